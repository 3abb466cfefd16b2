"""Notification rules of virtio 1.2 section 2.7 (split rings) at their edges: suppression flags,
``used_event`` behind and across the 16-bit index wrap, spurious kicks, and the write flag of an
indirect descriptor.
"""

from __future__ import annotations

import time

from iovirt.conformance.checks.common import Workload
from iovirt.conformance.registry import check, expect
from iovirt.conformance.target import Context, needs_feature
from iovirt.virtio.defs import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_WRITE,
)

WRAP_BASE = 0xFFFD  # three entries before the used idx wraps to 0
SPURIOUS_KICKS = 8
KICK_GAP_S = 0.01  # apart, so that an eventfd does not fold the kicks into one


@check(
    "virtio-1.2:2.7.7.2#no_interrupt",
    "without EVENT_IDX: used_event is ignored (flags 0 notifies), and flags NO_INTERRUPT suppresses notifications",
)
def no_interrupt(ctx: Context) -> None:
    link = ctx.open(features=~(1 << VIRTIO_F_EVENT_IDX))
    work = Workload(ctx, link)
    q = work.queue
    link.memory.write_u16(q.avail_addr, 0)
    q.set_used_event((q.last_used_idx + 0x8000) & 0xFFFF)  # far from every index written here: must not matter
    link.frontend.wait_call(work.index, 0)
    for i in range(3):
        work.run()
        expect(
            link.frontend.wait_call(work.index, ctx.timeout),
            f"no call for used buffer {i + 1} with avail flags 0 (used_event, set far away, must be ignored without EVENT_IDX)",
        )
    link.memory.write_u16(q.avail_addr, VIRTQ_AVAIL_F_NO_INTERRUPT)
    work.run(3)
    expect(
        not link.frontend.wait_call(work.index, ctx.quiet),
        "a call for used buffers while avail flags is VIRTQ_AVAIL_F_NO_INTERRUPT (SHOULD NOT notify)",
    )


@check(
    "virtio-1.2:2.7.7.2#event_idx",
    "with EVENT_IDX: no call while used_event is behind, the flags bit is ignored, used_event holds across the wrap",
    applies=needs_feature(VIRTIO_F_EVENT_IDX, "VIRTIO_F_EVENT_IDX"),
)
def event_idx_edges(ctx: Context) -> None:
    link = ctx.open()
    expect(link.negotiated.has(VIRTIO_F_EVENT_IDX), "VIRTIO_F_EVENT_IDX offered but not negotiated")
    work = Workload(ctx, link)
    q = work.queue
    q.interrupts = False  # keep get_used from moving used_event on
    call = link.frontend.wait_call
    # The driver sees the used entry before the call that follows it: wait for that call (tolerated either
    # way), or a late one would count as a call while used_event is behind.
    q.set_used_event(q.last_used_idx)
    work.run()
    call(work.index, ctx.timeout)
    q.set_used_event((q.last_used_idx - 1) & 0xFFFF)  # the entry at used_event is already written
    work.run()
    work.run()
    expect(not call(work.index, ctx.quiet), "a call while used_event is behind the used idx (SHOULD NOT notify)")

    link.memory.write_u16(q.avail_addr, VIRTQ_AVAIL_F_NO_INTERRUPT)
    q.set_used_event(q.last_used_idx)
    work.run()
    expect(
        call(work.index, ctx.timeout),
        "no call for the entry at used_event while avail flags has bit 0 set (flags must be ignored with EVENT_IDX)",
    )
    link.memory.write_u16(q.avail_addr, 0)

    link.rebase(work.index, WRAP_BASE)
    q.set_used_event(0)  # the entry written just after the wrap
    # The first used entry after a (re)start may notify whatever used_event says: the device has no
    # last-notified index yet (Linux vhost and QEMU do the same).  Tolerated, drained.
    work.run()
    call(work.index, ctx.timeout)
    for idx in (0xFFFE, 0xFFFF):
        work.run()
        expect(not call(work.index, ctx.quiet), f"a call for the entry at {idx:#x} with used_event 0 (SHOULD NOT notify)")
    work.run()
    expect(call(work.index, ctx.timeout), "no call for the entry at index 0 = used_event after the used idx wrapped")


@check("virtio-1.2:2.7.10#spurious", "spurious kicks (nothing new available) change nothing; the ring keeps working")
def spurious_kicks(ctx: Context) -> None:
    link = ctx.open()
    work = Workload(ctx, link)
    work.run()
    for _ in range(SPURIOUS_KICKS):
        link.frontend.kick(work.index)
        time.sleep(KICK_GAP_S)
    extra = link.poll_used(work.index, 1, ctx.quiet)
    expect(not extra, f"{len(extra)} used entries after kicks with nothing available")
    work.run(2)


@check(
    "virtio-1.2:2.7.5.3.1#write-flag",
    "the write flag on a descriptor that points to an indirect table is ignored",
    applies=needs_feature(VIRTIO_F_INDIRECT_DESC, "VIRTIO_F_INDIRECT_DESC"),
)
def indirect_write_flag(ctx: Context) -> None:
    link = ctx.open()
    expect(link.negotiated.has(VIRTIO_F_INDIRECT_DESC), "VIRTIO_F_INDIRECT_DESC offered but not negotiated")
    work = Workload(ctx, link)
    q = work.queue
    heads = [work.post(indirect=True) for _ in range(2)]
    for head in heads:
        at = q.desc_addr + 16 * head + 12  # le16 flags of the ring's descriptor
        flags = link.memory.read_u16(at)
        expect(flags & VIRTQ_DESC_F_INDIRECT, "the driver helper did not build an indirect descriptor")
        link.memory.write_u16(at, flags | VIRTQ_DESC_F_WRITE)
    link.submit(work.index)
    link.wait_used(work.index, len(heads))
