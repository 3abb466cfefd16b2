"""The shared inflight-I/O region of ``VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`` (split rings).

Layout (vhost-user.rst, "Inflight I/O tracking"): one region per queue,
each ``QueueRegionSplit { u64 features; u16 version; u16 desc_num;
u16 last_batch_head; u16 used_idx; DescStateSplit desc[desc_num]; }`` with
``DescStateSplit { u8 inflight; u8 padding[5]; u16 next; u64 counter; }``.
The front-end keeps the fd across a back-end restart and hands it back with
``SET_INFLIGHT_FD``, so requests popped but not completed by a back-end that
died are resubmitted, in the order they were popped, by the next one.
"""

from __future__ import annotations

import mmap
import struct

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


class InflightQueue:
    """The inflight bookkeeping of one split queue, kept in shared memory."""

    def __init__(self, view: memoryview, queue_size: int, fresh: bool) -> None:
        self.view = view
        self.queue_size = queue_size
        if fresh or QUEUE_HEADER.unpack_from(view, 0)[1] != INFLIGHT_VERSION:
            view[:] = bytes(len(view))
            QUEUE_HEADER.pack_into(view, 0, 0, INFLIGHT_VERSION, queue_size, 0, 0)
        self.counter = 1 + max((self._desc(i)[2] for i in range(queue_size)), default=0)

    def _desc(self, head: int) -> tuple[int, int, int]:
        return DESC_STATE.unpack_from(self.view, QUEUE_HEADER.size + DESC_STATE.size * head)

    def _set_desc(self, head: int, inflight: int, nxt: int, counter: int) -> None:
        DESC_STATE.pack_into(self.view, QUEUE_HEADER.size + DESC_STATE.size * head, inflight, nxt, counter)

    def popped(self, head: int) -> None:
        """A chain was taken from the avail ring: mark it in flight with the next counter."""
        _, nxt, _ = self._desc(head)
        self._set_desc(head, 1, nxt, self.counter)
        self.counter += 1

    def completed(self, heads: list[int], used_idx: int) -> None:
        """A batch went to the used ring (whose idx is now ``used_idx``): clear it, in spec order."""
        features, version, desc_num, last, _ = QUEUE_HEADER.unpack_from(self.view, 0)
        for head in heads:
            inflight, _, counter = self._desc(head)
            self._set_desc(head, inflight, last, counter)
            last = head
        QUEUE_HEADER.pack_into(self.view, 0, features, version, desc_num, last, self._used_idx())
        for head in heads:
            _, nxt, counter = self._desc(head)
            self._set_desc(head, 0, nxt, counter)
        QUEUE_HEADER.pack_into(self.view, 0, features, version, desc_num, last, used_idx)

    def _used_idx(self) -> int:
        return QUEUE_HEADER.unpack_from(self.view, 0)[4]

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
    """The mapped inflight fd: one :class:`InflightQueue` per queue."""

    def __init__(self, fd: int, size: int, offset: int, num_queues: int, queue_size: int, fresh: bool) -> None:
        self.map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, offset=offset)
        per_queue = queue_region_size(queue_size)
        base = memoryview(self.map)
        self._base = base
        self.queues = [
            InflightQueue(base[i * per_queue : (i + 1) * per_queue], queue_size, fresh) for i in range(num_queues)
        ]

    def queue(self, index: int) -> InflightQueue:
        """Queue ``index``'s bookkeeping."""
        return self.queues[index]

    def close(self) -> None:
        """Unmap."""
        for q in self.queues:
            q.view.release()
        self._base.release()
        self.map.close()
