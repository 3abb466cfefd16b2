"""Many VMs' LAPIC timers on one host timer, with the real clock.

N VMs x M vCPUs; half the vLAPICs run periodic timers, half TSC-deadline
timers re-armed from the guest's service routine (as a tickless kernel or
kvm-unit-tests' tscdeadline_latency does), all at --hz.  Every expiry takes
the full path: multiplexer -> LAPIC timer -> LVTT -> IRR -> vCPU kick -> ack
(IRR -> ISR) -> service routine -> EOI.  Lateness is measured in the service
routine: monotonic time when the guest sees the interrupt minus the deadline.

The second phase repeats a shorter run without and with --idle extra armed
timers (one-shot timers an hour away) to show what idle timers cost per
expiration.  The last line is one JSON object.

    python benchmarks/timers.py [--vms 100 --vcpus 10 --hz 100 --duration 15]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import select
import time
from array import array
from typing import Callable

from iovirt.timer import ApicBus, MonotonicClock, TimerFd, TimerMultiplexer
from iovirt.timer.regs import (
    APIC_LVT_TIMER_PERIODIC,
    APIC_LVT_TIMER_TSCDEADLINE,
    APIC_LVTT,
    APIC_SVR,
    APIC_TDCR,
    APIC_TMICT,
    MSR_IA32_TSCDEADLINE,
)
from iovirt.timer.testing import fake_multiplexer, run_until

PR_SET_TIMERSLACK = 29
TIMER_VECTOR = 0xEC


def set_timer_slack_1ns() -> None:
    """Default timer slack (50 µs) would delay every timerfd wakeup; ask for 1 ns."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)


def build(mux: TimerMultiplexer, vms: int, vcpus: int, hz: int, idle: int,
          wait_until: Callable[[int], None]) -> tuple[array, list]:
    """N x M timing vLAPICs plus ``idle`` armed ones; ``wait_until`` spaces the starts."""
    lateness = array("q")
    record = lateness.append
    now_ns = mux.now_ns
    period_ns = 1_000_000_000 // hz

    def periodic_isr(lapic, vector):
        record(now_ns() - lapic.timer.last_due_ns)

    def deadline_isr(lapic, vector):
        due = lapic.timer.last_due_ns
        record(now_ns() - due)
        # The guest programs its next tick one period after the one it got.
        lapic.wrmsr(MSR_IA32_TSCDEADLINE, lapic.bus.config.tsc_at(due + period_ns))

    def vcpu_takes_interrupt(lapic):
        lapic.ack()
        lapic.eoi()

    buses = []
    starts = []
    for vm in range(vms):
        isr = periodic_isr if vm % 2 == 0 else deadline_isr
        bus = ApicBus(mux, vcpus, service_routine=isr, on_pending=vcpu_takes_interrupt)
        for lapic in bus.lapics:
            lapic.mmio_write(APIC_SVR, 4, 0x1FF)
            lapic.mmio_write(APIC_TDCR, 4, 0xB)  # divide by 1: TMICT in bus cycles (ns)
            mode = APIC_LVT_TIMER_PERIODIC if isr is periodic_isr else APIC_LVT_TIMER_TSCDEADLINE
            lapic.mmio_write(APIC_LVTT, 4, mode | TIMER_VECTOR)
            starts.append(lapic)
        buses.append(bus)
    # Idle timers first, so building them does not make the timing ones late.
    if idle:
        idle_bus = ApicBus(mux, idle)
        hour = now_ns() + 3600 * 1_000_000_000
        for i, lapic in enumerate(idle_bus.lapics):
            lapic.mmio_write(APIC_SVR, 4, 0x1FF)
            lapic.mmio_write(APIC_LVTT, 4, APIC_LVT_TIMER_TSCDEADLINE | TIMER_VECTOR)
            lapic.wrmsr(MSR_IA32_TSCDEADLINE, idle_bus.config.tsc_at(hour + i * 1000))
        buses.append(idle_bus)
    # Spread the timers' phases over one period, as guests booted at different times.
    t0 = now_ns() + 1_000_000
    step = period_ns / len(starts)
    for i, lapic in enumerate(starts):
        first = t0 + int(i * step)
        if lapic.timer.mode == APIC_LVT_TIMER_PERIODIC:
            wait_until(first)
            lapic.mmio_write(APIC_TMICT, 4, period_ns)
        else:
            lapic.wrmsr(MSR_IA32_TSCDEADLINE, lapic.bus.config.tsc_at(first + period_ns))
    return lateness, buses


def busy_wait_until(deadline_ns: int) -> None:
    while time.monotonic_ns() < deadline_ns:
        pass


def run(vms: int, vcpus: int, hz: int, duration: float, idle: int, slack_ns: int) -> dict:
    """Real clock, one timerfd in an epoll loop."""
    host_timer = TimerFd()
    mux = TimerMultiplexer(MonotonicClock(), host_timer, slack_ns)
    lateness, buses = build(mux, vms, vcpus, hz, idle, busy_wait_until)
    gc.collect()
    gc.freeze()  # setup objects out of the collector's way
    ep = select.epoll()
    ep.register(host_timer.fileno(), select.EPOLLIN)
    poll = ep.poll
    on_host_timer = mux.on_host_timer
    # Half a second of warm-up: setup and gc.collect() left the first ticks late.
    warm_end = time.monotonic() + 0.5
    while time.monotonic() < warm_end:
        if poll(0.1):
            on_host_timer()
    del lateness[:]
    exp0, disp0, arms0 = mux.expirations, mux.dispatches, host_timer.arm_count
    cpu0 = os.times()
    wall0 = time.monotonic()
    end = wall0 + duration
    while time.monotonic() < end:
        if poll(0.1):
            on_host_timer()
    wall = time.monotonic() - wall0
    cpu1 = os.times()
    ep.close()
    gc.unfreeze()
    expirations = mux.expirations - exp0
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    lat = sorted(lateness)
    n = len(lat)
    result = {
        "timers": vms * vcpus,
        "idle_timers": idle,
        "hz": hz,
        "duration_s": round(wall, 2),
        "expirations": expirations,
        "expirations_per_s": round(expirations / wall),
        "target_per_s": vms * vcpus * hz,
        "host_cpu_percent": round(100 * cpu / wall, 1),
        "cpu_ns_per_expiration": round(cpu * 1e9 / expirations) if expirations else None,
        "wakeups_per_s": round((mux.dispatches - disp0) / wall),
        "host_timer_arms": host_timer.arm_count - arms0,
        "p50_lateness_ms": lat[n // 2] / 1e6 if n else None,
        "p99_lateness_ms": lat[min(n - 1, n * 99 // 100)] / 1e6 if n else None,
        "max_lateness_ms": lat[-1] / 1e6 if n else None,
        "host_timers": TimerFd.open_count,
        "slack_us": slack_ns / 1000,
    }
    host_timer.close()
    del buses
    return result


def idle_cost(vms: int, vcpus: int, hz: int, idle: int, seconds: int = 1) -> float:
    """CPU ns per expiration over ``seconds`` of fake time, each deadline hit exactly.

    The fake clock makes every run the same sequence of expiry batches, so the
    only difference between runs with and without idle timers is the heap size.
    """
    mux, clock = fake_multiplexer()
    lateness, buses = build(mux, vms, vcpus, hz, idle, clock.set)
    start = clock.now_ns()
    run_until(mux, clock, start + 1_000_000_000)  # settle the phases
    gc.collect()
    gc.freeze()  # as in run(): the VMs' objects are not the collector's business
    exp0 = mux.expirations
    cpu0 = time.process_time_ns()
    run_until(mux, clock, start + (1 + seconds) * 1_000_000_000)
    cpu = time.process_time_ns() - cpu0
    gc.unfreeze()
    return cpu / (mux.expirations - exp0)


def show(label: str, r: dict) -> None:
    print(
        f"{label}: {r['timers']} timers (+{r['idle_timers']} idle) at {r['hz']} Hz for {r['duration_s']} s: "
        f"{r['expirations_per_s']:,} expirations/s (target {r['target_per_s']:,}), "
        f"host CPU {r['host_cpu_percent']} %, {r['cpu_ns_per_expiration']} CPU ns/expiration, "
        f"{r['wakeups_per_s']:,} wakeups/s; lateness p50 {r['p50_lateness_ms']:.3f} ms, "
        f"p99 {r['p99_lateness_ms']:.3f} ms, max {r['max_lateness_ms']:.3f} ms; "
        f"host timers {r['host_timers']}, slack {r['slack_us']} µs"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vms", type=int, default=100)
    parser.add_argument("--vcpus", type=int, default=10)
    parser.add_argument("--hz", type=int, default=100)
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--idle", type=int, default=10_000)
    parser.add_argument("--idle-duration", type=float, default=8.0)
    parser.add_argument("--slack-us", type=int, default=100,
                        help="host timer may fire this late to batch nearby deadlines (never early)")
    parser.add_argument("--realtime", action="store_true",
                        help="run the timer loop at SCHED_FIFO priority 50, as a hypervisor's timer thread "
                             "would (needs root or CAP_SYS_NICE)")
    args = parser.parse_args()
    set_timer_slack_1ns()
    if args.realtime:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(50))
    slack_ns = args.slack_us * 1000

    main_run = run(args.vms, args.vcpus, args.hz, args.duration, 0, slack_ns)
    show("main", main_run)
    with_idle = run(args.vms, args.vcpus, args.hz, args.idle_duration, args.idle, slack_ns)
    show("same with idle armed timers", with_idle)
    # Controlled comparison: alternate runs, keep each configuration's best.
    costs: dict[int, list[float]] = {0: [], args.idle: []}
    for _ in range(3):
        for n in costs:
            costs[n].append(idle_cost(args.vms, args.vcpus, args.hz, n))
    a, b = min(costs[0]), min(costs[args.idle])
    delta = round(100 * (b - a) / a, 1)
    spread = round(100 * (max(costs[0]) - a) / a, 1)
    print(f"expiry-path CPU (fake clock, best of 3): {a:.0f} ns/expiration without, {b:.0f} ns with "
          f"{args.idle} idle armed timers ({delta:+} %; run-to-run spread without: {spread} %)")
    summary = dict(main_run)
    summary["realtime"] = args.realtime
    summary["with_idle"] = {k: with_idle[k] for k in
                            ("idle_timers", "expirations_per_s", "cpu_ns_per_expiration", "p99_lateness_ms")}
    summary["idle_cost_ns_per_expiration"] = {"without": round(a), "with": round(b), "delta_percent": delta,
                                              "spread_percent": spread}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
