"""The driver side of a packed virtqueue: what a guest's virtio driver does to the ring.

The packed-ring counterpart of :mod:`iovirt.virtio.driver`, for tests, the
bench and the conformance suite.  It follows the driver requirements of
virtio 1.2 section 2.8: a list's descriptors go into consecutive ring slots
with the AVAIL/USED bits set from the Driver Ring Wrap Counter, the first
descriptor's flags written last (at :meth:`PackedDriverQueue.publish`); the
Buffer ID goes into every descriptor of the list; used descriptors are read
back at the driver's used slot, which skips as many slots as the list took.
With VIRTIO_F_IN_ORDER (``in_order``, 2.8.8) a used descriptor with Buffer
ID N completes every list outstanding up to N and skips all their slots.

``write_desc`` writes a raw descriptor, to build the malformed rings that
bad-input tests feed to devices.
"""

from __future__ import annotations

import collections
import struct
from typing import Sequence

from iovirt.memory import BumpAllocator, GuestMemory
from iovirt.virtio.defs import (
    DESC_ALIGN,
    PACKED_EVENT_ALIGN,
    PACKED_EVENT_SIZE,
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
from iovirt.virtio.driver import DriverQueueError, UsedElem, UsedIdError, read_written
from iovirt.virtio.state import QueueState

_DESC = struct.Struct("<QIHH")


def avail_flags(wrap: bool) -> int:
    """2.8.1: AVAIL set to the Driver Ring Wrap Counter, USED to its inverse."""
    return VIRTQ_DESC_F_AVAIL if wrap else VIRTQ_DESC_F_USED


class PackedDriverQueue:
    """The driver's view of one packed virtqueue; ``alloc`` hands out guest memory.

    ``in_order``: VIRTIO_F_IN_ORDER was negotiated (2.8.8).
    """

    def __init__(
        self,
        memory: GuestMemory,
        alloc: BumpAllocator,
        size: int,
        *,
        event_idx: bool = False,
        index: int = 0,
        in_order: bool = False,
    ) -> None:
        self.memory = memory
        self.alloc = alloc
        self.size = size
        self.index = index
        self.event_idx = event_idx
        self.desc_addr = alloc.alloc(VIRTQ_DESC_SIZE * size, DESC_ALIGN)
        self.driver_addr = alloc.alloc(PACKED_EVENT_SIZE, PACKED_EVENT_ALIGN)
        self.device_addr = alloc.alloc(PACKED_EVENT_SIZE, PACKED_EVENT_ALIGN)
        memory.fill(self.desc_addr, VIRTQ_DESC_SIZE * size)  # 2.8: the ring starts zeroed
        memory.fill(self.driver_addr, PACKED_EVENT_SIZE)
        memory.fill(self.device_addr, PACKED_EVENT_SIZE)
        self.next_avail, self.avail_wrap = 0, True
        self.last_used, self.used_wrap = 0, True
        self.in_order = in_order
        # Free Buffer IDs, taken from the end; with in_order from the front and freed in that order.
        self._free_ids = list(range(size) if in_order else range(size - 1, -1, -1))
        # With in_order: Buffer IDs made available and not yet used, oldest first.
        self._order: collections.deque[int] = collections.deque()
        self.num_free = size
        # Buffer ID -> (ring slots its list took, writable buffers)
        self._inflight: dict[int, tuple[int, list[tuple[int, int]]]] = {}
        # (slot, flags) of first descriptors written but not yet made available, and the
        # position publish() last made available up to.
        self._unpublished: list[tuple[int, int]] = []
        self._published = (0, True)
        self.interrupts = True

    def state(self) -> QueueState:
        """The ``QueueState`` a device needs to serve this ring from the start."""
        return QueueState(
            size=self.size,
            desc_addr=self.desc_addr,
            avail_addr=self.driver_addr,
            used_addr=self.device_addr,
            last_avail_idx=PACKED_WRAP_BIT,
            used_idx=PACKED_WRAP_BIT,
            event_idx=self.event_idx,
            index=self.index,
            in_order=self.in_order,
        )

    # -- raw access, for building broken rings ------------------------------------
    def write_desc(self, slot: int, addr: int, length: int, buf_id: int, flags: int, table: int | None = None) -> None:
        """Write descriptor ``slot`` of the ring (or of an indirect ``table``) verbatim."""
        base = self.desc_addr if table is None else table
        self.memory.write(base + VIRTQ_DESC_SIZE * slot, _DESC.pack(addr, length, buf_id, flags))

    def post_raw(self, descs: Sequence[tuple[int, int, int, int]]) -> None:
        """Make raw ``(addr, len, id, flags)`` descriptors available at the next slots.

        AVAIL/USED come from the wrap counter; the other flags are taken as
        given.  No bookkeeping: for bad-input tests.
        """
        for addr, length, buf_id, flags in descs:
            self.write_desc(self.next_avail, addr, length, buf_id, flags | avail_flags(self.avail_wrap))
            self._advance(1)
        self._published = (self.next_avail, self.avail_wrap)

    def _advance(self, n: int) -> None:
        self.next_avail += n
        if self.next_avail >= self.size:
            self.next_avail -= self.size
            self.avail_wrap = not self.avail_wrap

    # -- building lists ----------------------------------------------------------
    def add_chain(
        self,
        readable: Sequence[tuple[int, int]] = (),
        writable: Sequence[tuple[int, int]] = (),
        *,
        indirect: bool = False,
    ) -> int:
        """Write a list of guest buffers (made available by :meth:`publish`); return its Buffer ID."""
        bufs = [(a, n, 0) for a, n in readable] + [(a, n, VIRTQ_DESC_F_WRITE) for a, n in writable]
        if not bufs:
            raise DriverQueueError("a chain needs at least one buffer")
        if indirect:
            table = self.alloc.alloc(VIRTQ_DESC_SIZE * len(bufs), DESC_ALIGN)
            for k, (addr, length, flags) in enumerate(bufs):
                self.write_desc(k, addr, length, 0, flags, table=table)
            ring = [(table, VIRTQ_DESC_SIZE * len(bufs), VIRTQ_DESC_F_INDIRECT)]
        else:
            ring = [(a, n, f | (VIRTQ_DESC_F_NEXT if k + 1 < len(bufs) else 0)) for k, (a, n, f) in enumerate(bufs)]
        if len(ring) > self.num_free or not self._free_ids:
            raise DriverQueueError(f"queue {self.index}: {len(ring)} descriptors wanted, {self.num_free} free")
        buf_id = self._free_ids.pop(0 if self.in_order else -1)
        if self.in_order:
            self._order.append(buf_id)
        first = None
        for addr, length, flags in ring:
            flags |= avail_flags(self.avail_wrap)
            if first is None:
                # 2.8.6: the first descriptor's flags are written after the rest of the list.
                # Its old flags stay until then: zero would read as used on an odd lap.
                first = (self.next_avail, flags)
                self.memory.write(self.desc_addr + VIRTQ_DESC_SIZE * self.next_avail, _DESC.pack(addr, length, buf_id, 0)[:14])
            else:
                self.write_desc(self.next_avail, addr, length, buf_id, flags)
            self._advance(1)
        assert first is not None
        self._unpublished.append(first)
        self.num_free -= len(ring)
        self._inflight[buf_id] = (len(ring), list(writable))
        return buf_id

    def add_data(self, out: Sequence[bytes] = (), in_sizes: Sequence[int] = (), *, indirect: bool = False) -> int:
        """Allocate buffers, copy ``out`` into readable ones, add writable ones of ``in_sizes``."""
        readable = []
        for data in out:
            addr = self.alloc.alloc(max(len(data), 1))
            self.memory.write(addr, data)
            readable.append((addr, len(data)))
        writable = [(self.alloc.alloc(max(n, 1)), n) for n in in_sizes]
        return self.add_chain(readable, writable, indirect=indirect)

    def publish(self) -> bool:
        """Make the lists written so far available; return whether the device must be kicked (2.8.10)."""
        for slot, flags in self._unpublished:
            self.memory.write_u16(self.desc_addr + VIRTQ_DESC_SIZE * slot + 14, flags)
        self._unpublished = []
        old, new = self._published, (self.next_avail, self.avail_wrap)
        self._published = new
        flags = self.memory.read_u16(self.device_addr + 2) & 0x3
        if flags != RING_EVENT_FLAGS_DESC or not self.event_idx:
            return flags != RING_EVENT_FLAGS_DISABLE
        # Kick if the slot the device asked about was made available by this publish.
        event = self.memory.read_u16(self.device_addr)
        event_lap = self._lap(event & ~PACKED_WRAP_BIT, bool(event & PACKED_WRAP_BIT))
        laps = 2 * self.size
        return (event_lap - self._lap(*old)) % laps < (self._lap(*new) - self._lap(*old)) % laps

    def _lap(self, slot: int, wrap: bool) -> int:
        return slot if wrap else slot + self.size

    # -- used side -------------------------------------------------------------
    def get_used(self) -> list[UsedElem]:
        """Take every new used descriptor, free its slots and id, return them with written data.

        With ``in_order`` a used descriptor with Buffer ID N stands for every
        list outstanding up to N (2.8.8): those before N are returned as used
        whole (their writable length), N with the descriptor's ``len``.
        """
        out = []
        while True:
            at = self.desc_addr + VIRTQ_DESC_SIZE * self.last_used
            _, length, buf_id, flags = _DESC.unpack(self.memory.read(at, VIRTQ_DESC_SIZE))
            # 2.8.1: used when AVAIL and USED both equal the used wrap counter.
            if bool(flags & VIRTQ_DESC_F_AVAIL) != self.used_wrap or bool(flags & VIRTQ_DESC_F_USED) != self.used_wrap:
                break
            if buf_id not in self._inflight:
                raise UsedIdError(f"used id {buf_id} is not an in-flight buffer id", self.index, buf_id)
            ids = [buf_id]
            if self.in_order:
                ids = [self._order.popleft() for _ in range(self._order.index(buf_id) + 1)]
            for done in ids:
                taken, writable = self._inflight.pop(done)
                self.last_used += taken
                if self.last_used >= self.size:
                    self.last_used -= self.size
                    self.used_wrap = not self.used_wrap
                self.num_free += taken
                self._free_ids.append(done)
                n_used = length if done == buf_id else sum(n for _, n in writable)
                out.append(UsedElem(done, n_used, read_written(self.memory, writable, n_used)))
        if self.event_idx and self.interrupts:
            self.set_interrupts(True)  # as Linux: ask for an interrupt at the next used slot
        return out

    def used_event_pos(self) -> int:
        """The driver's next used slot with its wrap counter in bit 15 (desc_event_off_wrap encoding)."""
        return self.last_used | (PACKED_WRAP_BIT if self.used_wrap else 0)

    def set_interrupts(self, enabled: bool) -> None:
        """Ask for (or suppress) used-buffer notifications through the Driver area (2.8.14)."""
        self.interrupts = enabled
        if enabled and self.event_idx:
            self.memory.write_u16(self.driver_addr, self.used_event_pos())
            self.memory.write_u16(self.driver_addr + 2, RING_EVENT_FLAGS_DESC)
        else:
            self.memory.write_u16(self.driver_addr + 2, RING_EVENT_FLAGS_ENABLE if enabled else RING_EVENT_FLAGS_DISABLE)
