"""virtio-vsock streams between iovirt's driver side and host UNIX sockets (virtio 1.2 section 5.10)."""

from __future__ import annotations

import hashlib
import os
import threading

from iovirt.virtio.vsock.connection import BUF_ALLOC
from iovirt.virtio.vsock.defs import (
    CONFIG,
    VIRTIO_VSOCK_EVENT_TRANSPORT_RESET,
    VIRTIO_VSOCK_OP_CREDIT_REQUEST,
    VIRTIO_VSOCK_OP_CREDIT_UPDATE,
    VIRTIO_VSOCK_OP_REQUEST,
    VIRTIO_VSOCK_OP_RESPONSE,
    VIRTIO_VSOCK_OP_RST,
    VIRTIO_VSOCK_OP_RW,
    VIRTIO_VSOCK_OP_SHUTDOWN,
    VIRTIO_VSOCK_SHUTDOWN_F_SEND,
    VIRTIO_VSOCK_SHUTDOWN_MASK,
    VIRTIO_VSOCK_TYPE_STREAM,
    VMADDR_CID_HOST,
)

from vsock_helpers import GUEST_CID, guest_connect, recv_exactly


def test_config_is_the_guest_cid(served, guest):
    assert CONFIG.unpack(guest.drv.frontend.get_config(0, CONFIG.size)) == (GUEST_CID,)


def test_guest_connect_exchanges_data_both_ways(served, guest):
    host, hdr = guest_connect(guest, served, 1234)
    assert (hdr.src_cid, hdr.dst_cid, hdr.src_port, hdr.dst_port) == (VMADDR_CID_HOST, GUEST_CID, 1234, 5000)
    assert hdr.type == VIRTIO_VSOCK_TYPE_STREAM and hdr.len == 0 and hdr.buf_alloc == BUF_ALLOC
    guest.send(guest.header(5000, 1234, VIRTIO_VSOCK_OP_RW, length=5), b"hello")
    assert recv_exactly(host, 5) == b"hello"
    host.sendall(b"world!")
    hdr, data = guest.wait_op(VIRTIO_VSOCK_OP_RW, 5000)
    assert data == b"world!" and hdr.len == 6


def test_connect_to_a_port_nobody_listens_on_is_reset(served, guest):
    guest.send(guest.header(5001, 999, VIRTIO_VSOCK_OP_REQUEST))
    hdr, _ = guest.wait_op(VIRTIO_VSOCK_OP_RST, 5001)
    assert (hdr.src_port, hdr.dst_port, hdr.dst_cid) == (999, 5001, GUEST_CID)


def test_host_connect_reaches_the_guest_listener(served, guest):
    host = served.connect(77)
    req, _ = guest.wait_op(VIRTIO_VSOCK_OP_REQUEST, 77)
    assert (req.src_cid, req.dst_cid, req.type) == (VMADDR_CID_HOST, GUEST_CID, VIRTIO_VSOCK_TYPE_STREAM)
    guest.send(guest.header(77, req.src_port, VIRTIO_VSOCK_OP_RESPONSE))
    assert recv_exactly(host, len(f"OK {req.src_port}\n")) == f"OK {req.src_port}\n".encode()
    host.sendall(b"ping")
    _, data = guest.wait_op(VIRTIO_VSOCK_OP_RW, 77)
    assert data == b"ping"
    guest.send(guest.header(77, req.src_port, VIRTIO_VSOCK_OP_RW, length=4), b"pong")
    assert recv_exactly(host, 4) == b"pong"


def test_host_connect_refused_by_the_guest_closes_the_socket(served, guest):
    host = served.connect(78)
    req, _ = guest.wait_op(VIRTIO_VSOCK_OP_REQUEST, 78)
    guest.send(guest.header(78, req.src_port, VIRTIO_VSOCK_OP_RST))
    assert host.recv(16) == b""


def test_credit_is_respected_and_requested(served, guest):
    host, _ = guest_connect(guest, served, 1235, src_port=5002, buf_alloc=1000)
    host.sendall(os.urandom(5000))
    got = bytearray()
    hdr, data = guest.wait_op(VIRTIO_VSOCK_OP_RW, 5002)
    got += data
    while len(got) < 1000:
        got += guest.wait_op(VIRTIO_VSOCK_OP_RW, 5002)[1]
    assert len(got) == 1000  # never more than the advertised buf_alloc
    guest.wait_op(VIRTIO_VSOCK_OP_CREDIT_REQUEST, 5002)
    assert not [p for p in guest.quiet(0.3) if p[0].op == VIRTIO_VSOCK_OP_RW]
    guest.send(guest.header(5002, 1235, VIRTIO_VSOCK_OP_CREDIT_UPDATE, buf_alloc=1000, fwd_cnt=1000))
    more = bytearray()
    while len(more) < 1000:
        more += guest.wait_op(VIRTIO_VSOCK_OP_RW, 5002)[1]
    assert len(more) == 1000


def test_device_advertises_freed_space(served, guest):
    """The guest fills our buffer; once the host reads, a CREDIT_UPDATE (or any packet) carries the new fwd_cnt."""
    host, _ = guest_connect(guest, served, 1236, src_port=5003)
    chunk = os.urandom(60000)
    sent = 0
    while sent + len(chunk) <= BUF_ALLOC:
        guest.send(guest.header(5003, 1236, VIRTIO_VSOCK_OP_RW, length=len(chunk)), chunk)
        sent += len(chunk)
    assert recv_exactly(host, sent) == chunk * (sent // len(chunk))
    hdr, _ = guest.wait_op(VIRTIO_VSOCK_OP_CREDIT_UPDATE, 5003)
    assert 0 < hdr.fwd_cnt <= sent and hdr.buf_alloc == BUF_ALLOC
    assert BUF_ALLOC - (sent - hdr.fwd_cnt) >= BUF_ALLOC // 2  # the guest may send again


def test_credit_request_is_answered(served, guest):
    guest_connect(guest, served, 1237, src_port=5004)
    guest.send(guest.header(5004, 1237, VIRTIO_VSOCK_OP_CREDIT_REQUEST))
    hdr, _ = guest.wait_op(VIRTIO_VSOCK_OP_CREDIT_UPDATE, 5004)
    assert hdr.buf_alloc == BUF_ALLOC and hdr.fwd_cnt == 0


def test_shutdown_both_directions(served, guest):
    host, _ = guest_connect(guest, served, 1238, src_port=5005)
    guest.send(guest.header(5005, 1238, VIRTIO_VSOCK_OP_RW, length=3), b"abc")
    guest.send(guest.header(5005, 1238, VIRTIO_VSOCK_OP_SHUTDOWN, flags=VIRTIO_VSOCK_SHUTDOWN_F_SEND))
    assert recv_exactly(host, 3) == b"abc"
    assert host.recv(1) == b""  # the guest's SHUTDOWN(SEND) became SHUT_WR after the data
    host.sendall(b"tail")
    host.shutdown(2 - 1)  # SHUT_WR
    assert guest.wait_op(VIRTIO_VSOCK_OP_RW, 5005)[1] == b"tail"
    hdr, _ = guest.wait_op(VIRTIO_VSOCK_OP_SHUTDOWN, 5005)
    assert hdr.flags & VIRTIO_VSOCK_SHUTDOWN_F_SEND
    guest.wait_op(VIRTIO_VSOCK_OP_RST, 5005)  # both directions over: the connection ends
    assert not served.device.connections


def test_guest_close_gets_rst_and_closes_the_host_socket(served, guest):
    host, _ = guest_connect(guest, served, 1239, src_port=5006)
    guest.send(guest.header(5006, 1239, VIRTIO_VSOCK_OP_SHUTDOWN, flags=VIRTIO_VSOCK_SHUTDOWN_MASK))
    guest.wait_op(VIRTIO_VSOCK_OP_RST, 5006)
    assert host.recv(1) == b""


def test_guest_rst_closes_the_host_socket(served, guest):
    host, _ = guest_connect(guest, served, 1240, src_port=5007)
    guest.send(guest.header(5007, 1240, VIRTIO_VSOCK_OP_RST))
    assert host.recv(1) == b""
    assert not [p for p in guest.quiet(0.2) if p[0].op == VIRTIO_VSOCK_OP_RST]  # an RST is never answered


def test_many_connections_carry_data_in_order(served, guest):
    n, size = 8, 200_000
    payloads = [os.urandom(size) for _ in range(n)]
    hosts = [guest_connect(guest, served, 2000 + i, src_port=6000 + i)[0] for i in range(n)]
    received = {}

    def drain(i):
        received[i] = recv_exactly(hosts[i], size)
        hosts[i].sendall(payloads[i][::-1])

    threads = [threading.Thread(target=drain, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    offsets = [0] * n
    fwd = [0] * n
    back = [bytearray() for _ in range(n)]
    while any(o < size for o in offsets) or any(len(b) < size for b in back):
        for i in range(n):
            # send within the device's credit: what it holds is what we sent minus its last fwd_cnt
            if offsets[i] < size and offsets[i] - fwd[i] < BUF_ALLOC - 4096:
                piece = payloads[i][offsets[i]:offsets[i] + 4096]
                guest.send(guest.header(6000 + i, 2000 + i, VIRTIO_VSOCK_OP_RW, length=len(piece),
                                        fwd_cnt=len(back[i])), piece)
                offsets[i] += len(piece)
        guest._collect()
        for hdr, data in guest.received:
            i = hdr.dst_port - 6000
            fwd[i] = max(fwd[i], hdr.fwd_cnt)
            if hdr.op == VIRTIO_VSOCK_OP_RW:
                back[i] += data
            if hdr.op == VIRTIO_VSOCK_OP_CREDIT_REQUEST:
                guest.send(guest.header(6000 + i, 2000 + i, VIRTIO_VSOCK_OP_CREDIT_UPDATE, fwd_cnt=len(back[i])))
        guest.received.clear()
    for t in threads:
        t.join(timeout=10)
    for i in range(n):
        assert hashlib.md5(received[i]).digest() == hashlib.md5(payloads[i]).digest()
        assert bytes(back[i]) == payloads[i][::-1]


def test_device_reset_resets_connections_and_posts_transport_reset(served, guest):
    host, _ = guest_connect(guest, served, 1241, src_port=5008)
    guest.drv.frontend.reset_device()
    assert host.recv(1) == b""
    assert not served.device.connections
    guest2 = type(guest)(guest.drv, GUEST_CID)
    assert guest2.events() == [VIRTIO_VSOCK_EVENT_TRANSPORT_RESET]


def test_transport_reset_reaches_the_event_queue(served, guest):
    host, _ = guest_connect(guest, served, 1242, src_port=5009)
    with served.server.dataplane.lock:
        served.device.transport_reset()
    assert guest.events() == [VIRTIO_VSOCK_EVENT_TRANSPORT_RESET]
    assert host.recv(1) == b""
