"""Dirty-page logging in the ring code (vhost-user.rst "Migration"), both SplitQueue twins.

Pages of the device-writable buffers of every chain pushed, and the used ring
when its ranges are given, are marked; nothing else is.
"""

from __future__ import annotations

import pytest

from iovirt.memory import BumpAllocator, GuestMemory
from iovirt.virtio import queue as queue_mod
from iovirt.virtio import dirtylog
from iovirt.virtio.defs import used_ring_size
from iovirt.virtio.dirtylog import DirtyLog, log_bytes_needed
from iovirt.virtio.driver import DriverQueue

PAGE = 4096
MEM = 64 * PAGE


@pytest.fixture(params=sorted(queue_mod.implementations()))
def impl(request):
    return queue_mod.implementations()[request.param]


def setup(impl, size=8):
    memory = GuestMemory.from_ranges([(0, MEM)])
    drv = DriverQueue(memory, BumpAllocator(PAGE, 4 * PAGE), size)
    dev = impl.from_state(memory, drv.state())
    log = DirtyLog(memoryview(bytearray(log_bytes_needed(MEM))))
    return memory, drv, dev, log


def pages(lo, n=1):
    return {lo + i * PAGE for i in range(n)}


def test_bitmap_layout_and_bounds():
    log = DirtyLog(memoryview(bytearray(2)))  # 16 pages
    log.mark(0x1000, 1)
    log.mark(0x2FFF, 2)  # crosses into page 3
    log.mark(15 * PAGE, PAGE + 1)  # page 16 lies beyond
    assert bytes(log.bitmap) == bytes([0b1110, 0b1000_0000])
    assert log.dirty_pages() == [0x1000, 0x2000, 0x3000, 15 * PAGE]
    assert log.beyond == 1
    assert log_bytes_needed(0) == 0 and log_bytes_needed(1) == 1 and log_bytes_needed(8 * PAGE + 1) == 2


def test_python_marker_matches_c():
    if dirtylog.IMPLEMENTATION != "cython":
        pytest.skip("extension not built")
    a, b = bytearray(8), bytearray(8)
    for gpa, n in [(0, 1), (0x1FFF, 2), (10 * PAGE, 7 * PAGE), (63 * PAGE, 3 * PAGE)]:
        assert dirtylog._mark_py(memoryview(a), gpa, n) == dirtylog._mark(memoryview(b), gpa, n)
    assert a == b


def test_push_batch_logs_writable_buffers_and_used_ring(impl):
    memory, drv, dev, log = setup(impl)
    drv.add_chain(readable=[(20 * PAGE, 100)], writable=[(30 * PAGE + 4000, 200), (40 * PAGE, 10)])
    drv.add_chain(writable=[(50 * PAGE, 3 * PAGE)])
    drv.publish()
    used = (drv.used_addr, used_ring_size(8))
    dev.set_dirty_log(log, [used])
    batch = dev.pop_batch(8)
    for i in range(len(batch)):
        batch.set_used_len(i, 1) if hasattr(batch, "set_used_len") else setattr(batch[i], "used_len", 1)
    dev.push_batch(batch)
    used_pages = {p & ~(PAGE - 1) for p in (drv.used_addr, drv.used_addr + used_ring_size(8) - 1)}
    expected = pages(30 * PAGE, 2) | pages(40 * PAGE) | pages(50 * PAGE, 3) | used_pages
    assert set(log.dirty_pages()) == expected  # not the readable buffer, nor the chain's tables


def test_push_by_head_walks_the_chain_again(impl):
    memory, drv, dev, log = setup(impl)
    drv.add_chain(readable=[(20 * PAGE, 8)], writable=[(33 * PAGE, 64)])
    drv.publish()
    dev.set_dirty_log(log)  # no used ring ranges: the used ring is not logged
    chain = dev.pop()
    dev.push(chain.head, 64)
    assert log.dirty_pages() == [33 * PAGE]


def test_no_log_no_marks_and_stopping(impl):
    memory, drv, dev, log = setup(impl)
    for _ in range(2):
        drv.add_chain(writable=[(33 * PAGE, 64)])
    drv.publish()
    dev.set_dirty_log(log, [(drv.used_addr, 6)])
    dev.set_dirty_log(None)
    chain = dev.pop()
    dev.push(chain.head, 64)
    assert log.dirty_pages() == []


def test_translated_buffers_are_logged_at_guest_physical_pages(impl):
    from iovirt.memory import Access

    class Shift:
        """IOVA = GPA + 1 MiB, page by page (a translator splitting at pages as an IOMMU does)."""

        def translate(self, addr, length, access: Access):
            out, end = [], addr + length
            while addr < end:
                n = min(end, (addr | (PAGE - 1)) + 1) - addr
                out.append((addr - (1 << 20), n))
                addr += n
            return out

    memory = GuestMemory.from_ranges([(0, MEM)])
    iova = memory.with_translator(Shift())
    drv = DriverQueue(iova, BumpAllocator((1 << 20) + PAGE, 4 * PAGE), 8)
    dev = impl.from_state(iova, drv.state())
    log = DirtyLog(memoryview(bytearray(log_bytes_needed(MEM))))
    drv.add_chain(writable=[((1 << 20) + 33 * PAGE, 2 * PAGE)])
    drv.publish()
    dev.set_dirty_log(log)
    batch = dev.pop_batch(4)
    dev.push_batch(batch)
    assert log.dirty_pages() == [33 * PAGE, 34 * PAGE]
