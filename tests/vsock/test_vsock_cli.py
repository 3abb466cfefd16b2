"""``iovirt serve --vsock``, ``[[vsock]]`` tables and ``iovirt vhost-user-vsock``."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from iovirt.vhost_user.driver import VhostUserDriver
from iovirt.vhost_user.specs import SpecError, load_config, parse_vsock
from iovirt.virtio.vsock.defs import CONFIG, VIRTIO_VSOCK_OP_REQUEST, VIRTIO_VSOCK_OP_RESPONSE, VIRTIO_VSOCK_OP_RW
from iovirt.virtio.vsock.driver import VsockDriver

ROOT = Path(__file__).resolve().parents[2]


def test_flag_and_table_mean_the_same(tmp_path):
    flag = parse_vsock("/run/v.sock,cid=7,uds=/run/vm.vsock")
    conf = tmp_path / "c.toml"
    conf.write_text('[[vsock]]\nsocket = "/run/v.sock"\ncid = 7\nuds = "/run/vm.vsock"\n')
    assert load_config(str(conf))["vsock"] == [flag]
    assert flag.options == {"cid": 7, "uds": "/run/vm.vsock"}


@pytest.mark.parametrize("text", ["/s,cid=7", "/s,uds=/u", ",cid=7,uds=/u", "/s,cid=1,uds=/u", "/s,cid=7,uds=/u,x=1"])
def test_bad_vsock_flags(text):
    with pytest.raises(SpecError):
        parse_vsock(text)


def test_table_without_uds_is_refused(tmp_path):
    conf = tmp_path / "c.toml"
    conf.write_text('[[vsock]]\nsocket = "/run/v.sock"\ncid = 7\n')
    with pytest.raises(SpecError, match="missing key 'uds'"):
        load_config(str(conf))


def run(argv, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "iovirt", *argv], env=env, stderr=subprocess.PIPE)


def wait_for(path, proc):
    for _ in range(200):
        if os.path.exists(path):
            return
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.05)
    raise AssertionError(f"{path} never appeared")


@pytest.mark.parametrize("program", ["serve", "vhost-user-vsock"])
def test_programs_serve_a_guest_connection(tmp_path, program):
    sock, uds = str(tmp_path / "v.sock"), str(tmp_path / "vm.vsock")
    argv = (["serve", "--vsock", f"{sock},cid=9,uds={uds}"] if program == "serve"
            else ["vhost-user-vsock", "--socket-path", sock, "--guest-cid", "9", "--uds-path", uds])
    proc = run(argv, tmp_path)
    try:
        wait_for(sock, proc)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(f"{uds}_1234")
        listener.listen(1)
        listener.settimeout(5)
        with VhostUserDriver(sock, timeout=10) as drv:
            assert CONFIG.unpack(drv.frontend.get_config(0, CONFIG.size)) == (9,)
            guest = VsockDriver(drv, 9)
            guest.send(guest.header(4000, 1234, VIRTIO_VSOCK_OP_REQUEST))
            guest.wait_op(VIRTIO_VSOCK_OP_RESPONSE, 4000)
            host, _ = listener.accept()
            host.sendall(b"hi")
            assert guest.wait_op(VIRTIO_VSOCK_OP_RW, 4000)[1] == b"hi"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err.decode()
    assert "Traceback" not in err.decode()


def test_print_capabilities():
    out = subprocess.run([sys.executable, "-m", "iovirt", "vhost-user-vsock", "--print-capabilities"],
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, check=True)
    assert json.loads(out.stdout)["type"] == "vsock"
