"""vLAPIC register map, priority/EOI, x2APIC MSRs and bad guest input."""

from __future__ import annotations

from fake_vm import make_vm
from hypothesis import given, settings
from hypothesis import strategies as st

from iovirt.timer.regs import (
    APIC_DFR,
    APIC_EOI,
    APIC_ESR,
    APIC_ID,
    APIC_IRR,
    APIC_ISR,
    APIC_LDR,
    APIC_LVR,
    APIC_LVT0,
    APIC_LVTCMCI,
    APIC_LVTERR,
    APIC_LVTT,
    APIC_PPR,
    APIC_SELF_IPI,
    APIC_SVR,
    APIC_TMR,
    APIC_TPR,
    APICBASE_EN,
    APICBASE_EXTD,
    ESR_ILLEGAL_REGISTER,
    ESR_RECV_ILLEGAL_VECTOR,
    MSR_IA32_APICBASE,
)

X2 = 0x800


def to_x2apic(lapic):
    assert lapic.wrmsr(MSR_IA32_APICBASE, lapic.apic_base | APICBASE_EXTD)


def test_reset_values_and_version():
    vm = make_vm(2, enable=False)
    lapic = vm.lapic(1)
    assert lapic.mmio_read(APIC_ID, 4) == 1 << 24
    assert lapic.mmio_read(APIC_LVR, 4) == 0x60014  # version 0x14, 7 LVT entries
    assert 0x10 <= lapic.mmio_read(APIC_LVR, 4) & 0xFF <= 0x15  # test_lapic_existence
    assert lapic.mmio_read(APIC_SVR, 4) == 0xFF
    assert lapic.mmio_read(APIC_DFR, 4) == 0xFFFFFFFF
    for off in (APIC_LVTT, APIC_LVT0, APIC_LVTERR, APIC_LVTCMCI):
        assert lapic.mmio_read(off, 4) == 0x10000
    assert lapic.rdmsr(MSR_IA32_APICBASE) == 0xFEE00000 | APICBASE_EN  # not the BSP
    assert vm.lapic(0).rdmsr(MSR_IA32_APICBASE) & 0x100  # vCPU 0 is the BSP


def test_write_masks():
    vm = make_vm(1)
    lapic = vm.lapic()
    lapic.mmio_write(APIC_TPR, 4, 0xFFFFFFFF)
    assert lapic.mmio_read(APIC_TPR, 4) == 0xFF
    lapic.mmio_write(APIC_LDR, 4, 0xFFFFFFFF)
    assert lapic.mmio_read(APIC_LDR, 4) == 0xFF000000
    lapic.mmio_write(APIC_DFR, 4, 0)
    assert lapic.mmio_read(APIC_DFR, 4) == 0x0FFFFFFF  # cluster model, low bits read 1
    lapic.mmio_write(APIC_SVR, 4, 0xFFFFFFFF)
    assert lapic.mmio_read(APIC_SVR, 4) == 0x3FF
    lapic.mmio_write(APIC_LVTT, 4, 0xFFFFFFFF)
    assert lapic.mmio_read(APIC_LVTT, 4) == 0x700FF  # mask, mode 3 (reserved), vector
    lapic.mmio_write(APIC_LVT0, 4, 0xFFFFFFFF)
    assert lapic.mmio_read(APIC_LVT0, 4) == 0x1A7FF  # no delivery-status / remote-IRR
    lapic.mmio_write(APIC_LVTERR, 4, 0xFFFFFFFF)
    assert lapic.mmio_read(APIC_LVTERR, 4) == 0x100FF
    lapic.mmio_write(APIC_ID, 4, 0x12345678)
    assert lapic.mmio_read(APIC_ID, 4) == 0x12000000
    lapic.mmio_write(APIC_LVR, 4, 0)  # read-only: ignored
    assert lapic.mmio_read(APIC_LVR, 4) == 0x60014


def test_priority_ppr_ack_and_eoi():
    vm = make_vm(1)
    lapic = vm.lapic()
    lapic.accept_irq(0x31)
    lapic.accept_irq(0x62)
    assert lapic.mmio_read(APIC_IRR + 0x10, 4) == 1 << (0x31 - 32)
    assert lapic.mmio_read(APIC_IRR + 0x30, 4) == 1 << (0x62 - 96)
    assert lapic.ack() == 0x62  # highest first
    assert lapic.mmio_read(APIC_PPR, 4) == 0x60
    assert lapic.mmio_read(APIC_ISR + 0x30, 4) == 1 << (0x62 - 96)
    lapic.accept_irq(0x65)  # same class as the in-service vector: not deliverable
    assert lapic.highest_deliverable() is None
    lapic.accept_irq(0x71)
    assert lapic.ack() == 0x71  # higher class preempts
    assert lapic.mmio_read(APIC_PPR, 4) == 0x70
    lapic.mmio_write(APIC_EOI, 4, 0)  # EOI clears the highest ISR bit (0x71)
    assert lapic.mmio_read(APIC_PPR, 4) == 0x60
    lapic.mmio_write(APIC_EOI, 4, 0)
    assert lapic.mmio_read(APIC_PPR, 4) == 0
    assert lapic.ack() == 0x65 and lapic.eoi() == 0x65
    assert [v for _, v, _ in vm.serviced] == [0x62, 0x71, 0x65]
    # TPR blocks classes at or below it; lowering it re-enables delivery.
    lapic.mmio_write(APIC_TPR, 4, 0x35)
    assert lapic.mmio_read(APIC_PPR, 4) == 0x35
    assert lapic.highest_deliverable() is None  # 0x31 is class 3 <= PPR
    kicks = []
    lapic.on_pending = kicks.append
    lapic.mmio_write(APIC_TPR, 4, 0x20)
    assert kicks == [lapic] and lapic.ack() == 0x31
    assert lapic.eoi() == 0x31 and lapic.eoi() is None


def test_level_triggered_sets_tmr():
    vm = make_vm(1)
    lapic = vm.lapic()
    lapic.accept_irq(0x50, level=True)
    assert lapic.mmio_read(APIC_TMR + 0x20, 4) == 1 << (0x50 - 64)
    lapic.accept_irq(0x50, level=False)
    assert lapic.mmio_read(APIC_TMR + 0x20, 4) == 0


def test_svr_software_disable_masks_every_lvt():
    vm = make_vm(1)
    lapic = vm.lapic()
    lapic.mmio_write(APIC_LVT0, 4, 0x30)
    lapic.mmio_write(APIC_LVTT, 4, 0x31)
    lapic.mmio_write(APIC_SVR, 4, 0x0FF)
    assert lapic.mmio_read(APIC_LVT0, 4) == 0x10030
    assert lapic.mmio_read(APIC_LVTT, 4) == 0x10031
    lapic.mmio_write(APIC_LVT0, 4, 0x30)  # stays masked while disabled
    assert lapic.mmio_read(APIC_LVT0, 4) == 0x10030


def test_illegal_vectors_set_esr_and_raise_lvt_error():
    vm = make_vm(1)
    lapic = vm.lapic()
    lapic.mmio_write(APIC_LVTERR, 4, 0xFE)
    assert lapic.accept_irq(5) is False
    assert lapic.irr == 1 << 0xFE  # only the error interrupt was accepted
    lapic.mmio_write(APIC_ESR, 4, 0)  # latch errors into ESR
    assert lapic.mmio_read(APIC_ESR, 4) == ESR_RECV_ILLEGAL_VECTOR
    lapic.mmio_write(APIC_ESR, 4, 0)
    assert lapic.mmio_read(APIC_ESR, 4) == 0
    # An illegal error vector cannot recurse forever.
    lapic.mmio_write(APIC_LVTERR, 4, 0x3)
    lapic.accept_irq(1)
    lapic.mmio_write(APIC_ESR, 4, 0)
    assert lapic.mmio_read(APIC_ESR, 4) == ESR_RECV_ILLEGAL_VECTOR


def test_bad_mmio_accesses_are_ignored():
    vm = make_vm(1)
    lapic = vm.lapic()
    lapic.mmio_write(APIC_TPR, 4, 0x20)
    lapic.mmio_write(APIC_TPR, 2, 0x30)  # sub-dword write: ignored
    lapic.mmio_write(APIC_TPR + 4, 4, 0x40)  # not 16-byte aligned: ignored
    lapic.mmio_write(0x2000, 4, 0x40)  # outside the page: ignored
    assert lapic.mmio_read(APIC_TPR, 4) == 0x20
    # Sub-dword reads inside one register work (KVM kvm_lapic_reg_read).
    lapic.mmio_write(APIC_LDR, 4, 0xAB000000)
    assert lapic.mmio_read(APIC_LDR + 3, 1) == 0xAB
    assert lapic.mmio_read(APIC_LDR + 2, 2) == 0xAB00
    assert lapic.mmio_read(APIC_LDR + 2, 4) == 0  # crosses the 32-bit register
    assert lapic.mmio_read(APIC_LDR, 8) == 0
    assert lapic.mmio_read(APIC_EOI, 4) == 0  # write-only
    assert lapic.mmio_read(0xFFF, 4) == 0
    # A reserved register sets ESR "illegal register address".
    assert lapic.mmio_read(0x40, 4) == 0
    lapic.mmio_write(APIC_SELF_IPI, 4, 0x40)  # SELF_IPI is x2APIC-only
    lapic.mmio_write(APIC_ESR, 4, 0)
    assert lapic.mmio_read(APIC_ESR, 4) == ESR_ILLEGAL_REGISTER
    assert lapic.irr == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(-16, 0x1010), st.sampled_from([0, 1, 2, 3, 4, 8, 16]),
                          st.integers(0, 2**32 - 1)), max_size=40))
def test_random_mmio_never_raises(ops):
    vm = make_vm(2)
    lapic = vm.lapic()
    for write, offset, size, value in ops:
        if write:
            lapic.mmio_write(offset, size, value)
        else:
            assert 0 <= lapic.mmio_read(offset, size) < 2**64
    vm.advance(10_000_000)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0x7F0, 0x900), st.integers(0, 2**64 - 1)), max_size=40))
def test_random_msrs_never_raise(ops):
    vm = make_vm(2)
    lapic = vm.lapic()
    to_x2apic(lapic)
    for write, msr, value in ops:
        if write:
            assert lapic.wrmsr(msr, value) in (True, False)
        else:
            assert lapic.rdmsr(msr) is None or lapic.rdmsr(msr) >= 0


def test_x2apic_msr_map():
    vm = make_vm(20)
    lapic = vm.lapic(18)
    assert lapic.rdmsr(X2 + (APIC_TPR >> 4)) is None  # xAPIC mode: x2APIC MSRs #GP
    to_x2apic(lapic)
    assert lapic.rdmsr(X2 + 0x02) == 18  # ID is the full APIC ID
    assert lapic.rdmsr(X2 + 0x0D) == (1 << 16) | (1 << 2)  # LDR: cluster 1, bit 2
    assert lapic.rdmsr(X2 + 0x03) == 0x60014
    assert lapic.wrmsr(X2 + 0x08, 0x20) and lapic.rdmsr(X2 + 0x08) == 0x20  # TPR
    assert lapic.mmio_read(APIC_TPR, 4) == 0xFFFFFFFF  # MMIO is off in x2APIC mode
    lapic.mmio_write(APIC_TPR, 4, 0)
    assert lapic.rdmsr(X2 + 0x08) == 0x20
    # Read-only, write-only and invalid registers #GP.
    assert lapic.wrmsr(X2 + 0x02, 5) is False  # ID
    assert lapic.wrmsr(X2 + 0x0D, 5) is False  # LDR
    assert lapic.wrmsr(X2 + 0x0A, 0) is False  # PPR
    assert lapic.rdmsr(X2 + 0x0B) is None  # EOI is write-only
    assert lapic.rdmsr(X2 + 0x3F) is None  # SELF_IPI is write-only
    assert lapic.rdmsr(X2 + 0x0E) is None and lapic.wrmsr(X2 + 0x0E, 0) is False  # DFR
    assert lapic.rdmsr(X2 + 0x09) is None  # ARBPRI
    assert lapic.rdmsr(X2 + 0x31) is None  # ICR2 does not exist
    assert lapic.rdmsr(X2 + 0x04) is None  # reserved
    assert lapic.wrmsr(X2 + 0x28, 1) is False  # ESR: only 0 may be written
    assert lapic.wrmsr(X2 + 0x0B, 1) is False  # EOI: only 0 may be written
    assert lapic.wrmsr(X2 + 0x08, 1 << 32) is False  # bits 63:32 reserved
    assert lapic.wrmsr(X2 + 0x28, 0)


def test_x2apic_self_ipi_and_icr():
    vm = make_vm(2)
    a, b = vm.lapic(0), vm.lapic(1)
    to_x2apic(a)
    to_x2apic(b)
    assert a.wrmsr(X2 + 0x3F, 0x45)
    assert vm.take_all(0) == [0x45]  # delivered exactly once
    assert a.wrmsr(X2 + 0x30, (1 << 32) | 0x46)  # 64-bit ICR, physical dest 1
    assert a.rdmsr(X2 + 0x30) == (1 << 32) | 0x46
    assert vm.take_all(1) == [0x46] and vm.take_all(0) == []
    assert a.wrmsr(X2 + 0x30, (0xFFFFFFFF << 32) | 0x47)  # x2APIC broadcast
    assert vm.take_all(0) == [0x47] and vm.take_all(1) == [0x47]


def test_apic_base_transitions():
    vm = make_vm(1)
    lapic = vm.lapic()
    base = lapic.apic_base
    assert lapic.wrmsr(MSR_IA32_APICBASE, base | (1 << 40)) is False  # reserved bit
    assert lapic.wrmsr(MSR_IA32_APICBASE, (base & ~APICBASE_EN) | APICBASE_EXTD) is False  # EXTD w/o EN
    to_x2apic(lapic)
    assert lapic.wrmsr(MSR_IA32_APICBASE, base) is False  # x2APIC -> xAPIC directly
    assert lapic.wrmsr(MSR_IA32_APICBASE, base & ~APICBASE_EN)  # -> disabled
    assert lapic.mmio_read(APIC_SVR, 4) == 0xFFFFFFFF  # disabled: reads all ones
    assert lapic.wrmsr(MSR_IA32_APICBASE, base | APICBASE_EXTD) is False  # disabled -> x2APIC
    assert lapic.wrmsr(MSR_IA32_APICBASE, base)
    assert lapic.mmio_read(APIC_SVR, 4) == 0xFF  # back in the reset state
