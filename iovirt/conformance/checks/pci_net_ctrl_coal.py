"""virtio-net notification coalescing and device statistics through the control virtqueue (virtio 1.4
5.1.9.5.10 and 5.1.9.5.11), behind the in-process virtio-pci transport where the device serves the
control queue itself.

Coalescing parameters are read back with VIRTIO_NET_CTRL_NOTF_COAL_VQ_GET, so those checks need
VIRTIO_NET_F_VQ_NOTF_COAL; the ones that disable and re-enable a queue need VIRTIO_F_RING_RESET.
"""

from __future__ import annotations

import struct

from iovirt.conformance.checks.pci import PCI
from iovirt.conformance.checks.pci_net_ctrl_rx import Link, ctrl_command, ctrl_err, ctrl_ok, needs_ctrl
from iovirt.conformance.platform_target import PciContext
from iovirt.conformance.registry import check, expect
from iovirt.virtio.defs import VIRTIO_F_RING_RESET
from iovirt.virtio.net.defs import (
    VIRTIO_NET_CTRL_COAL,
    VIRTIO_NET_CTRL_COAL_VQ,
    VIRTIO_NET_CTRL_NOTF_COAL,
    VIRTIO_NET_CTRL_NOTF_COAL_RX_SET,
    VIRTIO_NET_CTRL_NOTF_COAL_TX_SET,
    VIRTIO_NET_CTRL_NOTF_COAL_VQ_GET,
    VIRTIO_NET_CTRL_NOTF_COAL_VQ_SET,
    VIRTIO_NET_CTRL_QUEUE_STATS,
    VIRTIO_NET_CTRL_STATS,
    VIRTIO_NET_CTRL_STATS_GET,
    VIRTIO_NET_CTRL_STATS_QUERY,
    VIRTIO_NET_F_DEVICE_STATS,
    VIRTIO_NET_F_NOTF_COAL,
    VIRTIO_NET_F_VQ_NOTF_COAL,
    VIRTIO_NET_OK,
    VIRTIO_NET_STATS_REPLY_HDR,
    VIRTIO_NET_STATS_TYPE_CVQ,
    VIRTIO_NET_STATS_TYPE_RX_BASIC,
    VIRTIO_NET_STATS_TYPE_TX_BASIC,
)
from iovirt.virtio.transport.defs import VIRTIO_PCI_COMMON_Q_RESET, VIRTIO_PCI_COMMON_Q_SELECT

_COAL = (VIRTIO_NET_F_NOTF_COAL, "VIRTIO_NET_F_NOTF_COAL")
_VQ_COAL = (VIRTIO_NET_F_VQ_NOTF_COAL, "VIRTIO_NET_F_VQ_NOTF_COAL")
_RING_RESET = (VIRTIO_F_RING_RESET, "VIRTIO_F_RING_RESET")
_STATS = (VIRTIO_NET_F_DEVICE_STATS, "VIRTIO_NET_F_DEVICE_STATS")
TX_PARAMS, RX_PARAMS, VQ_PARAMS = (16, 40), (8, 30), (3, 7)  # (max_packets, max_usecs), all different
FRAMES = 4
RESULT_ROOM = 512  # bytes of command-specific-result offered to STATS_GET: more than any reply here
STATS_TYPES = (VIRTIO_NET_STATS_TYPE_RX_BASIC, VIRTIO_NET_STATS_TYPE_TX_BASIC, VIRTIO_NET_STATS_TYPE_CVQ)
_LE64 = struct.Struct("<Q")


# -- notifications coalescing (5.1.9.5.10.6) ----------------------------------------------------------
def _set(ctx: PciContext, command: int, params: tuple[int, int]) -> None:
    ctrl_ok(ctx, VIRTIO_NET_CTRL_NOTF_COAL, command, VIRTIO_NET_CTRL_COAL.pack(*params))


def _vq_set(ctx: PciContext, index: int, params: tuple[int, int], reserved: int = 0) -> None:
    ctrl_ok(ctx, VIRTIO_NET_CTRL_NOTF_COAL, VIRTIO_NET_CTRL_NOTF_COAL_VQ_SET,
            VIRTIO_NET_CTRL_COAL_VQ.pack(index, reserved, *params))


def _vq_get(ctx: PciContext, index: int) -> tuple[int, int]:
    result = ctrl_ok(ctx, VIRTIO_NET_CTRL_NOTF_COAL, VIRTIO_NET_CTRL_NOTF_COAL_VQ_GET, struct.pack("<HH", index, 0),
                     VIRTIO_NET_CTRL_COAL.size)
    expect(len(result) == VIRTIO_NET_CTRL_COAL.size, f"VIRTIO_NET_CTRL_NOTF_COAL_VQ_GET {index} wrote {len(result)} "
                                                     f"bytes of virtio_net_ctrl_coal, expected {VIRTIO_NET_CTRL_COAL.size}")
    params: tuple[int, int] = VIRTIO_NET_CTRL_COAL.unpack(result)
    return params


def _reset_queue(ctx: PciContext, index: int) -> None:
    """Disable queue ``index`` with queue_reset (2.6.1) and enable it again."""
    d = ctx.driver
    d.common_write(VIRTIO_PCI_COMMON_Q_SELECT, 2, index)
    d.common_write(VIRTIO_PCI_COMMON_Q_RESET, 2, 1)
    expect(d.common_read(VIRTIO_PCI_COMMON_Q_RESET, 2) == 0, f"queue {index} still resetting")
    d.setup_queue(index)


@check(
    "virtio-1.4:5.1.9.5.10.6#reserved",
    "net, VQ_NOTF_COAL: VIRTIO_NET_CTRL_NOTF_COAL_VQ_SET with reserved set is served as with reserved 0",
    devices={"net"}, transport=PCI, applies=needs_ctrl(_VQ_COAL),
)
def coal_reserved(ctx: PciContext) -> None:
    ctx.bring_up()
    _vq_set(ctx, 0, VQ_PARAMS, reserved=0xFFFF)
    got = _vq_get(ctx, 0)
    expect(got == VQ_PARAMS, f"VQ_GET 0 gives {got} after a VQ_SET of {VQ_PARAMS} with reserved 0xffff")


@check(
    "virtio-1.4:5.1.9.5.10.6#ack",
    "net, NOTF_COAL and VQ_NOTF_COAL: TX_SET, RX_SET and VQ_SET acked VIRTIO_NET_OK changed the parameters "
    "(VQ_GET shows them); ones the device could not carry out (cut short) get VIRTIO_NET_ERR and change nothing",
    devices={"net"}, transport=PCI, applies=needs_ctrl(_COAL, _VQ_COAL),
)
def coal_ack(ctx: PciContext) -> None:
    ctx.bring_up()
    _set(ctx, VIRTIO_NET_CTRL_NOTF_COAL_TX_SET, TX_PARAMS)
    _set(ctx, VIRTIO_NET_CTRL_NOTF_COAL_RX_SET, RX_PARAMS)
    expect(_vq_get(ctx, 1) == TX_PARAMS, f"transmitq1 has {_vq_get(ctx, 1)} after TX_SET {TX_PARAMS} was acked OK")
    expect(_vq_get(ctx, 0) == RX_PARAMS, f"receiveq1 has {_vq_get(ctx, 0)} after RX_SET {RX_PARAMS} was acked OK")
    _vq_set(ctx, 0, VQ_PARAMS)
    expect(_vq_get(ctx, 0) == VQ_PARAMS, f"receiveq1 has {_vq_get(ctx, 0)} after VQ_SET {VQ_PARAMS} was acked OK")
    for command, name in ((VIRTIO_NET_CTRL_NOTF_COAL_TX_SET, "TX_SET"), (VIRTIO_NET_CTRL_NOTF_COAL_RX_SET, "RX_SET")):
        ctrl_err(ctx, VIRTIO_NET_CTRL_NOTF_COAL, command, VIRTIO_NET_CTRL_COAL.pack(1, 1)[:4],
                 f"a {name} cut to 4 bytes (only max_packets)")
    ctrl_err(ctx, VIRTIO_NET_CTRL_NOTF_COAL, VIRTIO_NET_CTRL_NOTF_COAL_VQ_SET,
             VIRTIO_NET_CTRL_COAL_VQ.pack(0, 0, 1, 1)[:8], "a VQ_SET cut to 8 bytes (no max_usecs)")
    expect((_vq_get(ctx, 0), _vq_get(ctx, 1)) == (VQ_PARAMS, TX_PARAMS),
           "commands answered VIRTIO_NET_ERR changed the parameters")


@check(
    "virtio-1.4:5.1.9.5.10.6#vq_index",
    "net, VQ_NOTF_COAL: VQ_SET and VQ_GET of a queue that is not an enabled transmit or receive queue (the "
    "control queue, one beyond num_queues, one disabled by queue_reset with RING_RESET) get VIRTIO_NET_ERR",
    devices={"net"}, transport=PCI, applies=needs_ctrl(_VQ_COAL),
)
def coal_vq_index(ctx: PciContext) -> None:
    ctx.bring_up()
    ctrl = ctx.num_queues - 1
    for index, what in ((ctrl, "the control queue"), (ctx.num_queues, "a queue beyond num_queues")):
        ctrl_err(ctx, VIRTIO_NET_CTRL_NOTF_COAL, VIRTIO_NET_CTRL_NOTF_COAL_VQ_GET, struct.pack("<HH", index, 0),
                 f"vq_index {index} ({what})", VIRTIO_NET_CTRL_COAL.size)
        ctrl_err(ctx, VIRTIO_NET_CTRL_NOTF_COAL, VIRTIO_NET_CTRL_NOTF_COAL_VQ_SET,
                 VIRTIO_NET_CTRL_COAL_VQ.pack(index, 0, *VQ_PARAMS), f"vq_index {index} ({what})")
    if ctx.driver.has_feature(VIRTIO_F_RING_RESET):
        d = ctx.driver
        d.common_write(VIRTIO_PCI_COMMON_Q_SELECT, 2, 1)
        d.common_write(VIRTIO_PCI_COMMON_Q_RESET, 2, 1)
        ctrl_err(ctx, VIRTIO_NET_CTRL_NOTF_COAL, VIRTIO_NET_CTRL_NOTF_COAL_VQ_GET, struct.pack("<HH", 1, 0),
                 "vq_index 1 (transmitq1, disabled by queue_reset)", VIRTIO_NET_CTRL_COAL.size)


@check(
    "virtio-1.4:5.1.9.5.10.6#re-enable",
    "net, NOTF_COAL, VQ_NOTF_COAL and RING_RESET: a queue disabled and enabled again has the last TX_SET / RX_SET "
    "parameters of its direction, or 0 when there was none",
    devices={"net"}, transport=PCI, applies=needs_ctrl(_COAL, _VQ_COAL, _RING_RESET),
)
def coal_re_enable(ctx: PciContext) -> None:
    ctx.bring_up()
    _set(ctx, VIRTIO_NET_CTRL_NOTF_COAL_TX_SET, TX_PARAMS)
    _vq_set(ctx, 1, VQ_PARAMS)
    _reset_queue(ctx, 1)
    got = _vq_get(ctx, 1)
    expect(got == TX_PARAMS, f"transmitq1 re-enabled has {got}, expected the TX_SET parameters {TX_PARAMS}")
    _vq_set(ctx, 0, VQ_PARAMS)  # no RX_SET was sent
    _reset_queue(ctx, 0)
    got = _vq_get(ctx, 0)
    expect(got == (0, 0), f"receiveq1 re-enabled has {got}, expected 0 (the driver set no RX parameters)")
    _set(ctx, VIRTIO_NET_CTRL_NOTF_COAL_RX_SET, RX_PARAMS)
    _vq_set(ctx, 0, VQ_PARAMS)
    _reset_queue(ctx, 0)
    got = _vq_get(ctx, 0)
    expect(got == RX_PARAMS, f"receiveq1 re-enabled has {got}, expected the RX_SET parameters {RX_PARAMS}")


@check(
    "virtio-1.4:5.1.9.5.10.6#suppressed",
    "net, NOTF_COAL: with coalescing set, the receive queues send no used buffer notification while the driver "
    "suppresses them (and do once it asks again)",
    devices={"net"}, transport=PCI, applies=needs_ctrl(_COAL),
)
def coal_suppressed(ctx: PciContext) -> None:
    ctx.bring_up()
    _set(ctx, VIRTIO_NET_CTRL_NOTF_COAL_RX_SET, (1, 1))  # a notification per frame, were they not suppressed
    link = Link(ctx)
    mac = ctx.driver.read_device_config(0, 6)

    def rx_interrupts() -> int:
        taken = ctx.take_interrupts()
        return sum(taken.get(index, 0) for index in range(0, ctx.num_queues - 1, 2))

    before = rx_interrupts()
    expect(link.received(mac), "a frame to the device's mac was not received")
    expect(rx_interrupts() > before, "no used buffer notification for a frame while the driver asked for them")
    for q in link.rx:
        q.set_interrupts(False)
    before = rx_interrupts()
    for _ in range(FRAMES):
        expect(link.received(mac), "a frame to the device's mac was not received")
    now = rx_interrupts()
    expect(now == before, f"{now - before} used buffer notifications on the receive queues while the driver "
                          "suppressed them")
    for q in link.rx:
        q.set_interrupts(True)
    expect(link.received(mac), "a frame to the device's mac was not received")
    expect(rx_interrupts() > now, "no used buffer notification once the driver asked for them again")


@check(
    "virtio-1.4:5.1.9.5.10.6#reset",
    "net, NOTF_COAL and VQ_NOTF_COAL: after a device reset every coalescing parameter reads 0",
    devices={"net"}, transport=PCI, applies=needs_ctrl(_COAL, _VQ_COAL),
)
def coal_reset(ctx: PciContext) -> None:
    ctx.bring_up()
    _set(ctx, VIRTIO_NET_CTRL_NOTF_COAL_TX_SET, TX_PARAMS)
    _set(ctx, VIRTIO_NET_CTRL_NOTF_COAL_RX_SET, RX_PARAMS)
    _vq_set(ctx, 0, VQ_PARAMS)
    ctx.bring_up()  # resets first (3.1.1)
    for index in range(ctx.num_queues - 1):
        got = _vq_get(ctx, index)
        expect(got == (0, 0), f"queue {index} has coalescing parameters {got} after a device reset, expected 0")


# -- device statistics (5.1.9.5.11.12) -------------------------------------------------------------------
def _supported(ctx: PciContext) -> int:
    result = ctrl_ok(ctx, VIRTIO_NET_CTRL_STATS, VIRTIO_NET_CTRL_STATS_QUERY, result=_LE64.size)
    expect(len(result) == _LE64.size, f"VIRTIO_NET_CTRL_STATS_QUERY wrote {len(result)} bytes of "
                                      f"virtio_net_stats_capabilities, expected {_LE64.size}")
    supported: int = _LE64.unpack(result)[0]
    return supported


def _entries(ctx: PciContext, supported: int) -> list[tuple[int, int]]:
    """One stats[] entry per supported basic/controlq type, on a queue it is for."""
    ctrl = ctx.num_queues - 1
    queue_of = {VIRTIO_NET_STATS_TYPE_RX_BASIC: 0, VIRTIO_NET_STATS_TYPE_TX_BASIC: 1, VIRTIO_NET_STATS_TYPE_CVQ: ctrl}
    return [(queue_of[t], t) for t in STATS_TYPES if supported & t]


def _get(entries: list[tuple[int, int]]) -> bytes:
    return b"".join(VIRTIO_NET_CTRL_QUEUE_STATS.pack(vq, types) for vq, types in entries)


@check(
    "virtio-1.4:5.1.9.5.11.12#query",
    "net, DEVICE_STATS: VIRTIO_NET_CTRL_STATS_QUERY answers virtio_net_stats_capabilities, and every type it "
    "lists (of the basic and controlq ones) can be got",
    devices={"net"}, transport=PCI, applies=needs_ctrl(_STATS),
)
def stats_query(ctx: PciContext) -> None:
    ctx.bring_up()
    supported = _supported(ctx)
    entries = _entries(ctx, supported)
    expect(bool(supported and entries), f"supported_stats_types {supported:#x}: none of the basic or controlq types")
    for entry in entries:
        ctrl_ok(ctx, VIRTIO_NET_CTRL_STATS, VIRTIO_NET_CTRL_STATS_GET, _get([entry]), RESULT_ROOM)
    # The other way round: a type it serves is among the types it lists.
    queue_of = {VIRTIO_NET_STATS_TYPE_RX_BASIC: 0, VIRTIO_NET_STATS_TYPE_TX_BASIC: 1,
                VIRTIO_NET_STATS_TYPE_CVQ: ctx.num_queues - 1}
    for stats_type in STATS_TYPES:
        if not supported & stats_type:
            reply = ctrl_command(ctx, VIRTIO_NET_CTRL_STATS, VIRTIO_NET_CTRL_STATS_GET,
                                 _get([(queue_of[stats_type], stats_type)]), RESULT_ROOM)
            expect(reply[0] != VIRTIO_NET_OK, f"type {stats_type:#x} is served but supported_stats_types "
                                              f"{supported:#x} does not list it")


@check(
    "virtio-1.4:5.1.9.5.11.12#bad-request",
    "net, DEVICE_STATS: a STATS_GET with one bad entry among good ones (vq_index out of range, an unknown type, a "
    "type not for that queue) gets VIRTIO_NET_ERR",
    devices={"net"}, transport=PCI, applies=needs_ctrl(_STATS),
)
def stats_bad_request(ctx: PciContext) -> None:
    ctx.bring_up()
    supported = _supported(ctx)
    good = _entries(ctx, supported)[:1]
    unknown = 1 << 63  # no such type
    bad = [((ctx.num_queues, good[0][1]), f"vq_index {ctx.num_queues} beyond the queues"),
           ((good[0][0], unknown), "an unknown type (bit 63)")]
    if supported & VIRTIO_NET_STATS_TYPE_TX_BASIC:
        bad.append(((0, VIRTIO_NET_STATS_TYPE_TX_BASIC), "TX_BASIC asked of receiveq1"))
    for entry, why in bad:
        ctrl_err(ctx, VIRTIO_NET_CTRL_STATS, VIRTIO_NET_CTRL_STATS_GET, _get(good + [entry]),
                 f"a good entry then one with {why}", RESULT_ROOM)


def _replies(ctx: PciContext, entries: list[tuple[int, int]], room: int) -> tuple[bytes, list[tuple[int, int, int]]]:
    """STATS_GET of ``entries`` (one type each): its result and the (type, vq_index, size) of each reply in it."""
    result = ctrl_ok(ctx, VIRTIO_NET_CTRL_STATS, VIRTIO_NET_CTRL_STATS_GET, _get(entries), room)
    headers: list[tuple[int, int, int]] = []
    pos = 0
    for _ in entries:
        expect(pos + VIRTIO_NET_STATS_REPLY_HDR.size <= len(result),
               f"{len(result)} bytes of result: no room for reply {len(headers)} of {len(entries)}")
        rtype, vq, size = VIRTIO_NET_STATS_REPLY_HDR.unpack_from(result, pos)
        expect(size >= VIRTIO_NET_STATS_REPLY_HDR.size, f"reply {len(headers)}: size {size} shorter than its header")
        headers.append((rtype, vq, size))
        pos += size
    return result, headers


@check(
    "virtio-1.4:5.1.9.5.11.12#reply-hdr",
    "net, DEVICE_STATS: each STATS_GET reply header has the type and vq_index asked for and the reply's size "
    "in bytes (the header and its le64 counters, within the result written)",
    devices={"net"}, transport=PCI, applies=needs_ctrl(_STATS),
)
def stats_reply_hdr(ctx: PciContext) -> None:
    ctx.bring_up()
    entries = _entries(ctx, _supported(ctx))
    result, headers = _replies(ctx, entries, RESULT_ROOM)
    want = [(t.bit_length() - 1, vq) for vq, t in entries]
    expect([(t, vq) for t, vq, _ in headers] == want, f"replies for (type, vq_index) {[(t, vq) for t, vq, _ in headers]}, "
                                                       f"asked for {want}")
    pos = 0
    for rtype, vq, size in headers:
        expect(pos + size <= len(result), f"reply type {rtype} queue {vq}: size {size} runs past the result written")
        pos += size
        expect(size % _LE64.size == 0, f"reply type {rtype} queue {vq}: size {size} is not the header and le64s")


@check(
    "virtio-1.4:5.1.9.5.11.12#fill",
    "net, DEVICE_STATS: STATS_GET writes only the valid bytes: into a bigger buffer exactly the replies, into a "
    "smaller one only as many bytes as it holds",
    devices={"net"}, transport=PCI, applies=needs_ctrl(_STATS),
)
def stats_fill(ctx: PciContext) -> None:
    ctx.bring_up()
    entries = _entries(ctx, _supported(ctx))
    result, headers = _replies(ctx, entries, RESULT_ROOM)
    valid = sum(size for _, _, size in headers)
    expect(len(result) == valid, f"{len(result)} bytes of result written into {RESULT_ROOM}, the replies hold {valid}")
    small = VIRTIO_NET_STATS_REPLY_HDR.size + 4
    reply = ctrl_command(ctx, VIRTIO_NET_CTRL_STATS, VIRTIO_NET_CTRL_STATS_GET, _get(entries), small)
    expect(reply[0] == VIRTIO_NET_OK, f"STATS_GET into {small} bytes answered {reply[0]}")
    expect(len(reply) - 1 <= small, f"{len(reply) - 1} bytes written into a {small}-byte result buffer")
