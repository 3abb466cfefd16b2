"""Packed virtqueue, device side: the readable reference implementation.

The accelerated twin is ``_packed_c.pyx``; :mod:`iovirt.virtio.queue` picks
one.  Both implement the split ring's API (``_queue_py.SplitQueue``) and are
run by the same tests.  This one reads and writes the ring through
:class:`~iovirt.memory.GuestMemory` field by field, as virtio 1.2 section
2.8 describes the packed ring:

- Descriptor Ring: ``struct pvirtq_desc { le64 addr; le32 len; le16 id; le16 flags; }``;
  a descriptor is available when its AVAIL bit equals the driver's wrap
  counter and its USED bit does not (2.8.1); the device returns a list by
  writing one used descriptor (``id``, ``len``, AVAIL = USED = its own wrap
  counter) at its next used slot and skipping as many slots as the list took (2.8.6);
- Driver and Device Event Suppression: ``struct pvirtq_event_suppress
  { le16 desc_event_off_wrap; le16 desc_event_flags; }`` (2.8.14).

Positions (``last_avail_idx``, ``used_idx``, ``desc_event_off_wrap``) are
a slot in bits 0-14 and the wrap counter in bit 15, as vhost-user.rst
encodes packed ring indexes; both wrap counters start at 1 (2.8.1).
"""

from __future__ import annotations

import collections
import struct
from typing import Callable, Iterable, Sequence

from iovirt.memory import Access, GuestMemory, GuestMemoryError, TranslationPending
from iovirt.virtio import _packed_checks as pchecks
from iovirt.virtio import _queue_checks as checks
from iovirt.virtio.chain import ChainBatch, DescChain
from iovirt.virtio.defs import (
    PACKED_WRAP_BIT,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_USED,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_DESC_SIZE,
)
from iovirt.virtio.dirtylog import DirtyLog
from iovirt.virtio.errors import VirtqueueError
from iovirt.virtio.state import QueueState

_DESC = struct.Struct("<QIHH")
_USED = struct.Struct("<IH")  # len, id: the used descriptor's fields before flags
_U64_MAX = (1 << 64) - 1
#: 2.8.14: desc_event_flags is 2 bits.
_EVENT_FLAGS_MASK = 0x3

IMPLEMENTATION = "python"


def _pos(slot: int, wrap: bool) -> int:
    return slot | (PACKED_WRAP_BIT if wrap else 0)


class PackedQueue:
    """The device side of one packed virtqueue.

    Same API as the split ``SplitQueue``: a chain's ``head`` is its Buffer ID
    (the ``id`` of the list's last descriptor, or of the indirect
    descriptor), which ``push`` takes back.  ``driver_addr`` and
    ``device_addr`` are the Driver and Device Event Suppression areas (the
    "avail" and "used" addresses of vhost-user's VHOST_USER_SET_VRING_ADDR
    and of :class:`~iovirt.virtio.state.QueueState`).  A list that breaks a
    rule is consumed up to the offending ring descriptor and raised as a
    :class:`~iovirt.virtio.errors.VirtqueueError` subclass.

    ``in_order``: VIRTIO_F_IN_ORDER was negotiated (2.8.8); as the split
    ring's, lists are then pushed in pop order, and ``push_batch(batch,
    coalesce=True)`` may return a run of lists through one used descriptor.
    """

    def __init__(
        self,
        memory: GuestMemory,
        size: int,
        desc_addr: int,
        driver_addr: int,
        device_addr: int,
        *,
        index: int = 0,
        event_idx: bool = False,
        last_avail_idx: int = PACKED_WRAP_BIT,
        used_idx: int = PACKED_WRAP_BIT,
        in_order: bool = False,
    ) -> None:
        pchecks.check_layout(memory, index, size, desc_addr, driver_addr, device_addr)
        for addr, length in pchecks.ring_parts(size, desc_addr, driver_addr, device_addr):
            checks.ring_part_gpa(memory, index, addr, length)
        self.memory = memory
        self.index = index
        self.size = size
        self.desc_addr = desc_addr
        self.driver_addr = driver_addr
        self.device_addr = device_addr
        self.event_idx = event_idx
        self.in_order = in_order
        self._next_avail = (last_avail_idx & ~PACKED_WRAP_BIT) % size
        self._avail_wrap = bool(last_avail_idx & PACKED_WRAP_BIT)
        self._next_used = (used_idx & ~PACKED_WRAP_BIT) % size
        self._used_wrap = bool(used_idx & PACKED_WRAP_BIT)
        self._notify_enabled = True
        self._pending_error: VirtqueueError | None = None
        # Buffer ID -> ring descriptors its list took: the used side skips as many (2.8.6).
        self._in_flight: dict[int, int] = {}
        # With in_order: the Buffer IDs in flight, oldest first (the order the used ring must follow).
        self._order: collections.deque[int] = collections.deque()
        # (Buffer ID, start position) of lists popped since the last push, for rewind.
        self._recent: list[tuple[int, int]] = []
        # Used-ring slots written since the driver was last notified (None: never notified).
        self._signalled: int | None = None
        self._since_signal = 0
        self._walked = 0
        self._released = False
        self._log: DirtyLog | None = None
        self._used_log: list[tuple[int, int]] = []
        # Buffer ID -> its buffers, kept while logging, for push(id) to log them.
        self._log_buffers_of: dict[int, list[tuple[int, int, bool]]] = {}

    # -- state ---------------------------------------------------------------
    @classmethod
    def from_state(cls, memory: GuestMemory, state: QueueState) -> "PackedQueue":
        """Rebuild a queue from saved state (``avail_addr``/``used_addr``: the Driver/Device areas)."""
        pchecks.check_state(state)
        return cls(
            memory,
            state.size,
            state.desc_addr,
            state.avail_addr,
            state.used_addr,
            index=state.index,
            event_idx=bool(state.event_idx),
            last_avail_idx=state.last_avail_idx,
            used_idx=state.used_idx,
            in_order=bool(state.in_order),
        )

    def state(self) -> QueueState:
        """Plain-data snapshot of the queue (positions with their wrap counters in bit 15)."""
        return QueueState(
            size=self.size,
            desc_addr=self.desc_addr,
            avail_addr=self.driver_addr,
            used_addr=self.device_addr,
            last_avail_idx=self.last_avail_idx,
            used_idx=self.used_idx,
            event_idx=self.event_idx,
            index=self.index,
            in_order=self.in_order,
        )

    @property
    def last_avail_idx(self) -> int:
        """Slot of the next descriptor the device will take, wrap counter in bit 15."""
        return _pos(self._next_avail, self._avail_wrap)

    @property
    def used_idx(self) -> int:
        """Slot of the next used descriptor the device will write, wrap counter in bit 15."""
        return _pos(self._next_used, self._used_wrap)

    def release(self) -> None:
        """Let go of guest memory (the queue is stopped); any later use of the ring raises."""
        self._released = True

    def refresh(self) -> None:
        """Re-validate the ring after the memory map changed."""
        self._check_live()
        pchecks.check_layout(self.memory, self.index, self.size, self.desc_addr, self.driver_addr, self.device_addr)
        for addr, length in pchecks.ring_parts(self.size, self.desc_addr, self.driver_addr, self.device_addr):
            checks.ring_part_gpa(self.memory, self.index, addr, length)

    def set_dirty_log(self, log: DirtyLog | None, used_ranges: Iterable[tuple[int, int]] = ()) -> None:
        """Log device writes in ``log`` from now on (None: stop logging).

        As the split ring's: the device-writable buffers of a list are
        logged before its used descriptor is written, and the guest-physical
        ranges ``used_ranges`` after every device write to the ring (for a
        packed ring, the Descriptor Ring and the Device area).  ``push(id)``
        logs the buffers of lists popped while logging was on; the used
        descriptor may already have overwritten the list's slots, so it
        cannot walk the list again as a split ring does.
        """
        self._log = log
        self._used_log = list(used_ranges) if log is not None else []
        self._log_buffers_of = {}

    def _log_buffers(self, buffers: list[tuple[int, int, bool]]) -> None:
        log = self._log
        assert log is not None
        for addr, length, writable in buffers:
            if writable and length:
                try:
                    pieces = self.memory.translate(addr, length, Access.WRITE)
                except GuestMemoryError:
                    log.unresolved += 1
                    continue
                for gpa, n in pieces:
                    log.mark(gpa, n)

    def _log_used(self) -> None:
        assert self._log is not None
        for gpa, length in self._used_log:
            self._log.mark(gpa, length)

    def _check_live(self) -> None:
        if self._released:
            raise checks.released(self.index)

    # -- avail side ------------------------------------------------------------
    def _flags(self, slot: int) -> int:
        return self.memory.read_u16(self.desc_addr + VIRTQ_DESC_SIZE * slot + 14)

    def _is_avail(self, flags: int, wrap: bool) -> bool:
        # 2.8.1: available when AVAIL matches the driver's wrap counter and USED does not.
        return bool(flags & VIRTQ_DESC_F_AVAIL) == wrap and bool(flags & VIRTQ_DESC_F_USED) != wrap

    def pending(self) -> int:
        """How many lists the driver has made available and we have not popped."""
        self._check_live()
        count = 0
        slot, wrap = self._next_avail, self._avail_wrap
        for _ in range(self.size):  # at most Queue Size slots ahead
            flags = self._flags(slot)
            if not self._is_avail(flags, wrap):
                break
            count += 1
            for _ in range(self.size):  # skip the rest of the list
                slot += 1
                if slot == self.size:
                    slot, wrap = 0, not wrap
                if not flags & VIRTQ_DESC_F_NEXT:
                    break
                flags = self._flags(slot)
        return count

    def pop(self) -> DescChain | None:
        """Take the next available list, or ``None`` when there is none."""
        batch = self.pop_batch(1)
        return batch[0] if len(batch) else None

    def pop_batch(self, max_chains: int, batch: ChainBatch | None = None) -> ChainBatch:
        """Take up to ``max_chains`` available lists (into ``batch`` if given, reusing it).

        As the split ring's: a malformed list met after good ones is raised
        by the next call; one whose translation is pending stays available
        and ends the batch.
        """
        if self._pending_error is not None:
            error, self._pending_error = self._pending_error, None
            raise error
        self._check_live()
        chains: list[DescChain] = []
        while len(chains) < max_chains:
            if not self._is_avail(self._flags(self._next_avail), self._avail_wrap):
                break
            start = self.last_avail_idx
            try:
                buf_id, taken, buffers = self._walk(self._next_avail, self._ring_reader(self._next_avail))
            except TranslationPending:
                break  # not the driver's fault: leave the list available, retry later
            except VirtqueueError as exc:
                self._advance_avail(self._walked)
                if not chains:
                    self._publish_avail_event()
                    raise
                self._pending_error = exc
                break
            self._advance_avail(taken)
            self._in_flight[buf_id] = taken
            if self.in_order:
                self._order.append(buf_id)
            self._recent.append((buf_id, start))
            if self._log is not None:
                self._log_buffers_of[buf_id] = buffers
            chains.append(DescChain(buf_id, buffers))
        self._publish_avail_event()
        if batch is None:
            return ChainBatch(chains)
        batch.chains = chains
        return batch

    def resubmit(self, lists: Sequence[bytes], batch: ChainBatch | None = None) -> ChainBatch:
        """Take again lists a previous back-end popped and never completed; the avail position does not move.

        vhost-user.rst "Inflight I/O tracking" (packed): each of ``lists`` is
        a list's ring descriptors as they were popped (16 bytes each), saved
        in the inflight region, since used descriptors written out of order
        may have overwritten them in the ring.  They are walked by the pop
        rules; each Buffer ID is in flight again, taking as many ring slots
        as it has descriptors.  One whose translation is pending ends the
        batch (the caller keeps the rest).
        """
        if self._pending_error is not None:
            error, self._pending_error = self._pending_error, None
            raise error
        self._check_live()
        chains: list[DescChain] = []
        for raw in lists:
            saved = pchecks.saved_list(self.index, raw, self.size)
            try:
                buf_id, taken, buffers = self._walk(0, self._saved_reader(saved))
            except TranslationPending:
                break
            self._in_flight[buf_id] = taken
            if self.in_order:
                self._order.append(buf_id)
            if self._log is not None:
                self._log_buffers_of[buf_id] = buffers
            chains.append(DescChain(buf_id, buffers))
        if batch is None:
            return ChainBatch(chains)
        batch.chains = chains
        return batch

    def _ring_reader(self, first: int) -> Callable[[int], tuple[int, int, int, int]]:
        return lambda slot: self._read_desc(self.desc_addr, slot, first)

    def _saved_reader(self, saved: bytes) -> Callable[[int], tuple[int, int, int, int]]:
        count = len(saved) // VIRTQ_DESC_SIZE

        def read(slot: int) -> tuple[int, int, int, int]:
            if slot >= count:  # the last saved descriptor has NEXT
                raise checks.too_long(self.index, slot, 0, count + 1, self.size)
            return _DESC.unpack_from(saved, VIRTQ_DESC_SIZE * slot)

        return read

    def _advance_avail(self, n: int) -> None:
        self._next_avail += n
        if self._next_avail >= self.size:
            self._next_avail -= self.size
            self._avail_wrap = not self._avail_wrap

    def rewind(self, count: int) -> None:
        """Give back the last ``count`` popped lists unused: they will be popped again.

        Only lists popped since the last push can be given back.
        """
        pchecks.check_rewind(self.index, count, len(self._recent))
        if count == 0:
            return
        start = self._recent[-count][1]
        for buf_id, _ in self._recent[-count:]:
            del self._in_flight[buf_id]
            self._log_buffers_of.pop(buf_id, None)
            if self.in_order:
                self._order.pop()
        del self._recent[-count:]
        self._next_avail, self._avail_wrap = start & ~PACKED_WRAP_BIT, bool(start & PACKED_WRAP_BIT)

    def _read_desc(self, table: int, i: int, head: int) -> tuple[int, int, int, int]:
        try:
            return _DESC.unpack(self.memory.read(table + VIRTQ_DESC_SIZE * i, VIRTQ_DESC_SIZE))
        except TranslationPending:
            raise
        except GuestMemoryError as exc:
            raise checks.table_unreadable(self.index, i, head, table, exc) from exc

    def _walk(
        self, first: int, read_ring: Callable[[int], tuple[int, int, int, int]]
    ) -> tuple[int, int, list[tuple[int, int, bool]]]:
        """Read the list starting at ring slot ``first``: its Buffer ID, ring slots taken and buffers.

        ``read_ring(slot)`` reads a ring descriptor: from the Descriptor
        Ring, or from a resubmitted list's saved descriptors.

        Checks every rule of 2.8.6-2.8.7 and 2.8.19-2.8.20; ``self._walked``
        says how many ring slots were read when an error is raised.
        """
        q, size = self.index, self.size
        buffers: list[tuple[int, int, bool]] = []
        seen_writable = False
        slot, taken = first, 0
        while True:
            if taken == size:
                raise checks.too_long(q, slot, first, size + 1, size)
            taken += 1
            self._walked = taken
            addr, length, buf_id, flags = read_ring(slot)
            if flags & VIRTQ_DESC_F_INDIRECT:
                # 2.8.20: an indirect descriptor stands alone, and its table holds whole descriptors.
                if taken > 1:
                    raise pchecks.indirect_in_chain(q, slot, first)
                if flags & VIRTQ_DESC_F_NEXT:
                    raise checks.indirect_next(q, slot, first)
                if length == 0 or length % VIRTQ_DESC_SIZE:
                    raise checks.indirect_length(q, slot, first, length)
                self._check_buffer(addr, length, slot, first, False)
                count = length // VIRTQ_DESC_SIZE
                if count > size:
                    raise checks.too_long(q, slot, first, count, size)
                for i in range(count):
                    b_addr, b_len, _, b_flags = self._read_desc(addr, i, first)
                    # 2.8.19: WRITE is the only valid flag inside the table; others are ignored, but
                    # an indirect descriptor in it is a nested table the device refuses.
                    if b_flags & VIRTQ_DESC_F_INDIRECT:
                        raise checks.nested_indirect(q, i, first)
                    seen_writable = self._add_buffer(buffers, b_addr, b_len, b_flags, i, first, seen_writable)
            else:
                seen_writable = self._add_buffer(buffers, addr, length, flags, slot, first, seen_writable)
                if flags & VIRTQ_DESC_F_NEXT:
                    slot = slot + 1 if slot + 1 < size else 0
                    continue
            # 2.8.6: the Buffer ID is in the list's last descriptor.
            if buf_id >= size:
                raise pchecks.buffer_id(q, slot, first, buf_id, size)
            if buf_id in self._in_flight:
                raise pchecks.id_in_flight(q, slot, first, buf_id)
            return buf_id, taken, buffers

    def _add_buffer(
        self, buffers: list[tuple[int, int, bool]], addr: int, length: int, flags: int, desc: int, head: int, seen_writable: bool
    ) -> bool:
        writable = bool(flags & VIRTQ_DESC_F_WRITE)
        if seen_writable and not writable:
            raise checks.order(self.index, desc, head)
        self._check_buffer(addr, length, desc, head, writable)
        buffers.append((addr, length, writable))
        return writable

    def _check_buffer(self, addr: int, length: int, desc: int, head: int, writable: bool) -> None:
        if addr + length - 1 > _U64_MAX:
            raise checks.buffer_wraps(self.index, desc, head, addr, length)
        try:
            self.memory.check_range(addr, length, Access.WRITE if writable else Access.READ)
        except TranslationPending:
            raise
        except GuestMemoryError as exc:
            raise checks.buffer_outside(self.index, desc, head, addr, length, exc) from exc

    # -- used side ---------------------------------------------------------------
    def push(self, head: int, length: int) -> None:
        """Return the list of Buffer ID ``head`` with ``length`` bytes written."""
        self._check_live()
        if not self._in_flight:
            raise checks.too_many_used(self.index, 1, 0)
        self._check_used(head, length)
        if self.in_order and head != self._order[0]:
            raise checks.used_order(self.index, head, self._order[0])
        if self._log is not None:
            buffers = self._log_buffers_of.pop(head, None)
            if buffers is None:
                self._log.unresolved += 1  # popped before logging started
            else:
                self._log_buffers(buffers)
        self._push_one(head, length)
        self._published()

    def push_batch(self, batch: ChainBatch, coalesce: bool = False) -> None:
        """Return every list of ``batch`` with its ``used_len``.

        ``coalesce`` (with ``in_order``): 2.8.8 lets the device return a run
        of lists through one used descriptor with the last list's Buffer ID,
        written at the run's first slot, and skip the slots of the whole
        run; the lists skipped count as used whole, so a run ends at every
        list whose ``used_len`` is not its writable length (as the split
        ring's ``push_batch``).
        """
        self._check_live()
        if len(batch) > len(self._in_flight):
            raise checks.too_many_used(self.index, len(batch), len(self._in_flight))
        seen: set[int] = set()
        for k, chain in enumerate(batch):
            if chain.head in seen:  # twice in one batch: the second is no longer in flight
                raise pchecks.used_not_in_flight(self.index, chain.head)
            self._check_used(chain.head, chain.used_len)
            # 2.8.8: buffers are used in the order they were made available.
            if self.in_order and chain.head != self._order[k]:
                raise checks.used_order(self.index, chain.head, self._order[k])
            seen.add(chain.head)
        if self._log is not None:
            for chain in batch:
                self._log_buffers_of.pop(chain.head, None)
                self._log_buffers(chain.buffers)
        if coalesce and self.in_order:
            skipped = 0
            last = len(batch) - 1
            for i, chain in enumerate(batch):
                if i == last or chain.used_len != chain.writable_len:
                    self._push_one(chain.head, chain.used_len, skipped)
                    skipped = 0
                else:
                    skipped += self._take(chain.head)
        else:
            for chain in batch:
                self._push_one(chain.head, chain.used_len)
        self._published()

    def _check_used(self, head: int, length: int) -> None:
        if head not in self._in_flight:
            raise pchecks.used_not_in_flight(self.index, head)
        if not 0 <= length <= checks.USED_LEN_MAX:
            raise checks.used_len(self.index, head, length)

    def _take(self, head: int) -> int:
        """Count the list of ``head`` returned; the ring slots it took."""
        if self.in_order:
            self._order.popleft()
        self._recent.clear()
        return self._in_flight.pop(head)

    def _push_one(self, head: int, length: int, skipped: int = 0) -> None:
        """Write the used descriptor of ``head`` for it and the ``skipped`` slots of lists it stands for."""
        taken = self._take(head) + skipped
        at = self.desc_addr + VIRTQ_DESC_SIZE * self._next_used
        # 2.8.6 / 2.8.21: id and len first, then flags (AVAIL = USED = the device's wrap counter).
        self.memory.write(at + 8, _USED.pack(length, head))
        flags = (VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED) if self._used_wrap else 0
        if length:
            flags |= VIRTQ_DESC_F_WRITE
        self.memory.write_u16(at + 14, flags)
        self._next_used += taken
        if self._next_used >= self.size:
            self._next_used -= self.size
            self._used_wrap = not self._used_wrap
        self._since_signal += taken

    def _published(self) -> None:
        if self._log is not None:
            self._log_used()
            self._log.notify()

    # -- notifications ---------------------------------------------------------
    def need_notify(self) -> bool:
        """Whether the driver must be notified of the used descriptors written so far (2.8.10, 2.8.14).

        The Driver area says: ENABLE, DISABLE, or (with VIRTIO_F_EVENT_IDX)
        DESC: notify once the used descriptor at ``desc_event_off_wrap`` is
        written, that is when it lies among the slots used since the last
        notification.
        """
        self._check_live()
        flags = self.memory.read_u16(self.driver_addr + 2) & _EVENT_FLAGS_MASK
        old, since = self._signalled, self._since_signal
        self._signalled, self._since_signal = self._lap(self.used_idx), 0
        if flags != RING_EVENT_FLAGS_DESC or not self.event_idx:
            return flags != RING_EVENT_FLAGS_DISABLE
        if old is None:
            return True
        event = self._lap(self.memory.read_u16(self.driver_addr))
        return (event - old) % (2 * self.size) < since

    def _lap(self, pos: int) -> int:
        """A position counted over two laps of the ring, so wrap counters order positions."""
        slot = (pos & ~PACKED_WRAP_BIT) % self.size
        return slot if pos & PACKED_WRAP_BIT else slot + self.size

    def _publish_avail_event(self) -> None:
        # 2.8.14: with VIRTIO_F_EVENT_IDX, ask for a kick when the next slot is made available.
        if self.event_idx and self._notify_enabled:
            self.memory.write_u16(self.device_addr, self.last_avail_idx)
            if self._log is not None:
                self._log_used()

    def enable_notification(self) -> bool:
        """Ask the driver to kick again; return True if lists arrived meanwhile."""
        self._check_live()
        self._notify_enabled = True
        self._publish_avail_event()
        self.memory.write_u16(self.device_addr + 2, RING_EVENT_FLAGS_DESC if self.event_idx else RING_EVENT_FLAGS_ENABLE)
        if self._log is not None:
            self._log_used()
        return self.pending() > 0

    def disable_notification(self) -> None:
        """Tell the driver kicks are not needed (we are polling)."""
        self._check_live()
        self._notify_enabled = False
        self.memory.write_u16(self.device_addr + 2, RING_EVENT_FLAGS_DISABLE)
        if self._log is not None:
            self._log_used()
