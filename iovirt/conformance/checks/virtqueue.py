"""Generic device requirements of virtio 1.2 (sections 2 and 6) reachable through vhost-user."""

from __future__ import annotations

import os

from iovirt.conformance.checks.common import Workload
from iovirt.conformance.devices import BlkPort, NetPort, marker_frame, new_tag
from iovirt.conformance.registry import PROTOCOL_DEVICES, CheckFailed, NotApplicable, check, expect
from iovirt.conformance.target import Context, needs_feature
from iovirt.vhost_user.messages import VHOST_USER_F_PROTOCOL_FEATURES
from iovirt.virtio.blk.defs import REQ_HDR, SECTOR_SIZE, VIRTIO_BLK_F_RO, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from iovirt.virtio.defs import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_USED_F_NO_NOTIFY,
    desc_table_size,
)
from iovirt.virtio.net.defs import NetHdr

MINIMAL = (1 << VIRTIO_F_VERSION_1) | (1 << VHOST_USER_F_PROTOCOL_FEATURES)


@check("virtio-1.2:6.2", "the device offers VIRTIO_F_VERSION_1", devices=PROTOCOL_DEVICES)
def offers_version_1(ctx: Context) -> None:
    expect(ctx.caps.has(VIRTIO_F_VERSION_1), f"features {ctx.caps.features:#x} lack VIRTIO_F_VERSION_1 (bit 32)")


@check("virtio-1.2:2.2.2", "the device accepts a valid subset of its features (VERSION_1 alone)")
def minimal_subset(ctx: Context) -> None:
    link = ctx.open(features=MINIMAL)
    Workload(ctx, link).run(2)


@check("virtio-1.2:2.7.4.1", "the device makes no assumption about how a request is split into descriptors")
def message_framing(ctx: Context) -> str:
    link = ctx.open()
    work = Workload(ctx, link)
    work.run(2, split=True)
    if ctx.caps.device != "blk":
        return ""
    if ctx.caps.has(VIRTIO_BLK_F_RO):
        return "read-only: the header and data in one descriptor not written"
    # The other way round: header and data in one device-readable descriptor.  2.7.4 lets the driver lay a
    # request out either way; legacy devices without VIRTIO_F_ANY_LAYOUT wanted the header alone.
    data = os.urandom(SECTOR_SIZE)
    status = _put(link, b"\xff")
    link.add_buffers(work.index, [_put(link, REQ_HDR.pack(VIRTIO_BLK_T_OUT, 0, FRAMING_SECTOR) + data)], [status])
    link.submit(work.index)
    link.wait_used(work.index, 1)
    got = link.memory.read(status[0], 1)[0]
    expect(got == VIRTIO_BLK_S_OK, f"a write with its header and data in one descriptor: status {got}, expected OK")
    back = BlkPort.on(link, work.index).request(VIRTIO_BLK_T_IN, FRAMING_SECTOR, in_len=SECTOR_SIZE)
    expect(back.status == VIRTIO_BLK_S_OK and back.data == data,
           "a write with its header and data in one descriptor read back different")
    return ""


FRAMING_SECTOR = 32
"""Where :func:`message_framing` writes (no other check of this module writes there)."""


@check("virtio-1.2:2.7.5.1", "the device writes neither device-readable buffers nor the descriptor table")
def no_write_readable(ctx: Context) -> None:
    link = ctx.open()
    work = Workload(ctx, link)
    q = work.queue
    heads = [work.post(split=True) for _ in range(3)]
    table = link.memory.read(q.desc_addr, desc_table_size(q.size))
    readable = []
    for head in heads:
        i = head
        while True:
            addr, length, flags, nxt = _desc(link, q.desc_addr, i)
            if not flags & 2:
                readable.append((addr, link.memory.read(addr, length)))
            if not flags & 1:
                break
            i = nxt
    link.submit(work.index)
    link.wait_used(work.index, len(heads))
    expect(link.memory.read(q.desc_addr, desc_table_size(q.size)) == table, "the device wrote into the descriptor table")
    for addr, data in readable:
        expect(link.memory.read(addr, len(data)) == data, f"the device wrote into the device-readable buffer at {addr:#x}")


def _desc(link, table: int, i: int) -> tuple[int, int, int, int]:
    raw = link.memory.read(table + 16 * i, 16)
    return (
        int.from_bytes(raw[0:8], "little"),
        int.from_bytes(raw[8:12], "little"),
        int.from_bytes(raw[12:14], "little"),
        int.from_bytes(raw[14:16], "little"),
    )


@check(
    "virtio-1.2:2.7.5.3.2",
    "the device follows indirect descriptor tables",
    applies=needs_feature(VIRTIO_F_INDIRECT_DESC, "VIRTIO_F_INDIRECT_DESC"),
)
def indirect(ctx: Context) -> None:
    link = ctx.open()
    expect(link.negotiated.has(VIRTIO_F_INDIRECT_DESC), "VIRTIO_F_INDIRECT_DESC offered but not negotiated")
    Workload(ctx, link).run(3, indirect=True)


@check("virtio-1.2:2.7.8.2", "used entries name buffers made available, with len within their writable part")
def used_ring(ctx: Context) -> None:
    link = ctx.open()
    work = Workload(ctx, link)
    heads = {work.post() for _ in range(4)}
    link.submit(work.index)
    used = link.wait_used(work.index, 4)  # read_used validates ids, counts and lengths
    expect({u.head for u in used} == heads, f"used ids {sorted(u.head for u in used)}, available heads {sorted(heads)}")


@check("virtio-1.2:2.7.7.2#flags", "without EVENT_IDX, used-ring flags 0 means a used buffer notification")
def used_notify_flags(ctx: Context) -> None:
    link = ctx.open(features=~(1 << VIRTIO_F_EVENT_IDX))
    work = Workload(ctx, link)
    link.memory.write_u16(work.queue.avail_addr, 0)
    link.frontend.wait_call(work.index, 0)
    work.run()
    expect(link.frontend.wait_call(work.index, ctx.timeout), "no call after a used buffer with avail flags 0")
    link.memory.write_u16(work.queue.avail_addr, VIRTQ_AVAIL_F_NO_INTERRUPT)  # SHOULD NOT notify: not checked


@check(
    "virtio-1.2:2.7.7.2#used_event",
    "with EVENT_IDX, the device notifies when it writes the used entry at used_event",
    applies=needs_feature(VIRTIO_F_EVENT_IDX, "VIRTIO_F_EVENT_IDX"),
)
def used_event(ctx: Context) -> None:
    link = ctx.open()
    expect(link.negotiated.has(VIRTIO_F_EVENT_IDX), "VIRTIO_F_EVENT_IDX offered but not negotiated")
    work = Workload(ctx, link)
    q = work.queue
    target = (q.last_used_idx + 2) & 0xFFFF
    q.interrupts = False  # keep get_used from moving used_event on
    q.set_used_event(target)
    for _ in range(2):
        work.run()
        link.frontend.wait_call(work.index, 0)  # "SHOULD NOT" notify before: tolerated, drained
    work.run()
    expect(
        link.frontend.wait_call(work.index, ctx.timeout),
        f"no call after the used entry at index {target} = used_event was written",
    )


@check("virtio-1.2:2.7.10.2", "used flags are valid, and with EVENT_IDX avail_event lets the driver's kicks through")
def avail_event(ctx: Context) -> None:
    link = ctx.open()
    work = Workload(ctx, link)
    event_idx = link.negotiated.has(VIRTIO_F_EVENT_IDX)
    for i in range(16):
        # One request at a time, kicking only when avail_event asks (Link.submit): a device that
        # does not keep avail_event current stalls here.
        work.run()
        flags = link.memory.read_u16(work.queue.used_addr)
        if event_idx:
            expect(flags == 0, f"used flags {flags:#x} with EVENT_IDX negotiated, expected 0")
        else:
            expect(flags & ~VIRTQ_USED_F_NO_NOTIFY == 0, f"used flags {flags:#x}, expected 0 or 1")


@check(
    "virtio-1.2:2.7.8#written",
    "blk: when the used idx shows a read done, the len bytes it reports are already written (data, status)",
    devices={"blk"},
    applies=lambda caps: None if not caps.has(VIRTIO_BLK_F_RO) else "VIRTIO_BLK_F_RO offered: the device is read-only",
)
def written_before_idx(ctx: Context) -> None:
    link = ctx.open()
    port = BlkPort(link)
    data = os.urandom(4 * SECTOR_SIZE)
    expect(port.request(VIRTIO_BLK_T_OUT, 40, out=data).status == VIRTIO_BLK_S_OK, "OUT of 4 sectors at sector 40")
    for sectors in (1, 2, 3, 4):
        port.post(VIRTIO_BLK_T_IN, 40, in_len=sectors * SECTOR_SIZE)
    link.submit(port.index)
    # read_used reads each entry's first len bytes right after it sees the used idx move
    for elem in link.wait_used(port.index, 4):
        expect(elem.len > 0, f"used len 0 for a read of data (head {elem.head})")
        expected = data[: len(elem.data) - 1] + bytes([VIRTIO_BLK_S_OK])
        written = elem.data[: len(expected)]
        expect(
            written == expected[: len(written)],
            f"head {elem.head}: of the {elem.len} bytes used len reports, some were not written when the used idx moved",
        )


@check(
    "virtio-1.2:2.7.5.3.2#limits",
    "normal descriptors followed by one indirect are followed; an indirect table as long as the queue is served whole",
    applies=needs_feature(VIRTIO_F_INDIRECT_DESC, "VIRTIO_F_INDIRECT_DESC"),
)
def indirect_limits(ctx: Context) -> str:
    link = ctx.open()
    expect(link.negotiated.has(VIRTIO_F_INDIRECT_DESC), "VIRTIO_F_INDIRECT_DESC offered but not negotiated")
    if ctx.caps.device == "net":
        return _indirect_limits_net(ctx, link)
    if ctx.caps.has(VIRTIO_BLK_F_RO):
        raise NotApplicable("VIRTIO_BLK_F_RO offered: what a long table writes cannot be read back")
    port = BlkPort(link)
    size = link.split_queue(port.index).size
    for what, sectors, lead in (("a header in the ring, data and status in an indirect table", 4, 1),
                                (f"one indirect table of {size} entries (the queue size)", size - 2, 0)):
        data = os.urandom(sectors * SECTOR_SIZE)
        readable = [_put(link, REQ_HDR.pack(VIRTIO_BLK_T_OUT, 0, 16))]
        readable += [_put(link, data[i : i + SECTOR_SIZE]) for i in range(0, len(data), SECTOR_SIZE)]
        status = _put(link, b"\xff")
        link.add_buffers(port.index, readable, [status], indirect=True, lead=lead)
        link.submit(port.index)
        link.wait_used(port.index, 1)
        expect(link.memory.read(status[0], 1)[0] == VIRTIO_BLK_S_OK, f"a write with {what}: status not OK")
        back = port.request(VIRTIO_BLK_T_IN, 16, in_len=len(data))
        expect(back.status == VIRTIO_BLK_S_OK and back.data == data, f"a write with {what} read back different")
    return ""


def _indirect_limits_net(ctx: Context, link) -> str:
    dut = ctx.net_port(link)
    _injector, sink = ctx.net_ends(dut)
    size = link.split_queue(NetPort.TX).size
    # pieces of 4 bytes keep a queue-size table's frame within the MTU
    for what, pieces, piece, lead in (("the header in the ring, the frame in an indirect table", 4, 16, 1),
                                      (f"one indirect table of {size} entries (the queue size)", size - 1, 4, 0)):
        tag = new_tag()
        frame = marker_frame(tag, max(60, piece * pieces))
        readable = [_put(link, NetHdr().pack(dut.hdr_len))]
        readable += [_put(link, frame[i : i + piece]) for i in range(0, len(frame), piece)]
        link.add_buffers(NetPort.TX, readable, [], indirect=True, lead=lead)
        link.submit(NetPort.TX)
        got = sink.receive(tag, ctx.timeout)
        if got is None:
            raise CheckFailed(f"a frame sent with {what} did not leave the device")
        expect(got.frame[: len(frame)] == frame, f"a frame sent with {what} left changed")
    return ""


def _put(link, data: bytes) -> tuple[int, int]:
    addr = link.alloc.alloc(len(data))
    link.memory.write(addr, data)
    return addr, len(data)
