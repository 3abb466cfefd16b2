"""Per-VM settings of the virtual APICs and their timers."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from iovirt.timer.errors import ApicConfigError


class MissedTickPolicy(enum.Enum):
    """What a periodic LAPIC timer does when its expiry is handled late.

    ``ONE_LATE_TICK`` (default) is KVM's behaviour: however many periods were
    missed, one interrupt is delivered and the period restarts from now
    (``advance_periodic_target_expiration`` pulls a past target up to now, and
    its single ``pending`` count coalesces the rest).  It equals Xen's
    ``one_missed_tick_pending`` (HVM_PARAM_TIMER_MODE 3).

    ``NO_MISSED_TICKS_PENDING`` is Xen's mode 2: one interrupt, the missed ticks
    are dropped, and the next expiry stays on the original period grid.

    ``DELIVER_ALL`` approximates Xen's ``no_delay_for_missed_ticks`` (mode 1):
    each missed period is a separate expiry, handled back to back until the
    timer has caught up with the host clock.  Xen's mode 0 freezes guest time
    while a vCPU is descheduled; guest time is not modelled, so it is absent.
    """

    ONE_LATE_TICK = "one_late_tick"
    NO_MISSED_TICKS_PENDING = "no_missed_ticks_pending"
    DELIVER_ALL = "deliver_all"


@dataclass(frozen=True)
class ApicConfig:
    """Time bases and timer rules shared by the vLAPICs of one VM.

    ``bus_cycle_ns`` is the APIC timer's input clock period before the divider
    (KVM's ``APIC_BUS_CYCLE_NS_DEFAULT`` is 1 ns).  ``tsc_hz`` converts
    ``IA32_TSC_DEADLINE`` values to host nanoseconds; ``tsc_offset`` is the
    guest TSC at host time 0.  ``min_period_ns`` clamps periodic timers
    (KVM's ``min_timer_period_us`` is 200 µs).
    """

    bus_cycle_ns: int = 1
    tsc_hz: int = 1_000_000_000
    tsc_offset: int = 0
    min_period_ns: int = 200_000
    missed_tick_policy: MissedTickPolicy = MissedTickPolicy.ONE_LATE_TICK

    def __post_init__(self) -> None:
        if self.bus_cycle_ns < 1:
            raise ApicConfigError("bus_cycle_ns", self.bus_cycle_ns, "an integer >= 1")
        if self.tsc_hz < 1:
            raise ApicConfigError("tsc_hz", self.tsc_hz, "an integer >= 1")
        if self.min_period_ns < 1:
            raise ApicConfigError("min_period_ns", self.min_period_ns, "an integer >= 1")
        if not isinstance(self.missed_tick_policy, MissedTickPolicy):
            raise ApicConfigError(
                "missed_tick_policy", self.missed_tick_policy, "a MissedTickPolicy member"
            )

    def tsc_at(self, now_ns: int) -> int:
        """The guest TSC value at host monotonic time ``now_ns``."""
        return now_ns * self.tsc_hz // 1_000_000_000 + self.tsc_offset

    def tsc_to_ns(self, tsc: int) -> int:
        """The earliest host time at which the guest TSC reaches ``tsc``."""
        return -(-(tsc - self.tsc_offset) * 1_000_000_000 // self.tsc_hz)
