"""The LAPIC timer of one vCPU: one-shot, periodic and TSC-deadline modes.

Semantics follow KVM (``arch/x86/kvm/lapic.c``):

* TMICT writes restart the count (ignored in TSC-deadline mode); 0 stops it.
* The period is ``TMICT * bus_cycle_ns * divisor``; a periodic period below
  ``min_period_ns`` is raised to it (``limit_periodic_timer_frequency``).
* Switching into or out of TSC-deadline mode cancels the timer and zeroes
  TMICT and the deadline (``apic_update_lvtt``); switching between one-shot
  and periodic leaves a running count alone, and the mode at expiry decides
  whether the timer restarts.
* ``IA32_TSC_DEADLINE`` writes arm the timer only in TSC-deadline mode; 0
  disarms; a deadline already past fires at once; after firing it reads 0.
* A TDCR change while counting rescales the remaining time
  (``update_target_expiration``).

TMCCT is computed from the host clock.  It counts down from TMICT to 0 as on
hardware and in QEMU (``apic_get_current_count``); KVM's ``mod period`` reads
0 instead of TMICT at the very start of a period, a boundary case not copied.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from iovirt.timer.config import ApicConfig, MissedTickPolicy
from iovirt.timer.mux import MuxTimer, TimerMultiplexer
from iovirt.timer.regs import (
    APIC_LVT_TIMER_ONESHOT,
    APIC_LVT_TIMER_PERIODIC,
    APIC_LVT_TIMER_TSCDEADLINE,
    APIC_TDCR_WRITE_MASK,
    tdcr_to_divisor,
)

if TYPE_CHECKING:
    from iovirt.timer.lapic import VirtualLapic

_ONE_LATE_TICK = MissedTickPolicy.ONE_LATE_TICK
_NO_MISSED_TICKS_PENDING = MissedTickPolicy.NO_MISSED_TICKS_PENDING


class LapicTimer(MuxTimer):
    """Timer state of one vLAPIC, armed on the shared :class:`TimerMultiplexer`.

    ``mode`` holds LVTT bits 18:17 as stored in the register (mode 3 is
    reserved and, as in KVM, behaves like one-shot).
    """

    __slots__ = (
        "_lapic",
        "_mux",
        "_config",
        "_now_ns",
        "mode",
        "tmict",
        "tdcr",
        "divisor",
        "period_ns",
        "target_ns",
        "tscdeadline",
        "expirations",
        "missed_ticks",
        "last_due_ns",
    )

    def __init__(self, lapic: "VirtualLapic", mux: TimerMultiplexer, config: ApicConfig) -> None:
        super().__init__()
        self._lapic = lapic
        self._mux = mux
        self._config = config
        self._now_ns = mux.now_ns
        self.mode = APIC_LVT_TIMER_ONESHOT
        self.tmict = 0
        self.tdcr = 0
        self.divisor = tdcr_to_divisor(0)
        self.period_ns = 0
        self.target_ns: int | None = None  # expiry of the current count, None when stopped
        self.tscdeadline = 0
        self.expirations = 0
        self.missed_ticks = 0
        self.last_due_ns: int | None = None

    def reset(self) -> None:
        """Stop the timer and return to the power-on state."""
        self._mux.cancel(self)
        self.mode = APIC_LVT_TIMER_ONESHOT
        self.tmict = self.tdcr = self.period_ns = self.tscdeadline = 0
        self.divisor = tdcr_to_divisor(0)
        self.target_ns = None

    # --- register side ------------------------------------------------------------
    def set_mode(self, mode: int) -> None:
        """Apply LVTT bits 18:17 after an LVTT write (KVM ``apic_update_lvtt``)."""
        if mode == self.mode:
            return
        if (mode == APIC_LVT_TIMER_TSCDEADLINE) != (self.mode == APIC_LVT_TIMER_TSCDEADLINE):
            self._mux.cancel(self)
            self.tmict = self.period_ns = self.tscdeadline = 0
            self.target_ns = None
        self.mode = mode
        if mode == APIC_LVT_TIMER_PERIODIC and self.period_ns:
            self.period_ns = max(self.period_ns, self._config.min_period_ns)

    def write_tmict(self, value: int) -> None:
        """A TMICT write: restart counting from ``value`` (ignored in TSC-deadline mode)."""
        if self.mode == APIC_LVT_TIMER_TSCDEADLINE:
            return
        self._mux.cancel(self)
        self.tmict = value
        if value == 0:
            self.period_ns = 0
            self.target_ns = None
            return
        self.period_ns = self._period_ns()
        self.target_ns = self._now_ns() + self.period_ns
        self._mux.arm(self, self.target_ns)

    def read_tmcct(self) -> int:
        """TMCCT: the count left, computed from the host clock."""
        target = self.target_ns
        if target is None or self.mode == APIC_LVT_TIMER_TSCDEADLINE or not self.tmict:
            return 0
        remaining = target - self._now_ns()
        if remaining <= 0:
            return 0
        if self.mode == APIC_LVT_TIMER_PERIODIC:
            remaining = (remaining - 1) % self.period_ns + 1
        unit = self._config.bus_cycle_ns * self.divisor
        return min(-(-remaining // unit), 0xFFFFFFFF)

    def write_tdcr(self, value: int) -> None:
        """A TDCR write: new divisor; a running count is rescaled to it."""
        old = self.divisor
        self.tdcr = value & APIC_TDCR_WRITE_MASK
        self.divisor = tdcr_to_divisor(self.tdcr)
        if self.divisor == old or not self.tmict or self.mode == APIC_LVT_TIMER_TSCDEADLINE:
            return
        self.period_ns = self._period_ns()
        if self.target_ns is None:
            return
        now = self._now_ns()
        remaining = self.target_ns - now
        if remaining > 0:
            self.target_ns = now + remaining * self.divisor // old
            self._mux.arm(self, self.target_ns)

    def read_tscdeadline(self) -> int:
        """``IA32_TSC_DEADLINE``: the armed deadline, 0 when disarmed or in another mode."""
        return self.tscdeadline if self.mode == APIC_LVT_TIMER_TSCDEADLINE else 0

    def write_tscdeadline(self, value: int) -> None:
        """An ``IA32_TSC_DEADLINE`` write (KVM ``kvm_set_lapic_tscdeadline_msr``)."""
        if self.mode != APIC_LVT_TIMER_TSCDEADLINE:
            return
        self._mux.cancel(self)
        self.tscdeadline = value
        if value == 0:
            self.target_ns = None
            return
        due = self._config.tsc_to_ns(value)
        now = self._now_ns()
        self.target_ns = due
        if due <= now:
            self.expire(due, now)
        else:
            self._mux.arm(self, due)

    # --- expiry ---------------------------------------------------------------------
    def expire(self, due_ns: int, now_ns: int) -> None:
        """The multiplexer's callback: restart if periodic, then raise the LVT timer interrupt."""
        self.expirations += 1
        self.last_due_ns = due_ns
        mode = self.mode
        if mode == APIC_LVT_TIMER_PERIODIC:
            period = self.period_ns
            nxt = due_ns + period
            if nxt <= now_ns:
                nxt = self._late_next(due_ns, now_ns, period)
            self.target_ns = nxt
            self._mux.arm(self, nxt)
        elif mode == APIC_LVT_TIMER_TSCDEADLINE:
            self.tscdeadline = 0
            self.target_ns = None
        self._lapic.deliver_timer_interrupt()

    def _late_next(self, due_ns: int, now_ns: int, period: int) -> int:
        """Next expiry of a periodic timer handled after its next period began."""
        policy = self._config.missed_tick_policy
        if policy is _ONE_LATE_TICK:
            self.missed_ticks += (now_ns - due_ns) // period
            return now_ns + period
        if policy is _NO_MISSED_TICKS_PENDING:
            missed = (now_ns - due_ns) // period
            self.missed_ticks += missed
            return due_ns + (missed + 1) * period
        return due_ns + period  # DELIVER_ALL: the multiplexer fires it again at once

    def _period_ns(self) -> int:
        ns = self.tmict * self._config.bus_cycle_ns * self.divisor
        if self.mode == APIC_LVT_TIMER_PERIODIC:
            ns = max(ns, self._config.min_period_ns)
        return ns
