"""Packed virtqueues seen from the driver (virtio 1.2 section 2.8: the device requirements 2.8.12,
2.8.15 and 2.8.18, same numbers in 1.4): only descriptors the driver made
available are used, in ring order; chains are followed in order; used descriptors and
device-readable buffers stay as the device left them.

Each check opens its link with ``packed=True`` and applies only when the back-end offers
VIRTIO_F_RING_PACKED.
"""

from __future__ import annotations

import os

from iovirt.conformance.checks.common import Workload
from iovirt.conformance.devices import BlkPort, NetPort, marker_frame, new_tag
from iovirt.conformance.link import Link
from iovirt.conformance.registry import CheckFailed, NotApplicable, check, expect
from iovirt.conformance.target import Context, needs_feature, needs_frame_path
from iovirt.virtio.blk.defs import REQ_HDR, SECTOR_SIZE, VIRTIO_BLK_F_RO, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from iovirt.virtio.defs import VIRTIO_F_RING_PACKED, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_USED, VIRTQ_DESC_SIZE
from iovirt.virtio.net.defs import NetHdr
from iovirt.virtio.packed_driver import PackedDriverQueue

_packed = needs_feature(VIRTIO_F_RING_PACKED, "VIRTIO_F_RING_PACKED")
ORDER_FRAMES = 8
CHAIN_PIECES = 4
FLAGS_AT = 14  # le16 flags within a 16-byte packed descriptor


def _open(ctx: Context) -> Link:
    link = ctx.open(packed=True)
    expect(link.packed, "VIRTIO_F_RING_PACKED offered but not negotiated")
    return link


def _ring(link: Link, index: int) -> PackedDriverQueue:
    q = link.queues[index]
    assert isinstance(q, PackedDriverQueue)
    return q


def _net_applies(caps) -> str | None:
    return _packed(caps) or needs_frame_path(caps)


@check(
    "virtio-1.2:2.8.12#order",
    "packed, net: frames made available together leave in ring order, and used descriptors follow that order",
    devices={"net"},
    applies=_net_applies,
)
def ring_order(ctx: Context) -> None:
    dut = ctx.net_port(_open(ctx))
    _injector, sink = ctx.net_ends(dut)
    tag = new_tag()
    frames = [marker_frame(tag + b"#%02d" % i, 200) for i in range(ORDER_FRAMES)]
    heads = dut.send(frames)  # one publish: every list is available before the kick
    arrived: list[int] = []
    for _ in frames:
        got = sink.receive(tag, ctx.timeout)
        if got is None:
            raise CheckFailed(f"{len(arrived)} of {len(frames)} frames left the device")
        arrived.append(int(got.frame[got.frame.index(tag) + len(tag) + 1 :][:2]))
    expect(arrived == list(range(ORDER_FRAMES)),
           f"frames left in the order {arrived}: the device did not process the descriptors in ring order")
    used = [u.head for u in dut.link.wait_used(NetPort.TX, len(frames))]
    expect(used == [heads[i] for i in arrived],
           f"used buffer ids {used} are not in the order the buffers completed ({[heads[i] for i in arrived]})")


@check(
    "virtio-1.2:2.8.15#avail-bit",
    "packed: a descriptor whose AVAIL/USED bits do not mark it available is not used, even after a kick",
    applies=_packed,
)
def avail_bit(ctx: Context) -> None:
    link = _open(ctx)
    work = Workload(ctx, link)
    q = _ring(link, work.index)
    slot = q.next_avail
    work.post()
    at = q.desc_addr + VIRTQ_DESC_SIZE * slot + FLAGS_AT
    assert q.avail_wrap, "a fresh ring: the Driver Ring Wrap Counter is 1"
    # The list is written, its first descriptor's flags not yet (publish writes them last).  Try flags
    # that are neither available (AVAIL 1, USED 0) nor used (both 1) on this lap: both clear, as the
    # ring started, and USED alone, as a slot left from the previous lap (2.8.1).  The workloads' first
    # descriptor is device-readable; NEXT as the list needs.
    next_bit = VIRTQ_DESC_F_NEXT if (q.next_avail - slot) % q.size > 1 else 0
    for what, bits in (("both clear, as the ring started", 0), ("USED alone, as a slot left from the previous lap", VIRTQ_DESC_F_USED)):
        link.memory.write_u16(at, next_bit | bits)
        link.frontend.kick(work.index)
        extra = link.poll_used(work.index, 1, ctx.quiet)
        expect(not extra, f"the device used a descriptor whose AVAIL/USED bits were {what} (flags {next_bit | bits:#x})")
    link.submit(work.index)  # now the AVAIL bit changes: the list must be used
    link.wait_used(work.index, 1)


@check(
    "virtio-1.2:2.8.15#used-descs",
    "packed: device-readable buffers are not written, and a used descriptor does not change afterwards",
    applies=_packed,
)
def used_descs_stay(ctx: Context) -> None:
    link = _open(ctx)
    work = Workload(ctx, link)
    q = _ring(link, work.index)
    readable = []
    first = q.next_avail
    heads = [work.post(split=True) for _ in range(3)]
    slots = (q.next_avail - first) % q.size
    for slot in range(first, first + slots):
        addr, length, _id, flags = _desc(link, q, slot)
        if not flags & 2:  # VIRTQ_DESC_F_WRITE
            readable.append((addr, link.memory.read(addr, length)))
    link.submit(work.index)
    link.wait_used(work.index, len(heads))
    used_area = link.memory.read(q.desc_addr + VIRTQ_DESC_SIZE * first, VIRTQ_DESC_SIZE * slots)
    work.run(3)  # more lists, in slots after these: the device writes used descriptors there only
    expect(link.memory.read(q.desc_addr + VIRTQ_DESC_SIZE * first, VIRTQ_DESC_SIZE * slots) == used_area,
           "the device changed descriptors it had already marked used")
    for addr, data in readable:
        expect(link.memory.read(addr, len(data)) == data, f"the device wrote into the device-readable buffer at {addr:#x}")


def _desc(link: Link, q: PackedDriverQueue, slot: int) -> tuple[int, int, int, int]:
    raw = link.memory.read(q.desc_addr + VIRTQ_DESC_SIZE * (slot % q.size), VIRTQ_DESC_SIZE)
    return (int.from_bytes(raw[0:8], "little"), int.from_bytes(raw[8:12], "little"),
            int.from_bytes(raw[12:14], "little"), int.from_bytes(raw[14:16], "little"))


def _chain_applies(caps) -> str | None:
    if caps.device == "net":
        return _net_applies(caps)
    if caps.has(VIRTIO_BLK_F_RO):
        return "VIRTIO_BLK_F_RO offered: the order of written pieces cannot be read back"
    return _packed(caps)


@check(
    "virtio-1.2:2.8.18#chain-order",
    "packed: a list chained with NEXT is used in the order made available (blk: a write in four pieces reads "
    "back whole; net: a frame in four pieces leaves whole)",
    applies=_chain_applies,
)
def chain_order(ctx: Context) -> None:
    link = _open(ctx)
    if ctx.caps.device == "net":
        dut = ctx.net_port(link)
        _injector, sink = ctx.net_ends(dut)
        tag = new_tag()
        frame = marker_frame(tag, 1000)[:60] + os.urandom(940)
        pieces = [NetHdr().pack(dut.hdr_len)] + [frame[i : i + 250] for i in range(0, len(frame), 250)]
        link.add(NetPort.TX, pieces)
        link.submit(NetPort.TX)
        got = sink.receive(tag, ctx.timeout)
        if got is None:
            raise CheckFailed(f"a frame in {len(pieces)} descriptors did not leave the device")
        expect(got.frame[: len(frame)] == frame, f"a frame sent in {len(pieces)} descriptors left reordered or changed")
        return
    if ctx.caps.device != "blk":
        raise NotApplicable("for net and blk devices")
    port = BlkPort(link)
    data = os.urandom(CHAIN_PIECES * SECTOR_SIZE)
    readable = [_put(link, REQ_HDR.pack(VIRTIO_BLK_T_OUT, 0, 8))]
    readable += [_put(link, data[i : i + SECTOR_SIZE]) for i in range(0, len(data), SECTOR_SIZE)]
    status = _put(link, b"\xff")
    link.add_buffers(port.index, readable, [status])
    link.submit(port.index)
    link.wait_used(port.index, 1)
    expect(link.memory.read(status[0], 1)[0] == VIRTIO_BLK_S_OK, "a write in four data descriptors did not complete OK")
    back = port.request(VIRTIO_BLK_T_IN, 8, in_len=len(data))
    expect(back.status == VIRTIO_BLK_S_OK, f"read-back status {back.status}")
    expect(back.data == data, "the sectors written from four descriptors read back reordered or changed")


def _put(link: Link, data: bytes) -> tuple[int, int]:
    addr = link.alloc.alloc(len(data))
    link.memory.write(addr, data)
    return addr, len(data)
