"""The cross-process switch port (``iovirt/virtio/net/switch_link.py``) over a real SOCK_SEQPACKET pair.

Two switches joined by a link, each with a recording port: frames and their
pending checksums cross in batches, MACs are learned behind the link, a full
socket drops instead of blocking, a malformed datagram from the other end is
logged and dropped, and a closed link leaves its switch (forgetting its MACs).
"""

from __future__ import annotations

import logging
import socket
import threading

import pytest

from iovirt.virtio.net import datapath
from iovirt.virtio.net.switch import LearningSwitch
from iovirt.virtio.net.switch_link import COUNT, RECORD, Hub, LinkPort, encode, link_pair

A, B = bytes([2, 0, 0, 0, 0, 0xA]), bytes([2, 0, 0, 0, 0, 0xB])


class Recorder:
    """A switch port that keeps what it is given."""

    def __init__(self, name: str, switch: LearningSwitch) -> None:
        self.name = name
        self.got: list[tuple[bytes, tuple[int, int] | None]] = []
        switch.attach(self)

    def deliver(self, frame: bytes, csum: tuple[int, int] | None) -> bool:
        self.got.append((frame, csum))
        return True


def eth(dst: bytes, src: bytes, n: int = 0, size: int = 60) -> bytes:
    return (dst + src + b"\x88\xb5" + n.to_bytes(4, "big")).ljust(size, b"\0")


@pytest.fixture
def joined():
    left, right = LearningSwitch(), LearningSwitch()
    s0, s1 = link_pair()
    l0, l1 = LinkPort(s0, left, "left-link"), LinkPort(s1, right, "right-link")
    a, b = Recorder("a", left), Recorder("b", right)
    yield left, right, l0, l1, a, b
    for link in (l0, l1):
        if not link.closed:
            link.close()


def test_a_batch_crosses_in_one_datagram_with_its_checksums(joined):
    left, right, l0, l1, a, b = joined
    frames = datapath.Frames()
    sent = [(eth(b"\xff" * 6, A, i, 60 + i), (34, 16) if i % 2 else None) for i in range(100)]
    for frame, csum in sent:
        frames.append(frame, csum)
    left.forward_batch(a, frames)  # floods to the link
    assert l0.stats["tx_packets"] == 100
    l1.on_readable()
    assert b.got == sent
    assert right.lookup(A) is l1  # learned behind the link
    # The answer is switched on that entry back over the link, and A's switch learns B behind its link.
    right.forward(b, eth(A, B))
    l0.on_readable()
    assert a.got == [(eth(A, B), None)] and left.lookup(B) is l0


def test_large_frames_split_into_several_datagrams(joined):
    left, _, l0, l1, a, b = joined
    big = [eth(b"\xff" * 6, A, i, 9000) for i in range(20)]  # 180 kB: more than one datagram holds
    frames = datapath.Frames()
    for frame in big:
        frames.append(frame)
    left.forward_batch(a, frames)
    l1.on_readable()
    assert [f for f, _ in b.got] == big


def test_a_full_link_drops_instead_of_blocking(joined):
    left, _, l0, l1, a, b = joined
    l0.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sent = sum(l0.deliver(eth(b"\xff" * 6, A, i, 1500), None) for i in range(2000))
    assert 0 < sent < 2000 and l0.stats["tx_dropped"] == 2000 - sent
    l1.on_readable()
    while len(b.got) < sent:
        l1.on_readable()
    assert len(b.got) == sent


@pytest.mark.parametrize(
    "datagram,problem",
    [
        (b"\x01", "no frame count"),
        (COUNT.pack(0), "carries no frames"),
        (COUNT.pack(3) + RECORD.pack(60, 0, 0), "do not fit"),
        (COUNT.pack(1) + RECORD.pack(60, 0, 0) + bytes(59), "do not add up"),
        (COUNT.pack(1) + RECORD.pack(0x7FFFFFFF, 0, 0) + bytes(60), "do not add up"),
        (COUNT.pack(2) + RECORD.pack(6, 0, 0) + RECORD.pack(60, 0, 0) + bytes(66), "shorter than an Ethernet header"),
    ],
)
def test_a_malformed_datagram_is_logged_and_dropped(joined, caplog, datagram, problem):
    _, _, l0, l1, _, b = joined
    caplog.set_level(logging.WARNING, logger="iovirt")
    l0.sock.send(datagram)
    l0.sock.send(encode([eth(B, A)], [None]))  # what follows still gets through
    l1.on_readable()
    assert b.got == [(eth(B, A), None)]
    assert l1.stats["rx_malformed"] == 1
    assert any(problem in r.getMessage() and "right-link" in r.getMessage() for r in caplog.records)


def test_the_other_end_closing_calls_back_once_and_close_forgets_the_macs(joined):
    left, right, l0, l1, a, b = joined
    closed = []
    l1.on_closed = lambda: closed.append(1)
    left.forward(a, eth(b"\xff" * 6, A))
    l1.on_readable()
    assert right.lookup(A) is l1
    l0.close()
    l1.on_readable()
    l1.on_readable()
    assert closed == [1]
    l1.close()
    assert right.lookup(A) is None and l1 not in right.ports
    assert not l1.deliver(eth(A, B), None)  # a closed link drops


def test_a_workers_hub_sends_everything_to_the_other_port():
    hub, switch = Hub(), LearningSwitch()
    s0, s1 = link_pair()
    uplink, port = LinkPort(s0, hub, "uplink"), LinkPort(s1, switch, "worker")
    device = Recorder("device", hub)
    other = Recorder("other", switch)
    frames = datapath.Frames()
    for i in range(3):
        frames.append(eth(B, A, i), (34, 16))
    hub.forward_batch(device, frames)  # all of it to the uplink, nothing learned in the hub
    port.on_readable()
    assert other.got == [(eth(B, A, i), (34, 16)) for i in range(3)] and not hub.table
    assert switch.lookup(A) is port
    switch.forward(other, eth(A, B))
    uplink.on_readable()
    assert device.got == [(eth(A, B), None)]
    assert hub.forward(device, b"short") == 0
    uplink.close()
    port.close()


def test_an_uplink_waits_for_room_before_it_drops(joined):
    _, _, l0, l1, _, b = joined
    sent = 0
    while l0.deliver(eth(b"\xff" * 6, A, sent), None):
        sent += 1
    assert sent and l0.stats["tx_dropped"] == 1  # full: without a wait the next frame is dropped
    l0.send_wait_s = 5.0
    # The other end drains a moment later (the kernel reports room once 3/4 of the send buffer is free).
    drain = threading.Timer(0.1, lambda: [l1.on_readable() for _ in range(sent // 16 + 1)])
    drain.start()
    assert l0.deliver(eth(b"\xff" * 6, A, sent), None)  # waited for room instead of dropping
    drain.join()
    assert l0.stats["tx_dropped"] == 1 and b.got
