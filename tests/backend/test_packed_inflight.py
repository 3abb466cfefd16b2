"""Inflight I/O tracking for packed virtqueues (vhost-user.rst "Inflight I/O tracking", packed).

The region is ``QueueRegionPacked``: a free list of ``DescStatePacked``
entries, one per ring descriptor popped, holding a copy of it.  Checked
here, reading and writing the region with its own struct layout (not with
iovirt's helper): the spec's order around writing used descriptors, the
twins' ``resubmit`` of saved descriptors, and a restarted back-end that
resubmits exactly what was in flight from the saved copies, even where a
used descriptor written out of order overwrote a list in the ring.
"""

from __future__ import annotations

import mmap
import os
import struct

import pytest

from iovirt import _accel
from iovirt.memory import BumpAllocator, GuestMemory
from iovirt.vhost_user.driver import PACKED_START_BASE, VhostUserDriver
from iovirt.vhost_user.inflight import (
    InflightError,
    PackedInflightQueue,
    QueueRegion,
    packed_queue_region_size,
    queue_region_size,
)
from iovirt.virtio.blk.defs import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_OUT
from iovirt.virtio.defs import VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED, VIRTQ_DESC_F_WRITE
from iovirt.virtio.errors import VirtqueueError
from iovirt.virtio.packed_driver import PackedDriverQueue
from iovirt.virtio.queue import packed_implementations

HEADER = struct.Struct("=QHHHHHHBB")  # features, version, desc_num, free_head, old_free_head, used_idx,
# old_used_idx, used_wrap_counter, old_used_wrap_counter (then padding to 32)
DESC = struct.Struct("=BxHHHQHHIQ")  # inflight, next, last, num, counter, id, flags, len, addr
RING_DESC = struct.Struct("<QIHH")
SIZE = 16
IMPLS = packed_implementations()


def header(view) -> tuple:
    return HEADER.unpack_from(view, 0)


def entry(view, i: int) -> tuple:
    return DESC.unpack_from(view, 32 + DESC.size * i)


@pytest.fixture(params=["python", "cython"])
def packed_cls(request):
    if request.param == "cython" and "cython" not in IMPLS:
        if _accel.NO_EXTENSIONS:
            pytest.skip("IOVIRT_NO_EXTENSIONS set: pure Python run")
        pytest.fail("the Cython packed queue extension did not load")
    return IMPLS[request.param]


@pytest.fixture
def ring(packed_cls):
    memory = GuestMemory.from_ranges([(0, 1 << 20)], backing="bytearray")
    driver = PackedDriverQueue(memory, BumpAllocator(0x1000, (1 << 20) - 0x1000), SIZE)
    device = packed_cls.from_state(memory, driver.state())
    area = bytearray(packed_queue_region_size(SIZE))
    region = QueueRegion(memoryview(area), SIZE, fresh=True).packed()
    region.start_at(device.used_idx)
    return memory, driver, device, region, memoryview(area)


class PushSpy:
    """The device's queue, with a look at the region when the used descriptors are written."""

    def __init__(self, queue, view) -> None:
        self.queue = queue
        self.view = view
        self.seen: list[tuple] = []

    def __getattr__(self, name):
        return getattr(self.queue, name)

    def push_batch(self, batch, coalesce=False) -> None:
        self.seen.append((header(self.view), [entry(self.view, i) for i in range(SIZE)]))
        self.queue.push_batch(batch, coalesce)


def test_a_popped_list_is_copied_into_free_entries_in_ring_order(ring):
    memory, driver, device, region, view = ring
    ids = [driver.add_data([b"a" * 8, b"b" * 8], [4]), driver.add_data([b"c" * 8], [4])]
    driver.publish()
    queue = PackedInflightQueue(device, region, [])
    batch = queue.pop_batch(8)
    assert [batch.head(i) for i in range(len(batch))] == ids
    # List 0 took entries 0-2 (3 descriptors), list 1 entries 3-4; free and old free heads at 5.
    assert header(view)[3:5] == (5, 5)
    inflight, _, last, num, counter, buf_id, flags, length, _ = entry(view, 0)
    assert (inflight, last, num, counter) == (1, 2, 3, 1)
    assert [entry(view, i)[5] for i in range(5)] == [ids[0]] * 3 + [ids[1]] * 2
    assert [entry(view, i)[7] for i in range(5)] == [8, 8, 4, 8, 4]
    assert entry(view, 2)[6] & VIRTQ_DESC_F_WRITE
    assert entry(view, 3)[:4] == (1, 4, 4, 2)


def test_entries_are_freed_before_the_used_descriptors_and_old_heads_set_after(ring):
    memory, driver, device, region, view = ring
    for _ in range(2):
        driver.add_data([b"x" * 8], [4])
    driver.publish()
    spy = PushSpy(device, view)
    queue = PackedInflightQueue(spy, region, [])
    batch = queue.pop_batch(8)
    queue.push_batch(batch)
    (before, entries), = spy.seen
    _, _, _, free_head, old_free_head, used_idx, old_used_idx, wrap, old_wrap = before
    # Steps 1-4: the batch's entries head the free list; the old heads and used index not moved yet.
    assert (free_head, old_free_head, used_idx, old_used_idx) == (2, 4, 0, 0)
    # Free list: list 2 (entries 2, 3) -> list 1 (entries 0, 1) -> entry 4; both still in flight.
    assert entries[3][1] == 0 and entries[1][1] == 4 and entries[0][0] == entries[2][0] == 1
    # After: nothing in flight, used index 4 (two lists of 2), old values equal the new.
    after = header(view)
    assert after[3:9] == (2, 2, 4, 4, 1, 1)
    assert entry(view, 0)[0] == entry(view, 2)[0] == 0
    assert [u.head for u in driver.get_used()] == [0, 1]


def test_the_twins_resubmit_saved_descriptors(ring):
    memory, driver, device, region, view = ring
    buf_id = driver.add_data([b"q" * 8], [4])
    driver.publish()
    saved = memory.read(driver.desc_addr, 32)
    memory.write(driver.desc_addr, bytes(32))  # the ring copy is gone: only the saved one is left
    (chain,) = list(device.resubmit([saved]))
    assert chain.head == buf_id and [b[1] for b in chain.buffers] == [8, 4]
    # The list is in flight again, taking its 2 slots on the used side.
    device.push(buf_id, 4)
    assert device.used_idx == 2 | 1 << 15


@pytest.mark.parametrize("saved", [b"", bytes(15), bytes(16 * (SIZE + 1))])
def test_a_saved_list_of_no_or_too_many_descriptors_is_refused(ring, saved):
    _, _, device, _, _ = ring
    with pytest.raises(VirtqueueError, match="resubmitted list"):
        device.resubmit([saved])


def test_a_saved_list_ending_in_next_is_refused(ring):
    _, _, device, _, _ = ring
    with pytest.raises(VirtqueueError):
        device.resubmit([RING_DESC.pack(0x8000, 8, 0, 1)])  # VIRTQ_DESC_F_NEXT on the last


def test_a_region_too_small_for_the_packed_layout_is_refused():
    with pytest.raises(InflightError, match="packed inflight state"):
        QueueRegion(memoryview(bytearray(queue_region_size(SIZE))), SIZE, fresh=True).packed()


def test_a_corrupt_list_in_the_region_is_an_inflight_error(ring):
    memory, driver, device, region, view = ring
    driver.add_data([b"x" * 8], [4])
    driver.publish()
    PackedInflightQueue(device, region, []).pop_batch(8)
    DESC.pack_into(view, 32, *(1, 1, 0xFFFF, 2, 1, 0, 0, 8, 0x8000))  # last beyond desc_num
    with pytest.raises(InflightError):
        region.recover(lambda slot: 0)


def blk_out(queue: PackedDriverQueue, sector: int, data: bytes) -> int:
    return queue.add_data([struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, sector), data], [1])


def test_a_restarted_backend_resubmits_exactly_what_was_in_flight(backend):
    """A, B, C were popped; B completed out of order, its used descriptor overwriting A's first; the back-end died."""
    with VhostUserDriver(backend.blk_path, packed=True) as drv:
        fe = drv.frontend
        info, fd = fe.get_inflight_fd(1, SIZE)
        area = mmap.mmap(fd, info.mmap_size, mmap.MAP_SHARED)
        try:
            fe.set_inflight_fd(info, fd)
            queue = PackedDriverQueue(drv.memory, drv.alloc, SIZE, index=0)
            # Started but not enabled: the back-end serves nothing yet.
            fe.set_vring_num(0, SIZE)
            fe.set_vring_base(0, PACKED_START_BASE)
            fe.set_vring_addr(0, queue.desc_addr, queue.driver_addr, queue.device_addr)
            fe.set_vring_call(0)
            fe.set_vring_kick(0)
            a, b, c = (blk_out(queue, s, bytes([0xA0 + s]) * 512) for s in range(3))
            queue.publish()
            assert fe.get_vring_base(0) == PACKED_START_BASE
            # What the dead back-end left.  Ring: A in slots 0-2, B in 3-5, C in 6-8.  Region: A in
            # entries 0-2, B in 3-5, C in 6-8 (counters 1, 2, 3); B completed (its entries head the
            # free list, not in flight), used index 3.
            ring = [RING_DESC.unpack(drv.memory.read(queue.desc_addr + 16 * s, 16)) for s in range(9)]
            view = memoryview(area)
            for first, counter in ((0, 1), (3, 2), (6, 3)):
                for k in range(3):
                    addr, length, buf_id, flags = ring[first + k]
                    nxt = first + k + 1 if k < 2 else (9 if first != 3 else 9)
                    head = (1 if first != 3 else 0, first + 2, 3, counter) if k == 0 else (0, 0, 0, 0)
                    DESC.pack_into(view, 32 + DESC.size * (first + k), head[0], nxt, head[1], head[2], head[3],
                                   buf_id, flags, length, addr)
            for i in range(9, SIZE):
                DESC.pack_into(view, 32 + DESC.size * i, 0, i + 1, 0, 0, 0, 0, 0, 0, 0)
            HEADER.pack_into(view, 0, 0, 1, SIZE, 3, 3, 3, 3, 1, 1)
            # B's used descriptor in slot 0, over A's first descriptor (used flags: wrap counter 1).
            drv.memory.write(queue.desc_addr, RING_DESC.pack(0, 1, b, VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED))
            # QEMU could not ask the dead back-end: it sends a stale base; the region knows better.
            fe.set_vring_base(0, PACKED_START_BASE)
            fe.set_vring_addr(0, queue.desc_addr, queue.driver_addr, queue.device_addr)
            fe.set_vring_kick(0)
            fe.set_vring_enable(0, True)
            assert fe.wait_call(0, timeout=5)
            used = queue.get_used()
            # The blk engine may complete A and C in separate batches, each with its own call.
            while len(used) < 3 and fe.wait_call(0, timeout=5):
                used += queue.get_used()
            # B's used descriptor first; A and C resubmitted, each once, completing in either order (the blk
            # engine completes in the disk's order; no IN_ORDER is negotiated).
            assert used[0].head == b and sorted(u.head for u in used[1:]) == sorted([a, c])
            assert [u.data[-1] for u in used[1:]] == [VIRTIO_BLK_S_OK] * 2
            image = backend.image.read_bytes()
            assert image[0:512] == bytes([0xA0]) * 512 and image[1024:1536] == bytes([0xA2]) * 512
            assert image[512:1024] == bytes(512)  # B had completed: not served again
            # The region: nothing in flight, used index 9 (3 + A's 3 + C's 3), wrap counter 1.
            assert header(view)[5:9] == (9, 9, 1, 1)
            assert entry(view, 0)[0] == entry(view, 6)[0] == 0
            # And the ring goes on after the resubmitted lists: avail and used at slot 9.
            assert fe.get_vring_base(0) == (9 | 1 << 15) | (9 | 1 << 15) << 16
            view.release()
        finally:
            area.close()
            os.close(fd)


@pytest.mark.parametrize("saved", [
    RING_DESC.pack(0x8000, 8, 0, 1),  # NEXT on the last saved descriptor
    RING_DESC.pack(0x8000, 8, SIZE, 0),  # a Buffer ID beyond the ring
    RING_DESC.pack(1 << 30, 8, 0, 0),  # a buffer outside guest memory
    RING_DESC.pack(0x8000, 8, 0, 1) + RING_DESC.pack(0x9000, 16, 0, 4),  # an indirect descriptor in a chain
])
def test_both_twins_refuse_a_bad_saved_list_alike(saved):
    if len(IMPLS) < 2:
        pytest.skip("one twin built")
    errors = []
    for cls in IMPLS.values():
        memory = GuestMemory.from_ranges([(0, 1 << 20)], backing="bytearray")
        driver = PackedDriverQueue(memory, BumpAllocator(0x1000, (1 << 20) - 0x1000), SIZE)
        device = cls.from_state(memory, driver.state())
        with pytest.raises(VirtqueueError) as info:
            device.resubmit([saved])
        errors.append((type(info.value), str(info.value)))
    assert errors[0] == errors[1]
