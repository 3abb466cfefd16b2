"""virtio-net receive filtering, MAC filtering, the announce acknowledgement, multiqueue receive steering, RSS and
its inner header hash through the control virtqueue (virtio 1.4 5.1.9.5.1, 5.1.9.5.2, 5.1.9.5.4, 5.1.9.5.6, 5.1.9.5.7,
5.1.9.4.4), where the device serves the control queue itself: behind the
in-process virtio-pci transport (over vhost-user the front-end serves the control queue).

Frames come from the network the device is attached to (its switch), as they would from peers; a
check counts which of them reach the driver's receive buffers.  Each check turns promiscuous mode
off first (its state after a reset is not specified) unless promiscuous mode is what it checks.
"""

from __future__ import annotations

import struct

from iovirt.conformance.checks.pci import PCI
from iovirt.conformance.devices import new_tag
from iovirt.conformance.platform_target import PciContext
from iovirt.conformance.registry import NotApplicable, check, expect
from iovirt.conformance.target import Capabilities
from iovirt.virtio.defs import VIRTIO_F_RING_RESET
from iovirt.virtio.net.defs import (
    ETH_P_IP,
    IPPROTO_IPIP,
    IPPROTO_TCP,
    NET_HDR_SIZE,
    VIRTIO_NET_CTRL_ANNOUNCE,
    VIRTIO_NET_CTRL_ANNOUNCE_ACK,
    VIRTIO_NET_CTRL_HASH_TUNNEL,
    VIRTIO_NET_CTRL_HASH_TUNNEL_SET,
    VIRTIO_NET_CTRL_MAC,
    VIRTIO_NET_CTRL_MAC_ADDR_SET,
    VIRTIO_NET_CTRL_MAC_TABLE_SET,
    VIRTIO_NET_CTRL_MQ,
    VIRTIO_NET_CTRL_MQ_RSS_CONFIG,
    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
    VIRTIO_NET_CTRL_RX,
    VIRTIO_NET_CTRL_RX_ALLMULTI,
    VIRTIO_NET_CTRL_RX_ALLUNI,
    VIRTIO_NET_CTRL_RX_NOBCAST,
    VIRTIO_NET_CTRL_RX_NOMULTI,
    VIRTIO_NET_CTRL_RX_NOUNI,
    VIRTIO_NET_CTRL_RX_PROMISC,
    VIRTIO_NET_ERR,
    VIRTIO_NET_F_CTRL_MAC_ADDR,
    VIRTIO_NET_F_CTRL_RX,
    VIRTIO_NET_F_CTRL_RX_EXTRA,
    VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_GUEST_ANNOUNCE,
    VIRTIO_NET_F_HASH_TUNNEL,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_RSS,
    VIRTIO_NET_HASH_TUNNEL_TYPE_IPIP,
    VIRTIO_NET_HASH_TYPE_IPv4,
    VIRTIO_NET_HASH_TYPE_TCPv4,
    VIRTIO_NET_OK,
    VIRTIO_NET_S_ANNOUNCE,
)
from iovirt.virtio.transport.defs import VIRTIO_PCI_COMMON_Q_RESET, VIRTIO_PCI_COMMON_Q_SELECT

RX_BUFFERS, RX_BUFFER = 16, 2048
PEER = bytes.fromhex("02000000c0de")
OTHER_UNICAST = bytes.fromhex("02000000beef")  # neither the device's address nor the peer's
MULTICAST = bytes.fromhex("01005e0000fb")
BROADCAST = b"\xff" * 6
NEW_MAC = bytes.fromhex("0200000a11ce")
STATUS_OFFSET = 6  # virtio_net_config.status, after mac (5.1.4)


class _Network:
    """The far side of the device's link: frames sent here arrive at the device."""

    name = "conformance-network"

    def deliver(self, frame: bytes, csum: tuple[int, int] | None) -> bool:
        return True  # what the device transmits is not looked at here


def needs_ctrl(*bits: tuple[int, str]):
    """An ``applies`` predicate: CTRL_VQ and each of ``bits`` (bit, name) offered."""

    def applies(caps: Capabilities) -> str | None:
        for bit, name in ((VIRTIO_NET_F_CTRL_VQ, "VIRTIO_NET_F_CTRL_VQ"), *bits):
            if not caps.has(bit):
                return f"{name} not offered"
        return None

    return applies


def ctrl_command(ctx: PciContext, cls: int, command: int, data: bytes = b"", result: int = 0) -> bytes:
    """Send one control command; returns what the device wrote (the ack, then any result)."""
    index = ctx.num_queues - 1  # the control queue comes after the queue pairs (5.1.2)
    q = ctx.driver.queues[index]
    q.add_data([bytes([cls, command]) + data], [1 + result])
    ctx.kick(index)
    used = q.get_used()
    expect(len(used) == 1, f"control command class {cls} command {command}: {len(used)} used buffers, expected 1")
    expect(used[0].len >= 1, f"control command class {cls} command {command}: no ack written")
    return used[0].data


def ctrl_ok(ctx: PciContext, cls: int, command: int, data: bytes = b"", result: int = 0) -> bytes:
    """:func:`ctrl_command` that must be acked VIRTIO_NET_OK; returns the command-specific-result."""
    reply = ctrl_command(ctx, cls, command, data, result)
    expect(reply[0] == VIRTIO_NET_OK, f"control command class {cls} command {command} ({data.hex()}) answered "
                                      f"{reply[0]}, expected VIRTIO_NET_OK")
    return reply[1:]


def ctrl_err(ctx: PciContext, cls: int, command: int, data: bytes, why: str, result: int = 0) -> None:
    """:func:`ctrl_command` that must be acked VIRTIO_NET_ERR (``why``: what was wrong with it)."""
    reply = ctrl_command(ctx, cls, command, data, result)
    expect(reply[0] == VIRTIO_NET_ERR, f"control command class {cls} command {command} with {why} answered "
                                       f"{reply[0]}, expected VIRTIO_NET_ERR")


class Link:
    """The device's network and the driver's receive queues: which frames, by destination, reach the driver.

    Every receive queue gets buffers and is looked at: which queue a frame goes to is the business of the
    steering checks, not of these.
    """

    def __init__(self, ctx: PciContext) -> None:
        switch = getattr(ctx.device, "switch", None)
        if switch is None:
            raise NotApplicable("the device under test has no network the check can send frames from")
        self.ctx, self.switch, self.network = ctx, switch, _Network()
        self.rx = [ctx.driver.queues[index] for index in range(0, ctx.num_queues - 1, 2)]
        for index in range(len(self.rx)):
            self.post(index, RX_BUFFERS)

    def post(self, pair: int, count: int) -> None:
        """``count`` more buffers on receiveq(pair + 1)."""
        for _ in range(count):
            self.rx[pair].add_data([], [RX_BUFFER])
        self.ctx.kick(2 * pair)

    def received(self, dest: bytes) -> bool:
        """Send a frame to ``dest`` from a peer; whether the driver got it."""
        tag = new_tag()
        frame = dest + PEER + ETH_P_IP.to_bytes(2, "big") + (tag * 8).ljust(46, b"\0")
        self.switch.forward(self.network, frame)
        seen = False
        for pair, q in enumerate(self.rx):
            got = [e.data[NET_HDR_SIZE:] for e in q.get_used()]
            self.post(pair, len(got))  # as many as were used: the ring never fills
            seen = seen or any(tag in f for f in got)
        return seen


def rx_mode(ctx: PciContext, command: int, on: bool) -> None:
    """Set a receive mode; it must be acked VIRTIO_NET_OK."""
    ctrl_ok(ctx, VIRTIO_NET_CTRL_RX, command, bytes([on]))


def _setup(ctx: PciContext, promisc: bool = False) -> Link:
    ctx.bring_up()
    link = Link(ctx)
    rx_mode(ctx, VIRTIO_NET_CTRL_RX_PROMISC, promisc)
    return link


def _mac(ctx: PciContext) -> bytes:
    return ctx.driver.read_device_config(0, 6)


def mac_table(unicast: list[bytes], multicast: list[bytes]) -> bytes:
    """VIRTIO_NET_CTRL_MAC_TABLE_SET's data: two ``virtio_net_ctrl_mac`` tables."""
    return b"".join(struct.pack("<I", len(t)) + b"".join(t) for t in (unicast, multicast))


_RX = (VIRTIO_NET_F_CTRL_RX, "VIRTIO_NET_F_CTRL_RX")
_RX_EXTRA = (VIRTIO_NET_F_CTRL_RX_EXTRA, "VIRTIO_NET_F_CTRL_RX_EXTRA")


# -- receive modes (5.1.9.5.1.1) --------------------------------------------------------------------
@check(
    "virtio-1.4:5.1.9.5.1.1#promisc",
    "net, CTRL_RX: VIRTIO_NET_CTRL_RX_PROMISC is served; promiscuous mode on receives frames to any address, "
    "even with NOUNI / NOMULTI / NOBCAST on (with CTRL_RX_EXTRA)",
    devices={"net"}, transport=PCI, applies=needs_ctrl(_RX),
)
def promisc(ctx: PciContext) -> None:
    link = _setup(ctx)
    expect(not link.received(OTHER_UNICAST), "promiscuous mode off: a frame to another unicast address was received")
    rx_mode(ctx, VIRTIO_NET_CTRL_RX_PROMISC, True)
    if ctx.driver.has_feature(VIRTIO_NET_F_CTRL_RX_EXTRA):
        for command in (VIRTIO_NET_CTRL_RX_NOUNI, VIRTIO_NET_CTRL_RX_NOMULTI, VIRTIO_NET_CTRL_RX_NOBCAST):
            rx_mode(ctx, command, True)
    for dest, what in ((OTHER_UNICAST, "another unicast address"), (MULTICAST, "a multicast address"),
                       (BROADCAST, "broadcast"), (_mac(ctx), "the device's address")):
        expect(link.received(dest), f"promiscuous mode on (and NOUNI/NOMULTI/NOBCAST on): a frame to {what} was "
                                    "not received")


@check(
    "virtio-1.4:5.1.9.5.1.1#allmulti",
    "net, CTRL_RX: VIRTIO_NET_CTRL_RX_ALLMULTI is served; off, a multicast address not in the table is dropped; "
    "on, it is received",
    devices={"net"}, transport=PCI, applies=needs_ctrl(_RX),
)
def allmulti(ctx: PciContext) -> None:
    link = _setup(ctx)
    rx_mode(ctx, VIRTIO_NET_CTRL_RX_ALLMULTI, False)
    expect(not link.received(MULTICAST), "all-multicast off, empty table: a multicast frame was received")
    rx_mode(ctx, VIRTIO_NET_CTRL_RX_ALLMULTI, True)
    expect(link.received(MULTICAST), "all-multicast on: a multicast frame was not received")


@check(
    "virtio-1.4:5.1.9.5.1.1#alluni",
    "net, CTRL_RX_EXTRA: VIRTIO_NET_CTRL_RX_ALLUNI is served; on, a frame to any unicast address is received",
    devices={"net"}, transport=PCI, applies=needs_ctrl(_RX, _RX_EXTRA),
)
def alluni(ctx: PciContext) -> None:
    link = _setup(ctx)
    expect(not link.received(OTHER_UNICAST), "all-unicast off: a frame to another unicast address was received")
    rx_mode(ctx, VIRTIO_NET_CTRL_RX_ALLUNI, True)
    expect(link.received(OTHER_UNICAST), "all-unicast on: a frame to another unicast address was not received")


@check(
    "virtio-1.4:5.1.9.5.1.1#nomulti",
    "net, CTRL_RX_EXTRA: VIRTIO_NET_CTRL_RX_NOMULTI is served; on, multicast frames are dropped even with "
    "ALLMULTI on, broadcast ones still received",
    devices={"net"}, transport=PCI, applies=needs_ctrl(_RX, _RX_EXTRA),
)
def nomulti(ctx: PciContext) -> None:
    link = _setup(ctx)
    rx_mode(ctx, VIRTIO_NET_CTRL_RX_ALLMULTI, True)
    rx_mode(ctx, VIRTIO_NET_CTRL_RX_NOMULTI, True)
    expect(not link.received(MULTICAST), "multicast receive suppressed (ALLMULTI on): a multicast frame was received")
    expect(link.received(BROADCAST), "multicast receive suppressed: a broadcast frame was not received (the filter "
                                     "does not apply to broadcast)")


@check(
    "virtio-1.4:5.1.9.5.1.1#nouni",
    "net, CTRL_RX_EXTRA: VIRTIO_NET_CTRL_RX_NOUNI is served; on, unicast frames are dropped even with ALLUNI on",
    devices={"net"}, transport=PCI, applies=needs_ctrl(_RX, _RX_EXTRA),
)
def nouni(ctx: PciContext) -> None:
    link = _setup(ctx)
    rx_mode(ctx, VIRTIO_NET_CTRL_RX_ALLUNI, True)
    rx_mode(ctx, VIRTIO_NET_CTRL_RX_NOUNI, True)
    for dest, what in ((OTHER_UNICAST, "another unicast address"), (_mac(ctx), "the device's address")):
        expect(not link.received(dest), f"unicast receive suppressed (ALLUNI on): a frame to {what} was received")


@check(
    "virtio-1.4:5.1.9.5.1.1#nobcast",
    "net, CTRL_RX_EXTRA: VIRTIO_NET_CTRL_RX_NOBCAST is served; on, broadcast frames are dropped even with "
    "ALLMULTI on",
    devices={"net"}, transport=PCI, applies=needs_ctrl(_RX, _RX_EXTRA),
)
def nobcast(ctx: PciContext) -> None:
    link = _setup(ctx)
    rx_mode(ctx, VIRTIO_NET_CTRL_RX_ALLMULTI, True)
    expect(link.received(BROADCAST), "a broadcast frame was not received")
    rx_mode(ctx, VIRTIO_NET_CTRL_RX_NOBCAST, True)
    expect(not link.received(BROADCAST), "broadcast receive suppressed (ALLMULTI on): a broadcast frame was received")


# -- MAC address filtering (5.1.9.5.2.1) ----------------------------------------------------------------
@check(
    "virtio-1.4:5.1.9.5.2.1#table-set",
    "net, CTRL_RX: a frame to an address that is neither mac nor in the table is dropped; once "
    "VIRTIO_NET_CTRL_MAC_TABLE_SET is used, frames to the table's addresses are received",
    devices={"net"}, transport=PCI, applies=needs_ctrl(_RX),
)
def table_set(ctx: PciContext) -> None:
    link = _setup(ctx)
    expect(link.received(_mac(ctx)), "promiscuous mode off: a frame to the device's mac was not received")
    expect(not link.received(OTHER_UNICAST), "a frame to an address neither mac nor in the table was received")
    ctrl_ok(ctx, VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, mac_table([OTHER_UNICAST], [MULTICAST]))
    expect(link.received(OTHER_UNICAST), "right after VIRTIO_NET_CTRL_MAC_TABLE_SET was used, a frame to a unicast "
                                         "address of the table was not received")
    expect(link.received(MULTICAST), "right after VIRTIO_NET_CTRL_MAC_TABLE_SET was used, a frame to a multicast "
                                     "address of the table was not received")


@check(
    "virtio-1.4:5.1.9.5.2.1#table-reset",
    "net, CTRL_RX: a device reset empties the MAC filtering table",
    devices={"net"}, transport=PCI, applies=needs_ctrl(_RX),
)
def table_reset(ctx: PciContext) -> None:
    link = _setup(ctx)
    ctrl_ok(ctx, VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, mac_table([OTHER_UNICAST], [MULTICAST]))
    rx_mode(ctx, VIRTIO_NET_CTRL_RX_PROMISC, False)
    expect(link.received(OTHER_UNICAST), "a frame to a unicast address of the table was not received")
    link = _setup(ctx)  # reset, bring up again, promiscuous off
    expect(link.received(_mac(ctx)), "after the reset a frame to the device's mac was not received")
    expect(not link.received(OTHER_UNICAST), "after a reset a frame to an address of the old MAC table was received")
    expect(not link.received(MULTICAST), "after a reset a frame to a multicast address of the old table was received")


@check(
    "virtio-1.4:5.1.9.5.2.1#addr-set",
    "net, CTRL_MAC_ADDR and MAC: mac in config space reads the address once VIRTIO_NET_CTRL_MAC_ADDR_SET is used; "
    "frames to it are received, frames to the old one dropped",
    devices={"net"}, transport=PCI,
    applies=needs_ctrl(_RX, (VIRTIO_NET_F_CTRL_MAC_ADDR, "VIRTIO_NET_F_CTRL_MAC_ADDR"),
                       (VIRTIO_NET_F_MAC, "VIRTIO_NET_F_MAC")),
)
def addr_set(ctx: PciContext) -> None:
    link = _setup(ctx)
    old = _mac(ctx)
    ctrl_ok(ctx, VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET, NEW_MAC)
    now = _mac(ctx)
    expect(now == NEW_MAC, f"mac reads {now.hex(':')} once VIRTIO_NET_CTRL_MAC_ADDR_SET {NEW_MAC.hex(':')} was used")
    expect(link.received(NEW_MAC), "a frame to the address set with VIRTIO_NET_CTRL_MAC_ADDR_SET was not received")
    expect(not link.received(old), "a frame to the old mac (neither mac nor in the table now) was received")


# -- gratuitous packets (5.1.9.5.4.2) --------------------------------------------------------------------
@check(
    "virtio-1.4:5.1.9.5.4.2#announce-ack",
    "net, GUEST_ANNOUNCE: VIRTIO_NET_S_ANNOUNCE is clear once the VIRTIO_NET_CTRL_ANNOUNCE_ACK buffer is used",
    devices={"net"}, transport=PCI, applies=needs_ctrl((VIRTIO_NET_F_GUEST_ANNOUNCE, "VIRTIO_NET_F_GUEST_ANNOUNCE")),
)
def announce_ack(ctx: PciContext) -> None:
    ctx.bring_up()
    request = getattr(ctx.device, "request_announce", None)
    if request is None:
        raise NotApplicable("the device under test has no way to be asked to announce itself")
    expect(request(), "the device refused to request an announcement with VIRTIO_NET_F_GUEST_ANNOUNCE negotiated")
    ctx.function.config_changed()
    d = ctx.driver
    expect(d.device_cfg_read(STATUS_OFFSET, 2) & VIRTIO_NET_S_ANNOUNCE, "VIRTIO_NET_S_ANNOUNCE is not set in status "
                                                                       "after the device asked for an announcement")
    ctrl_ok(ctx, VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK)
    status = d.device_cfg_read(STATUS_OFFSET, 2)
    expect(not status & VIRTIO_NET_S_ANNOUNCE, f"status {status:#x}: VIRTIO_NET_S_ANNOUNCE still set once the "
                                               "VIRTIO_NET_CTRL_ANNOUNCE_ACK buffer was used")


# -- automatic receive steering in multiqueue mode (5.1.9.5.6.2) -----------------------------------------
FLOWS = 32  # frames of distinct flows (source MACs): enough to reach every queue a device spreads over
MAX_PAIRS_OFFSET = 8  # virtio_net_config.max_virtqueue_pairs, after mac and status (5.1.4)
SUPPORTED_TUNNEL_TYPES_OFFSET = 24  # virtio_net_config.supported_tunnel_types (5.1.4)


def _multiqueue(caps: Capabilities) -> str | None:
    why = needs_ctrl((VIRTIO_NET_F_MQ, "VIRTIO_NET_F_MQ"), (VIRTIO_F_RING_RESET, "VIRTIO_F_RING_RESET"))(caps)
    if why is None and int.from_bytes((caps.config or b"")[MAX_PAIRS_OFFSET:MAX_PAIRS_OFFSET + 2], "little") < 2:
        why = "max_virtqueue_pairs < 2"
    return why


class Steering:
    """Every receive queue with buffers; frames of :data:`FLOWS` flows sent at once, seen per receive queue."""

    def __init__(self, ctx: PciContext) -> None:
        switch = getattr(ctx.device, "switch", None)
        if switch is None:
            raise NotApplicable("the device under test has no network the check can send frames from")
        self.ctx, self.switch, self.network = ctx, switch, _Network()
        self.pairs = (ctx.num_queues - 1) // 2
        for pair in range(self.pairs):
            self.post(pair)

    def post(self, pair: int) -> None:
        """Receive buffers on receiveq(pair + 1), for every frame of one round."""
        q = self.ctx.driver.queues[2 * pair]
        for _ in range(FLOWS - (q.avail_idx - q.last_used_idx) % 0x10000):
            q.add_data([], [RX_BUFFER])
        self.ctx.kick(2 * pair)

    def send(self) -> dict[int, int]:
        """One frame per flow to the device's mac; how many of them each receive queue (0-based pair) got."""
        mac, tags = _mac(self.ctx), []
        for flow in range(FLOWS):
            tags.append(new_tag())
            src = bytes([2, 0, 0, 0, 0x5E, flow])
            self.switch.forward(self.network, mac + src + ETH_P_IP.to_bytes(2, "big") + (tags[-1] * 8).ljust(46, b"\0"))
        got: dict[int, int] = {}
        for pair in range(self.pairs):
            q = self.ctx.driver.queues.get(2 * pair)
            if q is None:
                continue
            n = sum(any(t in e.data for t in tags) for e in q.get_used())
            if n:
                got[pair] = n
        return got

    def reset_queue(self, pair: int) -> None:
        """queue_reset receiveq(pair + 1) (2.6.1) and leave it disabled."""
        d = self.ctx.driver
        d.common_write(VIRTIO_PCI_COMMON_Q_SELECT, 2, 2 * pair)
        d.common_write(VIRTIO_PCI_COMMON_Q_RESET, 2, 1)
        del d.queues[2 * pair]


def _pairs_set(ctx: PciContext, pairs: int) -> None:
    ctrl_ok(ctx, VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", pairs))


@check(
    "virtio-1.4:5.1.9.5.6.2#receiveq1",
    "net, MQ: after initialization, and after a reset, frames of every flow go to receiveq1 only",
    devices={"net"}, transport=PCI, applies=_multiqueue,
)
def steering_receiveq1(ctx: PciContext) -> None:
    for when in ("initialization", "a reset (multiqueue was on before)"):
        ctx.bring_up()
        steering = Steering(ctx)
        got = steering.send()
        expect(set(got) == {0} and got[0] == FLOWS, f"after {when}: frames of {FLOWS} flows reached receive queues "
                                                    f"{ {p + 1: n for p, n in got.items()} } (receiveq: frames), "
                                                    "expected all on receiveq1")
        _pairs_set(ctx, steering.pairs)


@check(
    "virtio-1.4:5.1.9.5.6.2#vq-pairs",
    "net, MQ: once VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET n is used, no frame goes to a receive queue beyond receiveqn",
    devices={"net"}, transport=PCI, applies=_multiqueue,
)
def steering_vq_pairs(ctx: PciContext) -> None:
    ctx.bring_up()
    steering = Steering(ctx)
    for pairs in sorted({2, steering.pairs}):
        _pairs_set(ctx, pairs)
        got = steering.send()
        expect(sum(got.values()) == FLOWS, f"virtqueue_pairs {pairs}: {sum(got.values())} of {FLOWS} frames received")
        expect(max(got) < pairs, f"virtqueue_pairs {pairs}: frames reached receiveq{max(got) + 1}")
        for pair in range(steering.pairs):
            steering.post(pair)


@check(
    "virtio-1.4:5.1.9.5.6.2#reset-reselect",
    "net, MQ and RING_RESET: with receiveq1 being reset, frames of every flow still arrive, on the other queues",
    devices={"net"}, transport=PCI, applies=_multiqueue,
)
def steering_reset_reselect(ctx: PciContext) -> None:
    ctx.bring_up()
    steering = Steering(ctx)
    _pairs_set(ctx, steering.pairs)
    steering.reset_queue(0)
    got = steering.send()
    expect(sum(got.values()) == FLOWS, f"receiveq1 being reset: {sum(got.values())} of {FLOWS} frames were received on "
                                       "the other receive queues")


@check(
    "virtio-1.4:5.1.9.5.6.2#reset-all",
    "net, MQ and RING_RESET: frames arriving while every receive queue is being reset are dropped, not delivered "
    "once the queues are enabled again",
    devices={"net"}, transport=PCI, applies=_multiqueue,
)
def steering_reset_all(ctx: PciContext) -> None:
    ctx.bring_up()
    steering = Steering(ctx)
    _pairs_set(ctx, steering.pairs)
    for pair in range(steering.pairs):
        steering.reset_queue(pair)
    steering.send()
    for pair in range(steering.pairs):
        ctx.driver.setup_queue(2 * pair)
        steering.post(pair)
    mac, late = _mac(ctx), 0
    for pair in range(steering.pairs):
        late += sum(e.data[NET_HDR_SIZE:NET_HDR_SIZE + 6] == mac for e in ctx.driver.queues[2 * pair].get_used())
    expect(late == 0, f"{late} frames that arrived while every receive queue was being reset were delivered later")


# -- receive-side scaling (5.1.9.5.7.3) ---------------------------------------------------------------------
RSS_KEY = bytes(range(7, 47))  # 40 bytes, rss_max_key_size at the least (5.1.4.1)
RSS_TABLE = 8


def _rss(caps: Capabilities) -> str | None:
    why = _multiqueue(caps)
    return why or needs_ctrl((VIRTIO_NET_F_RSS, "VIRTIO_NET_F_RSS"))(caps)


def _toeplitz(key: bytes, data: bytes) -> int:
    """5.1.9.4.3's Toeplitz hash, bit by bit: for each set input bit, XOR in the key's 32 bits at that bit."""
    bits = int.from_bytes(key, "big")
    width = 8 * len(key)
    result = 0
    for n in range(8 * len(data)):
        if data[n // 8] >> (7 - n % 8) & 1 and n + 32 <= width:
            result ^= bits >> (width - 32 - n) & 0xFFFFFFFF
    return result


def _tcp4(mac: bytes, sport: int, tag: bytes) -> tuple[bytes, bytes]:
    """An Ethernet/IPv4/TCP frame to ``mac`` from port ``sport``, and the bytes TCPv4 hashing takes from it."""
    addresses = bytes([10, 0, 0, 2, 10, 0, 0, 1])
    ports = struct.pack("!HH", sport, 80)
    ip = struct.pack("!BBHHHBBH", 0x45, 0, 20 + 20 + len(tag), 0, 0, 64, IPPROTO_TCP, 0) + addresses
    tcp = ports + struct.pack("!IIBBHHH", 1, 0, 5 << 4, 0x10, 65535, 0, 0)
    return mac + PEER + ETH_P_IP.to_bytes(2, "big") + ip + tcp + tag, addresses + ports


def _rss_config(table: list[int], unclassified: int, pairs: int) -> bytes:
    """``virtio_net_rss_config``: TCPv4 hashing, ``table`` of receive queue ids (pair numbers)."""
    return (struct.pack("<IHH", VIRTIO_NET_HASH_TYPE_TCPv4, len(table) - 1, unclassified)
            + struct.pack(f"<{len(table)}H", *table) + struct.pack("<HB", pairs, len(RSS_KEY)) + RSS_KEY)


def _where(ctx: PciContext, steering: Steering, tags: list[bytes]) -> dict[bytes, int]:
    """Which receive queue (0-based pair) each frame tagged with one of ``tags`` reached."""
    seen = {}
    for pair in range(steering.pairs):
        q = ctx.driver.queues.get(2 * pair)
        for e in q.get_used() if q is not None else []:
            for tag in tags:
                if tag in e.data:
                    seen[tag] = pair
    return seen


@check(
    "virtio-1.4:5.1.9.5.7.3#steering",
    "net, RSS: once VIRTIO_NET_CTRL_MQ_RSS_CONFIG is used, a TCPv4 frame goes to indirection_table[Toeplitz hash & "
    "mask], a frame without a hash (not IP) to unclassified_queue",
    devices={"net"}, transport=PCI, applies=_rss,
)
def rss_steering(ctx: PciContext) -> None:
    ctx.bring_up()
    steering = Steering(ctx)
    table = [(i * 3 + 1) % steering.pairs for i in range(RSS_TABLE)]
    unclassified = steering.pairs - 1
    ctrl_ok(ctx, VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_RSS_CONFIG, _rss_config(table, unclassified, steering.pairs))
    mac, want, tags = _mac(ctx), {}, []
    for sport in range(1000, 1000 + FLOWS):
        tag = new_tag()
        frame, hashed = _tcp4(mac, sport, tag)
        want[tag] = table[_toeplitz(RSS_KEY, hashed) & (RSS_TABLE - 1)]
        tags.append(tag)
        steering.switch.forward(steering.network, frame)
    other = new_tag()
    steering.switch.forward(steering.network, mac + PEER + b"\x88\xb5" + (other * 8).ljust(46, b"\0"))
    want[other] = unclassified
    seen = _where(ctx, steering, tags + [other])
    wrong = {tag.hex(): (seen.get(tag), queue) for tag, queue in want.items() if seen.get(tag) != queue}
    expect(not wrong, f"{len(wrong)} of {len(want)} frames not on the receive queue RSS chooses (tag: (got, expected "
                      f"0-based receive queue)): {dict(list(wrong.items())[:4])}")


@check(
    "virtio-1.4:5.1.9.5.7.3#reset-drop",
    "net, RSS and RING_RESET: a frame whose RSS destination queue is being reset is dropped, not steered elsewhere "
    "nor delivered once the queue is enabled again",
    devices={"net"}, transport=PCI, applies=_rss,
)
def rss_reset_drop(ctx: PciContext) -> None:
    ctx.bring_up()
    steering = Steering(ctx)
    last = steering.pairs - 1
    ctrl_ok(ctx, VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_RSS_CONFIG, _rss_config([last] * RSS_TABLE, 0, steering.pairs))
    steering.reset_queue(last)
    mac, tags = _mac(ctx), []
    for sport in range(2000, 2000 + FLOWS):
        tags.append(new_tag())
        steering.switch.forward(steering.network, _tcp4(mac, sport, tags[-1])[0])
    control = new_tag()  # not IP: unclassified_queue, receiveq1, which is not being reset
    steering.switch.forward(steering.network, mac + PEER + b"\x88\xb5" + (control * 8).ljust(46, b"\0"))
    ctx.driver.setup_queue(2 * last)
    steering.post(last)
    seen = _where(ctx, steering, tags + [control])
    expect(seen.get(control) == 0, "a frame for unclassified_queue (receiveq1) was not received there")
    late = [tag for tag in tags if tag in seen]
    expect(not late, f"{len(late)} of {FLOWS} frames for receiveq{last + 1}, which was being reset, were received "
                     f"(on receive queues {sorted({seen[t] + 1 for t in late})})")


# -- inner header hash (5.1.9.4.4.4) ---------------------------------------------------------------------
OUTER_ADDRESSES = bytes([192, 0, 2, 1, 192, 0, 2, 2])
IP_PROTO_RESERVED = 253  # RFC 3692: for experimentation; the inner packets carry no transport header


def _tunnel(caps: Capabilities) -> str | None:
    return _rss(caps) or needs_ctrl((VIRTIO_NET_F_HASH_TUNNEL, "VIRTIO_NET_F_HASH_TUNNEL"))(caps)


def _ipv4(proto: int, addresses: bytes, payload: bytes) -> bytes:
    return struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(payload), 0, 0, 64, proto, 0) + addresses + payload


def _ipip(mac: bytes, inner_addresses: bytes, tag: bytes) -> bytes:
    """An IPv4-in-IPv4 frame (RFC 2003): the outer addresses never change, the inner ones do."""
    return mac + PEER + ETH_P_IP.to_bytes(2, "big") + _ipv4(IPPROTO_IPIP, OUTER_ADDRESSES,
                                                             _ipv4(IP_PROTO_RESERVED, inner_addresses, tag))


def _tunnel_set(ctx: PciContext, types: int) -> None:
    ctrl_ok(ctx, VIRTIO_NET_CTRL_HASH_TUNNEL, VIRTIO_NET_CTRL_HASH_TUNNEL_SET, struct.pack("<I", types))


def _supported_tunnel_types(ctx: PciContext) -> int:
    return int.from_bytes(ctx.driver.read_device_config(SUPPORTED_TUNNEL_TYPES_OFFSET, 4), "little")


def _ipip_steered_by(ctx: PciContext, steering: Steering, table: list[int]) -> dict[str, int]:
    """Send IPIP frames of :data:`FLOWS` inner flows; how many went where the outer and the inner hash say."""
    mac, tags, want = _mac(ctx), [], {}
    for flow in range(FLOWS):
        tag = new_tag()
        inner = bytes([10, 1, flow, 7, 10, 2, 0, 9])
        steering.switch.forward(steering.network, _ipip(mac, inner, tag))
        want[tag] = tuple(table[_toeplitz(RSS_KEY, a) & (RSS_TABLE - 1)] for a in (OUTER_ADDRESSES, inner))
        tags.append(tag)
    seen = _where(ctx, steering, tags)
    for pair in range(steering.pairs):
        steering.post(pair)
    return {"outer": sum(seen.get(t) == w[0] for t, w in want.items()),
            "inner": sum(seen.get(t) == w[1] for t, w in want.items())}


def _ipip_rss(ctx: PciContext) -> tuple[Steering, list[int]]:
    """Bring up, RSS on IPv4 addresses over every pair; the table, its entries spread."""
    ctx.bring_up()
    steering = Steering(ctx)
    table = [i % steering.pairs for i in range(RSS_TABLE)]
    config = _rss_config(table, 0, steering.pairs)
    config = struct.pack("<I", VIRTIO_NET_HASH_TYPE_IPv4) + config[4:]
    ctrl_ok(ctx, VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_RSS_CONFIG, config)
    return steering, table


def _expect_hashed_on(ctx: PciContext, steering: Steering, table: list[int], header: str, when: str) -> None:
    got = _ipip_steered_by(ctx, steering, table)
    expect(got[header] == FLOWS, f"{when}: {got[header]} of {FLOWS} IPIP frames went where the hash of their {header} "
                                 f"header sends them ({got['inner' if header == 'outer' else 'outer']} where the "
                                 f"{'inner' if header == 'outer' else 'outer'} one does)")


@check(
    "virtio-1.4:5.1.9.4.4.4#outer",
    "net, RSS and HASH_TUNNEL: a packet whose outer header matches no enabled encapsulation type (IPIP with none "
    "enabled, or only another type enabled) is hashed on its outer header",
    devices={"net"}, transport=PCI, applies=_tunnel,
)
def tunnel_outer(ctx: PciContext) -> None:
    steering, table = _ipip_rss(ctx)
    _expect_hashed_on(ctx, steering, table, "outer", "no encapsulation type enabled")
    others = _supported_tunnel_types(ctx) & ~VIRTIO_NET_HASH_TUNNEL_TYPE_IPIP
    if others:
        _tunnel_set(ctx, others)
        _expect_hashed_on(ctx, steering, table, "outer", f"encapsulation types {others:#x} enabled, IPIP not")


@check(
    "virtio-1.4:5.1.9.4.4.4#unsupported",
    "net, HASH_TUNNEL: VIRTIO_NET_CTRL_HASH_TUNNEL_SET with a type not in supported_tunnel_types gets VIRTIO_NET_ERR",
    devices={"net"}, transport=PCI, applies=needs_ctrl((VIRTIO_NET_F_HASH_TUNNEL, "VIRTIO_NET_F_HASH_TUNNEL")),
)
def tunnel_unsupported(ctx: PciContext) -> None:
    ctx.bring_up()
    supported = _supported_tunnel_types(ctx)
    unsupported = ~supported & 0xFFFFFFFF
    expect(unsupported != 0, "supported_tunnel_types has every bit set")
    bit = unsupported & -unsupported
    ctrl_err(ctx, VIRTIO_NET_CTRL_HASH_TUNNEL, VIRTIO_NET_CTRL_HASH_TUNNEL_SET, struct.pack("<I", supported | bit),
             f"enabled_tunnel_types {supported | bit:#x} (bit {bit:#x} not in supported_tunnel_types {supported:#x})")


@check(
    "virtio-1.4:5.1.9.4.4.4#disable",
    "net, RSS and HASH_TUNNEL: with IPIP enabled IPIP packets are hashed on the inner header; after "
    "enabled_tunnel_types 0, and after a device reset, on the outer header again",
    devices={"net"}, transport=PCI, applies=_tunnel,
)
def tunnel_disable(ctx: PciContext) -> None:
    steering, table = _ipip_rss(ctx)
    expect(_supported_tunnel_types(ctx) & VIRTIO_NET_HASH_TUNNEL_TYPE_IPIP, "IPIP not in supported_tunnel_types")
    _tunnel_set(ctx, VIRTIO_NET_HASH_TUNNEL_TYPE_IPIP)
    _expect_hashed_on(ctx, steering, table, "inner", "IPIP enabled")
    _tunnel_set(ctx, 0)
    _expect_hashed_on(ctx, steering, table, "outer", "enabled_tunnel_types set to 0")
    _tunnel_set(ctx, VIRTIO_NET_HASH_TUNNEL_TYPE_IPIP)
    steering, table = _ipip_rss(ctx)  # resets the device first
    _expect_hashed_on(ctx, steering, table, "outer", "after a device reset")
