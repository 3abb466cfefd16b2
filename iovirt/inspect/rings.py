"""A read-only view of one split virtqueue in guest memory (virtio 1.2 section 2.7).

:func:`decode_ring` reads the descriptor table, the avail ring (``flags``,
``idx``, ``ring[]``, ``used_event``) and the used ring (``flags``, ``idx``,
``ring[]``, ``avail_event``) and walks the chains in flight: the avail
entries from ``used.idx`` up to ``avail.idx``, which the device has not
returned yet.  (With out-of-order completion a device may have returned a
later chain and still hold an earlier one; the window is then the count in
flight, not exactly their heads.)

Chains are walked by the ring code itself, the reference twin
:class:`iovirt.virtio._queue_py.SplitQueue` (its ``_walk``: ``next``,
indirect tables, loops, chain length, buffers in memory, 2.7.5), over the
memory as it is; nothing is written.  What breaks a rule becomes a
warning, never an exception: a post-mortem looks at broken rings on
purpose.  Warnings name:

* an avail index more than Queue Size past the used index (or past the
  device's ``last_avail_idx``, when the back-end said it): the driver is
  buggy or hostile (2.7.13.3: the driver never makes more than Queue Size
  chains available);
* a used ``id`` that is not a descriptor index (2.7.8);
* a head that is in flight twice;
* whatever the walk refuses: a ``next`` loop, a chain longer than Queue
  Size, a ``next`` or indirect table out of range, a buffer outside memory.
"""

from __future__ import annotations

import struct
from dataclasses import asdict, dataclass, field
from typing import Any

from iovirt.memory import GuestMemory, GuestMemoryError
from iovirt.virtio._queue_py import SplitQueue as ReferenceQueue
from iovirt.virtio.defs import VIRTQ_DESC_SIZE, VIRTQ_USED_ELEM_SIZE, desc_table_size
from iovirt.virtio.errors import VirtqueueError

_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")


@dataclass
class Chain:
    """One chain in flight: its place in the avail ring, its head and buffers ``(addr, len, writable)``.

    ``popped``: whether the device had taken it (known only when the
    device's ``last_avail_idx`` is); ``error``: why the walk refused it.
    """

    avail_index: int
    head: int
    buffers: list[tuple[int, int, bool]] = field(default_factory=list)
    popped: bool | None = None
    error: str | None = None


@dataclass
class RingReport:
    """The decoded state of one split ring, with its warnings (``to_dict`` for JSON)."""

    index: int
    size: int
    desc_addr: int
    avail_addr: int
    used_addr: int
    device: str = ""
    last_avail_idx: int | None = None
    error: str | None = None
    avail_flags: int = 0
    avail_idx: int = 0
    used_event: int = 0
    used_flags: int = 0
    used_idx: int = 0
    avail_event: int = 0
    descriptors: list[tuple[int, int, int, int]] = field(default_factory=list)
    avail_ring: list[int] = field(default_factory=list)
    used_ring: list[tuple[int, int]] = field(default_factory=list)
    in_flight: list[Chain] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``iovirt inspect --json``."""
        return asdict(self)


def decode_ring(
    memory: GuestMemory,
    size: int,
    desc_addr: int,
    avail_addr: int,
    used_addr: int,
    *,
    index: int = 0,
    device: str = "",
    last_avail_idx: int | None = None,
) -> RingReport:
    """Decode the split ring at the given guest-physical addresses; never raises for a broken ring.

    ``last_avail_idx`` is the device's next avail index if known (from an
    ``iovirt dump`` note); it tells popped chains from ones still waiting.
    A ring that is not in ``memory`` or has a bad size gets ``error`` and
    nothing decoded.
    """
    report = RingReport(index, size, desc_addr, avail_addr, used_addr, device, last_avail_idx)
    try:
        queue = ReferenceQueue(memory, size, desc_addr, avail_addr, used_addr, index=index)
    except (VirtqueueError, GuestMemoryError) as exc:
        report.error = str(exc)
        report.warnings.append(f"ring cannot be decoded: {exc}")
        return report
    read16 = memory.read_u16
    report.avail_flags, report.avail_idx = read16(avail_addr), read16(avail_addr + 2)
    report.avail_ring = list(struct.unpack_from(f"<{size}H", memory.read(avail_addr + 4, 2 * size)))
    report.used_event = read16(avail_addr + 4 + 2 * size)
    report.used_flags, report.used_idx = read16(used_addr), read16(used_addr + 2)
    used_raw = memory.read(used_addr + 4, VIRTQ_USED_ELEM_SIZE * size)
    report.used_ring = [_USED_ELEM.unpack_from(used_raw, i * VIRTQ_USED_ELEM_SIZE) for i in range(size)]
    report.avail_event = read16(used_addr + 4 + VIRTQ_USED_ELEM_SIZE * size)
    table = memory.read(desc_addr, desc_table_size(size))
    report.descriptors = [_DESC.unpack_from(table, i * VIRTQ_DESC_SIZE) for i in range(size)]
    _check_indices(report)
    _check_used(report)
    _walk_in_flight(report, queue)
    return report


def _distance(later: int, earlier: int) -> int:
    return (later - earlier) & 0xFFFF


def _check_indices(report: RingReport) -> None:
    size = report.size
    outstanding = _distance(report.avail_idx, report.used_idx)
    if outstanding > size:
        report.warnings.append(
            f"avail index jumps: avail.idx {report.avail_idx} is {outstanding} past used.idx {report.used_idx}, "
            f"more than Queue Size {size}"
        )
    if report.last_avail_idx is not None:
        waiting = _distance(report.avail_idx, report.last_avail_idx)
        if waiting > size:
            report.warnings.append(
                f"avail index jumps: avail.idx {report.avail_idx} is {waiting} past the device's "
                f"last_avail_idx {report.last_avail_idx}, more than Queue Size {size}"
            )
        held = _distance(report.last_avail_idx, report.used_idx)
        if held > size:
            report.warnings.append(
                f"the device's last_avail_idx {report.last_avail_idx} is {held} past used.idx "
                f"{report.used_idx}, more than Queue Size {size}"
            )


def _check_used(report: RingReport) -> None:
    # Slots written so far: all once used.idx has gone round the ring (it
    # may have wrapped 2^16; then all were written too).
    written = report.size if report.used_idx >= report.size else report.used_idx
    for slot in range(written):
        used_id, _length = report.used_ring[slot]
        if used_id >= report.size:
            report.warnings.append(
                f"used id out of range: used.ring[{slot}].id {used_id} is not a descriptor index "
                f"(Queue Size {report.size})"
            )


def _walk_in_flight(report: RingReport, queue: ReferenceQueue) -> None:
    size = report.size
    count = min(_distance(report.avail_idx, report.used_idx), size)
    popped = None if report.last_avail_idx is None else _distance(report.last_avail_idx, report.used_idx)
    seen: dict[int, int] = {}
    for n in range(count):
        position = (report.used_idx + n) & 0xFFFF
        head = report.avail_ring[position % size]
        chain = Chain(position, head, popped=None if popped is None else n < popped)
        if head in seen:
            report.warnings.append(f"head {head} is in flight twice (avail positions {seen[head]} and {position})")
        seen[head] = position
        try:
            chain.buffers = queue._walk(head)  # the ring code's own walk: one set of rules
        except (VirtqueueError, GuestMemoryError) as exc:
            chain.error = str(exc)
            report.warnings.append(f"chain at avail position {position} (head {head}): {exc}")
        report.in_flight.append(chain)
