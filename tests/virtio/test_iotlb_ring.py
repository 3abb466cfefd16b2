"""The split ring behind a CachedTranslator, both implementations: the same chains, the same
errors, pending translations; and the accelerated ring's translation really happening in C."""

from __future__ import annotations

import pytest

from iovirt.memory import BumpAllocator, GuestMemory, TranslationFault, TranslationPending
from iovirt.virtio.chain import read_chain, write_chain
from iovirt.virtio.defs import VIRTQ_DESC_F_INDIRECT
from iovirt.virtio.driver import DriverQueue
from iovirt.virtio.errors import DescBufferError
from iovirt.virtio import iotlb
from iovirt.virtio.iotlb import CachedTranslator
from iovirt.virtio.queue import implementations as queue_impls

from twins import outcome

K4 = 0x1000
RING = 0x1_0000  # rings identity-mapped at [RING, RING + 0x4000)
IOVA = 0x7000_0000
R, W, RW = 1, 2, 3


class PageTableTranslator(CachedTranslator):
    """IOVA pages -> (GPA page, perm) from a dict; pages in ``pending`` answer later.

    Counts how often ``fill`` and ``translate`` run, to tell the C path from the Python one.
    """

    def __init__(self, pages: dict[int, tuple[int, int]]) -> None:
        super().__init__(64)
        self.pages = pages
        self.pending: set[int] = set()
        self.fills = 0
        self.translates = 0

    def translate(self, addr, length, access):
        self.translates += 1
        return super().translate(addr, length, access)

    def fill(self, iova, length, access):
        self.fills += 1
        pieces = []
        end = iova + length
        while iova < end:
            page = iova & ~(K4 - 1)
            if page in self.pending:
                raise TranslationPending(iova, length, access)
            gpa, perm = self.pages.get(page, (None, 0))
            if gpa is None or perm & int(access) != int(access):
                raise TranslationFault(iova, length, access, "not mapped")
            self.cache.insert(page, gpa, K4, perm)
            n = min(end, page + K4) - iova
            pieces.append((gpa + (iova - page), n))
            iova += n
        return pieces


@pytest.fixture
def mem():
    memory = GuestMemory.from_ranges([(0, 0x20_0000)])
    memory.queues = []
    yield memory
    for queue in memory.queues:
        queue.release()  # the accelerated ring holds views of the regions
    memory.close()


def setup(mem, queue_cls, pages):
    ident = {RING + i * K4: (RING + i * K4, RW) for i in range(4)}
    translator = PageTableTranslator({**ident, **pages})
    drv = DriverQueue(mem, BumpAllocator(RING, 0x4000), 16)
    dev_mem = mem.with_translator(translator)
    dev = queue_cls.from_state(dev_mem, drv.state())
    mem.queues.append(dev)
    return translator, drv, dev_mem, dev


def test_chains_are_translated_and_read(mem, queue_cls):
    # IOVA pages 0 and 1 are contiguous in GPA; page 2 lies elsewhere (a scattered buffer).
    pages = {IOVA: (0x8_0000, RW), IOVA + K4: (0x8_1000, RW), IOVA + 2 * K4: (0x5_0000, RW)}
    translator, drv, dev_mem, dev = setup(mem, queue_cls, pages)
    mem.write(0x8_0FFC, b"abcdefgh")
    mem.write(0x8_1FFC, b"1234")
    mem.write(0x5_0000, b"5678")
    head = drv.add_chain(readable=[(IOVA + 0xFFC, 8), (IOVA + 0x1FFC, 8)], writable=[(IOVA + 0x100, 16)])
    drv.publish()
    chain = dev.pop()
    assert chain.head == head
    assert chain.buffers == [(IOVA + 0xFFC, 8, False), (IOVA + 0x1FFC, 8, False), (IOVA + 0x100, 16, True)]
    assert read_chain(dev_mem, chain) == b"abcdefgh12345678"
    write_chain(dev_mem, chain, b"x" * 16)
    assert mem.read(0x8_0100, 16) == b"x" * 16


def test_unmapped_buffer_is_a_descriptor_error(mem, queue_cls):
    translator, drv, dev_mem, dev = setup(mem, queue_cls, {IOVA: (0x8_0000, RW)})
    good = drv.add_chain(readable=[(IOVA, 8)])
    drv.add_chain(readable=[(IOVA + 0xFF8, 16)])  # its second page is not mapped
    drv.publish()
    assert [c.head for c in dev.pop_batch(8)] == [good]
    with pytest.raises(DescBufferError) as info:
        dev.pop_batch(8)
    assert (info.value.addr, info.value.length) == (IOVA + 0xFF8, 16)


def test_writable_buffer_on_read_only_page(mem, queue_cls):
    # A device-writable buffer is checked for write permission when popped (both
    # implementations): on a read-only page the chain is rejected, nothing written.
    translator, drv, dev_mem, dev = setup(mem, queue_cls, {IOVA: (0x8_0000, R)})
    drv.add_chain(writable=[(IOVA, 8)])
    drv.publish()
    with pytest.raises(DescBufferError):
        dev.pop()
    assert mem.read(0x8_0000, 8) == bytes(8)


def test_writable_buffer_on_write_only_page(mem, queue_cls):
    # DMA_FROM_DEVICE mappings are write-only: enough for a device-writable buffer.
    translator, drv, dev_mem, dev = setup(mem, queue_cls, {IOVA: (0x8_0000, 2)})
    drv.add_chain(writable=[(IOVA, 8)])
    drv.publish()
    chain = dev.pop()
    write_chain(dev_mem, chain, b"12345678")
    assert mem.read(0x8_0000, 8) == b"12345678"


def test_pending_translation_leaves_the_chain_available(mem, queue_cls):
    translator, drv, dev_mem, dev = setup(mem, queue_cls, {IOVA: (0x8_0000, RW), IOVA + K4: (0x8_1000, RW)})
    translator.pending.add(IOVA + K4)
    first = drv.add_chain(readable=[(IOVA, 8)])
    second = drv.add_chain(readable=[(IOVA + K4, 8)])
    drv.publish()
    assert [c.head for c in dev.pop_batch(8)] == [first]
    assert len(dev.pop_batch(8)) == 0 and dev.pending() == 1
    translator.pending.clear()  # the mapping arrived
    assert [c.head for c in dev.pop_batch(8)] == [second]


def test_indirect_table_behind_the_translator(mem, queue_cls):
    pages = {IOVA: (0x8_0000, RW), IOVA + K4: (0x9_0000, RW)}
    translator, drv, dev_mem, dev = setup(mem, queue_cls, pages)
    mem.write(0x9_0000, b"indirect")
    # The driver writes the table at its GPA; the ring descriptor names its IOVA.
    drv.write_desc(0, IOVA + K4, 8, table=0x8_0000)
    drv.write_desc(0, IOVA, 16, VIRTQ_DESC_F_INDIRECT)
    drv.post_head(0)
    drv.publish()
    chain = dev.pop()
    assert chain.buffers == [(IOVA + K4, 8, False)]
    assert read_chain(dev_mem, chain) == b"indirect"


def test_accelerated_ring_translates_in_c(mem, queue_cls):
    if queue_cls.__module__.endswith("_queue_py"):
        pytest.skip("the reference ring translates through GuestMemory by design")
    if iotlb.IMPLEMENTATION != "cython":
        pytest.skip("IOVIRT_NO_EXTENSIONS set: translators are the Python reference")
    pages = {IOVA + i * K4: (0x8_0000 + i * K4, RW) for i in range(4)}
    translator, drv, dev_mem, dev = setup(mem, queue_cls, pages)
    translator.fills = translator.translates = 0  # the ring parts were translated at setup
    for i in range(4):
        drv.add_chain(readable=[(IOVA + i * K4, 64)], writable=[(IOVA + i * K4 + 64, 64)])
    drv.publish()
    batch = dev.pop_batch(8)
    assert len(batch) == 4
    assert translator.fills == 4 and translator.translates == 0  # misses: fill, called from C
    dev.push_batch(batch)
    drv.get_used()
    for i in range(4):
        drv.add_chain(readable=[(IOVA + i * K4, 64)], writable=[(IOVA + i * K4 + 64, 64)])
    drv.publish()
    hits = translator.cache.hits
    assert len(dev.pop_batch(8)) == 4
    # All eight buffers were hits in the C cache: no Python translation at all.
    assert translator.fills == 4 and translator.translates == 0
    assert translator.cache.hits == hits + 8


def _translated_errors(mem, queue_cls):
    """Chains behind the translator that each break one rule, popped one by one."""
    pages = {IOVA: (0x8_0000, RW), IOVA + K4: (0x8_1000, R), IOVA + 2 * K4: (0x9_0000, RW),
             IOVA + 4 * K4: (0xA_0000, RW), IOVA + 5 * K4: (0xC_0000, RW)}  # the last two: scattered in GPA
    translator, drv, dev_mem, dev = setup(mem, queue_cls, pages)
    drv.add_chain(readable=[(IOVA + 0xFF8, 16)])  # fine
    drv.add_chain(readable=[(IOVA + 3 * K4, 8)])  # not mapped: the translator's fault
    drv.add_chain(writable=[(IOVA + K4, 8)])  # read-only page, device-writable buffer
    drv.add_chain(readable=[(IOVA + 4 * K4 + 0xFF0, 0x20)])  # scattered in GPA: fine
    drv.add_chain(writable=[(IOVA + 5 * K4 + 0xFF0, 0x20)])  # runs onto an unmapped page
    drv.write_desc(0, IOVA + 3 * K4, 8, table=0x9_0000)
    drv.write_desc(15, IOVA + 2 * K4, 16, VIRTQ_DESC_F_INDIRECT)  # a table whose buffer faults
    drv.post_head(15)
    drv.write_desc(14, IOVA + 3 * K4, 16, VIRTQ_DESC_F_INDIRECT)  # a table on an unmapped page
    drv.post_head(14)
    drv.publish()
    return [outcome(lambda: [(c.head, c.buffers) for c in dev.pop_batch(1)]) for _ in range(8)]


def test_the_twins_fail_alike_behind_the_translator(mem):
    impls = queue_impls()
    if "cython" not in impls:
        pytest.skip("one implementation only")
    got = _translated_errors(mem, impls["python"])
    assert got == _translated_errors(mem, impls["cython"])
    assert [kind for kind, _ in got] == ["ok", "raised", "raised", "ok", "raised", "raised", "raised", "ok"]
