"""Cache semantics and invalidation: stale until invalidated, register and queued interfaces, IQE."""

from __future__ import annotations

import pytest

from iovirt.memory import Access
from iovirt.vtd import DmarFault, VtdDriver
from iovirt.vtd import regs as R
from iovirt.vtd.invalidation import (
    DESC_CONTEXT,
    DESC_DEVICE_IOTLB,
    DESC_DEVTLB_S,
    DESC_IOTLB,
    DESC_SID_SHIFT,
    DESC_WAIT,
    DESC_WAIT_IF,
    DESC_WAIT_SW,
)
from iovirt.vtd.tables import PTE_R, PTE_W, TT_DEVICE_TLB, context_entry, pte

SID = 0x0100
IOVA = 0x1000_0000
OLD, NEW = 0x20_0000, 0x30_0000
RW = PTE_R | PTE_W


@pytest.fixture(params=["registers", "queued"])
def driver(request, unit, mem, alloc):
    drv = VtdDriver(unit, mem, alloc, queued_invalidation=request.param == "queued")
    drv.init()
    return drv


def setup_domain(drv, did=1, sid=SID):
    dom = drv.create_domain(did)
    drv.attach(sid, dom)
    drv.map(dom, IOVA, OLD, 0x4000, RW)
    drv.enable_translation()
    return dom


def gpa(unit, iova, sid=SID):
    return unit.translate(sid, iova, 4, Access.READ)[0][0]


def test_changed_pte_served_stale_until_iotlb_invalidation(unit, mem, driver):
    """The stale-until-invalidated rule, over both the register and the queued interface."""
    dom = setup_domain(driver)
    dev = mem.with_translator(unit.dma_translator(SID))
    mem.write(OLD + 0x10, b"old!")
    mem.write(NEW + 0x10, b"new!")
    assert dev.read(IOVA + 0x10, 4) == b"old!"  # cached now
    driver.map(dom, IOVA, NEW, 0x1000, RW)  # PTE changed in memory, no flush
    assert dev.read(IOVA + 0x10, 4) == b"old!"
    assert gpa(unit, IOVA + 0x1000) == OLD + 0x1000  # untouched neighbour
    driver.flush_iotlb(dom, IOVA, 0x1000)
    assert dev.read(IOVA + 0x10, 4) == b"new!"


def test_unmapped_page_served_until_invalidated_then_faults(unit, driver):
    dom = setup_domain(driver)
    assert gpa(unit, IOVA) == OLD
    driver.unmap(dom, IOVA, 0x1000, flush=False)
    assert gpa(unit, IOVA) == OLD
    driver.flush_iotlb(dom, IOVA, 0x1000)
    with pytest.raises(DmarFault):
        gpa(unit, IOVA)


def test_changed_context_entry_served_stale_until_context_invalidation(unit, driver):
    dom1 = setup_domain(driver)
    dom2 = driver.create_domain(2)
    driver.map(dom2, IOVA, NEW, 0x1000, RW)
    assert gpa(unit, IOVA) == OLD
    # Rewrite the context entry behind the unit's back (attach would flush).
    ctx = driver.context_tables[SID >> 8] + (SID & 0xFF) * 16
    lo, hi = context_entry(dom2.pgd, dom2.did)
    driver.memory.write_u64(ctx + 8, hi)
    driver.memory.write_u64(ctx, lo)
    assert gpa(unit, IOVA) == OLD
    driver.flush_context_device(SID, dom1.did)
    assert gpa(unit, IOVA) == NEW


def test_page_selective_invalidation_keeps_other_pages_and_domains(unit, driver):
    dom1 = setup_domain(driver)
    dom2 = driver.create_domain(2)
    driver.attach(0x0200, dom2)
    driver.map(dom2, IOVA, OLD, 0x1000, RW)
    for i in range(4):
        gpa(unit, IOVA + i * 0x1000)
    gpa(unit, IOVA, sid=0x0200)
    driver.flush_iotlb(dom1, IOVA + 0x2000, 0x2000)  # pages 2 and 3: one AM=1 block
    keys = set(unit.dma.iotlb.entries)
    assert keys == {(1, IOVA >> 12), (1, (IOVA >> 12) + 1), (2, IOVA >> 12)}
    # A single page (AM=0) leaves its neighbour cached.
    driver.flush_iotlb(dom1, IOVA + 0x1000, 0x1000)
    assert set(unit.dma.iotlb.entries) == {(1, IOVA >> 12), (2, IOVA >> 12)}


def test_psi_of_one_page_drops_a_cached_large_page(unit, driver):
    dom = driver.create_domain(1)
    driver.attach(SID, dom)
    driver.map(dom, 0x4000_0000, 0x20_0000, 0x20_0000, RW)  # one 2 MiB leaf
    driver.enable_translation()
    gpa(unit, 0x4000_0000 + 0x15_0000)
    driver.flush_iotlb(dom, 0x4000_0000, 0x1000)
    assert not unit.dma.iotlb.entries


def test_register_iotlb_reports_granularity(unit, reg_drv):
    dom = setup_domain(reg_drv)
    assert reg_drv.flush_iotlb(dom, IOVA, 0x1000) == R.IOTLB_PAGE
    gpa(unit, IOVA)
    # AM above MAMV: the hardware does a domain-selective flush and says so.
    unit.mmio_write(R.IVA, 8, 19)
    unit.mmio_write(R.IOTLB, 8, R.IOTLB_IVT | R.IOTLB_PAGE << R.IOTLB_IIRG_SHIFT | 1 << R.IOTLB_DID_SHIFT)
    value = unit.mmio_read(R.IOTLB, 8)
    assert not value & R.IOTLB_IVT
    assert (value >> R.IOTLB_IAIG_SHIFT) & 3 == R.IOTLB_DOMAIN
    assert not unit.dma.iotlb.entries


def test_register_invalidation_with_reserved_granularity_is_rejected(unit, reg_drv):
    setup_domain(reg_drv)
    gpa(unit, IOVA)
    unit.mmio_write(R.IOTLB, 8, R.IOTLB_IVT)  # IIRG = 0
    assert (unit.mmio_read(R.IOTLB, 8) >> R.IOTLB_IAIG_SHIFT) & 3 == 0
    assert unit.dma.iotlb.entries
    unit.mmio_write(R.CCMD, 8, R.CCMD_ICC)  # CIRG = 0
    assert (unit.mmio_read(R.CCMD, 8) >> R.CCMD_CAIG_SHIFT) & 3 == 0
    assert unit.dma.context_cache.entries


def test_device_selective_context_invalidation_honours_function_mask(unit, reg_drv):
    unit.dma.context_cache.entries.update({sid: (1, 0, 4, 0, False) for sid in (0x100, 0x101, 0x105, 0x108)})
    unit.mmio_write(R.CCMD, 8, R.CCMD_ICC | R.CC_DEVICE << R.CCMD_CIRG_SHIFT | 1 << R.CCMD_FM_SHIFT
                    | 0x101 << R.CCMD_SID_SHIFT | 1)
    assert set(unit.dma.context_cache.entries) == {0x100, 0x108}  # FM=1 ignores function bit 2


# -- the queue itself ------------------------------------------------------------------
def queue_setup(unit, mem, base=0x80_0000, qs=0):
    unit.mmio_write(R.IQT, 8, 0)
    unit.mmio_write(R.IQA, 8, base | qs)
    unit.mmio_write(R.GCMD, 4, R.QIE)


def put(mem, base, index, lo, hi=0):
    mem.write_u64(base + index * 16, lo)
    mem.write_u64(base + index * 16 + 8, hi)


def test_wait_descriptor_writes_status_and_interrupts(unit, mem, sink):
    queue_setup(unit, mem)
    unit.mmio_write(R.IEDATA, 4, 0x55)
    unit.mmio_write(R.IEADDR, 4, 0xFEE00000)
    unit.mmio_write(R.IECTL, 4, 0)
    put(mem, 0x80_0000, 0, DESC_WAIT | DESC_WAIT_SW | DESC_WAIT_IF | 0xCAFE << 32, 0x1000)
    unit.mmio_write(R.IQT, 8, 1 << 4)
    assert mem.read_u32(0x1000) == 0xCAFE
    assert unit.mmio_read(R.IQH, 8) == 1 << 4
    assert unit.mmio_read(R.ICS, 4) == R.ICS_IWC
    assert sink.msis == [(0x0010, 0xFEE00000, 0x55)]
    # IWC still set: the next completion does not interrupt again.
    put(mem, 0x80_0000, 1, DESC_WAIT | DESC_WAIT_IF)
    unit.mmio_write(R.IQT, 8, 2 << 4)
    assert len(sink.msis) == 1
    unit.mmio_write(R.ICS, 4, R.ICS_IWC)
    put(mem, 0x80_0000, 2, DESC_WAIT | DESC_WAIT_IF)
    unit.mmio_write(R.IQT, 8, 3 << 4)
    assert len(sink.msis) == 2


def test_masked_completion_event_pends(unit, mem, sink):
    queue_setup(unit, mem)
    put(mem, 0x80_0000, 0, DESC_WAIT | DESC_WAIT_IF)
    unit.mmio_write(R.IQT, 8, 1 << 4)
    assert sink.msis == [] and unit.mmio_read(R.IECTL, 4) & R.CTL_IP
    unit.mmio_write(R.IECTL, 4, 0)
    assert len(sink.msis) == 1 and not unit.mmio_read(R.IECTL, 4) & R.CTL_IP


def test_queue_wraps_around(unit, mem):
    queue_setup(unit, mem)
    unit.regs[R.IQH] = 255 << 4
    unit.mmio_write(R.IQT, 8, 255 << 4)
    put(mem, 0x80_0000, 255, DESC_WAIT | DESC_WAIT_SW | 1 << 32, 0x1000)
    put(mem, 0x80_0000, 0, DESC_WAIT | DESC_WAIT_SW | 2 << 32, 0x1004)
    unit.mmio_write(R.IQT, 8, 1 << 4)
    assert (mem.read_u32(0x1000), mem.read_u32(0x1004)) == (1, 2)
    assert unit.mmio_read(R.IQH, 8) == 1 << 4


def test_disabling_queued_invalidation_resets_iqh(unit, mem):
    # Spec 11.4.10 (IQH): QH is reset to 0 whenever queued invalidation is disabled.
    queue_setup(unit, mem)
    put(mem, 0x80_0000, 0, DESC_WAIT | DESC_WAIT_SW | 1 << 32, 0x1000)
    unit.mmio_write(R.IQT, 8, 1 << 4)
    assert unit.mmio_read(R.IQH, 8) == 1 << 4
    unit.mmio_write(R.GCMD, 4, 0)
    assert not unit.mmio_read(R.GSTS, 4) & R.QIE
    assert unit.mmio_read(R.IQH, 8) == 0


def iqe_case(unit, mem, sink, lo, hi=0):
    queue_setup(unit, mem)
    unit.mmio_write(R.FEADDR, 4, 0xFEE00000)
    unit.mmio_write(R.FEDATA, 4, 0x77)
    unit.mmio_write(R.FECTL, 4, 0)
    put(mem, 0x80_0000, 0, DESC_WAIT | DESC_WAIT_SW | 9 << 32, 0x1000)
    put(mem, 0x80_0000, 1, lo, hi)
    put(mem, 0x80_0000, 2, DESC_WAIT | DESC_WAIT_SW | 10 << 32, 0x1004)
    unit.mmio_write(R.IQT, 8, 3 << 4)
    assert mem.read_u32(0x1000) == 9  # the good descriptor before it ran
    assert unit.mmio_read(R.FSTS, 4) & R.FSTS_IQE
    assert unit.mmio_read(R.IQH, 8) == 1 << 4  # IQH on the bad descriptor
    assert mem.read_u32(0x1004) == 0  # nothing after it ran
    assert sink.msis == [(0x0010, 0xFEE00000, 0x77)]


@pytest.mark.parametrize(
    "lo, hi",
    [
        (0, 0),  # type 0 is not a descriptor
        (7, 0),  # PASID-cache: not supported in legacy mode
        (DESC_CONTEXT, 0),  # granularity 0
        (DESC_CONTEXT | 1 << 4 | 1 << 10, 0),  # reserved bit
        (DESC_IOTLB | 1 << 4, 1 << 8),  # reserved bit in the high word
        (DESC_IOTLB | 1 << 4 | 1 << 9, 0),  # type bits 11:9 (256-bit formats)
        (DESC_WAIT | DESC_WAIT_SW, 0x7_0000_0000),  # status address outside memory
        (DESC_WAIT | 1 << 8, 0),  # reserved
    ],
)
def test_malformed_descriptor_sets_iqe(unit, mem, sink, lo, hi):
    iqe_case(unit, mem, sink, lo, hi)


def test_queue_resumes_after_iqe_cleared(unit, mem, sink):
    iqe_case(unit, mem, sink, 0)
    put(mem, 0x80_0000, 1, DESC_WAIT)  # software fixes the descriptor
    unit.mmio_write(R.FSTS, 4, R.FSTS_IQE)
    assert not unit.mmio_read(R.FSTS, 4) & R.FSTS_IQE
    assert mem.read_u32(0x1004) == 10
    assert unit.mmio_read(R.IQH, 8) == 3 << 4


def test_tail_beyond_queue_sets_iqe(unit, mem):
    queue_setup(unit, mem, qs=0)  # 256 entries
    unit.mmio_write(R.IQT, 8, 300 << 4)
    assert unit.mmio_read(R.FSTS, 4) & R.FSTS_IQE
    assert unit.mmio_read(R.IQH, 8) == 0


def test_queue_outside_memory_sets_iqe(unit, mem):
    queue_setup(unit, mem, base=0x7_0000_0000)
    unit.mmio_write(R.IQT, 8, 1 << 4)
    assert unit.mmio_read(R.FSTS, 4) & R.FSTS_IQE


def test_iqe_blocks_queue_until_cleared(unit, mem):
    queue_setup(unit, mem)
    unit.mmio_write(R.IQT, 8, 300 << 4)  # IQE
    put(mem, 0x80_0000, 0, DESC_WAIT | DESC_WAIT_SW | 5 << 32, 0x1000)
    unit.mmio_write(R.IQT, 8, 1 << 4)
    assert mem.read_u32(0x1000) == 0
    unit.mmio_write(R.FSTS, 4, R.FSTS_IQE)
    assert mem.read_u32(0x1000) == 5


def test_device_iotlb_invalidation_reaches_listeners(unit, drv):
    seen = []
    unit.add_device_iotlb_listener(lambda sid, addr, size: seen.append((sid, addr, size)))
    dom = drv.create_domain(1)
    drv.attach(SID, dom, TT_DEVICE_TLB)
    drv.map(dom, IOVA, OLD, 0x4000, RW)
    drv.enable_translation()
    assert gpa(unit, IOVA) == OLD  # TT=01 translates untranslated requests normally
    drv.unmap(dom, IOVA, 0x4000)
    assert seen == [(SID, IOVA, 0x4000)]
    # Raw descriptors: S=0 is one page; S=1 with bit 12 clear is 8 KiB.
    drv.submit((DESC_DEVICE_IOTLB | 0x0101 << DESC_SID_SHIFT, 0x5000))
    drv.submit((DESC_DEVICE_IOTLB | 0x0101 << DESC_SID_SHIFT, 0x6000 | DESC_DEVTLB_S))
    assert seen[1:] == [(0x0101, 0x5000, 0x1000), (0x0101, 0x6000, 0x2000)]


def test_pte_cached_after_fault_free_walk_only(unit, drv, mem):
    """Not-present entries are never cached (CAP.CM=0): mapping later needs no flush."""
    dom = drv.create_domain(1)
    drv.attach(SID, dom)
    drv.enable_translation()
    with pytest.raises(DmarFault):
        gpa(unit, IOVA)
    drv.map(dom, IOVA, NEW, 0x1000, RW)
    assert gpa(unit, IOVA) == NEW
    assert pte(NEW, RW) == mem.read_u64(drv.pte_address(dom, IOVA))
