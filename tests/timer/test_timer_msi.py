"""MSI and IPI routing into vLAPICs; several VMs on one host timer."""

from __future__ import annotations

from fake_vm import make_vm

from iovirt.memory import BumpAllocator, GuestMemory
from iovirt.timer import ApicBus, InterruptRouter
from iovirt.timer.regs import (
    APIC_DFR,
    APIC_ESR,
    APIC_ICR,
    APIC_ICR2,
    APIC_LDR,
    APIC_LVT_TIMER_PERIODIC,
    APIC_LVTT,
    APIC_SVR,
    APIC_TDCR,
    APIC_TMICT,
    APIC_TPR,
    ESR_RECV_ILLEGAL_VECTOR,
    ESR_SEND_ILLEGAL_VECTOR,
)
from iovirt.timer.testing import fake_multiplexer, run_until
from iovirt.vtd import VtdDriver, VtdUnit
from iovirt.vtd import regs as R
from iovirt.vtd.faults import FR_IR_COMPAT_BLOCKED


def msi_addr(dest, logical=False, rh=False):
    return 0xFEE00000 | (dest << 12) | (8 if rh else 0) | (4 if logical else 0)


def msi_data(vector, mode=0, level=False):
    return vector | (mode << 8) | ((1 << 15 | 1 << 14) if level else 0)


def pending(vm, n):
    return [vm.take_all(i) for i in range(n)]


def test_physical_msi_reaches_one_vcpu():
    vm = make_vm(4)
    router = InterruptRouter(vm.bus)
    router.deliver_msi(0x0008, msi_addr(2), msi_data(0x41))
    assert pending(vm, 4) == [[], [], [0x41], []]
    router.deliver_msi(0x0008, msi_addr(0xFF), msi_data(0x42))  # broadcast
    assert pending(vm, 4) == [[0x42]] * 4
    assert router.delivered == 2


def test_level_msi_sets_tmr():
    vm = make_vm(1)
    InterruptRouter(vm.bus).deliver_msi(0, msi_addr(0), msi_data(0x55, level=True))
    assert vm.lapic().tmr == 1 << 0x55


def test_logical_flat_and_cluster_destinations():
    vm = make_vm(4)
    router = InterruptRouter(vm.bus)
    for i, lapic in enumerate(vm.bus.lapics):
        lapic.mmio_write(APIC_LDR, 4, (1 << i) << 24)  # flat: one bit per CPU
    router.deliver_msi(0, msi_addr(0b0101, logical=True), msi_data(0x50))
    assert pending(vm, 4) == [[0x50], [], [0x50], []]
    for i, lapic in enumerate(vm.bus.lapics):
        lapic.mmio_write(APIC_DFR, 4, 0x0FFFFFFF)  # cluster model
        lapic.mmio_write(APIC_LDR, 4, (((i // 2) << 4) | (1 << (i % 2))) << 24)
    router.deliver_msi(0, msi_addr(0x13, logical=True), msi_data(0x51))  # cluster 1, both
    assert pending(vm, 4) == [[], [], [0x51], [0x51]]
    router.deliver_msi(0, msi_addr(0x02, logical=True), msi_data(0x52))  # cluster 0, member 1
    assert pending(vm, 4) == [[], [0x52], [], []]


def test_lowest_priority_picks_the_lowest_tpr():
    vm = make_vm(3)
    router = InterruptRouter(vm.bus)
    for i, lapic in enumerate(vm.bus.lapics):
        lapic.mmio_write(APIC_LDR, 4, 1 << 24)  # all in logical group 1
        lapic.mmio_write(APIC_TPR, 4, (0x30, 0x10, 0x20)[i])
    router.deliver_msi(0, msi_addr(1, logical=True), msi_data(0x60, mode=1))
    assert pending(vm, 3) == [[], [0x60], []]
    # The redirection hint turns a fixed MSI into lowest priority as well.
    router.deliver_msi(0, msi_addr(1, logical=True, rh=True), msi_data(0x61))
    assert pending(vm, 3) == [[], [0x61], []]


def test_bad_msis_are_dropped_not_raised():
    vm = make_vm(2)
    router = InterruptRouter(vm.bus)
    router.deliver_msi(0, 0xFED00000, msi_data(0x41))  # not the interrupt window
    router.deliver_msi(0, msi_addr(0) | 0x10, 0)  # remappable but no remapper
    router.deliver_msi(0, msi_addr(7), msi_data(0x41))  # no such APIC
    router.deliver_msi(0, msi_addr(0), msi_data(0x41, mode=5))  # INIT: not modelled
    assert router.dropped == 4 and pending(vm, 2) == [[], []]
    router.deliver_msi(0, msi_addr(0), msi_data(0x3))  # illegal vector: receiver ESR
    vm.lapic().mmio_write(APIC_ESR, 4, 0)
    assert vm.lapic().mmio_read(APIC_ESR, 4) == ESR_RECV_ILLEGAL_VECTOR
    router.deliver_msi(0, msi_addr(1), msi_data(0x20, mode=4))  # NMI
    assert vm.lapic(1).nmi_pending == 1


class FakeRemapper:
    """An IRTE table: handle -> (dest, vector); records what it saw."""

    def __init__(self, table):
        self.table = table
        self.seen = []

    def remap_msi(self, source_id, address, data):
        self.seen.append((source_id, address, data))
        if not address & 0x10:  # compatibility format: passed through (remapping off / CFI set)
            return address, data
        handle = ((address >> 5) & 0x7FFF) | (((address >> 2) & 1) << 15)
        entry = self.table.get(handle)
        if entry is None:
            return None
        dest, vector = entry
        return msi_addr(dest), msi_data(vector)


def test_remappable_msis_go_through_the_remapper():
    vm = make_vm(2)
    remapper = FakeRemapper({3: (1, 0x70)})
    router = InterruptRouter(vm.bus, remapper)
    router.deliver_msi(0x0010, 0xFEE00000 | (3 << 5) | 0x10, 0)
    assert remapper.seen == [(0x0010, 0xFEE00070, 0)]
    assert pending(vm, 2) == [[], [0x70]]
    router.deliver_msi(0x0010, 0xFEE00000 | (9 << 5) | 0x10, 0)  # no IRTE: blocked
    assert router.blocked == 1 and pending(vm, 2) == [[], []]
    router.deliver_msi(0x0010, msi_addr(0), msi_data(0x44))  # compatibility format: asked too
    assert len(remapper.seen) == 3 and pending(vm, 2) == [[0x44], []]


def test_compatibility_msis_are_blocked_when_the_vtd_unit_disallows_them():
    """With IR on and CFI clear, a compatibility-format MSI is blocked with fault 0x25."""
    memory = GuestMemory.from_ranges([(0, 0x400000)])
    try:
        unit = VtdUnit(memory)
        vm = make_vm(2)
        router = InterruptRouter(vm.bus, unit)
        router.deliver_msi(0x0018, msi_addr(1), msi_data(0x45))  # IR off: passes
        assert pending(vm, 2) == [[], [0x45]]
        drv = VtdDriver(unit, memory, BumpAllocator(0x100000, 0x300000))
        drv.init()
        drv.setup_interrupt_remapping(allow_compat=False)
        router.deliver_msi(0x0018, msi_addr(1), msi_data(0x46))
        assert router.blocked == 1 and pending(vm, 2) == [[], []]
        hi = unit.mmio_read(R.FRCD + 8, 8)
        assert (hi >> 32) & 0xFF == FR_IR_COMPAT_BLOCKED and hi & 0xFFFF == 0x0018
        drv.setup_interrupt_remapping(allow_compat=True)
        router.deliver_msi(0x0018, msi_addr(1), msi_data(0x47))
        assert pending(vm, 2) == [[], [0x47]]
    finally:
        memory.close()


def test_xapic_ipis_and_shorthands():
    vm = make_vm(3)
    a = vm.lapic(0)
    a.mmio_write(APIC_ICR2, 4, 2 << 24)
    a.mmio_write(APIC_ICR, 4, 0x43 | (1 << 12))  # delivery-status bit is read-only
    assert a.mmio_read(APIC_ICR, 4) == 0x43
    assert pending(vm, 3) == [[], [], [0x43]]
    a.mmio_write(APIC_ICR, 4, 0x44 | (1 << 18))  # self
    assert pending(vm, 3) == [[0x44], [], []]
    a.mmio_write(APIC_ICR, 4, 0x45 | (2 << 18))  # all including self
    assert pending(vm, 3) == [[0x45]] * 3
    a.mmio_write(APIC_ICR, 4, 0x46 | (3 << 18))  # all but self
    assert pending(vm, 3) == [[], [0x46], [0x46]]
    a.mmio_write(APIC_ICR, 4, 0x05)  # illegal vector: sender ESR, nothing sent
    a.mmio_write(APIC_ESR, 4, 0)
    assert a.mmio_read(APIC_ESR, 4) == ESR_SEND_ILLEGAL_VECTOR
    assert pending(vm, 3) == [[], [], []]


def test_many_vms_share_one_host_timer():
    mux, clock = fake_multiplexer(0)
    serviced = []
    buses = [
        ApicBus(mux, 2, service_routine=lambda lp, v, vm=vm: serviced.append((vm, lp.apic_id, v)))
        for vm in range(3)
    ]
    for vm, bus in enumerate(buses):
        for lapic in bus.lapics:
            lapic.on_pending = lambda lp: (lp.ack(), lp.eoi())
            lapic.mmio_write(APIC_SVR, 4, 0x1FF)
            lapic.mmio_write(APIC_TDCR, 4, 0xB)
            lapic.mmio_write(APIC_LVTT, 4, APIC_LVT_TIMER_PERIODIC | (0x40 + vm))
            lapic.mmio_write(APIC_TMICT, 4, 1_000_000 * (vm + 1))
    assert mux.armed_timers == 6 and mux.host_timer.armed_at == 1_000_000
    run_until(mux, clock, 6_000_000)
    counts = {(vm, cpu): sum(1 for s in serviced if s[:2] == (vm, cpu)) for vm in range(3) for cpu in range(2)}
    assert counts == {(0, 0): 6, (0, 1): 6, (1, 0): 3, (1, 1): 3, (2, 0): 2, (2, 1): 2}
    assert {v for vm, _, v in serviced if vm == 2} == {0x42}
    assert mux.host_timers == 1
