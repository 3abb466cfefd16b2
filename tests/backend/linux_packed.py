"""The driver side of a packed virtqueue as Linux's ``drivers/virtio/virtio_ring.c`` (6.1) runs it.

For the notification stress tests: what matters is *when* the driver reads
and writes the ring and the event suppression areas (virtio 1.2 2.8.10,
2.8.14, 2.8.21), so each Linux function is modelled step by step, with its
barriers, and the driver's two contexts (submitting, and the interrupt
handler) run on two threads under the queue lock as a Linux driver's
``vq_lock`` does.  ``yield_point`` lets the other threads (the back-end's
data plane) run between steps, so the device sees every intermediate state.

The functions and names follow Linux: ``add``, ``kick_prepare``,
``get_buf``, ``disable_cb``, ``enable_cb_prepare`` / ``poll``,
``enable_cb_delayed``, ``interrupt`` (``vring_interrupt``, with 6.1's
``event_triggered``).
"""

from __future__ import annotations

import random
import struct
import threading
import time
from typing import Callable

from iovirt.memory import BumpAllocator, GuestMemory
from iovirt.virtio.defs import (
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

_DESC = struct.Struct("<QIHH")
_WRAP = 15
_FENCE = threading.Lock()


def mb() -> None:
    """A full barrier (virtio_mb): a locked instruction on x86."""
    with _FENCE:
        pass


class LinuxPackedVq:
    """One packed virtqueue driven as Linux does; ``rng`` picks where to let other threads run."""

    def __init__(
        self,
        memory: GuestMemory,
        alloc: BumpAllocator,
        desc_addr: int,
        driver_addr: int,
        device_addr: int,
        num: int,
        *,
        event: bool,
        indirect: bool,
        rng: random.Random,
    ) -> None:
        self.memory, self.alloc, self.num = memory, alloc, num
        self.desc_addr, self.driver_addr, self.device_addr = desc_addr, driver_addr, device_addr
        self.event, self.indirect, self.rng = event, indirect, rng
        self.next_avail_idx, self.avail_wrap_counter = 0, 1
        self.avail_used_flags = VIRTQ_DESC_F_AVAIL
        self.num_added = 0
        self.num_free = num
        self.free_ids = list(range(num))
        self.last_used_idx = 0 | 1 << _WRAP
        self.event_flags_shadow = RING_EVENT_FLAGS_ENABLE
        self.event_triggered = False
        self.desc_state: dict[int, tuple[int, object]] = {}
        self.lock = threading.RLock()  # the driver's vq_lock

    def yield_point(self) -> None:
        if self.rng.random() < 0.3:
            time.sleep(0)

    # -- submission ------------------------------------------------------------------
    def add(self, out: list[tuple[int, int]], in_: list[tuple[int, int]], data: object) -> bool:
        """virtqueue_add_packed (direct or indirect); False when the ring is full."""
        sgs = [(a, n, 0) for a, n in out] + [(a, n, VIRTQ_DESC_F_WRITE) for a, n in in_]
        use_indirect = self.indirect and len(sgs) > 1 and self.num_free and self.rng.random() < 0.7
        descs_used = 1 if use_indirect else len(sgs)
        if self.num_free < descs_used or not self.free_ids:
            return False
        buf_id = self.free_ids.pop(self.rng.randrange(len(self.free_ids)))
        head = self.next_avail_idx
        if use_indirect:
            table = self.alloc.alloc(VIRTQ_DESC_SIZE * len(sgs), 16)
            for k, (a, n, f) in enumerate(sgs):
                self.memory.write(table + VIRTQ_DESC_SIZE * k, _DESC.pack(a, n, 0, f))
            self._write_desc(head, table, VIRTQ_DESC_SIZE * len(sgs), buf_id, None)
            head_flags = VIRTQ_DESC_F_INDIRECT | self.avail_used_flags
            self._advance(1)
        else:
            head_flags = 0
            for k, (a, n, f) in enumerate(sgs):
                flags = f | (VIRTQ_DESC_F_NEXT if k + 1 < len(sgs) else 0) | self.avail_used_flags
                if k == 0:
                    head_flags = flags
                    self._write_desc(self.next_avail_idx, a, n, buf_id, None)
                else:
                    self._write_desc(self.next_avail_idx, a, n, buf_id, flags)
                self._advance(1)
                self.yield_point()
        self.num_free -= descs_used
        self.desc_state[buf_id] = (descs_used, data)
        self.num_added += descs_used
        # virtio_wmb, then the head's flags make the whole list available (2.8.21).
        self.memory.write_u16(self.desc_addr + VIRTQ_DESC_SIZE * head + 14, head_flags)
        return True

    def _write_desc(self, slot: int, addr: int, length: int, buf_id: int, flags: int | None) -> None:
        at = self.desc_addr + VIRTQ_DESC_SIZE * slot
        packed = _DESC.pack(addr, length, buf_id, flags or 0)
        self.memory.write(at, packed if flags is not None else packed[:14])

    def _advance(self, n: int) -> None:
        self.next_avail_idx += n
        if self.next_avail_idx >= self.num:
            self.next_avail_idx -= self.num
            self.avail_wrap_counter ^= 1
            self.avail_used_flags ^= VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED

    def kick_prepare(self) -> bool:
        """virtqueue_kick_prepare_packed: whether the device asked for this kick."""
        mb()
        old = (self.next_avail_idx - self.num_added) & 0xFFFF
        new = self.next_avail_idx
        self.num_added = 0
        off_wrap, flags = struct.unpack("<HH", self.memory.read(self.device_addr, 4))
        if flags != RING_EVENT_FLAGS_DESC:
            return flags != RING_EVENT_FLAGS_DISABLE
        event_idx = off_wrap & ~(1 << _WRAP)
        if off_wrap >> _WRAP != self.avail_wrap_counter:
            event_idx = (event_idx - self.num) & 0xFFFF
        return (new - event_idx - 1) & 0xFFFF < (new - old) & 0xFFFF

    # -- completion --------------------------------------------------------------------
    def _is_used(self, idx: int, wrap: int) -> bool:
        flags = self.memory.read_u16(self.desc_addr + VIRTQ_DESC_SIZE * idx + 14)
        avail = bool(flags & VIRTQ_DESC_F_AVAIL)
        used = bool(flags & VIRTQ_DESC_F_USED)
        return avail == used and used == bool(wrap)

    def more_used(self) -> bool:
        return self._is_used(self.last_used_idx & ~(1 << _WRAP), self.last_used_idx >> _WRAP)

    def get_buf(self) -> tuple[object, int] | None:
        """virtqueue_get_buf_ctx_packed."""
        if not self.more_used():
            return None
        # virtio_rmb: id and len after the flags.
        last_used = self.last_used_idx & ~(1 << _WRAP)
        wrap = self.last_used_idx >> _WRAP
        _, length, buf_id, _ = _DESC.unpack(self.memory.read(self.desc_addr + VIRTQ_DESC_SIZE * last_used, 16))
        if buf_id not in self.desc_state:
            raise AssertionError(f"used id {buf_id} at slot {last_used} is not in flight")
        taken, data = self.desc_state.pop(buf_id)
        self.num_free += taken
        self.free_ids.append(buf_id)
        last_used += taken
        if last_used >= self.num:
            last_used -= self.num
            wrap ^= 1
        self.last_used_idx = last_used | wrap << _WRAP
        if self.event_flags_shadow == RING_EVENT_FLAGS_DESC:
            self.memory.write_u16(self.driver_addr, self.last_used_idx)  # virtio_store_mb
            mb()
        return data, length

    def disable_cb(self) -> None:
        """virtqueue_disable_cb (6.1: nothing to do once the device triggered an event)."""
        if self.event_triggered:
            return
        if self.event_flags_shadow != RING_EVENT_FLAGS_DISABLE:
            self.event_flags_shadow = RING_EVENT_FLAGS_DISABLE
            self.memory.write_u16(self.driver_addr + 2, self.event_flags_shadow)

    def enable_cb_prepare(self) -> int:
        """virtqueue_enable_cb_prepare_packed: returns where to poll."""
        self.event_triggered = False
        if self.event:
            self.memory.write_u16(self.driver_addr, self.last_used_idx)
            # virtio_wmb: the event offset before the flags
        self.yield_point()
        if self.event_flags_shadow == RING_EVENT_FLAGS_DISABLE:
            self.event_flags_shadow = RING_EVENT_FLAGS_DESC if self.event else RING_EVENT_FLAGS_ENABLE
            self.memory.write_u16(self.driver_addr + 2, self.event_flags_shadow)
        return self.last_used_idx

    def poll(self, opaque: int) -> bool:
        """virtqueue_poll: a used buffer at ``opaque`` (after a full barrier)."""
        mb()
        return self._is_used(opaque & ~(1 << _WRAP), opaque >> _WRAP)

    def enable_cb(self) -> bool:
        """virtqueue_enable_cb: False if buffers were used meanwhile (the caller goes round again)."""
        return not self.poll(self.enable_cb_prepare())

    def enable_cb_delayed(self) -> bool:
        """virtqueue_enable_cb_delayed_packed: interrupt after 3/4 of the outstanding buffers."""
        self.event_triggered = False
        if self.event:
            bufs = (self.num - self.num_free) * 3 // 4
            wrap = self.last_used_idx >> _WRAP
            used_idx = (self.last_used_idx & ~(1 << _WRAP)) + bufs
            if used_idx >= self.num:
                used_idx -= self.num
                wrap ^= 1
            self.memory.write_u16(self.driver_addr, used_idx | wrap << _WRAP)
        self.yield_point()
        if self.event_flags_shadow == RING_EVENT_FLAGS_DISABLE:
            self.event_flags_shadow = RING_EVENT_FLAGS_DESC if self.event else RING_EVENT_FLAGS_ENABLE
            self.memory.write_u16(self.driver_addr + 2, self.event_flags_shadow)
        mb()
        return not self.more_used()

    def interrupt(self, callback: Callable[[], None]) -> bool:
        """vring_interrupt: run ``callback`` if there is work; False: "no work" (IRQ_NONE)."""
        if not self.more_used():
            return False
        if self.event:
            self.event_triggered = True
        callback()
        return True
