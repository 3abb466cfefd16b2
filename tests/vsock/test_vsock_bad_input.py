"""Bad vsock packets and peers: the spec's answer, one log line, and the device goes on serving (virtio 1.2 5.10.6)."""

from __future__ import annotations

import logging
import os
import socket

import pytest

from iovirt.virtio.vsock.connection import BUF_ALLOC
from iovirt.virtio.vsock.defs import (
    HDR,
    MAX_PKT_PAYLOAD,
    VIRTIO_VSOCK_OP_REQUEST,
    VIRTIO_VSOCK_OP_RESPONSE,
    VIRTIO_VSOCK_OP_RST,
    VIRTIO_VSOCK_OP_RW,
    VIRTIO_VSOCK_OP_SHUTDOWN,
)

from vsock_helpers import GUEST_CID, guest_connect, recv_exactly


def vsock_log_lines(caplog):
    return [r for r in caplog.records if r.name == "iovirt.virtio-vsock" and r.levelno >= logging.WARNING]


def still_serving(guest, served, port=3999, src_port=7999):
    """A fresh connection still works after the bad input."""
    host, _ = guest_connect(guest, served, port, src_port=src_port)
    guest.send(guest.header(src_port, port, VIRTIO_VSOCK_OP_RW, length=2), b"ok")
    assert recv_exactly(host, 2) == b"ok"


def test_short_header_is_dropped(served, guest, caplog):
    guest.send(HDR.pack(GUEST_CID, 2, 1, 2, 0, 1, 1, 0, 0, 0)[:30])
    assert guest.quiet(0.3) == []  # nobody to answer: no RST
    assert len(vsock_log_lines(caplog)) == 1 and "shorter than" in caplog.text
    still_serving(guest, served)


def test_wrong_src_cid_is_dropped(served, guest, caplog):
    hdr = guest.header(7000, 1000, VIRTIO_VSOCK_OP_REQUEST)
    hdr.src_cid = GUEST_CID + 1
    guest.send(hdr)
    assert guest.quiet(0.3) == []
    assert len(vsock_log_lines(caplog)) == 1 and "src_cid" in caplog.text
    still_serving(guest, served)


@pytest.mark.parametrize("field,value,words", [
    ("dst_cid", 7, "dst_cid 7"),
    ("type", 9, "unknown type 9"),
    ("op", 0, "unknown op 0"),
    ("op", 42, "unknown op 42"),
])
def test_bad_header_field_is_reset(served, guest, caplog, field, value, words):
    hdr = guest.header(7001, 1001, VIRTIO_VSOCK_OP_REQUEST)
    setattr(hdr, field, value)
    guest.send(hdr)
    rst, _ = guest.wait_op(VIRTIO_VSOCK_OP_RST, 7001)
    assert (rst.src_port, rst.dst_port, rst.dst_cid) == (1001, 7001, GUEST_CID)
    assert len(vsock_log_lines(caplog)) == 1 and words in caplog.text
    still_serving(guest, served)


def test_unknown_op_on_a_connection_resets_it(served, guest, caplog):
    host, _ = guest_connect(guest, served, 1100, src_port=7002)
    guest.send(guest.header(7002, 1100, 99))
    guest.wait_op(VIRTIO_VSOCK_OP_RST, 7002)
    assert host.recv(1) == b""
    assert len(vsock_log_lines(caplog)) == 1 and "unknown op 99" in caplog.text
    still_serving(guest, served)


def test_len_beyond_the_buffer_is_reset(served, guest, caplog):
    host, _ = guest_connect(guest, served, 1101, src_port=7003)
    guest.send(guest.header(7003, 1101, VIRTIO_VSOCK_OP_RW, length=100), b"x" * 10)
    guest.wait_op(VIRTIO_VSOCK_OP_RST, 7003)
    assert host.recv(1) == b""  # not one byte of the bad packet reached the host
    assert len(vsock_log_lines(caplog)) == 1 and "buffer holds 10 bytes" in caplog.text
    still_serving(guest, served)


def test_len_above_the_maximum_is_reset(served, guest, caplog):
    host, _ = guest_connect(guest, served, 1102, src_port=7004)
    big = b"y" * (MAX_PKT_PAYLOAD + 1)
    guest.send(guest.header(7004, 1102, VIRTIO_VSOCK_OP_RW, length=len(big)), big)
    guest.wait_op(VIRTIO_VSOCK_OP_RST, 7004)
    assert host.recv(1) == b""
    assert len(vsock_log_lines(caplog)) == 1 and "above the" in caplog.text
    still_serving(guest, served)


def test_credit_violation_is_reset(served, guest, caplog):
    host, _ = guest_connect(guest, served, 1103, src_port=7005)
    # The host does not read: the socket's kernel buffer fills, then the device's advertised buffer.
    sndbuf = int(open("/proc/sys/net/core/wmem_default").read()) * 2
    chunk = b"z" * MAX_PKT_PAYLOAD
    for _ in range((BUF_ALLOC + sndbuf) // MAX_PKT_PAYLOAD + 2):
        guest.send(guest.header(7005, 1103, VIRTIO_VSOCK_OP_RW, length=len(chunk)), chunk)
    guest.wait_op(VIRTIO_VSOCK_OP_RST, 7005)
    assert len(vsock_log_lines(caplog)) == 1 and "credit violation" in caplog.text
    assert not served.device.connections
    still_serving(guest, served)


def test_host_peer_vanishing_mid_stream_resets_the_guest(served, guest, caplog):
    host, _ = guest_connect(guest, served, 1104, src_port=7006)
    guest.send(guest.header(7006, 1104, VIRTIO_VSOCK_OP_RW, length=4), b"data")
    assert recv_exactly(host, 4) == b"data"
    guest.send(guest.header(7006, 1104, VIRTIO_VSOCK_OP_RW, length=4), b"more")
    host.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    host.close()  # with "more" unread: the device's next read or write fails
    guest.send(guest.header(7006, 1104, VIRTIO_VSOCK_OP_RW, length=4), b"gone")
    guest.wait_op(VIRTIO_VSOCK_OP_RST, 7006)
    assert not served.device.connections
    assert len(vsock_log_lines(caplog)) == 1 and "host peer gone" in caplog.text
    still_serving(guest, served)


def test_data_before_response_is_reset(served, guest, caplog):
    host = served.connect(55)
    req, _ = guest.wait_op(VIRTIO_VSOCK_OP_REQUEST, 55)
    guest.send(guest.header(55, req.src_port, VIRTIO_VSOCK_OP_RW, length=2), b"no")
    guest.wait_op(VIRTIO_VSOCK_OP_RST, 55)
    assert host.recv(16) == b""
    assert len(vsock_log_lines(caplog)) == 1
    still_serving(guest, served)


def test_response_for_no_connection_is_reset(served, guest, caplog):
    guest.send(guest.header(7007, 1105, VIRTIO_VSOCK_OP_RESPONSE))
    guest.wait_op(VIRTIO_VSOCK_OP_RST, 7007)
    assert vsock_log_lines(caplog) == []  # a stale packet is not an error (Linux sends these after a reset)
    still_serving(guest, served)


def test_unknown_shutdown_flags_reset(served, guest, caplog):
    host, _ = guest_connect(guest, served, 1106, src_port=7008)
    guest.send(guest.header(7008, 1106, VIRTIO_VSOCK_OP_SHUTDOWN, flags=0x10))
    guest.wait_op(VIRTIO_VSOCK_OP_RST, 7008)
    assert host.recv(1) == b""
    assert len(vsock_log_lines(caplog)) == 1 and "unknown flags" in caplog.text


@pytest.mark.parametrize("line", [b"HELLO 5\n", b"CONNECT x\n", b"CONNECT 99999999999\n", b"C" * 100])
def test_bad_connect_line_closes_the_host_socket(served, guest, caplog, line):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(served.uds)
    sock.sendall(line)
    try:
        assert sock.recv(16) == b""
    except ConnectionResetError:
        pass  # closed with our bytes unread: the kernel says reset, which is as good
    assert len(vsock_log_lines(caplog)) == 1
    assert guest.quiet(0.2) == []  # the guest heard nothing of it
    still_serving(guest, served)


def test_rx_buffer_too_small_for_a_header_comes_back_empty(served, caplog):
    from iovirt.vhost_user.driver import VhostUserDriver
    from iovirt.virtio.vsock.driver import VsockDriver
    guest = VsockDriver(VhostUserDriver(served.socket), GUEST_CID, rx_buffers=0)
    guest.rx.add_data([], [20])
    guest.rx.add_data([], [4096])
    guest.drv.kick(0)
    guest.send(guest.header(7009, 1107, VIRTIO_VSOCK_OP_REQUEST))  # a reply (RST) needs a buffer
    guest.wait_op(VIRTIO_VSOCK_OP_RST, 7009)
    assert len(vsock_log_lines(caplog)) == 1 and "cannot hold" in caplog.text
    still_serving(guest, served)
    guest.drv.close()


def test_guest_cid_must_not_be_reserved(tmp_path):
    from iovirt.virtio.vsock.device import VirtioVsock, VsockConfigError
    for cid in (0, 1, 2, 0xFFFFFFFF, 1 << 33):
        with pytest.raises(VsockConfigError):
            VirtioVsock(cid, str(tmp_path / "u"))
    assert not os.path.exists(tmp_path / "u")
