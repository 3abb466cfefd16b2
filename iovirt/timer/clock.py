"""Clock sources for the timer multiplexer.

A clock is any object with ``now_ns() -> int`` on the host's monotonic time
line.  :class:`MonotonicClock` reads ``CLOCK_MONOTONIC``, the clock the
:class:`~iovirt.timer.hosttimer.TimerFd` is armed against;
:class:`iovirt.timer.testing.FakeClock` is the controllable one for tests.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """A monotonic nanosecond time source."""

    def now_ns(self) -> int:
        """The current time in nanoseconds."""
        ...


class MonotonicClock:
    """The host's ``CLOCK_MONOTONIC`` (``time.monotonic_ns``)."""

    now_ns = staticmethod(time.monotonic_ns)
