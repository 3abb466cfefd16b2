"""The shared inflight-I/O region of ``VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`` (split rings).

Layout (vhost-user.rst, "Inflight I/O tracking"): one region per queue,
each ``QueueRegionSplit { u64 features; u16 version; u16 desc_num;
u16 last_batch_head; u16 used_idx; DescStateSplit desc[desc_num]; }`` with
``DescStateSplit { u8 inflight; u8 padding[5]; u16 next; u64 counter; }``.
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
from typing import Any

from iovirt.errors import IovirtError
from iovirt.memory import MappableFd, MemoryRegion
from iovirt.virtio.queue import QueueWrapper

QUEUE_HEADER = struct.Struct("=QHHHH")  # 16 bytes
DESC_STATE = struct.Struct("=B5xHQ")  # 16 bytes
REGION_ALIGN = 64
INFLIGHT_VERSION = 1


def queue_region_size(queue_size: int) -> int:
    """Bytes of one queue's region, rounded up to 64."""
    raw = QUEUE_HEADER.size + DESC_STATE.size * queue_size
    return (raw + REGION_ALIGN - 1) // REGION_ALIGN * REGION_ALIGN


def inflight_mmap_size(num_queues: int, queue_size: int) -> int:
    """Bytes of the whole inflight area."""
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


class InflightRegion:
    """The mapped inflight fd: one :class:`QueueRegion` per queue.

    The fd is checked before it is mapped (:meth:`MemoryRegion.from_fd`);
    raises :class:`~iovirt.memory.GuestMemoryError` for one that cannot be,
    and :class:`InflightError` if ``size`` cannot hold the queues.
    """

    def __init__(self, fd: int, size: int, offset: int, num_queues: int, queue_size: int, fresh: bool) -> None:
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

    def push_batch(self, batch: Any) -> None:
        """Complete a batch, in the spec's order around its one used idx update."""
        heads = [batch.head(i) for i in range(len(batch))]
        self.region.completing(heads)
        self.inner.push_batch(batch)
        self.region.completed(heads, self.inner.used_idx)
