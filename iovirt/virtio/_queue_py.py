"""Split virtqueue, device side: the readable reference implementation.

The accelerated twin is ``_queue_c.pyx``; :mod:`iovirt.virtio.queue` picks
one.  Both implement the same API and are run by the same tests.  This one
reads and writes the ring through :class:`~iovirt.memory.GuestMemory` field by
field, exactly as the virtio 1.2 spec section 2.7 describes the split ring:

- descriptor table: ``struct virtq_desc { le64 addr; le32 len; le16 flags; le16 next; }``
- avail ring: ``le16 flags; le16 idx; le16 ring[size]; le16 used_event;``
- used ring: ``le16 flags; le16 idx; struct { le32 id; le32 len; } ring[size]; le16 avail_event;``
"""

from __future__ import annotations

import collections
import struct
from typing import Iterable, Sequence

from iovirt.memory import Access, GuestMemory, GuestMemoryError, TranslationPending
from iovirt.virtio.chain import ChainBatch, DescChain
from iovirt.virtio.defs import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_DESC_SIZE,
    VIRTQ_USED_F_NO_NOTIFY,
    vring_need_event,
)
from iovirt.virtio import _queue_checks as checks
from iovirt.virtio.dirtylog import DirtyLog
from iovirt.virtio.errors import VirtqueueError
from iovirt.virtio.layout import check_layout
from iovirt.virtio.state import QueueState

_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")
_U64_MAX = (1 << 64) - 1

IMPLEMENTATION = "python"


class SplitQueue:
    """The device side of one split virtqueue.

    ``pop``/``pop_batch`` take available chains, ``push``/``push_batch`` return
    them through the used ring, ``need_notify`` says whether the driver must be
    interrupted (2.7.7, 2.7.10).  A chain that breaks a rule is consumed and
    raised as a :class:`~iovirt.virtio.errors.VirtqueueError` subclass; an
    avail index that jumps by more than the queue size breaks the queue until
    it is rebuilt (the driver is treated as malicious).

    ``in_order``: VIRTIO_F_IN_ORDER was negotiated (2.7.9).  Chains must then
    be pushed in the order they were popped (:class:`~iovirt.virtio.errors.UsedOrderError`
    otherwise), and ``push_batch(batch, coalesce=True)`` may return a batch
    through fewer used entries.
    """

    def __init__(
        self,
        memory: GuestMemory,
        size: int,
        desc_addr: int,
        avail_addr: int,
        used_addr: int,
        *,
        index: int = 0,
        event_idx: bool = False,
        last_avail_idx: int = 0,
        used_idx: int = 0,
        in_order: bool = False,
    ) -> None:
        check_layout(memory, index, size, desc_addr, avail_addr, used_addr)
        for addr, length in checks.ring_parts(size, desc_addr, avail_addr, used_addr):
            checks.ring_part_gpa(memory, index, addr, length)
        self.memory = memory
        self.index = index
        self.size = size
        self.desc_addr = desc_addr
        self.avail_addr = avail_addr
        self.used_addr = used_addr
        self.event_idx = event_idx
        self.in_order = in_order
        self.last_avail_idx = last_avail_idx & 0xFFFF
        self.used_idx = used_idx & 0xFFFF
        self._signalled_used: int | None = None
        self._notify_enabled = True
        self._pending_error: VirtqueueError | None = None
        # Chains popped and not yet pushed: a device may not return more.
        self._in_flight = 0
        # With in_order: their heads, oldest first (the order the used ring must follow).
        self._order: collections.deque[int] = collections.deque()
        self._released = False
        self._log: DirtyLog | None = None
        self._used_log: list[tuple[int, int]] = []

    # -- state ---------------------------------------------------------------
    @classmethod
    def from_state(cls, memory: GuestMemory, state: QueueState) -> "SplitQueue":
        """Rebuild a queue from saved state, re-validating every field."""
        checks.check_state(state)
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
        """Plain-data snapshot of the queue."""
        return QueueState(
            size=self.size,
            desc_addr=self.desc_addr,
            avail_addr=self.avail_addr,
            used_addr=self.used_addr,
            last_avail_idx=self.last_avail_idx,
            used_idx=self.used_idx,
            event_idx=self.event_idx,
            index=self.index,
            in_order=self.in_order,
        )

    def release(self) -> None:
        """Let go of guest memory (the queue is stopped); any later use of the ring raises.

        Nothing is held here; the accelerated twin drops its views of the regions.
        """
        self._released = True

    def refresh(self) -> None:
        """Re-validate the ring after the memory map changed."""
        self._check_live()
        check_layout(self.memory, self.index, self.size, self.desc_addr, self.avail_addr, self.used_addr)
        for addr, length in checks.ring_parts(self.size, self.desc_addr, self.avail_addr, self.used_addr):
            checks.ring_part_gpa(self.memory, self.index, addr, length)

    def set_dirty_log(self, log: DirtyLog | None, used_ranges: Iterable[tuple[int, int]] = ()) -> None:
        """Log device writes in ``log`` from now on (None: stop logging).

        Every device-writable buffer of a chain returned through the used
        ring is logged at its guest-physical pages (through the translator,
        if any), after the device wrote it and before the used entry is
        published; after every write to the used ring, the guest-physical
        ``(gpa, length)`` ranges ``used_ranges`` are logged (the used ring;
        vhost-user ``log_guest_addr``; empty: the used ring is not logged).  Whole
        writable buffers are logged, not only ``used_len`` bytes: a device
        may write more than it reports (virtio 1.2 2.7.8.1), and a page sent
        twice costs less than a page lost.
        """
        self._log = log
        self._used_log = list(used_ranges) if log is not None else []

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

    def _log_head(self, head: int) -> None:
        """Log the writable buffers of the chain at ``head``, walking it again (as libvhost-user)."""
        try:
            buffers = self._walk(head)
        except (VirtqueueError, GuestMemoryError):
            assert self._log is not None
            self._log.unresolved += 1  # the driver changed the chain under the device: its loss
            return
        self._log_buffers(buffers)

    def _log_used(self) -> None:
        """Log the used ring after a write to it (the whole ring: a page or two)."""
        assert self._log is not None
        for gpa, length in self._used_log:
            self._log.mark(gpa, length)

    def _check_live(self) -> None:
        if self._released:
            raise checks.released(self.index)

    # -- avail side ------------------------------------------------------------
    def avail_idx(self) -> int:
        """The driver's avail ``idx``."""
        self._check_live()
        return self.memory.read_u16(self.avail_addr + 2)

    def pending(self) -> int:
        """How many chains the driver has made available and we have not popped."""
        count = (self.avail_idx() - self.last_avail_idx) & 0xFFFF
        if count > self.size:
            raise checks.avail_index(self.index, count, self.last_avail_idx, self.size)
        return count

    def pop(self) -> DescChain | None:
        """Take the next available chain, or ``None`` when there is none."""
        batch = self.pop_batch(1)
        return batch[0] if len(batch) else None

    def pop_batch(self, max_chains: int, batch: ChainBatch | None = None) -> ChainBatch:
        """Take up to ``max_chains`` available chains (into ``batch`` if given, reusing it).

        If a malformed chain is met after good ones, the good ones are
        returned and the error is raised by the next call, so no valid chain
        is lost.  A chain whose translation is pending
        (:class:`~iovirt.memory.TranslationPending`) stays available and
        ends the batch.
        """
        if self._pending_error is not None:
            error, self._pending_error = self._pending_error, None
            raise error
        self._check_live()
        count = min(self.pending(), max_chains)
        self._check_in_order_room(count)
        chains: list[DescChain] = []
        for _ in range(count):
            slot = self.avail_addr + 4 + 2 * (self.last_avail_idx % self.size)
            head = self.memory.read_u16(slot)
            self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
            self._in_flight += 1
            if self.in_order:
                self._order.append(head)
            try:
                chains.append(DescChain(head, self._walk(head)))
            except TranslationPending:
                # Not the driver's fault: leave the chain available, retry later.
                self.last_avail_idx = (self.last_avail_idx - 1) & 0xFFFF
                self._in_flight -= 1
                if self.in_order:
                    self._order.pop()
                break
            except VirtqueueError as exc:
                if not chains:
                    self._publish_avail_event()
                    raise
                self._pending_error = exc
                break
        self._publish_avail_event()
        if batch is None:
            return ChainBatch(chains)
        batch.chains = chains
        return batch

    def resubmit(self, heads: Sequence[int], batch: ChainBatch | None = None) -> ChainBatch:
        """Take the chains of ``heads`` again, in that order, without moving the avail index.

        vhost-user "Inflight I/O tracking": requests a previous back-end
        popped and never completed are resubmitted from the inflight region's
        list, not from the avail ring, since others popped with them may have
        completed out of order.  Returns the chains taken; one whose
        translation is pending ends the batch (the caller keeps the rest).
        """
        if self._pending_error is not None:
            error, self._pending_error = self._pending_error, None
            raise error
        self._check_live()
        self._check_in_order_room(len(heads))
        chains: list[DescChain] = []
        for head in heads:
            if not 0 <= head < self.size:
                raise checks.head_index(self.index, head, self.size)
            try:
                chains.append(DescChain(head, self._walk(head)))
            except TranslationPending:
                break
            self._in_flight += 1
            if self.in_order:
                self._order.append(head)
        if batch is None:
            return ChainBatch(chains)
        batch.chains = chains
        return batch

    def rewind(self, count: int) -> None:
        """Give back the last ``count`` popped chains unused: they will be popped again.

        For a device that popped receive buffers and found them too few for a
        frame (Linux vhost's ``vhost_discard_vq_desc``).
        """
        checks.check_rewind(self.index, count, self._in_flight)
        self.last_avail_idx = (self.last_avail_idx - count) & 0xFFFF
        self._in_flight -= count
        if self.in_order:
            for _ in range(count):
                self._order.pop()

    def _check_in_order_room(self, count: int) -> None:
        """With in_order, refuse to hold more than Queue Size chains: the order kept has that many places.

        A driver cannot have more chains out than descriptors (2.7.13 note);
        one that does reuses heads the device still holds.
        """
        if self.in_order and self._in_flight + count > self.size:
            raise checks.in_order_overrun(self.index, self._in_flight, count, self.size)

    def _read_desc(self, table: int, i: int, head: int) -> tuple[int, int, int, int]:
        try:
            return _DESC.unpack(self.memory.read(table + VIRTQ_DESC_SIZE * i, VIRTQ_DESC_SIZE))
        except TranslationPending:
            raise
        except GuestMemoryError as exc:
            raise checks.table_unreadable(self.index, i, head, table, exc) from exc

    def _walk(self, head: int) -> list[tuple[int, int, bool]]:
        """Follow a chain from ``head`` and check every rule of 2.7.5."""
        q = self.index
        if head >= self.size:
            raise checks.head_index(q, head, self.size)
        buffers: list[tuple[int, int, bool]] = []
        seen_writable = False
        table, table_len, i = self.desc_addr, self.size, head
        indirect = False
        visited = 0
        while True:
            visited += 1
            if visited > table_len:
                raise checks.loop(q, i, head, table_len)
            addr, length, flags, nxt = self._read_desc(table, i, head)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if indirect:
                    raise checks.nested_indirect(q, i, head)
                if flags & VIRTQ_DESC_F_NEXT:
                    raise checks.indirect_next(q, i, head)
                if length == 0 or length % VIRTQ_DESC_SIZE:
                    raise checks.indirect_length(q, i, head, length)
                self._check_buffer(addr, length, i, head, writable=False)
                count = length // VIRTQ_DESC_SIZE
                if len(buffers) + count > self.size:
                    raise checks.too_long(q, i, head, len(buffers) + count, self.size)
                table, table_len, i, indirect, visited = addr, count, 0, True, 0
                continue
            writable = bool(flags & VIRTQ_DESC_F_WRITE)
            if seen_writable and not writable:
                raise checks.order(q, i, head)
            seen_writable = writable
            self._check_buffer(addr, length, i, head, writable)
            buffers.append((addr, length, writable))
            if len(buffers) > self.size:
                raise checks.too_long(q, i, head, len(buffers), self.size)
            if not flags & VIRTQ_DESC_F_NEXT:
                return buffers
            if nxt >= table_len:
                raise checks.next_index(q, i, head, nxt, table_len)
            i = nxt

    def _check_buffer(self, addr: int, length: int, desc: int, head: int, writable: bool) -> None:
        if addr + length - 1 > _U64_MAX:
            raise checks.buffer_wraps(self.index, desc, head, addr, length)
        try:
            # A device-writable buffer needs write permission, a readable one read (VT-d R/W).
            self.memory.check_range(addr, length, Access.WRITE if writable else Access.READ)
        except TranslationPending:
            raise
        except GuestMemoryError as exc:
            raise checks.buffer_outside(self.index, desc, head, addr, length, exc) from exc

    # -- used side ---------------------------------------------------------------
    def push(self, head: int, length: int) -> None:
        """Return one chain through the used ring with ``length`` bytes written."""
        self._check_live()
        if self._in_flight < 1:
            raise checks.too_many_used(self.index, 1, self._in_flight)
        if self._log is not None:
            self._log_head(head)
        self._push_one(head, length)
        self._publish_used_idx()

    def push_batch(self, batch: ChainBatch, coalesce: bool = False) -> None:
        """Return every chain of ``batch`` with its ``used_len``; one idx update.

        ``coalesce`` (with ``in_order``): 2.7.9 lets the device return a run
        of chains through one used entry, the last chain's, written where the
        run's first entry would be; the used idx still moves by the run's
        length.  The driver takes the chains the entry skips as used whole,
        so a run ends at every chain whose ``used_len`` is not its writable
        length.  A caller passes ``coalesce`` only where its drivers read no
        skipped entry: DPDK's in-order split receive path reads every entry's
        ``len``, so only transmit-like queues may coalesce.
        """
        self._check_live()
        if len(batch) > self._in_flight:
            raise checks.too_many_used(self.index, len(batch), self._in_flight)
        if self._log is not None:
            for chain in batch:
                self._log_buffers(chain.buffers)
        if coalesce and self.in_order:
            start = self.used_idx
            last = len(batch) - 1
            for i, chain in enumerate(batch):
                self._take_used(chain.head, chain.used_len)
                self.used_idx = (self.used_idx + 1) & 0xFFFF
                if i == last or chain.used_len != chain.writable_len:
                    self._write_used(start, chain.head, chain.used_len)
                    start = self.used_idx
        else:
            for chain in batch:
                self._push_one(chain.head, chain.used_len)
        self._publish_used_idx()

    def _take_used(self, head: int, length: int) -> None:
        """Check a used entry for ``head`` and count its chain returned."""
        if not 0 <= head < self.size:
            raise checks.used_id(self.index, head, self.size)
        if not 0 <= length <= checks.USED_LEN_MAX:
            raise checks.used_len(self.index, head, length)
        if self.in_order:
            # 2.7.9: buffers are used in the order they were made available.
            if head != self._order[0]:
                raise checks.used_order(self.index, head, self._order[0])
            self._order.popleft()
        self._in_flight -= 1

    def _write_used(self, idx: int, head: int, length: int) -> None:
        slot = self.used_addr + 4 + 8 * (idx % self.size)
        self.memory.write(slot, _USED_ELEM.pack(head, length))

    def _push_one(self, head: int, length: int) -> None:
        self._take_used(head, length)
        self._write_used(self.used_idx, head, length)
        self.used_idx = (self.used_idx + 1) & 0xFFFF

    def _publish_used_idx(self) -> None:
        # 2.7.8.2: the used idx is written after the ring entries.
        self.memory.write_u16(self.used_addr + 2, self.used_idx)
        if self._log is not None:
            self._log_used()
            self._log.notify()

    # -- notifications ---------------------------------------------------------
    def need_notify(self) -> bool:
        """Whether the driver must be notified of the used entries pushed so far (2.7.10)."""
        self._check_live()
        if not self.event_idx:
            return not self.memory.read_u16(self.avail_addr) & VIRTQ_AVAIL_F_NO_INTERRUPT
        old, new = self._signalled_used, self.used_idx
        self._signalled_used = new
        if old is None:
            return True
        used_event = self.memory.read_u16(self.avail_addr + 4 + 2 * self.size)
        return vring_need_event(used_event, new, old)

    def _publish_avail_event(self) -> None:
        # 2.7.10: with VIRTIO_F_EVENT_IDX, avail_event tells the driver the
        # avail index at which it must kick us next.
        if self.event_idx and self._notify_enabled:
            self.memory.write_u16(self.used_addr + 4 + 8 * self.size, self.last_avail_idx)
            if self._log is not None:
                self._log_used()

    def enable_notification(self) -> bool:
        """Ask the driver to kick again; return True if chains arrived meanwhile."""
        self._check_live()
        self._notify_enabled = True
        if self.event_idx:
            self._publish_avail_event()
        else:
            flags = self.memory.read_u16(self.used_addr)
            self.memory.write_u16(self.used_addr, flags & ~VIRTQ_USED_F_NO_NOTIFY)
            if self._log is not None:
                self._log_used()
        return self.pending() > 0

    def disable_notification(self) -> None:
        """Tell the driver kicks are not needed (we are polling)."""
        self._check_live()
        self._notify_enabled = False
        if not self.event_idx:
            flags = self.memory.read_u16(self.used_addr)
            self.memory.write_u16(self.used_addr, flags | VIRTQ_USED_F_NO_NOTIFY)
            if self._log is not None:
                self._log_used()
