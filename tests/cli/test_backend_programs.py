"""vhost-user.rst "Backend program conventions" for ``iovirt vhost-user-net`` / ``vhost-user-blk``,
and ``iovirt serve``'s command line: real processes, real sockets."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from iovirt.vhost_user.driver import VhostUserDriver

IOVIRT = [sys.executable, "-m", "iovirt"]


def wait_for(path, proc, timeout=15):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=15)
    return proc.returncode, out.decode()


@pytest.mark.parametrize("program,kind", [("vhost-user-net", "net"), ("vhost-user-blk", "block")])
def test_print_capabilities(program, kind):
    out = subprocess.run([*IOVIRT, program, "--print-capabilities"], capture_output=True, text=True, check=True)
    caps = json.loads(out.stdout)
    assert caps["type"] == kind and isinstance(caps.get("features", []), list)


def test_blk_program_serves_and_exits_cleanly_on_sigterm(tmp_path):
    sock, image = tmp_path / "b.sock", tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    proc = subprocess.Popen([*IOVIRT, "vhost-user-blk", f"--socket-path={sock}", f"--blk-file={image}", "--read-only"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for(sock, proc)
        with VhostUserDriver(str(sock)) as drv:
            assert drv.features >> 5 & 1  # VIRTIO_BLK_F_RO
            assert int.from_bytes(drv.frontend.get_config(0, 8), "little") == (1 << 20) // 512
    finally:
        code, out = stop(proc)
    assert code == 0, out
    assert "front-end connected" in out and "negotiated features" in out
    assert not sock.exists()  # the socket file is removed on exit


def test_net_program_on_an_inherited_listening_fd(tmp_path):
    path = tmp_path / "n.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    proc = subprocess.Popen([*IOVIRT, "vhost-user-net", f"--fd={listener.fileno()}"], pass_fds=[listener.fileno()],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    listener.close()
    try:
        with VhostUserDriver(str(path)) as drv:
            assert drv.frontend.get_queue_num() == 1
    finally:
        code, out = stop(proc)
    assert code == 0, out


def test_net_program_on_an_inherited_connected_fd():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proc = subprocess.Popen([*IOVIRT, "vhost-user-net", f"--fd={theirs.fileno()}"], pass_fds=[theirs.fileno()],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    theirs.close()
    try:
        from iovirt.vhost_user.frontend import VhostUserFrontend

        with VhostUserFrontend(ours) as front:
            assert front.get_features() >> 32 & 1  # VERSION_1
    finally:
        code, out = stop(proc)
    assert code == 0, out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["vhost-user-blk", "--socket-path=/tmp/x.sock"], "--blk-file is required"),
        (["vhost-user-net"], "--socket-path or --fd is required"),
        (["serve"], "at least one --net"),
        (["serve", "--blk", "only-a-socket"], "SOCKET,IMAGE"),
        (["serve", "--blk", "s.sock,img,bogus=1"], "unknown option"),
        (["vhost-user-blk", "--socket-path=/tmp/iovirt-nope.sock", "--blk-file=/nonexistent/disk.img"], "No such file"),
    ],
)
def test_bad_command_lines_say_what_is_wrong(argv, message):
    out = subprocess.run([*IOVIRT, *argv], capture_output=True, text=True, timeout=30)
    assert out.returncode in (1, 2)
    assert message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_serve_refuses_a_path_that_is_not_a_socket(tmp_path):
    plain = tmp_path / "file"
    plain.write_text("x")
    out = subprocess.run([*IOVIRT, "serve", "--net", str(plain)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "is not a socket" in out.stderr
    assert plain.read_text() == "x"
