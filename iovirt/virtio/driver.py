"""The driver side of a split virtqueue: what a guest's virtio driver does to the ring.

Used by iovirt's tests, the packet bench, the conformance suite and the
in-process platform (rust-vmm ships the same thing as ``virtio-queue``'s
mock).  It follows the driver requirements of virtio 1.2 section 2.7: chains
are written into free descriptors (or an indirect table), the head goes into
the avail ring, and the avail idx is published after the entries; used
entries are read after the used idx.  With VIRTIO_F_IN_ORDER (``in_order``,
2.7.9) it uses descriptors in ring order (2.7.5) and takes a used entry for
head N as the completion of every chain outstanding up to N.

It also has raw writers (``write_desc``, ``post_head``, ``set_avail_idx``) to
build the malformed rings that bad-input tests feed to devices.
"""

from __future__ import annotations

import collections
import struct
from dataclasses import dataclass
from typing import Sequence

from iovirt.errors import IovirtError
from iovirt.memory import BumpAllocator, GuestMemory
from iovirt.virtio.defs import (
    AVAIL_ALIGN,
    DESC_ALIGN,
    USED_ALIGN,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_DESC_SIZE,
    VIRTQ_USED_F_NO_NOTIFY,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
    vring_need_event,
)
from iovirt.virtio.state import QueueState

_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")


class DriverQueueError(IovirtError):
    """A driver-side misuse: no free descriptors, an unknown used id, ..."""


class UsedIdError(DriverQueueError):
    """The device returned a used id that is not outstanding (2.7.8, 2.8.6), or an in-order batch
    that runs past the used idx (2.7.9).

    Attributes: ``queue`` (queue index), ``used_id`` (the id the device wrote).
    """

    def __init__(self, message: str, queue: int, used_id: int) -> None:
        super().__init__(f"queue {queue}: {message}")
        self.queue = queue
        self.used_id = used_id


@dataclass(frozen=True)
class UsedElem:
    """One used entry read back by the driver, with the device-written bytes."""

    head: int
    len: int
    data: bytes


def read_written(memory: GuestMemory, writable: list[tuple[int, int]], length: int) -> bytes:
    """The first ``length`` bytes the device wrote into ``writable`` buffers (a used entry's data)."""
    data = bytearray()
    left = length
    for addr, n in writable:
        if left <= 0:
            break
        data += memory.read(addr, min(n, left))
        left -= n
    return bytes(data)


class DriverQueue:
    """The driver's view of one split virtqueue.

    ``alloc`` hands out guest memory for rings, buffers and indirect tables.
    ``in_order``: VIRTIO_F_IN_ORDER was negotiated (2.7.9).
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
        self.desc_addr = alloc.alloc(desc_table_size(size), DESC_ALIGN)
        self.avail_addr = alloc.alloc(avail_ring_size(size), AVAIL_ALIGN)
        self.used_addr = alloc.alloc(used_ring_size(size), USED_ALIGN)
        memory.fill(self.desc_addr, desc_table_size(size))
        memory.fill(self.avail_addr, avail_ring_size(size))
        memory.fill(self.used_addr, used_ring_size(size))
        self.in_order = in_order
        # Free descriptors, taken from the end (the bench's raw path takes them there too); with
        # in_order from the front, in ring order (2.7.5: "starting from offset 0 in the table, and
        # wrapping around"), and freed in that order.
        self._free = list(range(size) if in_order else range(size - 1, -1, -1))
        # With in_order: heads made available and not yet used, oldest first.
        self._order: collections.deque[int] = collections.deque()
        self.avail_idx = 0  # shadow of avail->idx, published by publish()
        self._published_idx = 0
        self.last_used_idx = 0
        self.interrupts = True
        # head -> (descriptor indexes it holds, writable buffers, indirect)
        self._inflight: dict[int, tuple[list[int], list[tuple[int, int]]]] = {}

    def state(self) -> QueueState:
        """The ``QueueState`` a device needs to serve this ring from the start."""
        return QueueState(
            size=self.size,
            desc_addr=self.desc_addr,
            avail_addr=self.avail_addr,
            used_addr=self.used_addr,
            event_idx=self.event_idx,
            index=self.index,
            in_order=self.in_order,
        )

    @property
    def num_free(self) -> int:
        """Free descriptors in the table."""
        return len(self._free)

    # -- raw access, for building broken rings ------------------------------------
    def write_desc(self, i: int, addr: int, length: int, flags: int = 0, next: int = 0, table: int | None = None) -> None:
        """Write descriptor ``i`` of the ring's table (or of an indirect ``table``) verbatim."""
        base = self.desc_addr if table is None else table
        self.memory.write(base + VIRTQ_DESC_SIZE * i, _DESC.pack(addr, length, flags, next))

    def post_head(self, head: int) -> None:
        """Put ``head`` into the next avail slot without checks (publish() makes it visible)."""
        self.memory.write_u16(self.avail_addr + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF

    def set_avail_idx(self, idx: int) -> None:
        """Write avail->idx directly."""
        self.avail_idx = idx & 0xFFFF
        self.memory.write_u16(self.avail_addr + 2, self.avail_idx)

    # -- building chains ---------------------------------------------------------
    def add_chain(
        self,
        readable: Sequence[tuple[int, int]] = (),
        writable: Sequence[tuple[int, int]] = (),
        *,
        indirect: bool = False,
        lead: int = 0,
    ) -> int:
        """Make a chain of guest buffers available (not yet published); return its head.

        Readable buffers come first, then writable ones (2.7.4.2).  With
        ``indirect`` the buffers go into an indirect table that takes one ring
        descriptor (2.7.5.3); ``lead`` of them stay in ring descriptors chained
        before it (2.7.5.3.2: normal descriptors followed by one indirect).
        """
        bufs = [(a, n, 0) for a, n in readable] + [(a, n, VIRTQ_DESC_F_WRITE) for a, n in writable]
        if not bufs:
            raise DriverQueueError("a chain needs at least one buffer")
        if indirect:
            ring, bufs = bufs[:lead], bufs[lead:]
            table = self.alloc.alloc(VIRTQ_DESC_SIZE * len(bufs), DESC_ALIGN)
            for k, (addr, length, flags) in enumerate(bufs):
                more = VIRTQ_DESC_F_NEXT if k + 1 < len(bufs) else 0
                self.write_desc(k, addr, length, flags | more, k + 1 if more else 0, table=table)
            descs = self._take(len(ring) + 1)
            for k, (addr, length, flags) in enumerate(ring):
                self.write_desc(descs[k], addr, length, flags | VIRTQ_DESC_F_NEXT, descs[k + 1])
            self.write_desc(descs[-1], table, VIRTQ_DESC_SIZE * len(bufs), VIRTQ_DESC_F_INDIRECT)
        else:
            descs = self._take(len(bufs))
            for k, (addr, length, flags) in enumerate(bufs):
                more = VIRTQ_DESC_F_NEXT if k + 1 < len(bufs) else 0
                self.write_desc(descs[k], addr, length, flags | more, descs[k + 1] if more else 0)
        head = descs[0]
        self._inflight[head] = (descs, list(writable))
        if self.in_order:
            self._order.append(head)
        self.post_head(head)
        return head

    def add_data(self, out: Sequence[bytes] = (), in_sizes: Sequence[int] = (), *, indirect: bool = False) -> int:
        """Allocate buffers, copy ``out`` into readable ones, add writable ones of ``in_sizes``."""
        readable = []
        for data in out:
            addr = self.alloc.alloc(max(len(data), 1))
            self.memory.write(addr, data)
            readable.append((addr, len(data)))
        writable = [(self.alloc.alloc(max(n, 1)), n) for n in in_sizes]
        return self.add_chain(readable, writable, indirect=indirect)

    def _take(self, n: int) -> list[int]:
        if n > len(self._free):
            raise DriverQueueError(f"queue {self.index}: {n} descriptors wanted, {len(self._free)} free")
        if self.in_order:
            return [self._free.pop(0) for _ in range(n)]
        return [self._free.pop() for _ in range(n)]

    def publish(self) -> bool:
        """Publish the avail idx; return whether the device must be kicked (2.7.10)."""
        old, new = self._published_idx, self.avail_idx
        self.memory.write_u16(self.avail_addr + 2, new)
        self._published_idx = new
        if self.event_idx:
            avail_event = self.memory.read_u16(self.used_addr + 4 + 8 * self.size)
            return vring_need_event(avail_event, new, old)
        return not self.memory.read_u16(self.used_addr) & VIRTQ_USED_F_NO_NOTIFY

    # -- used side -------------------------------------------------------------
    def used_idx(self) -> int:
        """The device's used idx."""
        return self.memory.read_u16(self.used_addr + 2)

    def get_used(self) -> list[UsedElem]:
        """Take every new used entry, free its descriptors, return them with written data.

        With ``in_order`` an entry for head N stands for every chain
        outstanding up to N (2.7.9): those before N are returned as used
        whole (their writable length), N with the entry's ``len``; the used
        idx moved past all of them.
        """
        out = []
        used_idx = self.used_idx()
        while self.last_used_idx != used_idx:
            slot = self.used_addr + 4 + 8 * (self.last_used_idx % self.size)
            head, length = _USED_ELEM.unpack(self.memory.read(slot, 8))
            if head not in self._inflight:
                raise UsedIdError(f"used id {head} is not an in-flight head", self.index, head)
            heads = [head]
            if self.in_order:
                count = self._order.index(head) + 1
                left = (used_idx - self.last_used_idx) & 0xFFFF
                if count > left:
                    raise UsedIdError(
                        f"used id {head} completes {count} in-order chains but the used idx moved by {left}",
                        self.index, head,
                    )
                heads = [self._order.popleft() for _ in range(count)]
            self.last_used_idx = (self.last_used_idx + len(heads)) & 0xFFFF
            for done in heads:
                descs, writable = self._inflight.pop(done)
                self._free.extend(descs if self.in_order else reversed(descs))
                n_used = length if done == head else sum(n for _, n in writable)
                out.append(UsedElem(done, n_used, read_written(self.memory, writable, n_used)))
        if self.event_idx and self.interrupts:
            # As Linux's virtqueue_get_buf: ask for an interrupt at the next entry.
            self.set_used_event(self.last_used_idx)
        return out

    def set_interrupts(self, enabled: bool) -> None:
        """Ask for (or suppress) used-buffer notifications (2.7.7)."""
        self.interrupts = enabled
        if self.event_idx:
            # used_event: interrupt when the device passes the next entry (or never soon).
            target = self.last_used_idx if enabled else (self.last_used_idx - 1) & 0xFFFF
            self.memory.write_u16(self.avail_addr + 4 + 2 * self.size, target)
        else:
            self.memory.write_u16(self.avail_addr, 0 if enabled else VIRTQ_AVAIL_F_NO_INTERRUPT)

    def set_used_event(self, idx: int) -> None:
        """Write ``used_event`` directly (EVENT_IDX)."""
        self.memory.write_u16(self.avail_addr + 4 + 2 * self.size, idx)
