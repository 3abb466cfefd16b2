"""Shared by the vsock tests: the guest CID and small host-side helpers."""

from __future__ import annotations

from iovirt.virtio.vsock.defs import VIRTIO_VSOCK_OP_REQUEST, VIRTIO_VSOCK_OP_RESPONSE

GUEST_CID = 42


def recv_exactly(sock, n):
    """Read exactly ``n`` bytes from ``sock``."""
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, f"EOF after {len(data)} of {n} bytes"
        data += chunk
    return bytes(data)


def guest_connect(guest, served, port, src_port=5000, buf_alloc=256 << 10):
    """The guest connects to host port ``port``; returns the host's accepted socket and the RESPONSE header."""
    listener = served.listen(port)
    guest.send(guest.header(src_port, port, VIRTIO_VSOCK_OP_REQUEST, buf_alloc=buf_alloc))
    hdr, _ = guest.wait_op(VIRTIO_VSOCK_OP_RESPONSE, src_port)
    host, _ = listener.accept()
    host.settimeout(5)
    listener.close()
    return host, hdr
