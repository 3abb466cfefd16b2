"""virtio-net through the real ``VhostUserServer``: two ports of the learning switch.

Two :class:`VhostUserDriver` front-ends, one on each net socket, play the
guests: what port 0 puts on a transmit queue (a 12-byte ``virtio_net_hdr``
and an Ethernet frame, virtio 1.2 5.1.6) comes out of port 1's receive
buffers, and the vhost-user rules of QEMU's ``docs/interop/vhost-user.rst``
that touch the data path hold: ring enable, GET_VRING_BASE, multiqueue,
SEND_RARP and NET_SET_MTU.
"""

from __future__ import annotations

import select
import struct
import time

import pytest

from iovirt.memory import BumpAllocator
from iovirt.vhost_user.bringup import start_vring
from iovirt.vhost_user.driver import VhostUserDriver
from iovirt.vhost_user.errors import NackError
from iovirt.vhost_user.frontend import VhostUserFrontend
from iovirt.vhost_user.messages import VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES
from iovirt.virtio.defs import VIRTIO_F_EVENT_IDX, VIRTIO_F_RING_PACKED
from iovirt.virtio.driver import DriverQueue
from iovirt.virtio.net.defs import (
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    NetHdr,
)

from backend_helpers import log_line, wait_until

ALL = (1 << 64) - 1
MAC = [bytes([0x02, 0, 0, 0, 0, 0xA0 + i]) for i in range(2)]
BROADCAST = b"\xff" * 6
HDR = 12  # virtio_net_hdr with num_buffers (VERSION_1)


# -- helpers -------------------------------------------------------------------------


def endpoint(backend, path: str):
    return next(e for e in backend.server.endpoints if e.path == path)



def port(backend, i: int, features: int = ALL, queues=(0, 1), size: int = 64) -> VhostUserDriver:
    path = backend.net_paths[i]
    assert wait_until(lambda: endpoint(backend, path).connection is None)
    drv = VhostUserDriver(path, features=features, memory_size=8 << 20)
    drv.start_queues(list(queues), size=size)
    return drv


def eth(dst: bytes, src: bytes, payload: bytes = bytes(range(50)), ethertype: int = 0x88B5) -> bytes:
    return dst + src + ethertype.to_bytes(2, "big") + payload


def send(drv: VhostUserDriver, frame: bytes, queue: int = 1, hdr: NetHdr = NetHdr()) -> None:
    """Transmit one frame and wait until the device returned its buffer."""
    drv.queues[queue].add_data([hdr.pack() + frame])
    drv.kick(queue)
    assert drv.frontend.wait_call(queue, timeout=5)
    assert len(drv.queues[queue].get_used()) == 1


def post_rx(drv: VhostUserDriver, count: int, size: int = 2048, queue: int = 0) -> None:
    for _ in range(count):
        drv.queues[queue].add_data([], [size])
    drv.kick(queue)


def receive(drv: VhostUserDriver, count: int = 1, queues=(0,), timeout: float = 5.0) -> list[tuple[NetHdr, bytes, int]]:
    """``count`` frames as (header, frame, queue), merging MRG_RXBUF buffers by num_buffers."""
    frames: list[tuple[NetHdr, bytes, int]] = []
    pending: dict[int, list] = {q: [] for q in queues}
    deadline = time.monotonic() + timeout
    while len(frames) < count:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"{len(frames)} of {count} frames arrived"
        fds = {drv.frontend.call_fds[q]: q for q in queues}
        readable, _, _ = select.select(list(fds), [], [], remaining)
        for fd in readable:
            drv.frontend.wait_call(fds[fd], timeout=0)
            q = fds[fd]
            for used in drv.queues[q].get_used():
                pending[q].append(used.data)
                hdr = NetHdr.unpack(pending[q][0][:HDR])
                if len(pending[q]) == hdr.num_buffers:
                    frames.append((hdr, b"".join(pending[q])[HDR:], q))
                    pending[q] = []
    return frames


def nothing_received(drv: VhostUserDriver, queue: int = 0) -> bool:
    return not drv.frontend.wait_call(queue, timeout=0.2) and drv.queues[queue].used_idx() == 0




@pytest.fixture
def pair(backend):
    a, b = port(backend, 0), port(backend, 1)
    yield a, b
    a.close()
    b.close()


# -- switching -----------------------------------------------------------------------


def test_broadcast_then_learned_unicast(backend, pair):
    a, b = pair
    post_rx(a, 4)
    post_rx(b, 4)
    hello = eth(BROADCAST, MAC[0])
    send(a, hello)
    ((hdr, frame, _),) = receive(b)
    assert frame == hello and hdr == NetHdr(num_buffers=1)
    # Port 1 answers port 0 by unicast: MAC[0] was learned from the broadcast.
    reply = eth(MAC[0], MAC[1], b"reply".ljust(50, b"\0"))
    send(b, reply)
    assert receive(a)[0][1] == reply
    assert backend.switch.lookup(MAC[0]) is backend.net[0]
    assert backend.switch.lookup(MAC[1]) is backend.net[1]
    forwarded = backend.switch.forwarded
    unicast = eth(MAC[1], MAC[0], b"unicast".ljust(50, b"\0"))
    send(a, unicast)
    assert receive(b)[0][1] == unicast
    assert backend.switch.forwarded == forwarded + 1  # switched, not flooded


def test_frames_arrive_in_order(backend, pair):
    a, b = pair
    post_rx(b, 32)
    frames = [eth(BROADCAST, MAC[0], bytes([i]) * 60) for i in range(20)]
    for f in frames:
        a.queues[1].add_data([NetHdr().pack() + f])
    a.kick(1)
    assert [f for _, f, _ in receive(b, 20)] == frames


def test_mergeable_rx_buffers_span_a_frame(backend):
    with port(backend, 0) as a, port(backend, 1) as b:
        assert b.features >> VIRTIO_NET_F_MRG_RXBUF & 1
        post_rx(b, 8, size=64)
        big = eth(BROADCAST, MAC[0], bytes(range(186)))  # 200 bytes + 12 of header: 4 buffers
        send(a, big)
        ((hdr, frame, _),) = receive(b)
        assert hdr.num_buffers == 4 and frame == big
        assert b.queues[0].used_idx() == 4


def test_without_mrg_rxbuf_one_buffer_per_frame(backend, logs_info):
    with port(backend, 0) as a, port(backend, 1, features=ALL & ~(1 << VIRTIO_NET_F_MRG_RXBUF)) as b:
        assert not b.features >> VIRTIO_NET_F_MRG_RXBUF & 1
        post_rx(b, 1, size=64)
        post_rx(b, 1, size=2048)
        big = eth(BROADCAST, MAC[0], bytes(range(186)))
        send(a, big)
        send(a, big)
        assert wait_until(lambda: b.queues[0].used_idx() == 2)
        dropped, delivered = b.queues[0].get_used()
        # 5.1.6.3.1: a buffer too small for the whole frame is returned empty, the frame dropped.
        assert dropped.len == 0
        hdr = NetHdr.unpack(delivered.data[:HDR])
        assert hdr.num_buffers == 1 and delivered.data[HDR:] == big
        assert backend.net[1].stats["rx_dropped"] == 1
        # Bad driver input is logged (the buffer size and the frame size, or at least the drop).
        assert any(
            "net1" in r.getMessage() and ("too small" in r.getMessage() or "dropped" in r.getMessage())
            for r in logs_info.records
        ), [r.getMessage() for r in logs_info.records]


# -- checksum offload ---------------------------------------------------------------------


def ones_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def udp_frame_with_partial_csum() -> tuple[bytes, bytes, bytes]:
    """An IPv4/UDP frame whose checksum field holds the pseudo-header sum (Linux CHECKSUM_PARTIAL)."""
    src, dst = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
    data = b"iovirt checksum offload test!"
    udp_len = 8 + len(data)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 1, 0, 64, 17, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", ~ones_sum(ip) & 0xFFFF) + ip[12:]
    pseudo = src + dst + struct.pack("!BBH", 0, 17, udp_len)
    udp = struct.pack("!HHHH", 1234, 5678, udp_len, ones_sum(pseudo)) + data
    return eth(BROADCAST, MAC[0], ip + udp, ethertype=0x0800), pseudo, udp


CSUM = NetHdr(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=14 + 20, csum_offset=6)


def test_partial_checksum_completed_for_a_receiver_without_guest_csum(backend):
    with port(backend, 0) as a, port(backend, 1, features=ALL & ~(1 << VIRTIO_NET_F_GUEST_CSUM)) as b:
        post_rx(b, 1)
        frame, pseudo, udp = udp_frame_with_partial_csum()
        send(a, frame, hdr=CSUM)
        ((hdr, got, _),) = receive(b)
        assert hdr.flags == 0
        assert got[:40] == frame[:40] and got[42:] == frame[42:]  # only the UDP checksum changed
        assert got[40:42] != frame[40:42]
        assert ones_sum(pseudo + got[34:]) == 0xFFFF  # RFC 768: the checksum verifies


def test_partial_checksum_passed_through_with_guest_csum(backend):
    with port(backend, 0) as a, port(backend, 1) as b:
        assert b.features >> VIRTIO_NET_F_GUEST_CSUM & 1
        post_rx(b, 1)
        frame, _, _ = udp_frame_with_partial_csum()
        send(a, frame, hdr=CSUM)
        ((hdr, got, _),) = receive(b)
        assert (hdr.flags, hdr.csum_start, hdr.csum_offset) == (VIRTIO_NET_HDR_F_NEEDS_CSUM, 34, 6)
        assert got == frame


# -- ring enable, GET_VRING_BASE ------------------------------------------------------


def test_disabled_tx_ring_drops(backend, pair):
    a, b = pair
    post_rx(b, 2)
    a.frontend.set_vring_enable(1, False)
    send(a, eth(BROADCAST, MAC[0]))  # the buffer comes back; the frame goes nowhere
    assert nothing_received(b)
    assert backend.net[0].stats["tx_dropped"] == 1
    a.frontend.set_vring_enable(1, True)
    fresh = eth(BROADCAST, MAC[0], b"after".ljust(50, b"\0"))
    send(a, fresh)
    assert receive(b)[0][1] == fresh


def test_disabled_rx_ring_delivers_nothing(backend, pair):
    a, b = pair
    post_rx(b, 2)
    b.frontend.set_vring_enable(0, False)
    send(a, eth(BROADCAST, MAC[0]))
    assert nothing_received(b)
    b.frontend.set_vring_enable(0, True)
    fresh = eth(BROADCAST, MAC[0], b"after".ljust(50, b"\0"))
    send(a, fresh)
    got = []
    assert wait_until(lambda: got.extend(b.queues[0].get_used()) or any(u.data[HDR:] == fresh for u in got))


def test_get_vring_base_stops_the_ring_and_returns_next_avail(backend, pair):
    a, b = pair
    post_rx(b, 8)
    for i in range(3):
        send(a, eth(BROADCAST, MAC[0], bytes([i]) * 50))
    receive(b, 3)
    assert a.frontend.get_vring_base(1) == 3
    assert b.frontend.get_vring_base(0) == 3  # 3 of the 8 RX buffers consumed
    # Stopped: a fourth frame stays in the avail ring, unprocessed.
    a.queues[1].add_data([NetHdr().pack() + eth(BROADCAST, MAC[0], b"4".ljust(50, b"\0"))])
    a.queues[1].publish()
    a.frontend.kick(1)
    assert not a.frontend.wait_call(1, timeout=0.2)
    assert a.queues[1].used_idx() == 3
    # Restarted from the returned base (QEMU's order), the ring picks the fourth frame up.
    queue = b.queues[0]
    start_vring(b.frontend, 0, queue.size, queue.desc_addr, queue.avail_addr, queue.used_addr, base=3)
    queue = a.queues[1]
    start_vring(a.frontend, 1, queue.size, queue.desc_addr, queue.avail_addr, queue.used_addr, base=3)
    ((_, got, _),) = receive(b)
    assert got[14:15] == b"4"
    assert wait_until(lambda: a.queues[1].used_idx() == 4)


# -- multiqueue ------------------------------------------------------------------------------


def test_both_queue_pairs_forward(backend):
    with port(backend, 0, queues=(0, 1, 2, 3)) as a, port(backend, 1, queues=(0, 1, 2, 3)) as b:
        assert b.frontend.get_queue_num() == 2
        post_rx(b, 16, queue=0)
        post_rx(b, 16, queue=2)
        frames = {}
        for tx in (1, 3):
            for i in range(4):
                f = eth(BROADCAST, MAC[0], bytes([tx, i]) * 25)
                frames[f] = tx
                send(a, f, queue=tx)
        got = receive(b, 8, queues=(0, 2))
        assert sorted(f for _, f, _ in got) == sorted(frames)
        assert backend.net[0].stats["tx_packets"] == 8


# -- SEND_RARP, NET_SET_MTU ----------------------------------------------------------------------


def test_send_rarp_teaches_the_switch(backend, pair):
    a, b = pair
    post_rx(a, 2)
    post_rx(b, 2)
    moved = bytes([0x02, 0x11, 0x22, 0x33, 0x44, 0x55])
    a.frontend.send_rarp(moved)
    ((_, rarp, _),) = receive(b)
    assert rarp[:12] == BROADCAST + moved and rarp[12:14] == b"\x80\x35"
    assert backend.switch.lookup(moved) is backend.net[0]
    unicast = eth(moved, MAC[1])
    send(b, unicast)
    assert receive(a)[0][1] == unicast


@pytest.mark.parametrize("mtu", [68, 1500, 9000, 65535])
def test_mtu_in_range_accepted(backend, pair, mtu):
    a, _ = pair
    a.frontend.net_set_mtu(mtu)
    assert backend.net[0].mtu == mtu


@pytest.mark.parametrize("mtu", [0, 67, 65536, 1 << 40])
def test_mtu_out_of_range_nacked(backend, pair, logs_info, mtu):
    a, _ = pair
    with pytest.raises(NackError):
        a.frontend.net_set_mtu(mtu)
    assert backend.net[0].mtu == 1500
    assert any(f"MTU {mtu} outside [68, 65535]" in r.getMessage() for r in logs_info.records)
    assert a.frontend.get_queue_num() == 2


# -- without VHOST_USER_F_PROTOCOL_FEATURES ------------------------------------------------------


def test_without_protocol_features_rings_are_enabled_when_started(backend):
    # vhost-user.rst "Ring states": without the feature a ring is enabled as
    # soon as it starts; there is no SET_VRING_ENABLE.
    b = port(backend, 1)
    post_rx(b, 1)
    front = VhostUserFrontend.connect(backend.net_paths[0], timeout=5.0)
    try:
        front.add_region(0, 1 << 20)
        offered = front.get_features()
        front.set_owner()
        # Not VHOST_F_LOG_ALL either: a VMM asks for dirty logging only while migrating; and
        # not VIRTIO_F_RING_PACKED: the ring below is a split one.
        front.set_features(offered & ~(1 << VHOST_USER_F_PROTOCOL_FEATURES | 1 << VIRTIO_F_EVENT_IDX | 1 << VHOST_F_LOG_ALL
                                       | 1 << VIRTIO_F_RING_PACKED))
        front.set_mem_table()
        tx = DriverQueue(front.memory, BumpAllocator(0x1000, (1 << 20) - 0x1000), 8, index=1)
        start_vring(front, 1, 8, tx.desc_addr, tx.avail_addr, tx.used_addr)
        hello = eth(BROADCAST, MAC[0])
        tx.add_data([NetHdr().pack() + hello])
        tx.publish()
        front.kick(1)
        assert front.wait_call(1, timeout=5)
        assert receive(b)[0][1] == hello
    finally:
        front.close()
        b.close()


# -- host TSO (5.1.6.2) ----------------------------------------------------------------------


def _tcp_gso_frame(payload_len: int) -> bytes:
    from scapy.all import IP, TCP, Ether, Raw

    return bytes(Ether(src=MAC[0].hex(":"), dst=MAC[1].hex(":")) / IP(src="10.9.0.1", dst="10.9.0.2")
                 / TCP(sport=1, dport=2, seq=7, flags="PA") / Raw(bytes(payload_len)))


def test_a_tso_frame_leaves_the_switch_as_segments(backend):
    from iovirt.virtio.net.defs import VIRTIO_NET_HDR_GSO_TCPV4

    with port(backend, 0) as a, port(backend, 1) as b:
        assert a.features >> 11 & 1  # VIRTIO_NET_F_HOST_TSO4 negotiated
        post_rx(b, 8)
        frame = _tcp_gso_frame(3000)
        send(a, frame, hdr=NetHdr(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type=VIRTIO_NET_HDR_GSO_TCPV4,
                                  hdr_len=54, gso_size=1000, csum_start=34, csum_offset=16))
        got = receive(b, 3)
        assert [len(f) for _, f, _ in got] == [1054, 1054, 1054]


@pytest.mark.parametrize("case", ["not-negotiated", "no-needs-csum", "ecn-bit"])
def test_gso_frames_the_driver_may_not_send_are_dropped(backend, logs, case):
    from iovirt.virtio.net.defs import VIRTIO_NET_HDR_GSO_TCPV4

    features = ALL & ~(1 << 11) if case == "not-negotiated" else ALL
    with port(backend, 0, features=features) as a:
        gso = VIRTIO_NET_HDR_GSO_TCPV4 | (0x80 if case == "ecn-bit" else 0)
        flags = 0 if case == "no-needs-csum" else VIRTIO_NET_HDR_F_NEEDS_CSUM
        send(a, _tcp_gso_frame(3000), hdr=NetHdr(flags=flags, gso_type=gso, gso_size=1000, csum_start=34,
                                                 csum_offset=16))
        assert wait_until(lambda: backend.net[0].stats["tx_errors"] == 1)
        assert "GSO" in log_line(logs, "net0", "GSO")
        assert not backend.net[0].needs_reset  # dropped, the device goes on
