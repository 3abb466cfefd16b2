"""The read-only ring decoder: healthy rings, and the warnings for inconsistent ones."""

from __future__ import annotations

import pytest

from iovirt.inspect.rings import decode_ring
from iovirt.memory import BumpAllocator, GuestMemory
from iovirt.virtio.defs import VIRTQ_DESC_F_NEXT
from iovirt.virtio.driver import DriverQueue

SIZE = 8


@pytest.fixture
def ring():
    memory = GuestMemory.from_ranges([(0, 1 << 20)])
    queue = DriverQueue(memory, BumpAllocator(0x1000, (1 << 20) - 0x1000), SIZE, index=3)
    yield memory, queue
    memory.close()


def decode(memory, queue, **kw):
    return decode_ring(memory, SIZE, queue.desc_addr, queue.avail_addr, queue.used_addr, index=queue.index, **kw)


def test_healthy_ring_with_chains_in_flight(ring):
    memory, queue = ring
    heads = [queue.add_data([b"hdr"], [64]), queue.add_data([b"x" * 10], [], indirect=True)]
    queue.publish()
    report = decode(memory, queue, last_avail_idx=1)
    assert report.warnings == []
    assert (report.avail_idx, report.used_idx, report.index) == (2, 0, 3)
    assert [c.head for c in report.in_flight] == heads
    assert [c.popped for c in report.in_flight] == [True, False]
    assert [len(c.buffers) for c in report.in_flight] == [2, 1]
    assert report.in_flight[0].buffers[1][1:] == (64, True)
    assert report.in_flight[1].buffers[0][1] == 10  # through the indirect table


def test_event_idx_values(ring):
    memory, queue = ring
    memory.write_u16(queue.avail_addr + 4 + 2 * SIZE, 7)  # used_event
    memory.write_u16(queue.used_addr + 4 + 8 * SIZE, 5)  # avail_event
    report = decode(memory, queue)
    assert (report.used_event, report.avail_event) == (7, 5)


def test_avail_index_jump(ring):
    memory, queue = ring
    queue.set_avail_idx(SIZE + 3)
    report = decode(memory, queue)
    assert any("avail index jumps" in w and str(SIZE + 3) in w for w in report.warnings)
    assert len(report.in_flight) == SIZE  # never more than the ring holds


def test_avail_index_jump_past_device(ring):
    memory, queue = ring
    queue.set_avail_idx(4)
    memory.write_u16(queue.used_addr + 2, 4)
    report = decode(memory, queue, last_avail_idx=0xFFF0)
    assert any("past the device's last_avail_idx" in w for w in report.warnings)


def test_used_id_out_of_range(ring):
    memory, queue = ring
    memory.write_u32(queue.used_addr + 4 + 8 * 1, SIZE + 100)
    memory.write_u16(queue.used_addr + 2, 2)
    report = decode(memory, queue)
    assert any("used id out of range" in w and "used.ring[1]" in w for w in report.warnings)


def test_descriptor_loop(ring):
    memory, queue = ring
    buf = queue.alloc.alloc(16)
    queue.write_desc(0, buf, 16, VIRTQ_DESC_F_NEXT, 1)
    queue.write_desc(1, buf, 16, VIRTQ_DESC_F_NEXT, 0)
    queue.post_head(0)
    queue.publish()
    report = decode(memory, queue)
    assert report.in_flight[0].error is not None and "loop" in report.in_flight[0].error
    assert any("loop" in w for w in report.warnings)


def test_head_out_of_range_and_twice(ring):
    memory, queue = ring
    queue.post_head(SIZE + 1)
    queue.add_data([b"a"])
    memory.write_u16(queue.avail_addr + 4 + 2 * 2, memory.read_u16(queue.avail_addr + 4 + 2 * 1))
    queue.avail_idx = 3
    queue.publish()
    report = decode(memory, queue)
    assert report.in_flight[0].error is not None
    assert any("in flight twice" in w for w in report.warnings)


def test_ring_outside_memory_is_a_warning_not_an_exception(ring):
    memory, _queue = ring
    report = decode_ring(memory, SIZE, 0x10_0000_0000, 0x1000, 0x2000)
    assert report.error is not None and report.warnings and report.in_flight == []
