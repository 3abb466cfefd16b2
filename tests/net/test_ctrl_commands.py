"""The control-queue commands of virtio 1.4 5.1.9.5 beyond VLAN filtering, served by an in-process device.

Receive modes and the MAC table (filtering on receive), MAC_ADDR_SET, ANNOUNCE_ACK, notification
coalescing (kept, answered, honoured with a timer) and device statistics; bad commands are answered
VIRTIO_NET_ERR with a log line and never fail the device.
"""

from __future__ import annotations

import logging
import struct

import pytest

from iovirt.platform import VirtioNetDriver
from iovirt.platform.testing import RecordingPort, fake_clock_platform
from iovirt.virtio import device as device_mod
from iovirt.virtio.device import COMMON_FEATURES
from iovirt.virtio.net import ctrl_stats, rss
from iovirt.virtio.net.defs import (
    VIRTIO_NET_CTRL_ANNOUNCE,
    VIRTIO_NET_CTRL_ANNOUNCE_ACK,
    VIRTIO_NET_CTRL_COAL,
    VIRTIO_NET_CTRL_COAL_VQ,
    VIRTIO_NET_CTRL_MAC,
    VIRTIO_NET_CTRL_MAC_ADDR_SET,
    VIRTIO_NET_CTRL_MAC_TABLE_SET,
    VIRTIO_NET_CTRL_NOTF_COAL,
    VIRTIO_NET_CTRL_NOTF_COAL_RX_SET,
    VIRTIO_NET_CTRL_NOTF_COAL_TX_SET,
    VIRTIO_NET_CTRL_NOTF_COAL_VQ_GET,
    VIRTIO_NET_CTRL_NOTF_COAL_VQ_SET,
    VIRTIO_NET_CTRL_QUEUE_STATS,
    VIRTIO_NET_CTRL_RX,
    VIRTIO_NET_CTRL_RX_ALLMULTI,
    VIRTIO_NET_CTRL_RX_ALLUNI,
    VIRTIO_NET_CTRL_RX_NOBCAST,
    VIRTIO_NET_CTRL_RX_NOMULTI,
    VIRTIO_NET_CTRL_RX_NOUNI,
    VIRTIO_NET_CTRL_RX_PROMISC,
    VIRTIO_NET_CTRL_STATS,
    VIRTIO_NET_CTRL_STATS_GET,
    VIRTIO_NET_CTRL_STATS_QUERY,
    VIRTIO_NET_ERR,
    VIRTIO_NET_F_CTRL_RX,
    VIRTIO_NET_F_CTRL_RX_EXTRA,
    VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_DEVICE_STATS,
    VIRTIO_NET_F_GUEST_ANNOUNCE,
    VIRTIO_NET_F_NOTF_COAL,
    VIRTIO_NET_F_VQ_NOTF_COAL,
    VIRTIO_NET_OK,
    VIRTIO_NET_S_ANNOUNCE,
    VIRTIO_NET_STATS_REPLY_HDR,
    VIRTIO_NET_STATS_TYPE_CVQ,
    VIRTIO_NET_STATS_TYPE_RX_BASIC,
    VIRTIO_NET_STATS_TYPE_TX_BASIC,
)
from iovirt.virtio.net.device import CTRL_FEATURES, VirtioNet
from iovirt.virtio.net.switch import LearningSwitch

MAC = bytes.fromhex("525400000001")
OTHER = bytes.fromhex("525400000009")
PEER = bytes.fromhex("020000000002")
MCAST = bytes.fromhex("01005e000001")
MCAST2 = bytes.fromhex("333300000001")
BCAST = b"\xff" * 6
CTRL_QUEUE = 2  # one pair: receiveq1, transmitq1, controlq
OK, ERR = bytes([VIRTIO_NET_OK]), bytes([VIRTIO_NET_ERR])


class Nic:
    """A device with a control queue on a switch, its driver, and a peer port."""

    def __init__(self, queue_cls, monkeypatch, wanted: int | None = None) -> None:
        monkeypatch.setattr(device_mod, "SplitQueue", queue_cls)
        self.switch = LearningSwitch()
        self.peer = RecordingPort()
        self.switch.attach(self.peer)
        self.net = VirtioNet(MAC, self.switch, ctrl_vq=True)
        self.platform = fake_clock_platform([self.net])
        self.driver = self.platform.driver(self.platform.functions[0])
        self.driver.bring_up(wanted, queue_size=64)
        self.rx = VirtioNetDriver(self.driver)
        self.rx.post_rx(32)

    def command(self, cls: int, cmd: int, data: bytes = b"", result: int = 0) -> bytes:
        queue = self.driver.queues[CTRL_QUEUE]
        queue.add_data(out=[bytes([cls, cmd]) + data], in_sizes=[1 + result])
        self.driver.kick(CTRL_QUEUE)
        (used,) = queue.get_used()
        return used.data

    def received(self, *dests: bytes) -> list[bytes]:
        """Send one frame to each of ``dests`` from the peer; the destinations of those the driver got."""
        for dest in dests:
            self.switch.forward(self.peer, dest + PEER + b"\x88\xb5" + bytes(46))
        return [frame[:6] for _, frame in self.rx.receive()]


@pytest.fixture
def nic(queue_cls, monkeypatch):
    n = Nic(queue_cls, monkeypatch)
    yield n
    n.platform.close()


def mode(nic: Nic, command: int, on: bool) -> bytes:
    return nic.command(VIRTIO_NET_CTRL_RX, command, bytes([on]))


def mac_table(unicast: list[bytes], multicast: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(t)) + b"".join(t) for t in (unicast, multicast))


def test_the_commands_are_offered_only_with_a_control_queue() -> None:
    plain = VirtioNet(MAC).device_features()
    with_ctrl = VirtioNet(MAC, ctrl_vq=True).device_features()
    assert not plain & sum(1 << b for b in CTRL_FEATURES)
    assert with_ctrl == plain | sum(1 << b for b in CTRL_FEATURES)
    assert plain & ~COMMON_FEATURES  # the data-path bits stay


# -- receive modes and the MAC table (5.1.9.5.1, 5.1.9.5.2) -------------------------------------------
def test_promiscuous_after_reset_then_own_mac_and_broadcast(nic) -> None:
    assert nic.received(OTHER, MCAST) == [OTHER, MCAST]  # promiscuous until the driver says otherwise
    assert mode(nic, VIRTIO_NET_CTRL_RX_PROMISC, False) == OK
    assert nic.received(OTHER, MAC, MCAST, BCAST) == [MAC, BCAST]
    assert nic.net.stats["rx_dropped_rx_filter"] == 2


def test_receive_modes_and_their_precedence(nic) -> None:
    mode(nic, VIRTIO_NET_CTRL_RX_PROMISC, False)
    assert mode(nic, VIRTIO_NET_CTRL_RX_ALLMULTI, True) == OK
    assert nic.received(MCAST, MCAST2, OTHER) == [MCAST, MCAST2]
    assert mode(nic, VIRTIO_NET_CTRL_RX_NOMULTI, True) == OK  # wins over ALLMULTI, not over broadcast
    assert nic.received(MCAST, BCAST) == [BCAST]
    assert mode(nic, VIRTIO_NET_CTRL_RX_NOBCAST, True) == OK  # even with ALLMULTI on
    assert nic.received(BCAST, MAC) == [MAC]
    assert mode(nic, VIRTIO_NET_CTRL_RX_ALLUNI, True) == OK
    assert nic.received(OTHER) == [OTHER]
    assert mode(nic, VIRTIO_NET_CTRL_RX_NOUNI, True) == OK  # wins over ALLUNI
    assert nic.received(OTHER, MAC) == []
    assert mode(nic, VIRTIO_NET_CTRL_RX_PROMISC, True) == OK  # wins over everything
    assert nic.received(OTHER, MAC, MCAST, BCAST) == [OTHER, MAC, MCAST, BCAST]


def test_mac_table_filters_and_reset_empties_it(nic) -> None:
    mode(nic, VIRTIO_NET_CTRL_RX_PROMISC, False)
    assert nic.command(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, mac_table([OTHER], [MCAST])) == OK
    assert nic.received(OTHER, MCAST, MCAST2, PEER[:5] + b"\x07") == [OTHER, MCAST]
    nic.driver.reset()
    nic.driver.bring_up(queue_size=64)
    nic.rx = VirtioNetDriver(nic.driver)
    nic.rx.post_rx(8)
    mode(nic, VIRTIO_NET_CTRL_RX_PROMISC, False)
    assert nic.received(OTHER, MCAST, MAC) == [MAC]


def test_mac_table_overflow_accepts_that_kind(nic) -> None:
    mode(nic, VIRTIO_NET_CTRL_RX_PROMISC, False)
    many = [bytes([1, 0, 0x5E, 0, 1, i]) for i in range(65)]
    assert nic.command(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, mac_table([], many)) == OK
    assert nic.received(MCAST2, OTHER) == [MCAST2]


def test_mac_addr_set_changes_config_mac_and_the_filter(nic) -> None:
    mode(nic, VIRTIO_NET_CTRL_RX_PROMISC, False)
    assert nic.command(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET, OTHER) == OK
    assert nic.driver.read_device_config(0, 6) == OTHER
    assert nic.received(MAC, OTHER) == [OTHER]
    nic.driver.reset()
    assert nic.net.mac == MAC  # a reset puts the device's own address back


@pytest.mark.parametrize("cls,cmd,data", [
    (VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, b""),  # no data
    (VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, b"\x02"),  # neither 0 nor 1
    (VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_ALLMULTI, b"\x01\x00"),  # two bytes
    (VIRTIO_NET_CTRL_RX, 6, b"\x01"),  # no such mode
    (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, struct.pack("<I", 2) + OTHER),  # one address of two
    (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, struct.pack("<I", 1) + OTHER),  # no multicast count
    (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, mac_table([], []) + b"\0"),  # trailing byte
    (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, struct.pack("<I", 0xFFFFFFFF) + bytes(8)),  # huge count
    (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET, OTHER[:5]),
    (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET, MCAST),  # a multicast address
    (VIRTIO_NET_CTRL_NOTF_COAL, VIRTIO_NET_CTRL_NOTF_COAL_TX_SET, bytes(4)),
    (VIRTIO_NET_CTRL_NOTF_COAL, VIRTIO_NET_CTRL_NOTF_COAL_VQ_SET, VIRTIO_NET_CTRL_COAL_VQ.pack(2, 0, 1, 1)),  # ctrl q
    (VIRTIO_NET_CTRL_NOTF_COAL, VIRTIO_NET_CTRL_NOTF_COAL_VQ_GET, struct.pack("<HH", 9, 0)),  # no such queue
    (VIRTIO_NET_CTRL_NOTF_COAL, VIRTIO_NET_CTRL_NOTF_COAL_VQ_GET, struct.pack("<H", 0)),  # cut short
    (VIRTIO_NET_CTRL_NOTF_COAL, 4, b""),
    (VIRTIO_NET_CTRL_STATS, VIRTIO_NET_CTRL_STATS_QUERY, b"\0"),
    (VIRTIO_NET_CTRL_STATS, VIRTIO_NET_CTRL_STATS_GET, bytes(15)),
    (VIRTIO_NET_CTRL_STATS, VIRTIO_NET_CTRL_STATS_GET, VIRTIO_NET_CTRL_QUEUE_STATS.pack(3, 1)),  # queue 3 of 3
    (VIRTIO_NET_CTRL_STATS, VIRTIO_NET_CTRL_STATS_GET, VIRTIO_NET_CTRL_QUEUE_STATS.pack(0, 1 << 5)),  # unknown type
    (VIRTIO_NET_CTRL_STATS, VIRTIO_NET_CTRL_STATS_GET,  # one good entry, then TX_BASIC asked of a receive queue
     VIRTIO_NET_CTRL_QUEUE_STATS.pack(0, 1) + VIRTIO_NET_CTRL_QUEUE_STATS.pack(0, VIRTIO_NET_STATS_TYPE_TX_BASIC)),
    (VIRTIO_NET_CTRL_ANNOUNCE, 1, b""),
])
def test_bad_commands_get_err_and_a_log_line(nic, caplog, cls, cmd, data) -> None:
    mode(nic, VIRTIO_NET_CTRL_RX_PROMISC, False)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="iovirt.virtio-net"):
        reply = nic.command(cls, cmd, data, result=64)
    assert reply == ERR  # ack only: nothing after it
    assert "refused" in caplog.text and "Traceback" not in caplog.text
    assert not nic.net.needs_reset
    assert nic.received(OTHER, MAC) == [MAC]  # the filter did not change, the device still works


def test_commands_of_features_not_negotiated_get_err(queue_cls, monkeypatch) -> None:
    wanted = COMMON_FEATURES | 1 << VIRTIO_NET_F_CTRL_VQ | 1 << VIRTIO_NET_F_CTRL_RX
    n = Nic(queue_cls, monkeypatch, wanted)
    try:
        assert mode(n, VIRTIO_NET_CTRL_RX_PROMISC, False) == OK
        for command in (VIRTIO_NET_CTRL_RX_ALLUNI, VIRTIO_NET_CTRL_RX_NOMULTI, VIRTIO_NET_CTRL_RX_NOUNI,
                        VIRTIO_NET_CTRL_RX_NOBCAST):
            assert mode(n, command, True) == ERR
        assert n.command(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET, OTHER) == ERR
        assert n.command(VIRTIO_NET_CTRL_NOTF_COAL, VIRTIO_NET_CTRL_NOTF_COAL_RX_SET, bytes(8)) == ERR
        assert n.command(VIRTIO_NET_CTRL_STATS, VIRTIO_NET_CTRL_STATS_QUERY, result=8) == ERR
        assert n.command(VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK) == ERR
        assert not n.driver.has_feature(VIRTIO_NET_F_CTRL_RX_EXTRA)
    finally:
        n.platform.close()


# -- announce (5.1.9.5.4) ---------------------------------------------------------------------------
def test_announce_ack_clears_the_status_bit(nic) -> None:
    assert nic.driver.has_feature(VIRTIO_NET_F_GUEST_ANNOUNCE)
    assert nic.net.request_announce()
    assert nic.driver.device_cfg_read(6, 2) & VIRTIO_NET_S_ANNOUNCE
    assert nic.command(VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK) == OK
    assert not nic.driver.device_cfg_read(6, 2) & VIRTIO_NET_S_ANNOUNCE


# -- notification coalescing (5.1.9.5.10) ----------------------------------------------------------
def coal_get(nic: Nic, index: int) -> tuple[int, int]:
    reply = nic.command(VIRTIO_NET_CTRL_NOTF_COAL, VIRTIO_NET_CTRL_NOTF_COAL_VQ_GET, struct.pack("<HH", index, 0), 8)
    assert reply[:1] == OK
    return VIRTIO_NET_CTRL_COAL.unpack(reply[1:])


def test_coalescing_parameters_set_get_and_reset(nic) -> None:
    assert nic.driver.has_feature(VIRTIO_NET_F_NOTF_COAL) and nic.driver.has_feature(VIRTIO_NET_F_VQ_NOTF_COAL)
    assert coal_get(nic, 0) == coal_get(nic, 1) == (0, 0)
    assert nic.command(VIRTIO_NET_CTRL_NOTF_COAL, VIRTIO_NET_CTRL_NOTF_COAL_RX_SET, VIRTIO_NET_CTRL_COAL.pack(8, 50)) == OK
    assert nic.command(VIRTIO_NET_CTRL_NOTF_COAL, VIRTIO_NET_CTRL_NOTF_COAL_TX_SET, VIRTIO_NET_CTRL_COAL.pack(4, 20)) == OK
    assert coal_get(nic, 0) == (8, 50) and coal_get(nic, 1) == (4, 20)
    vq_set = VIRTIO_NET_CTRL_COAL_VQ.pack(0, 0xBEEF, 3, 7)  # reserved is ignored
    assert nic.command(VIRTIO_NET_CTRL_NOTF_COAL, VIRTIO_NET_CTRL_NOTF_COAL_VQ_SET, vq_set) == OK
    assert coal_get(nic, 0) == (3, 7)
    nic.net.stop_queue(0)  # disabled and enabled again: RX_SET's parameters
    assert nic.net.ctrl.coalescing.params[0] == (8, 50)
    nic.driver.reset()
    nic.driver.bring_up(queue_size=64)
    assert coal_get(nic, 0) == coal_get(nic, 1) == (0, 0)


def test_coalescing_is_honoured_with_a_timer(nic) -> None:
    timers: list[tuple[float, object]] = []
    nic.net.call_later = lambda delay, fn: timers.append((delay, fn))
    assert nic.command(VIRTIO_NET_CTRL_NOTF_COAL, VIRTIO_NET_CTRL_NOTF_COAL_RX_SET, VIRTIO_NET_CTRL_COAL.pack(3, 100)) == OK
    start = nic.driver.interrupts[0]
    nic.received(MAC)
    nic.platform.service_interrupts()
    assert nic.driver.interrupts[0] == start and [d for d, _ in timers] == [pytest.approx(100e-6)]
    nic.received(MAC, MAC)  # the third frame meets max_packets
    nic.platform.service_interrupts()
    assert nic.driver.interrupts[0] == start + 1
    timers[0][1]()  # the timer finds nothing held back
    nic.platform.service_interrupts()
    assert nic.driver.interrupts[0] == start + 1
    nic.switch.forward(nic.peer, MAC + PEER + b"\x88\xb5" + bytes(46))  # not taken by the driver yet
    nic.platform.service_interrupts()
    assert nic.driver.interrupts[0] == start + 1
    timers[-1][1]()  # max_usecs ran out: the held notification goes
    nic.platform.service_interrupts()
    assert nic.driver.interrupts[0] == start + 2


def test_coalescing_without_a_timer_notifies_at_once(nic) -> None:
    nic.command(VIRTIO_NET_CTRL_NOTF_COAL, VIRTIO_NET_CTRL_NOTF_COAL_RX_SET, VIRTIO_NET_CTRL_COAL.pack(3, 100))
    start = nic.driver.interrupts[0]
    nic.received(MAC)
    nic.platform.service_interrupts()
    assert nic.driver.interrupts[0] == start + 1


# -- device statistics (5.1.9.5.11) ----------------------------------------------------------------
def test_stats_query_and_get(nic) -> None:
    assert nic.driver.has_feature(VIRTIO_NET_F_DEVICE_STATS)
    reply = nic.command(VIRTIO_NET_CTRL_STATS, VIRTIO_NET_CTRL_STATS_QUERY, result=8)
    assert reply[:1] == OK and struct.unpack("<Q", reply[1:])[0] == ctrl_stats.SUPPORTED_STATS_TYPES
    nic.received(MAC, MAC)
    request = (VIRTIO_NET_CTRL_QUEUE_STATS.pack(0, VIRTIO_NET_STATS_TYPE_RX_BASIC)
               + VIRTIO_NET_CTRL_QUEUE_STATS.pack(1, VIRTIO_NET_STATS_TYPE_TX_BASIC)
               + VIRTIO_NET_CTRL_QUEUE_STATS.pack(2, VIRTIO_NET_STATS_TYPE_CVQ))
    reply = nic.command(VIRTIO_NET_CTRL_STATS, VIRTIO_NET_CTRL_STATS_GET, request, result=512)
    assert reply[:1] == OK and len(reply) == 1 + 56 + 56 + 24
    pos, seen = 1, []
    while pos < len(reply):
        rtype, vq, size = VIRTIO_NET_STATS_REPLY_HDR.unpack_from(reply, pos)
        values = struct.unpack_from(f"<{(size - 8) // 8}Q", reply, pos + 8)
        seen.append((rtype, vq, size, values))
        pos += size
    assert [(t, q, s) for t, q, s, _ in seen] == [(0, 0, 56), (16, 1, 56), (32, 2, 24)]
    assert seen[0][3][1] == 2 and seen[0][3][2] == 2 * 60  # rx_packets, rx_bytes
    assert seen[2][3] == (2, 2)  # command_num and ok_num: the QUERY and this command
    short = nic.command(VIRTIO_NET_CTRL_STATS, VIRTIO_NET_CTRL_STATS_GET, request, result=20)
    assert short[:1] == OK and len(short) == 21  # filled only up to the space given


def test_stats_counters_wrap(nic) -> None:
    nic.net.queue_stats[0]["frames"] = (1 << 64) + 5
    reply = ctrl_stats.reply(nic.net, [(0, VIRTIO_NET_STATS_TYPE_RX_BASIC)], 1, 1)
    assert struct.unpack_from("<Q", reply, 8 + 8)[0] == 5


# -- automatic receive steering (5.1.9.5.6) -----------------------------------------------------------
def test_receive_steering_follows_vq_pairs_set(queue_cls, monkeypatch) -> None:
    monkeypatch.setattr(device_mod, "SplitQueue", queue_cls)
    switch, peer = LearningSwitch(), RecordingPort()
    switch.attach(peer)
    net = VirtioNet(MAC, switch, queue_pairs=4, ctrl_vq=True)
    platform = fake_clock_platform([net])
    try:
        driver = platform.driver(platform.functions[0])
        driver.bring_up(queue_size=64)
        for rx in range(0, 8, 2):
            for _ in range(32):
                driver.queues[rx].add_data([], [2048])
            driver.kick(rx)

        def spread() -> set[int]:
            for i in range(16):
                switch.forward(peer, MAC + bytes([2, 0, 0, 0, 1, i]) + b"\x88\xb5" + bytes(46))
            return {rx for rx in range(0, 8, 2) if driver.queues[rx].get_used()}

        assert spread() == {0}  # receiveq1 alone after a reset
        queue = driver.queues[8]
        queue.add_data([bytes([4, 0]) + (2).to_bytes(2, "little")], [1])
        driver.kick(8)
        assert queue.get_used()[0].data == OK
        assert spread() == {0, 2}
        net.stop_queue(0)  # receiveq1 being reset: its flows go to receiveq2
        net.enabled[0] = False
        assert spread() == {2}
        net.stop_queue(2)
        net.enabled[2] = False
        assert spread() == set() and net.stats["rx_dropped_no_queue"] == 16 and not net.backlog
    finally:
        platform.close()


# -- receive-side scaling (5.1.9.5.7) ------------------------------------------------------------------
RSS_KEY = bytes.fromhex("6d5a56da255b0ec24167253d43a38fb0d0ca2bcbae7b30b477cb2da38030f20c6a42b73bbeac01fa")


def test_toeplitz_matches_the_published_vectors() -> None:
    # The verification vector of the Microsoft RSS specification: 66.9.149.187:2794 -> 161.142.100.80:1766.
    addresses = bytes([66, 9, 149, 187, 161, 142, 100, 80])
    assert rss.toeplitz(RSS_KEY, addresses) == 0x323E8FC2
    assert rss.toeplitz(RSS_KEY, addresses + struct.pack("!HH", 2794, 1766)) == 0x51CCC178


def rss_config(table: list[int], unclassified: int = 0, hash_types: int = rss.SUPPORTED_HASH_TYPES,
               max_tx_vq: int = 1, key: bytes = RSS_KEY) -> bytes:
    return (struct.pack("<IHH", hash_types, len(table) - 1, unclassified) + struct.pack(f"<{len(table)}H", *table)
            + struct.pack("<HB", max_tx_vq, len(key)) + key)


def tcp4(sport: int) -> bytes:
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, 6, 0, bytes([66, 9, 149, 187]), bytes([161, 142, 100, 80]))
    return MAC + PEER + b"\x08\x00" + ip + struct.pack("!HH", sport, 1766) + bytes(16)


@pytest.mark.parametrize("config", [
    rss_config([0, 1, 0]),  # 3 entries: not a power of two
    rss_config([0, 4]),  # queue id 4 of 2 pairs
    rss_config([0, 1], unclassified=2),
    rss_config([0, 1], hash_types=1 << 3),  # TCPv6: not supported
    rss_config([0, 1], max_tx_vq=3),
    rss_config([0, 1], key=b""),
    rss_config([0, 1], key=bytes(41)),
    rss_config([0, 1])[:-1],  # key cut short
    rss_config([0] * 256),  # beyond rss_max_indirection_table_length
])
def test_bad_rss_configs_are_refused(config) -> None:
    with pytest.raises(rss.RssConfigError):
        rss.RssConfig.parse(config, 2)


def test_rss_steers_by_the_hash_and_drops_for_a_queue_being_reset(queue_cls, monkeypatch) -> None:
    monkeypatch.setattr(device_mod, "SplitQueue", queue_cls)
    switch, peer = LearningSwitch(), RecordingPort()
    switch.attach(peer)
    net = VirtioNet(MAC, switch, queue_pairs=2, ctrl_vq=True)
    platform = fake_clock_platform([net])
    try:
        driver = platform.driver(platform.functions[0])
        driver.bring_up(queue_size=64)
        assert driver.read_device_config(12, 16) == device_mod_config_rss()
        for rx in (0, 2):
            for _ in range(32):
                driver.queues[rx].add_data([], [2048])
            driver.kick(rx)
        queue = driver.queues[4]
        queue.add_data([bytes([4, 1]) + rss_config([0, 1], unclassified=1, max_tx_vq=2)], [1])
        driver.kick(4)
        assert queue.get_used()[0].data == OK
        for sport in range(8):
            switch.forward(peer, tcp4(sport))
            want = 2 * (rss.toeplitz(RSS_KEY, tcp4(sport)[26:38]) & 1)
            assert [rx for rx in (0, 2) if driver.queues[rx].get_used()] == [want]
        switch.forward(peer, MAC + PEER + b"\x88\xb5" + bytes(46))  # not IPv4: unclassified_queue
        assert [rx for rx in (0, 2) if driver.queues[rx].get_used()] == [2]
        net.stop_queue(2)
        net.enabled[2] = False
        switch.forward(peer, MAC + PEER + b"\x88\xb5" + bytes(46))  # its queue is being reset: dropped
        assert not driver.queues[0].get_used() and net.stats["rx_dropped_no_queue"] == 1 and not net.backlog
    finally:
        platform.close()


def device_mod_config_rss() -> bytes:
    return struct.pack("<IBBHII", 0xFFFFFFFF, 0xFF, 40, 128, rss.SUPPORTED_HASH_TYPES, rss.SUPPORTED_TUNNEL_TYPES)


def ipip(inner_src: bytes) -> bytes:
    inner = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20, 0, 0, 64, 253, 0, inner_src, bytes([10, 9, 9, 9]))
    outer = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, 4, 0, bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2]))
    return MAC + PEER + b"\x08\x00" + outer + inner


def vxlan(inner_src: bytes) -> bytes:
    inner = MAC + PEER + b"\x08\x00" + struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20, 0, 0, 64, 253, 0, inner_src,
                                                   bytes([10, 9, 9, 9]))
    udp = struct.pack("!HHHH", 5555, 4789, 8 + 8 + len(inner), 0) + bytes([8, 0, 0, 0, 0, 0, 1, 0])
    outer = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp) + len(inner), 0, 0, 64, 17, 0,
                        bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2]))
    return MAC + PEER + b"\x08\x00" + outer + udp + inner


@pytest.mark.parametrize("make,kind", [(ipip, rss.VIRTIO_NET_HASH_TUNNEL_TYPE_IPIP),
                                       (vxlan, rss.VIRTIO_NET_HASH_TUNNEL_TYPE_VXLAN)])
def test_inner_header_hash(make, kind) -> None:
    src = bytes([10, 1, 2, 3])
    inner = src + bytes([10, 9, 9, 9])
    outer = bytes([192, 0, 2, 1, 192, 0, 2, 2])
    ipv4 = rss.VIRTIO_NET_HASH_TYPE_IPv4
    assert rss.hash_input(make(src), ipv4) == outer  # nothing enabled: the outer header
    assert rss.hash_input(make(src), ipv4, kind) == inner
    assert rss.hash_input(make(src), ipv4, rss.SUPPORTED_TUNNEL_TYPES & ~kind) == outer  # another type enabled


def test_hash_tunnel_set(nic) -> None:
    cmd = lambda types: nic.command(7, 0, struct.pack("<I", types))  # noqa: E731
    assert cmd(rss.SUPPORTED_TUNNEL_TYPES) == OK and nic.net.ctrl.tunnel_types == rss.SUPPORTED_TUNNEL_TYPES
    assert cmd(1 << 8) == ERR and nic.net.ctrl.tunnel_types == rss.SUPPORTED_TUNNEL_TYPES  # NVGRE: not supported
    assert nic.command(7, 0, b"\0\0") == ERR
    assert cmd(0) == OK and nic.net.ctrl.tunnel_types == 0
    cmd(rss.SUPPORTED_TUNNEL_TYPES)
    nic.driver.reset()
    assert nic.net.ctrl.tunnel_types == 0
