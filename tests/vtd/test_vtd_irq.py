"""Interrupt remapping: IRTE formats, remappable MSIs, source-id validation, IR faults, IEC."""

from __future__ import annotations

import pytest

from iovirt.vtd import faults as F
from iovirt.vtd import regs as R
from iovirt.vtd.irq import SVT_BUS, SVT_SID, irte, remappable_msi

SID = 0x0310  # bus 3, dev 2, fn 0


@pytest.fixture
def ir(drv):
    drv.setup_interrupt_remapping(size_order=3)  # 16 entries
    return drv


def last_fault(unit):
    fsts = unit.mmio_read(R.FSTS, 4)
    assert fsts & R.FSTS_PPF
    index = 0
    while unit.mmio_read(R.FRCD + 16 * index + 24, 8) & R.FRCD_HI_F:
        index += 1
    lo = unit.mmio_read(R.FRCD + 16 * index, 8)
    hi = unit.mmio_read(R.FRCD + 16 * index + 8, 8)
    return (hi >> 32) & 0xFF, hi & 0xFFFF, lo >> 48


def test_irte_layout():
    lo, hi = irte(0x31, 0x02, dlm=1, tm=1, dm=1, rh=1, svt=SVT_SID, sq=2, sid=0x1234, fpd=True)
    assert lo == 1 | 1 << 1 | 1 << 2 | 1 << 3 | 1 << 4 | 1 << 5 | 0x31 << 16 | 0x02 << 40
    assert hi == 0x1234 | 2 << 16 | 1 << 18


def test_remappable_msi_layout():
    assert remappable_msi(5) == (0xFEE00000 | 5 << 5 | 1 << 4, 0)
    assert remappable_msi(0x8001, subhandle=3) == (0xFEE00000 | 1 << 5 | 1 << 4 | 1 << 3 | 1 << 2, 3)


def test_setup_latches_table_and_blocks_compat(unit, ir):
    assert unit.mmio_read(R.GSTS, 4) & (R.IRE | R.SIRTP | R.QIE) == R.IRE | R.SIRTP | R.QIE
    assert not unit.mmio_read(R.GSTS, 4) & R.CFI
    assert unit.irq.table_entries == 16


def test_remap_fixed_edge(unit, ir):
    ir.set_irte(4, vector=0x41, dest=0x03)
    assert unit.remap_msi(SID, *remappable_msi(4)) == (0xFEE03000, 0x41)


def test_remap_level_lowest_priority_logical(unit, ir):
    ir.set_irte(5, vector=0x52, dest=0x0F, dlm=1, tm=1, dm=1, rh=1)
    address, data = unit.remap_msi(SID, *remappable_msi(5))
    assert address == 0xFEE0F000 | 1 << 3 | 1 << 2
    assert data == 0x52 | 1 << 8 | 1 << 14 | 1 << 15


def test_subhandle_adds_to_handle(unit, ir):
    ir.set_irte(6, vector=0x60, dest=1)
    ir.set_irte(9, vector=0x63, dest=1)
    assert unit.remap_msi(SID, *remappable_msi(6, subhandle=3))[1] == 0x63
    # Without SHV the data bits are not a subhandle.
    address, _ = remappable_msi(6)
    assert unit.remap_msi(SID, address, 3)[1] == 0x60


def test_source_id_validation_exact_and_masked(unit, ir):
    ir.set_irte(1, vector=0x30, dest=0, svt=SVT_SID, sid=SID)
    ir.set_irte(2, vector=0x31, dest=0, svt=SVT_SID, sq=3, sid=SID)  # any function of the device
    assert unit.remap_msi(SID, *remappable_msi(1)) is not None
    assert unit.remap_msi(SID + 1, *remappable_msi(1)) is None
    assert last_fault(unit) == (F.FR_IR_SID_INVALID, SID + 1, 1)
    assert unit.remap_msi(SID + 7, *remappable_msi(2)) is not None
    assert unit.remap_msi(SID + 8, *remappable_msi(2)) is None


def test_source_id_validation_by_bus_range(unit, ir):
    ir.set_irte(3, vector=0x30, dest=0, svt=SVT_BUS, sid=0x0205)  # buses 2..5
    assert unit.remap_msi(0x0200, *remappable_msi(3)) is not None
    assert unit.remap_msi(0x05FF, *remappable_msi(3)) is not None
    assert unit.remap_msi(0x0600, *remappable_msi(3)) is None


def test_compat_format_blocked_unless_cfis(unit, ir):
    compat = (0xFEE01000, 0x45)
    assert unit.remap_msi(SID, *compat) is None
    assert last_fault(unit)[0] == F.FR_IR_COMPAT_BLOCKED
    ir.setup_interrupt_remapping(size_order=3, allow_compat=True)
    assert unit.remap_msi(SID, *compat) == compat


def test_interrupts_pass_unchanged_with_ir_disabled(unit):
    assert unit.remap_msi(SID, 0xFEE01000, 0x45) == (0xFEE01000, 0x45)
    assert unit.remap_msi(SID, *remappable_msi(3)) == remappable_msi(3)


def test_non_interrupt_address_is_dropped(unit, ir):
    assert unit.remap_msi(SID, 0xFED00000, 0) is None
    assert unit.mmio_read(R.FSTS, 4) == 0


def test_fr20_request_reserved_bits(unit, ir):
    ir.set_irte(1, vector=0x30, dest=0)
    address, _ = remappable_msi(1)
    assert unit.remap_msi(SID, address, 0x10000) is None
    assert last_fault(unit) == (F.FR_IR_REQ_RSVD, SID, 1)
    assert unit.remap_msi(SID, address | 1 << 32, 0) is None


def test_fr21_index_beyond_table(unit, ir):
    assert unit.remap_msi(SID, *remappable_msi(16)) is None
    assert last_fault(unit) == (F.FR_IR_INDEX_OVER, SID, 16)
    assert unit.remap_msi(SID, *remappable_msi(15, subhandle=1)) is None


def test_fr22_entry_not_present(unit, ir):
    assert unit.remap_msi(SID, *remappable_msi(7)) is None
    assert last_fault(unit) == (F.FR_IR_ENTRY_NOT_PRESENT, SID, 7)


def test_fr23_table_outside_memory(unit, ir):
    unit.mmio_write(R.IRTA, 8, 0x7_0000_0000 | 3)
    unit.mmio_write(R.GCMD, 4, R.QIE | R.IRE | R.SIRTP)
    ir.submit((4, 0))  # global IEC flush
    assert unit.remap_msi(SID, *remappable_msi(2)) is None
    assert last_fault(unit)[0] == F.FR_IR_ROOT_INVALID


@pytest.mark.parametrize(
    "lo_extra, hi_extra",
    [(1 << 15, 0), (1 << 12, 0), (0xFF << 32, 0), (0, 1 << 20), (0, 3 << 18), (3 << 5, 0)],
    ids=["posted-IM", "bit12", "xapic-dst-low", "hi-reserved", "svt-11", "dlm-011"],
)
def test_fr24_irte_reserved_bits(unit, ir, lo_extra, hi_extra):
    lo, hi = irte(0x30, 1)
    ir.write_irte(2, lo | lo_extra, hi | hi_extra)
    assert unit.remap_msi(SID, *remappable_msi(2)) is None
    assert last_fault(unit) == (F.FR_IR_IRTE_RSVD, SID, 2)


def test_irte_fpd_suppresses_fault_records(unit, ir):
    ir.write_irte(2, *irte(0x30, 1, fpd=True, present=False))
    assert unit.remap_msi(SID, *remappable_msi(2)) is None
    assert unit.mmio_read(R.FSTS, 4) == 0


def test_iec_serves_stale_entry_until_invalidated(unit, ir, mem):
    ir.set_irte(3, vector=0x40, dest=1)
    assert unit.remap_msi(SID, *remappable_msi(3))[1] == 0x40
    lo, hi = irte(0x99, 1)
    mem.write_u64(ir.irt + 3 * 16, lo)  # behind the unit's back
    assert unit.remap_msi(SID, *remappable_msi(3))[1] == 0x40
    ir.submit((4 | 1 << 4 | 3 << 32, 0))  # index-selective IEC invalidation
    assert unit.remap_msi(SID, *remappable_msi(3))[1] == 0x99


def test_ir_fault_raises_fault_event(unit, sink, ir):
    unit.mmio_write(R.FEADDR, 4, 0xFEE00000)
    unit.mmio_write(R.FEDATA, 4, 0x21)
    unit.mmio_write(R.FECTL, 4, 0)
    unit.remap_msi(SID, *remappable_msi(9))
    assert sink.msis == [(0x0010, 0xFEE00000, 0x21)]


def test_through_the_lapic_router(unit, ir):
    """End to end: the timer layer's MSI router and a real vLAPIC consume remap_msi."""
    from iovirt.timer import ApicBus, InterruptRouter
    from iovirt.timer.regs import APIC_SVR
    from iovirt.timer.testing import fake_multiplexer

    mux, _clock = fake_multiplexer()
    bus = ApicBus(mux, 4)
    for lapic in bus.lapics:
        lapic.mmio_write(APIC_SVR, 4, 0x1FF)
    router = InterruptRouter(bus, remapper=unit)
    ir.set_irte(4, vector=0x41, dest=0x03)
    router.deliver_msi(SID, *remappable_msi(4))
    assert bus.lapics[3].ack() == 0x41
    router.deliver_msi(SID, *remappable_msi(5))  # not present: blocked, fault recorded
    assert router.blocked == 1 and last_fault(unit)[0] == F.FR_IR_ENTRY_NOT_PRESENT
