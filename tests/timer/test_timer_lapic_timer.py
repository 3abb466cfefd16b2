"""LAPIC timer modes, modelled on kvm-unit-tests x86/apic.c timer cases."""

from __future__ import annotations

import pytest
from fake_vm import make_vm

from iovirt.timer import ApicConfig, MissedTickPolicy
from iovirt.timer.regs import (
    APIC_LVT_MASKED,
    APIC_LVT_TIMER_PERIODIC,
    APIC_LVT_TIMER_TSCDEADLINE,
    APIC_LVTT,
    APIC_TDCR,
    APIC_TMCCT,
    APIC_TMICT,
    MSR_IA32_TSCDEADLINE,
    tdcr_to_divisor,
)

ONESHOT = 0


def program(lapic, lvtt, tdcr=0xB, tmict=None):
    lapic.mmio_write(APIC_TDCR, 4, tdcr)
    lapic.mmio_write(APIC_LVTT, 4, lvtt)
    if tmict is not None:
        lapic.mmio_write(APIC_TMICT, 4, tmict)


def tmcct(lapic):
    return lapic.mmio_read(APIC_TMCCT, 4)


@pytest.mark.parametrize(
    "code,divisor",
    [(0x0, 2), (0x1, 4), (0x2, 8), (0x3, 16), (0x8, 32), (0x9, 64), (0xA, 128), (0xB, 1)],
)
def test_tdcr_decodes_like_hardware(code, divisor):
    assert tdcr_to_divisor(code) == divisor
    vm = make_vm(1)
    lapic = vm.lapic()
    lapic.mmio_write(APIC_TDCR, 4, code | 0xFFFFFFF4)  # only bits 0, 1, 3 are writable
    assert lapic.mmio_read(APIC_TDCR, 4) == code
    program(lapic, ONESHOT | 0xEE, tdcr=code, tmict=1000)
    vm.advance(1000 * divisor - 1)
    assert vm.take_all() == []
    vm.advance(1)
    assert vm.take_all() == [0xEE]


def test_apic_timer_one_shot_fires_exactly_once():
    """test_apic_timer_one_shot: vector 0xEE, TDCR=0xB (divide by 1), TMICT=0x10000."""
    vm = make_vm(1)
    lapic = vm.lapic()
    start = vm.clock.now_ns()
    program(lapic, ONESHOT | 0xEE, tdcr=0xB, tmict=0x10000)
    vm.advance(10 * 0x10000)
    assert vm.take_all() == [0xEE]
    assert len(vm.serviced) == 1
    _, vector, when = vm.serviced[0]
    assert vector == 0xEE and when - start >= 0x10000  # elapsed >= interval (bus cycle 1 ns)
    assert lapic.timer.expirations == 1


def test_tmcct_counts_down_and_stops_at_zero():
    """test_apic_change_mode, one-shot part: TMCCT non-zero, then reaches 0 and stays."""
    vm = make_vm(1)
    lapic = vm.lapic()
    program(lapic, ONESHOT | 0xEE, tdcr=0xB, tmict=0x999999)
    assert tmcct(lapic) == 0x999999
    vm.advance(0x1000)
    assert tmcct(lapic) == 0x999999 - 0x1000
    vm.advance(0x999999)
    assert tmcct(lapic) == 0
    vm.advance(0x999999)
    assert tmcct(lapic) == 0
    assert lapic.mmio_read(APIC_TMICT, 4) == 0x999999  # TMICT keeps its value


def test_mode_change_does_not_reset_tmcct_and_periodic_wraps_to_tmict():
    """test_apic_change_mode: switching one-shot -> periodic keeps counting; periodic wraps."""
    vm = make_vm(1)
    lapic = vm.lapic()
    tmict = 0x999999
    program(lapic, ONESHOT | 0xEE, tdcr=0xB, tmict=tmict)
    vm.advance(tmict // 2)
    before = tmcct(lapic)
    lapic.mmio_write(APIC_LVTT, 4, APIC_LVT_TIMER_PERIODIC | 0xEE)
    assert tmcct(lapic) == before  # not reset by the mode switch
    vm.advance(before - 10)
    assert tmcct(lapic) == 10
    vm.advance(20)  # crosses the period boundary
    assert tmcct(lapic) == tmict - 10  # wrapped back towards TMICT
    assert vm.take_all() == [0xEE]
    # Back to one-shot: runs down to 0 and stays there.
    lapic.mmio_write(APIC_LVTT, 4, ONESHOT | 0xEE)
    vm.advance(tmict)
    assert tmcct(lapic) == 0
    vm.take_all()
    vm.advance(3 * tmict)
    assert vm.take_all() == []
    # Switching to periodic after expiry leaves TMCCT at 0.
    lapic.mmio_write(APIC_LVTT, 4, APIC_LVT_TIMER_PERIODIC | 0xEE)
    assert tmcct(lapic) == 0
    vm.advance(3 * tmict)
    assert vm.take_all() == []


def test_periodic_fires_every_period():
    vm = make_vm(1)
    lapic = vm.lapic()
    program(lapic, APIC_LVT_TIMER_PERIODIC | 0x40, tdcr=0x0, tmict=500_000)  # 1 ms
    for _ in range(5):
        vm.advance(1_000_000)
        assert vm.take_all() == [0x40]
    assert lapic.timer.expirations == 5
    lapic.mmio_write(APIC_TMICT, 4, 0)  # 0 stops the timer
    vm.advance(10_000_000)
    assert vm.take_all() == [] and vm.mux.armed_timers == 0


def test_periodic_minimum_period_clamp():
    vm = make_vm(1, ApicConfig(min_period_ns=200_000))
    lapic = vm.lapic()
    program(lapic, APIC_LVT_TIMER_PERIODIC | 0x40, tdcr=0xB, tmict=10)  # asks for 10 ns
    assert lapic.timer.period_ns == 200_000
    fired = vm.advance(1_000_000)
    assert fired == 5
    # One-shot is not clamped (KVM limit_periodic_timer_frequency is periodic only).
    program(lapic, ONESHOT | 0x41, tdcr=0xB, tmict=10)
    assert lapic.timer.period_ns == 10


def test_tsc_deadline_fires_once_then_reads_zero():
    """test_tsc_deadline_timer: deadline = now fires exactly once, then rdmsr(0x6E0) == 0."""
    vm = make_vm(1)
    lapic = vm.lapic()
    lapic.mmio_write(APIC_LVTT, 4, APIC_LVT_TIMER_TSCDEADLINE | 0xEF)
    now_tsc = vm.bus.config.tsc_at(vm.clock.now_ns())
    assert lapic.wrmsr(MSR_IA32_TSCDEADLINE, now_tsc)
    assert vm.take_all() == [0xEF]
    assert lapic.rdmsr(MSR_IA32_TSCDEADLINE) == 0
    vm.advance(10_000_000)
    assert vm.take_all() == []


def test_tsc_deadline_in_future_uses_tsc_frequency():
    config = ApicConfig(tsc_hz=2_000_000_000, tsc_offset=12345)  # 2 GHz guest TSC
    vm = make_vm(1, config)
    lapic = vm.lapic()
    lapic.mmio_write(APIC_LVTT, 4, APIC_LVT_TIMER_TSCDEADLINE | 0xEF)
    deadline = config.tsc_at(vm.clock.now_ns()) + 2_000_000  # 1 ms ahead
    lapic.wrmsr(MSR_IA32_TSCDEADLINE, deadline)
    assert lapic.rdmsr(MSR_IA32_TSCDEADLINE) == deadline
    assert tmcct(lapic) == 0  # TMCCT reads 0 in TSC-deadline mode
    vm.advance(999_999)
    assert vm.take_all() == []
    vm.advance(1)
    assert vm.take_all() == [0xEF]
    assert config.tsc_at(vm.serviced[0][2]) >= deadline


def test_tsc_deadline_zero_disarms_and_other_modes_ignore_it():
    vm = make_vm(1)
    lapic = vm.lapic()
    now_tsc = vm.bus.config.tsc_at(vm.clock.now_ns())
    # Not in TSC-deadline mode: the write is ignored and the MSR reads 0 (KVM).
    lapic.mmio_write(APIC_LVTT, 4, ONESHOT | 0xEF)
    lapic.wrmsr(MSR_IA32_TSCDEADLINE, now_tsc + 1000)
    assert lapic.rdmsr(MSR_IA32_TSCDEADLINE) == 0 and vm.mux.armed_timers == 0
    lapic.mmio_write(APIC_LVTT, 4, APIC_LVT_TIMER_TSCDEADLINE | 0xEF)
    lapic.wrmsr(MSR_IA32_TSCDEADLINE, now_tsc + 1000)
    assert vm.mux.armed_timers == 1
    lapic.wrmsr(MSR_IA32_TSCDEADLINE, 0)
    assert vm.mux.armed_timers == 0
    vm.advance(1_000_000)
    assert vm.take_all() == []


def test_switching_into_and_out_of_tsc_deadline_cancels_and_zeroes_tmict():
    vm = make_vm(1)
    lapic = vm.lapic()
    program(lapic, APIC_LVT_TIMER_PERIODIC | 0x40, tmict=1_000_000)
    lapic.mmio_write(APIC_LVTT, 4, APIC_LVT_TIMER_TSCDEADLINE | 0x40)
    assert lapic.mmio_read(APIC_TMICT, 4) == 0 and vm.mux.armed_timers == 0
    lapic.mmio_write(APIC_TMICT, 4, 1000)  # ignored in TSC-deadline mode
    assert lapic.mmio_read(APIC_TMICT, 4) == 0
    lapic.wrmsr(MSR_IA32_TSCDEADLINE, vm.bus.config.tsc_at(vm.clock.now_ns()) + 5000)
    lapic.mmio_write(APIC_LVTT, 4, ONESHOT | 0x40)  # out of TSC-deadline: cancelled
    assert vm.mux.armed_timers == 0
    lapic.mmio_write(APIC_LVTT, 4, APIC_LVT_TIMER_TSCDEADLINE | 0x40)
    assert lapic.rdmsr(MSR_IA32_TSCDEADLINE) == 0
    vm.advance(1_000_000)
    assert vm.take_all() == []


def test_masked_lvtt_counts_but_does_not_interrupt():
    vm = make_vm(1)
    lapic = vm.lapic()
    program(lapic, APIC_LVT_MASKED | APIC_LVT_TIMER_PERIODIC | 0x40, tmict=1_000_000)
    vm.advance(3_500_000)
    assert lapic.timer.expirations == 3 and vm.take_all() == []
    assert tmcct(lapic) == 500_000


def test_tdcr_change_rescales_running_count():
    vm = make_vm(1)
    lapic = vm.lapic()
    program(lapic, ONESHOT | 0x40, tdcr=0xB, tmict=1000)  # 1000 ns at divide 1
    vm.advance(400)
    lapic.mmio_write(APIC_TDCR, 4, 0x0)  # divide by 2: 600 ns left become 1200
    assert tmcct(lapic) == 600
    vm.advance(1199)
    assert vm.take_all() == []
    vm.advance(1)
    assert vm.take_all() == [0x40]


def test_timer_with_svr_disabled_is_masked():
    vm = make_vm(1, enable=False)
    lapic = vm.lapic()
    program(lapic, APIC_LVT_TIMER_PERIODIC | 0x40, tmict=1_000_000)  # forced masked
    assert lapic.mmio_read(APIC_LVTT, 4) & APIC_LVT_MASKED
    vm.advance(5_000_000)
    assert vm.take_all() == []


@pytest.mark.parametrize(
    "policy,fired_when_late,next_due",
    [
        # Handled 3.5 periods late: one tick, then a full period from "now" (KVM).
        (MissedTickPolicy.ONE_LATE_TICK, 1, 4_500_000 + 1_000_000),
        # One tick, next stays on the grid.
        (MissedTickPolicy.NO_MISSED_TICKS_PENDING, 1, 5_000_000),
        # Every missed period is an expiry of its own.
        (MissedTickPolicy.DELIVER_ALL, 4, 5_000_000),
    ],
)
def test_missed_tick_policies(policy, fired_when_late, next_due):
    vm = make_vm(1, ApicConfig(missed_tick_policy=policy))
    lapic = vm.lapic()
    counted = []

    def vcpu_takes_interrupt(lp):
        counted.append(lp.ack())
        lp.eoi()

    lapic.on_pending = vcpu_takes_interrupt
    t0 = vm.clock.now_ns()
    program(lapic, APIC_LVT_TIMER_PERIODIC | 0x40, tmict=1_000_000)
    vm.clock.set(t0 + 4_500_000)  # the host timer fired 3.5 ms late
    assert vm.mux.dispatch() == fired_when_late
    assert len(counted) == fired_when_late
    assert lapic.timer.target_ns - t0 == next_due
