"""The shared inflight-I/O region of ``VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD``.

Layout (vhost-user.rst, "Inflight I/O tracking"): one region per queue,
for a split ring ``QueueRegionSplit { u64 features; u16 version; u16 desc_num;
u16 last_batch_head; u16 used_idx; DescStateSplit desc[desc_num]; }`` with
``DescStateSplit { u8 inflight; u8 padding[5]; u16 next; u64 counter; }``;
for a packed ring ``QueueRegionPacked`` (:class:`PackedQueueRegion`), which
also keeps a copy of every ring descriptor in flight.  Whether a ring is
packed is known only once features are negotiated, which QEMU does after
GET_INFLIGHT_FD: each queue's region is sized for the packed layout (the
larger), and read in the layout of the ring when it starts.
The front-end keeps the fd across a back-end restart and hands it back with
``SET_INFLIGHT_FD``, so requests popped but not completed by a back-end that
died are resubmitted, in the order they were popped, by the next one.

:class:`InflightQueue` is how the back-end keeps the region: a wrapper it
installs around a device's queue (as libvhost-user does inside
``vu_queue_pop``/``vu_queue_push``), so the device never knows.  It follows
the spec's order: a batch's entries join the last-batch list before the used
index is published, and are cleared after it, so a back-end of any make
(libvhost-user, DPDK, SPDK) taking the region over resubmits exactly what
was in flight.

The region is shared with the front-end and read as untrusted: no head,
stored or given, indexes past a queue's ``desc_num`` entries
(:class:`InflightError`), and the back-end never starts a ring larger than
its queue's region (:mod:`iovirt.vhost_user.vrings`).
"""

from __future__ import annotations

import collections
import struct
from typing import Any, Callable

from iovirt.errors import IovirtError
from iovirt.memory import MappableFd, MemoryRegion
from iovirt.virtio.defs import (
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_USED,
    VIRTQ_DESC_SIZE,
)
from iovirt.virtio.queue import QueueWrapper, ring_of

QUEUE_HEADER = struct.Struct("=QHHHH")  # 16 bytes
DESC_STATE = struct.Struct("=B5xHQ")  # 16 bytes
_RING_DESC = struct.Struct("<QIHH")  # struct pvirtq_desc (virtio 1.2 2.8.13)
REGION_ALIGN = 64
INFLIGHT_VERSION = 1


# QueueRegionPacked's header up to its padding; the descriptors start at 32 (padding[7], then
# DescStatePacked's 8-byte alignment).
PACKED_QUEUE_HEADER = struct.Struct("=QHHHHHHBB")
PACKED_HEADER_SIZE = 32
# DescStatePacked { u8 inflight; u8 padding; u16 next; u16 last; u16 num; u64 counter;
#                   u16 id; u16 flags; u32 len; u64 addr; }
PACKED_DESC_STATE = struct.Struct("=BxHHHQHHIQ")  # 32 bytes


def _round(raw: int) -> int:
    return (raw + REGION_ALIGN - 1) // REGION_ALIGN * REGION_ALIGN


def queue_region_size(queue_size: int) -> int:
    """Bytes of one split queue's region, rounded up to 64."""
    return _round(QUEUE_HEADER.size + DESC_STATE.size * queue_size)


def packed_queue_region_size(queue_size: int) -> int:
    """Bytes of one packed queue's region, rounded up to 64 (never less than a split one's)."""
    return _round(PACKED_HEADER_SIZE + PACKED_DESC_STATE.size * queue_size)


def inflight_mmap_size(num_queues: int, queue_size: int) -> int:
    """Bytes of the whole inflight area GET_INFLIGHT_FD allocates: room for either layout."""
    return num_queues * packed_queue_region_size(queue_size)


def min_inflight_mmap_size(num_queues: int, queue_size: int) -> int:
    """The smallest area SET_INFLIGHT_FD takes: split layout (its packed rings cannot be tracked)."""
    return num_queues * queue_region_size(queue_size)


class InflightError(IovirtError):
    """The inflight region cannot record a head (it has fewer entries) or is too small."""


class QueueRegion:
    """The inflight bookkeeping of one split queue, kept in shared memory."""

    def __init__(self, view: memoryview, queue_size: int, fresh: bool) -> None:
        if len(view) < queue_region_size(queue_size):
            raise InflightError(f"{len(view)} bytes cannot hold the inflight state of {queue_size} descriptors")
        self.view = view
        self.queue_size = queue_size
        if fresh or QUEUE_HEADER.unpack_from(view, 0)[1] != INFLIGHT_VERSION:
            view[:] = bytes(len(view))
            QUEUE_HEADER.pack_into(view, 0, 0, INFLIGHT_VERSION, queue_size, 0, 0)
        self.counter = 1 + max((self._desc(i)[2] for i in range(queue_size)), default=0)
        self._packed: PackedQueueRegion | None = None

    def packed(self) -> "PackedQueueRegion":
        """This queue's region in the packed layout (for a packed ring), set up if no packed ring used it yet.

        Raises :class:`InflightError` if the region is too small for it.
        """
        if self._packed is None:
            self._packed = PackedQueueRegion(self.view, self.queue_size)
        return self._packed

    def _offset(self, head: int) -> int:
        if not 0 <= head < self.queue_size:
            raise InflightError(f"head {head} is beyond the inflight region's {self.queue_size} descriptors")
        return QUEUE_HEADER.size + DESC_STATE.size * head

    def _desc(self, head: int) -> tuple[int, int, int]:
        return DESC_STATE.unpack_from(self.view, self._offset(head))

    def _set_desc(self, head: int, inflight: int, nxt: int, counter: int) -> None:
        DESC_STATE.pack_into(self.view, self._offset(head), inflight, nxt, counter)

    def popped(self, head: int) -> None:
        """A chain was taken from the avail ring: mark it in flight with the next counter."""
        _, nxt, _ = self._desc(head)
        self._set_desc(head, 1, nxt, self.counter)
        self.counter += 1

    def unpopped(self, head: int) -> None:
        """A popped chain went back to the avail ring unserved (rewind)."""
        _, nxt, counter = self._desc(head)
        self._set_desc(head, 0, nxt, counter)

    def completing(self, heads: list[int]) -> None:
        """A batch is about to go to the used ring: link it into the last-batch list.

        Spec steps 1-4 of "supplying used buffers", before the used idx moves.
        """
        features, version, desc_num, last, used_idx = QUEUE_HEADER.unpack_from(self.view, 0)
        for head in heads:
            inflight, _, counter = self._desc(head)
            self._set_desc(head, inflight, last, counter)
            last = head
        QUEUE_HEADER.pack_into(self.view, 0, features, version, desc_num, last, used_idx)

    def completed(self, heads: list[int], used_idx: int) -> None:
        """The batch is in the used ring, whose idx is now ``used_idx``: clear it (steps 6-7)."""
        for head in heads:
            _, nxt, counter = self._desc(head)
            self._set_desc(head, 0, nxt, counter)
        features, version, desc_num, last, _ = QUEUE_HEADER.unpack_from(self.view, 0)
        QUEUE_HEADER.pack_into(self.view, 0, features, version, desc_num, last, used_idx)

    def recover(self, ring_used_idx: int) -> list[int]:
        """On reconnect: repair the last batch, return the heads to resubmit in pop order."""
        features, version, desc_num, last, used_idx = QUEUE_HEADER.unpack_from(self.view, 0)
        if used_idx != ring_used_idx:
            # The back-end died between publishing a batch and clearing it.
            count = (ring_used_idx - used_idx) & 0xFFFF
            head = last
            for _ in range(min(count, self.queue_size)):
                if head >= self.queue_size:
                    break
                _, nxt, counter = self._desc(head)
                self._set_desc(head, 0, nxt, counter)
                head = nxt
            QUEUE_HEADER.pack_into(self.view, 0, features, version, desc_num, last, ring_used_idx)
        pending = [(self._desc(i)[2], i) for i in range(self.queue_size) if self._desc(i)[0] == 1]
        return [head for _, head in sorted(pending)]


class PackedQueueRegion:
    """The inflight bookkeeping of one packed queue, kept in shared memory (``QueueRegionPacked``).

    vhost-user.rst "Inflight I/O tracking", packed virtqueue: ``desc[]`` is a
    free list of entries; a list popped takes one entry per ring descriptor
    (its head entry holds ``inflight``, ``num``, ``last`` and ``counter``,
    every entry a copy of its descriptor), so a list can be resubmitted even
    after used descriptors written out of order overwrote it in the ring.
    Completing gives the entries back to the free list before the used
    descriptors are written; ``old_free_head``, ``old_used_idx`` and
    ``old_used_wrap_counter`` are set after, so a restart rolls an unfinished
    completion back or commits it (:meth:`recover`).  Every index read from
    the region is checked against ``desc_num`` (:class:`InflightError`).
    """

    def __init__(self, view: memoryview, queue_size: int) -> None:
        if len(view) < packed_queue_region_size(queue_size):
            raise InflightError(
                f"{len(view)} bytes cannot hold the packed inflight state of {queue_size} descriptors "
                f"(needs {packed_queue_region_size(queue_size)})"
            )
        self.view = view
        self.queue_size = queue_size
        # Never used by a packed ring: uninitialised (version 0), or as GET_INFLIGHT_FD left it
        # (the header's version and desc_num, nothing else; QEMU asks for the region before it
        # negotiates features, so the ring type was not known then).
        version = PACKED_QUEUE_HEADER.unpack_from(view, 0)[1]
        self.fresh = version != INFLIGHT_VERSION or not bytes(view[12:]).strip(b"\0")
        """Set up here: the ring's positions are the front-end's (SET_VRING_BASE), not the region's."""
        if self.fresh:
            view[:] = bytes(len(view))
            # Both wrap counters start at 1 (virtio 1.2 2.8.1); the free list is 0, 1, 2, ...
            self._header(free_head=0, old_free_head=0, used_idx=0, old_used_idx=0, used_wrap=1, old_used_wrap=1)
            for i in range(queue_size):
                self._set(i, next=i + 1)
        self.counter = 1 + max((self._desc(i)[4] for i in range(queue_size)), default=0)

    # -- raw access ----------------------------------------------------------------------
    _FIELDS = ("inflight", "next", "last", "num", "counter", "id", "flags", "len", "addr")
    _HEADER = ("free_head", "old_free_head", "used_idx", "old_used_idx", "used_wrap", "old_used_wrap")

    def _check(self, entry: int) -> int:
        if not 0 <= entry < self.queue_size:
            raise InflightError(f"entry {entry} is beyond the inflight region's {self.queue_size} descriptors")
        return PACKED_HEADER_SIZE + PACKED_DESC_STATE.size * entry

    def _desc(self, entry: int) -> tuple[int, ...]:
        return PACKED_DESC_STATE.unpack_from(self.view, self._check(entry))

    def _get(self, entry: int) -> dict[str, int]:
        return dict(zip(self._FIELDS, self._desc(entry)))

    def _set(self, entry: int, **fields: int) -> None:
        values = {**self._get(entry), **fields}
        PACKED_DESC_STATE.pack_into(self.view, self._check(entry), *(values[f] for f in self._FIELDS))

    def header(self) -> dict[str, int]:
        """The header's free-list heads, used indexes and wrap counters (untrusted)."""
        _, _, _, *rest = PACKED_QUEUE_HEADER.unpack_from(self.view, 0)
        return dict(zip(self._HEADER, rest))

    def _header(self, **fields: int) -> None:
        values = {**self.header(), **fields}
        PACKED_QUEUE_HEADER.pack_into(
            self.view, 0, 0, INFLIGHT_VERSION, self.queue_size, *(values[f] & 0xFFFF for f in self._HEADER)
        )

    # -- the spec's steps ------------------------------------------------------------------
    def start_at(self, used_pos: int) -> None:
        """A fresh region for a ring whose next used slot is ``used_pos`` (slot, wrap counter in bit 15)."""
        slot, wrap = used_pos & 0x7FFF, used_pos >> 15 & 1
        self._header(used_idx=slot, old_used_idx=slot, used_wrap=wrap, old_used_wrap=wrap)
        self.fresh = False

    def popped(self, descs: list[tuple[int, int, int, int]]) -> int:
        """A list of ring descriptors ``(addr, len, id, flags)`` was taken: record it; returns its head entry.

        "When receiving available buffers from the driver", for every
        descriptor of the list in ring order.
        """
        self.fresh = False
        head = self.header()["old_free_head"]
        free = self.header()["free_head"]
        for i, (addr, length, buf_id, flags) in enumerate(descs):
            if i == 0:
                self._set(head, num=0, counter=self.counter, inflight=1)
                self.counter += 1
            if i == len(descs) - 1:
                self._set(head, last=free)
            self._set(head, num=self._get(head)["num"] + 1)
            self._set(free, addr=addr, len=length, flags=flags, id=buf_id)
            free = self._get(free)["next"]
            self._header(free_head=free)
        self._header(old_free_head=free)
        return head

    def unpopped(self, head: int) -> None:
        """The list of the last ``head`` popped went back to the ring unserved (rewind): its entries are free again."""
        self._set(head, inflight=0)
        self._header(free_head=head, old_free_head=head)

    def completing(self, heads: list[int]) -> None:
        """A batch is about to be written to the ring: give its entries back to the free list (steps 1-5)."""
        free = self.header()["free_head"]
        for head in heads:
            self._set(self._get(head)["last"], next=free)
            free = head
        self._header(free_head=free)

    def completed(self, heads: list[int], used_pos: int) -> None:
        """The batch is in the ring, whose next used slot is now ``used_pos`` (wrap counter in bit 15)."""
        for head in heads:
            self._set(head, inflight=0)
        slot, wrap = used_pos & 0x7FFF, used_pos >> 15 & 1
        free = self.header()["free_head"]
        self._header(used_idx=slot, used_wrap=wrap, old_free_head=free, old_used_idx=slot, old_used_wrap=wrap)

    def recover(self, ring_flags: Callable[[int], int]) -> tuple[int, list[tuple[int, list[bytes]]]]:
        """On reconnect: commit or roll back the last completion, free what is free, find what is in flight.

        ``ring_flags(slot)`` reads the flags of a Descriptor Ring slot.
        Returns the next used position (slot, wrap counter in bit 15) and the
        lists in flight in pop order: ``(head entry, [16-byte descriptors])``.
        """
        h = self.header()
        if h["used_idx"] != h["old_used_idx"]:
            slot = h["old_used_idx"]
            if slot >= self.queue_size:
                raise InflightError(f"old_used_idx {slot} is beyond the ring's {self.queue_size} descriptors")
            # Still the driver's available flags there: the used descriptor was not written.
            wrap = h["old_used_wrap"] & 1
            avail = VIRTQ_DESC_F_AVAIL if wrap else VIRTQ_DESC_F_USED
            if ring_flags(slot) & (VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED) != avail:
                self._header(old_free_head=h["free_head"], old_used_idx=h["used_idx"], old_used_wrap=h["used_wrap"])
        h = self.header()
        self._header(free_head=h["old_free_head"], used_idx=h["old_used_idx"], used_wrap=h["old_used_wrap"])
        entry = h["old_free_head"]
        for _ in range(self.queue_size):  # the free list, at most desc_num long
            if entry >= self.queue_size:
                break
            self._set(entry, inflight=0)
            entry = self._get(entry)["next"]
        pending = sorted((self._get(e)["counter"], e) for e in range(self.queue_size) if self._get(e)["inflight"] == 1)
        lists = [(head, self._list(head)) for _, head in pending]
        return (h["old_used_idx"] & 0x7FFF) | (h["old_used_wrap"] & 1) << 15, lists

    def _list(self, head: int) -> list[bytes]:
        """The saved ring descriptors of the list whose head entry is ``head``."""
        state = self._get(head)
        if not 0 < state["num"] <= self.queue_size:
            raise InflightError(f"entry {head} holds a list of {state['num']} descriptors")
        descs, entry = [], head
        for i in range(state["num"]):
            d = self._get(entry)
            descs.append(_RING_DESC.pack(d["addr"], d["len"], d["id"], d["flags"]))
            if i < state["num"] - 1:
                entry = d["next"]
        if entry != state["last"]:
            raise InflightError(f"entry {head}: its list ends at entry {entry}, not at its last {state['last']}")
        return descs


class InflightRegion:
    """The mapped inflight fd: one :class:`QueueRegion` per queue.

    The fd is checked before it is mapped (:meth:`MemoryRegion.from_fd`);
    raises :class:`~iovirt.memory.GuestMemoryError` for one that cannot be,
    and :class:`InflightError` if ``size`` cannot hold the queues.
    """

    def __init__(self, fd: int, size: int, offset: int, num_queues: int, queue_size: int, fresh: bool) -> None:
        # Room for the packed layout (what GET_INFLIGHT_FD allocates), else split only (another back-end's).
        per_queue = packed_queue_region_size(queue_size)
        if num_queues * per_queue > size:
            per_queue = queue_region_size(queue_size)
        if num_queues * per_queue > size:
            raise InflightError(f"{size} bytes cannot hold {num_queues} queues of {queue_size} descriptors")
        self.map = MemoryRegion.from_fd(0, size, fd, offset)
        base = self.map.view
        try:
            self.queues = [
                QueueRegion(base[i * per_queue : (i + 1) * per_queue], queue_size, fresh) for i in range(num_queues)
            ]
        except BaseException:
            self.map.close()
            raise

    @property
    def fd_info(self) -> MappableFd | None:
        """What the mapped fd was (for the seal policy)."""
        return self.map.fd_info

    def queue(self, index: int) -> QueueRegion:
        """Queue ``index``'s bookkeeping."""
        return self.queues[index]

    def close(self) -> None:
        """Unmap."""
        for q in self.queues:
            q.view.release()
        self.map.close()


class InflightQueue(QueueWrapper):
    """A device queue whose pops and pushes are recorded in a :class:`QueueRegion`.

    Everything else is the wrapped queue's (``inner``).
    """

    def __init__(self, inner: Any, region: QueueRegion, resubmit: list[int]) -> None:
        self.inner = inner
        self.region = region
        self._resubmit = list(resubmit)  # in flight when a previous back-end stopped: served first
        self._popped: collections.deque[int] = collections.deque(maxlen=region.queue_size)
        self._last_resubmitted = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _record(self, head: int) -> None:
        self.region.popped(head)
        self._popped.append(head)

    def pending(self) -> int:
        """Chains to serve: those to resubmit, then the available ones."""
        return len(self._resubmit) + self.inner.pending()

    def pop(self) -> Any:
        """Pop one chain, recording it in flight."""
        batch = self.pop_batch(1)
        return batch[0] if len(batch) else None

    def pop_batch(self, max_chains: int, batch: Any = None) -> Any:
        """Pop a batch, recording every chain in flight; resubmitted chains come first.

        A resubmitted chain is already in flight in the region, with the
        counter of its first pop: its order among the others stays.
        """
        args = () if batch is None else (batch,)
        if self._resubmit:
            taken = self.inner.resubmit(self._resubmit[:max_chains], *args)
            del self._resubmit[: len(taken)]
            self._last_resubmitted = len(taken)
            return taken
        popped = self.inner.pop_batch(max_chains, *args)
        self._last_resubmitted = 0
        for i in range(len(popped)):
            self._record(popped.head(i))
        return popped

    def rewind(self, count: int) -> None:
        """Give the last ``count`` popped chains back: no longer in flight.

        Resubmitted chains did not come from the avail ring and cannot go
        back to it (no device that rewinds offers INFLIGHT_SHMFD).
        """
        if self._last_resubmitted:
            raise ValueError("resubmitted inflight chains cannot be rewound")
        self.inner.rewind(count)
        for _ in range(min(count, len(self._popped))):
            self.region.unpopped(self._popped.pop())

    def push(self, head: int, length: int) -> None:
        """Complete one chain, in the spec's order around the used idx update."""
        self.region.completing([head])
        self.inner.push(head, length)
        self.region.completed([head], self.inner.used_idx)

    def push_batch(self, batch: Any, coalesce: bool = False) -> None:
        """Complete a batch, in the spec's order around its one used idx update.

        With ``coalesce`` (VIRTIO_F_IN_ORDER) fewer used entries may be
        written, but the used idx moves by the whole batch: the region's
        last-batch list and ``used_idx`` are kept as for one entry each.
        """
        heads = [batch.head(i) for i in range(len(batch))]
        self.region.completing(heads)
        self.inner.push_batch(batch, coalesce)
        self.region.completed(heads, self.inner.used_idx)


class PackedInflightQueue(QueueWrapper):
    """A packed device queue whose pops and pushes are recorded in a :class:`PackedQueueRegion`.

    The ring descriptors of each list popped are read back from the
    Descriptor Ring right after the pop (the driver may not touch them until
    they are used, and nothing is written to the ring in between) and copied
    into the region; ``resubmit`` lists, in flight when a previous back-end
    stopped, are served first from those copies.
    """

    def __init__(self, inner: Any, region: PackedQueueRegion, resubmit: list[tuple[int, list[bytes]]]) -> None:
        self.inner = inner
        self.region = region
        self._resubmit = list(resubmit)
        self._entry: dict[int, int] = {}  # Buffer ID -> its head entry in the region
        self._popped: collections.deque[int] = collections.deque(maxlen=region.queue_size)  # Buffer IDs
        self._last_resubmitted = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def pending(self) -> int:
        """Lists to serve: those to resubmit, then the available ones."""
        return len(self._resubmit) + self.inner.pending()

    def pop(self) -> Any:
        """Pop one list, recording it in flight."""
        batch = self.pop_batch(1)
        return batch[0] if len(batch) else None

    def pop_batch(self, max_chains: int, batch: Any = None) -> Any:
        """Pop a batch, recording every list in flight; resubmitted lists come first."""
        args = () if batch is None else (batch,)
        if self._resubmit:
            todo = self._resubmit[:max_chains]
            packed: Any = self.inner  # a packed queue's resubmit takes saved descriptors, not heads
            taken = packed.resubmit([b"".join(descs) for _, descs in todo], *args)
            for i in range(len(taken)):
                self._entry[taken.head(i)] = todo[i][0]
            del self._resubmit[: len(taken)]
            self._last_resubmitted = len(taken)
            return taken
        start = self.inner.last_avail_idx
        popped = self.inner.pop_batch(max_chains, *args)
        self._last_resubmitted = 0
        ring = ring_of(self.inner)
        slot, wrap = start & 0x7FFF, start >> 15
        for i in range(len(popped)):
            descs, slot, wrap = self._read_list(ring, slot, wrap)
            buf_id = popped.head(i)
            if descs[-1][2] != buf_id:
                raise InflightError(f"the ring's list at slot {slot} has Buffer ID {descs[-1][2]}, popped {buf_id}")
            self._entry[buf_id] = self.region.popped(descs)
            self._popped.append(buf_id)
        return popped

    @staticmethod
    def _read_list(ring: Any, slot: int, wrap: int) -> tuple[list[tuple[int, int, int, int]], int, int]:
        """The ring descriptors of the list at ``slot`` (already checked by the pop), and the slot after it."""
        descs = []
        for _ in range(ring.size):
            desc = _RING_DESC.unpack(ring.memory.read(ring.desc_addr + VIRTQ_DESC_SIZE * slot, VIRTQ_DESC_SIZE))
            descs.append(desc)
            slot += 1
            if slot == ring.size:
                slot, wrap = 0, wrap ^ 1
            if not desc[3] & VIRTQ_DESC_F_NEXT or desc[3] & VIRTQ_DESC_F_INDIRECT:
                break
        return descs, slot, wrap

    def rewind(self, count: int) -> None:
        """Give the last ``count`` popped lists back to the ring: no longer in flight."""
        if self._last_resubmitted:
            raise ValueError("resubmitted inflight lists cannot be rewound")
        self.inner.rewind(count)
        head = None
        for _ in range(min(count, len(self._popped))):
            head = self._entry.pop(self._popped.pop())
        if head is not None:
            self.region.unpopped(head)

    def push(self, head: int, length: int) -> None:
        """Complete one list (``head`` is its Buffer ID), in the spec's order around the used descriptor."""
        entries = [self._entry_of(head)]
        self.region.completing(entries)
        self.inner.push(head, length)
        self.region.completed(entries, self.inner.used_idx)
        del self._entry[head]

    def push_batch(self, batch: Any, coalesce: bool = False) -> None:
        """Complete a batch, in the spec's order around its used descriptors.

        With ``coalesce`` (VIRTIO_F_IN_ORDER) one used descriptor may stand
        for several lists; the used position still moves past all their
        slots, which is what the region records.
        """
        ids = [batch.head(i) for i in range(len(batch))]
        entries = [self._entry_of(i) for i in ids]
        self.region.completing(entries)
        self.inner.push_batch(batch, coalesce)
        self.region.completed(entries, self.inner.used_idx)
        for i in ids:
            del self._entry[i]

    def _entry_of(self, buf_id: int) -> int:
        entry = self._entry.get(buf_id)
        if entry is None:
            raise InflightError(f"Buffer ID {buf_id} was not popped through the inflight region")
        return entry
