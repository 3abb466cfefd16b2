"""DMA through the IOMMU: the translator seam, per-source-id contexts, pass-through, large pages."""

from __future__ import annotations

import pytest

from iovirt.memory import Access, TranslationFault
from iovirt.vtd import DmarFault, VtdDriver, VtdDriverError, VtdUnit
from iovirt.vtd import regs as R
from iovirt.vtd.tables import AW_39, PTE_R, PTE_W, TT_PASS_THROUGH

RW = PTE_R | PTE_W
PF = 0x0400  # 04:00.0
# SR-IOV routing ids: First VF Offset 0x80, VF Stride 2 -> VFs at devfn 0x80, 0x82 on the PF's bus.
VF0, VF1 = 0x0480, 0x0482


def test_translation_off_is_identity(unit):
    assert unit.translate(PF, 0x1234, 0x3000, Access.READ) == [(0x1234, 0x3000)]


def test_device_view_reads_and_writes_through_iova(unit, drv, mem):
    dom = drv.create_domain(1)
    drv.attach(PF, dom)
    drv.map(dom, 0x8000_0000, 0x10_0000, 0x3000, RW)
    drv.enable_translation()
    dev = mem.with_translator(unit.dma_translator(PF))
    payload = bytes(range(256)) * 20  # 5120 bytes: crosses a page boundary
    dev.write(0x8000_0F00, payload)
    assert mem.read(0x10_0F00, len(payload)) == payload
    assert dev.read(0x8000_0F00, len(payload)) == payload
    assert dev.read_u32(0x8000_0F00) == 0x03020100
    with pytest.raises(TranslationFault):  # the device just sees a failed access
        dev.read(0x8000_3000, 4)


def test_translation_splits_at_page_boundaries(unit, drv):
    dom = drv.create_domain(1)
    drv.attach(PF, dom)
    drv.map(dom, 0x1000, 0x50_0000, 0x1000, RW)
    drv.map(dom, 0x2000, 0x20_0000, 0x1000, RW)  # not contiguous with the first
    drv.enable_translation()
    assert unit.translate(PF, 0x1FF0, 0x20, Access.WRITE) == [(0x50_0FF0, 0x10), (0x20_0000, 0x10)]
    assert unit.translate(PF, 0x1000, 0, Access.READ) == []


def test_vfs_translate_through_their_own_context_entries(unit, drv, mem):
    doms = {sid: drv.create_domain(did) for did, sid in enumerate((PF, VF0, VF1), start=1)}
    for i, (sid, dom) in enumerate(doms.items()):
        drv.attach(sid, dom)
        drv.map(dom, 0x1_0000, 0x10_0000 * (i + 1), 0x1000, RW)
    drv.enable_translation()
    for i, sid in enumerate((PF, VF0, VF1)):
        mem.with_translator(unit.dma_translator(sid)).write(0x1_0000, bytes([i + 1]))
    assert [mem.read(0x10_0000 * (i + 1), 1)[0] for i in range(3)] == [1, 2, 3]
    with pytest.raises(DmarFault) as info:  # VF 2 (devfn 0x84) has no context entry
        unit.translate(0x0484, 0x1_0000, 1, Access.READ)
    assert info.value.source_id == 0x0484


def test_domain_shared_by_two_devices(unit, drv):
    dom = drv.create_domain(1)
    drv.attach(VF0, dom)
    drv.attach(VF1, dom)
    drv.map(dom, 0x1_0000, 0x30_0000, 0x1000, RW)
    drv.enable_translation()
    assert unit.translate(VF0, 0x1_0000, 4, Access.READ) == unit.translate(VF1, 0x1_0000, 4, Access.READ)
    assert len(unit.dma.iotlb.entries) == 1  # one IOTLB entry: keyed by domain, not device


def test_pass_through_context(unit, drv):
    dom = drv.create_domain(1)
    drv.attach(PF, dom, TT_PASS_THROUGH)
    drv.enable_translation()
    assert unit.translate(PF, 0x7_0000_1234, 8, Access.WRITE) == [(0x7_0000_1234, 8)]
    with pytest.raises(DmarFault):
        unit.translate(PF, 1 << 48, 8, Access.WRITE)


def test_large_pages_used_and_translated(unit, drv, mem):
    dom = drv.create_domain(1)
    drv.attach(PF, dom)
    drv.map(dom, 0x4000_0000, 0x4000_0000, 1 << 30, RW)  # one 1 GiB leaf (beyond backed memory)
    drv.map(dom, 0x20_0000, 0x40_0000, 0x20_0000, RW)  # one 2 MiB leaf
    drv.enable_translation()
    assert unit.translate(PF, 0x4123_4567, 4, Access.READ) == [(0x4123_4567, 4)]
    assert unit.translate(PF, 0x2F_F000, 4, Access.READ) == [(0x4F_F000, 4)]
    assert mem.read_u64(drv.pte_address(dom, 0x20_0000)) & (1 << 7)  # PS set
    drv.unmap(dom, 0x20_0000, 0x20_0000)
    with pytest.raises(DmarFault):
        unit.translate(PF, 0x2F_F000, 4, Access.READ)


def test_39_bit_domain(unit, drv):
    dom = drv.create_domain(1, aw=AW_39)
    drv.attach(PF, dom)
    drv.map(dom, 0x7F_FFFF_F000, 0x5000, 0x1000, RW)
    drv.enable_translation()
    assert unit.translate(PF, 0x7F_FFFF_F010, 4, Access.READ) == [(0x5010, 4)]
    assert unit.dma.context_cache.entries[PF][2] == 3  # three-level walk


def test_read_write_access_needs_both_permissions(unit, drv):
    dom = drv.create_domain(1)
    drv.attach(PF, dom)
    drv.map(dom, 0x1000, 0x5000, 0x1000, PTE_R)
    drv.enable_translation()
    with pytest.raises(DmarFault) as info:
        unit.translate(PF, 0x1000, 4, Access.READ | Access.WRITE)
    assert info.value.fault_reason == 0x5


def test_detach_makes_dma_fault(unit, drv):
    dom = drv.create_domain(1)
    drv.attach(PF, dom)
    drv.map(dom, 0x1000, 0x5000, 0x1000, RW)
    drv.enable_translation()
    unit.translate(PF, 0x1000, 4, Access.READ)
    drv.detach(PF)
    with pytest.raises(DmarFault) as info:
        unit.translate(PF, 0x1000, 4, Access.READ)
    assert info.value.fault_reason == 0x2


def test_iotlb_capacity_evicts_oldest(mem, alloc):
    unit = VtdUnit(mem, iotlb_capacity=4)
    drv = VtdDriver(unit, mem, alloc)
    drv.init()
    dom = drv.create_domain(1)
    drv.attach(PF, dom)
    drv.map(dom, 0, 0x10_0000, 0x8000, RW)
    drv.enable_translation()
    for page in range(6):
        unit.translate(PF, page * 0x1000, 4, Access.READ)
    assert sorted(vpn for _, vpn in unit.dma.iotlb.entries) == [2, 3, 4, 5]


def test_driver_with_register_invalidation(unit, reg_drv, mem):
    dom = reg_drv.create_domain(1)
    reg_drv.attach(PF, dom)
    reg_drv.map(dom, 0x1000, 0x5000, 0x1000, RW)
    reg_drv.enable_translation()
    assert unit.mmio_read(R.GSTS, 4) & (R.TE | R.SRTP | R.QIE) == R.TE | R.SRTP
    assert unit.translate(PF, 0x1000, 4, Access.READ) == [(0x5000, 4)]


def test_driver_reports_queue_errors(unit, drv):
    with pytest.raises(VtdDriverError):
        drv.submit((0, 0))  # type 0: IQE
    assert unit.mmio_read(R.FSTS, 4) & R.FSTS_IQE
