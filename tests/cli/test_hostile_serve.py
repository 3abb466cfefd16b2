"""Issue 12 against ``iovirt serve`` as a real process: fd exhaustion (failure 3), SIGTERM with a
stuck thread (failure 5), the fd limit raised at start, and the access options."""

from __future__ import annotations

import os
import resource
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time

import pytest

from iovirt.vhost_user.framing import Header, request_flags
from iovirt.vhost_user.frontend import VhostUserFrontend
from iovirt.vhost_user.messages import FrontendRequest
from iovirt.vhost_user.server import MAX_FDS_PER_MESSAGE

IOVIRT = [sys.executable, "-m", "iovirt"]
R = FrontendRequest


def start(args, sockets, nofile=None, python=None):
    """Start ``iovirt serve ARGS`` (or a ``python -c`` wrapper) and wait for its sockets."""
    def limit():
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, nofile)

    argv = [sys.executable, "-c", python, *args] if python else [*IOVIRT, "serve", *args]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=limit)
    deadline = time.monotonic() + 15
    while not all(os.path.exists(s) for s in sockets):
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline, "sockets never appeared"
        time.sleep(0.05)
    return proc


def stop(proc, timeout=15):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out.decode()


def test_trickled_fds_under_a_low_fd_limit_do_not_end_serve(tmp_path):
    """One message, one byte per sendmsg, 8 fds each, with 64 fds allowed: serve goes on accepting."""
    a, b = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
    proc = start(["--net", a, "--net", b], [a, b], nofile=(64, 64))
    fds = []
    try:
        for i in range(MAX_FDS_PER_MESSAGE):
            fds.append(os.memfd_create(f"trickle{i}"))
            os.ftruncate(fds[-1], 0x10000)
        message = Header(R.VHOST_USER_SET_MEM_TABLE, request_flags(), 8 + 32 * MAX_FDS_PER_MESSAGE).pack()
        message += bytes(8 + 32 * MAX_FDS_PER_MESSAGE)
        hostile = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        hostile.connect(a)
        try:
            for byte in message[:100]:  # never finished: its fds would all be held
                socket.send_fds(hostile, [bytes([byte])], fds)
                time.sleep(0.002)
        except (BrokenPipeError, ConnectionResetError):
            pass  # cut off: what the back-end should do
        # Hostile connection still open (if the back-end let it be): a new front-end is served.
        with VhostUserFrontend.connect(b, timeout=5.0) as front:
            assert front.get_features()
        hostile.close()
        with VhostUserFrontend.connect(a, timeout=5.0) as front:
            assert front.get_features()
        assert proc.poll() is None
    finally:
        for fd in fds:
            os.close(fd)
        code, out = stop(proc)
    assert code == 0, out
    assert "fds sent with byte 1 of a message" in out
    assert "Traceback" not in out


def test_serve_raises_its_soft_fd_limit(tmp_path):
    a = str(tmp_path / "a.sock")
    proc = start(["--net", a], [a], nofile=(256, 4096))
    try:
        limits = open(f"/proc/{proc.pid}/limits").read()
        line = next(l for l in limits.splitlines() if l.startswith("Max open files"))
        assert line.split()[3:5] == ["4096", "4096"], line
    finally:
        code, out = stop(proc)
    assert code == 0, out


STUCK_DATA_PLANE = textwrap.dedent("""
    import sys, threading
    from iovirt.vhost_user import dataplane

    def stuck(self):  # a data-plane thread that never comes back, holding the data-path lock
        with self.lock:
            threading.Event().wait()

    dataplane.DataPlane._run = stuck
    from iovirt.cli import main
    sys.exit(main(["serve", *sys.argv[1:]]))
""")


def test_sigterm_ends_serve_within_2s_with_a_stuck_thread(tmp_path):
    a = str(tmp_path / "a.sock")
    proc = start(["--net", a], [a], python=STUCK_DATA_PLANE)
    # The control thread takes the stuck lock for this connection's session and hangs too.
    front = VhostUserFrontend.connect(a, timeout=5.0)
    try:
        time.sleep(0.5)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError(f"still running 2 s after SIGTERM:\n{proc.communicate()[0].decode()}")
        took = time.monotonic() - sent
    finally:
        front.close()
    out = proc.communicate()[0].decode()
    assert took < 2.0
    assert "exiting without them" in out
    assert not os.path.exists(a)  # the socket file is removed all the same


def test_sigterm_ends_an_idle_serve_cleanly(tmp_path):
    a = str(tmp_path / "a.sock")
    proc = start(["--net", a], [a])
    sent = time.monotonic()
    code, out = stop(proc)
    assert code == 0 and time.monotonic() - sent < 2.0, out
    assert "exiting without them" not in out


def test_access_options(tmp_path):
    a = str(tmp_path / "a.sock")
    proc = start(["--net", a, "--socket-mode", "0660", "--allow-uid", "65534", "--allow-gid", "65533",
                  "--require-sealed-memory"], [a])
    try:
        assert stat.S_IMODE(os.stat(a).st_mode) == 0o660
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as me:  # our uid is no longer on the list
            me.connect(a)
            me.settimeout(5.0)
            assert me.recv(64) == b""
    finally:
        code, out = stop(proc)
    assert code == 0, out
    assert "front-ends allowed: uids 65534; gids 65533; socket mode 0660" in out
    assert f"refused a front-end (pid {os.getpid()}, uid {os.geteuid()}" in out


def test_bad_socket_mode_is_a_usage_error():
    out = subprocess.run([*IOVIRT, "serve", "--net", "x.sock", "--socket-mode", "rw"], capture_output=True, text=True)
    assert out.returncode == 2 and "--socket-mode" in out.stderr


def test_serve_help_explains_the_new_options():
    text = subprocess.run([*IOVIRT, "serve", "--help"], capture_output=True, text=True, check=True).stdout
    for option in ("--allow-uid", "--allow-gid", "--socket-mode", "--require-sealed-memory", "SIGTERM",
                   "RLIMIT_NOFILE"):
        assert option in text


@pytest.mark.parametrize("program", ["vhost-user-net", "vhost-user-blk"])
def test_backend_programs_take_the_access_options(tmp_path, program):
    sock = tmp_path / "p.sock"
    extra = [f"--blk-file={tmp_path / 'disk.img'}"] if program == "vhost-user-blk" else []
    if extra:
        (tmp_path / "disk.img").write_bytes(bytes(1 << 20))
    proc = subprocess.Popen([*IOVIRT, program, f"--socket-path={sock}", "--socket-mode=0640", f"--allow-gid={os.getegid()}",
                             "--require-sealed-memory", *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o640
        with VhostUserFrontend.connect(str(sock), timeout=5.0) as front:  # allowed by our gid
            assert front.get_features()
    finally:
        code, out = stop(proc)
    assert code == 0, out
    assert f"front-ends allowed: uids none; gids {os.getegid()}; socket mode 0640" in out
