"""A real Linux guest's AF_VSOCK streams through ``iovirt serve --vsock`` (issue 16, virtio 1.2 section 5.10).

Eight concurrent connections each way, 1 MiB in both directions on each,
byte-exact (md5): guest→host (the guest connects to CID 2, a host program
listens on ``<uds>_P``) and host→guest (a host program connects to ``<uds>``
with ``CONNECT P``, the guest listens).  The guest's side is Debian's socat.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import threading

import pytest

from iovirt.guest import Guest
from iovirt.guest.hostprog import program_files
from iovirt.guest.modules import VIRTIO_MODULES, VSOCK_MODULES
from iovirt.serve_process import ServeProcess

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86 is not installed"),
    pytest.mark.skipif(shutil.which("socat") is None, reason="socat is not installed (make deps)"),
]

BOOT = 180.0
CID = 7
CONNS = 8
SIZE = 1 << 20
G2H_PORT = 5000
H2G_PORT = 6000

GUEST_SCRIPT = f"""set -e
for i in $(seq 0 {CONNS - 1}); do head -c {SIZE} /dev/urandom > /tmp/s$i; done
for i in $(seq 0 {CONNS - 1}); do
  socat -t 120 - VSOCK-CONNECT:2:$(({G2H_PORT} + i)) < /tmp/s$i > /tmp/r$i &
done
wait
for i in $(seq 0 {CONNS - 1}); do
  echo "G2H $i sent $(md5sum < /tmp/s$i | cut -d' ' -f1) got $(md5sum < /tmp/r$i | cut -d' ' -f1)"
done
for i in $(seq 0 {CONNS - 1}); do
  socat -t 120 VSOCK-LISTEN:$(({H2G_PORT} + i)) - < /tmp/s$i > /tmp/q$i &
done
sleep 2
iovirt_wait_host listening
wait
for i in $(seq 0 {CONNS - 1}); do
  echo "H2G $i sent $(md5sum < /tmp/s$i | cut -d' ' -f1) got $(md5sum < /tmp/q$i | cut -d' ' -f1)"
done
"""


def exchange(sock: socket.socket, payload: bytes, results: dict, key: int) -> None:
    """Send ``payload`` and read until EOF at the same time; record the md5s."""
    def send():
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send)
    sender.start()
    got = bytearray()
    while chunk := sock.recv(1 << 16):
        got += chunk
    sender.join()
    sock.close()
    results[key] = (hashlib.md5(payload).hexdigest(), hashlib.md5(got).hexdigest(), len(got))


def read_line(sock: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        byte = sock.recv(1)
        assert byte, f"closed after {line!r}"
        line += byte
    return line


def test_guest_and_host_exchange_streams_both_ways(tmp_path):
    vhost, uds = tmp_path / "vsock.sock", str(tmp_path / "vm.vsock")
    srv = ServeProcess(("--vsock", f"{vhost},cid={CID},uds={uds}"), tmp_path / "serve.log", [vhost]).start()
    payloads = [os.urandom(SIZE) for _ in range(CONNS)]
    g2h: dict = {}
    h2g: dict = {}
    listeners = []
    for i in range(CONNS):
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lsock.bind(f"{uds}_{G2H_PORT + i}")
        lsock.listen(1)
        listeners.append(lsock)

    def serve_g2h(i):
        conn, _ = listeners[i].accept()
        exchange(conn, payloads[i], g2h, i)

    threads = [threading.Thread(target=serve_g2h, args=(i,), daemon=True) for i in range(CONNS)]
    for t in threads:
        t.start()
    extra = ("-chardev", f"socket,id=vs0,path={vhost}", "-device", "vhost-user-vsock-pci,chardev=vs0,vectors=0")
    try:
        with Guest(tmp_path, script=GUEST_SCRIPT, name="vsock", files=program_files("socat", "socat"),
                   modules=VIRTIO_MODULES + VSOCK_MODULES, extra_args=extra) as g:
            g.start()
            g.wait_for(r"IOVIRT-WAIT listening", timeout=BOOT)
            hosts = []
            for i in range(CONNS):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(120)
                sock.connect(uds)
                sock.sendall(f"CONNECT {H2G_PORT + i}\n".encode())
                assert re.fullmatch(rb"OK \d+\n", read_line(sock))
                hosts.append(sock)
            workers = [threading.Thread(target=exchange, args=(hosts[i], payloads[i], h2g, i)) for i in range(CONNS)]
            for w in workers:
                w.start()
            g.release("listening")
            result = g.wait_result(timeout=BOOT)
            for w in workers + threads:
                w.join(timeout=30)
    finally:
        code = srv.stop()
        assert code in (0, -signal.SIGKILL), srv.log()
    assert result.status == 0, result.console
    for direction, host_side in (("G2H", g2h), ("H2G", h2g)):
        for i in range(CONNS):
            m = re.search(rf"^{direction} {i} sent (\w+) got (\w+)", result.output, re.M)
            assert m, result.console
            host_sent, host_got, n = host_side[i]
            assert n == SIZE, (direction, i, n)
            assert m.group(2) == host_sent, (direction, i)  # what the host sent reached the guest
            assert host_got == m.group(1), (direction, i)  # what the guest sent reached the host
    assert "Traceback" not in srv.log()
