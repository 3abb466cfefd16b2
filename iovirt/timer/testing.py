"""Test utilities: a controllable clock and a host timer that only records.

Shipped in the package (as rust-vmm ships its queue mock) so tests of other
layers -- the platform, the bench -- can drive vLAPIC timers deterministically.
"""

from __future__ import annotations

from iovirt.timer.mux import TimerMultiplexer


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, start_ns: int = 1_000_000_000) -> None:
        self._now = start_ns

    def now_ns(self) -> int:
        """The current fake time."""
        return self._now

    def set(self, now_ns: int) -> None:
        """Move the clock to ``now_ns`` (never backwards: it is monotonic)."""
        if now_ns < self._now:
            raise ValueError(f"fake monotonic clock cannot go back from {self._now} to {now_ns}")
        self._now = now_ns

    def advance(self, delta_ns: int) -> None:
        """Move the clock forward by ``delta_ns``."""
        self.set(self._now + delta_ns)


class FakeHostTimer:
    """A host timer that records where it is armed instead of firing."""

    def __init__(self) -> None:
        self.armed_at: int | None = None
        self.arm_count = 0

    def arm(self, deadline_ns: int | None) -> None:
        self.armed_at = deadline_ns
        if deadline_ns is not None:
            self.arm_count += 1

    def fileno(self) -> int:
        return -1

    def acknowledge(self) -> int:
        return 0

    def close(self) -> None:
        self.armed_at = None


def fake_multiplexer(start_ns: int = 1_000_000_000) -> tuple[TimerMultiplexer, FakeClock]:
    """A multiplexer on a :class:`FakeClock` with a :class:`FakeHostTimer`."""
    clock = FakeClock(start_ns)
    return TimerMultiplexer(clock, FakeHostTimer()), clock


def run_until(mux: TimerMultiplexer, clock: FakeClock, end_ns: int) -> int:
    """Advance ``clock`` to ``end_ns`` firing the host timer at each armed deadline.

    This is what the real event loop does with a perfectly punctual timerfd.
    Returns the number of expirations.
    """
    timer = mux.host_timer
    if not isinstance(timer, FakeHostTimer):
        raise TypeError(f"run_until drives a FakeHostTimer, not {type(timer).__name__}")
    fired = 0
    while True:
        armed = timer.armed_at
        if armed is None or armed > end_ns:
            break
        clock.set(max(armed, clock.now_ns()))
        fired += mux.dispatch()
    clock.set(end_ns)
    return fired
