"""The one host timer: a Linux ``timerfd`` armed at an absolute deadline.

``timerfd_create(CLOCK_MONOTONIC)`` gives a file descriptor that becomes
readable when the timer expires (timerfd_create(2)), so the multiplexer's
timer sits in the same selector/epoll loop as the vhost-user control socket.
Python 3.11 has no ``os.timerfd_*`` (added in 3.13), hence ctypes.
"""

from __future__ import annotations

import ctypes
import os
from typing import Protocol

from iovirt.timer.errors import HostTimerError

CLOCK_MONOTONIC = 1
TFD_NONBLOCK = os.O_NONBLOCK
TFD_CLOEXEC = os.O_CLOEXEC
TFD_TIMER_ABSTIME = 1


class HostTimer(Protocol):
    """A one-shot host timer the multiplexer re-arms at its earliest deadline."""

    arm_count: int

    def arm(self, deadline_ns: int | None) -> None:
        """Fire at absolute monotonic time ``deadline_ns``; ``None`` disarms."""
        ...

    def fileno(self) -> int:
        """A descriptor that is readable once the timer has fired, or -1."""
        ...

    def acknowledge(self) -> int:
        """Consume a pending expiry; return how many expirations were pending."""
        ...

    def close(self) -> None:
        """Release the timer."""
        ...


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_libc = ctypes.CDLL(None, use_errno=True)
_timerfd_create = _libc.timerfd_create
_timerfd_create.argtypes = (ctypes.c_int, ctypes.c_int)
_timerfd_create.restype = ctypes.c_int
_timerfd_settime = _libc.timerfd_settime
_timerfd_settime.argtypes = (
    ctypes.c_int,
    ctypes.c_int,
    ctypes.POINTER(_Itimerspec),
    ctypes.POINTER(_Itimerspec),
)
_timerfd_settime.restype = ctypes.c_int


class TimerFd:
    """A non-blocking ``CLOCK_MONOTONIC`` timerfd armed with absolute deadlines.

    ``open_count`` counts the TimerFds alive in this process, so a benchmark
    can show how many host timers exist.
    """

    open_count = 0

    def __init__(self) -> None:
        fd = _timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise HostTimerError("timerfd_create", err, os.strerror(err))
        self._fd = fd
        # One preallocated itimerspec: re-arming happens on every expiry batch.
        self._spec = _Itimerspec()
        self._spec_ref = ctypes.byref(self._spec)
        self.arm_count = 0
        TimerFd.open_count += 1

    def arm(self, deadline_ns: int | None) -> None:
        """Arm at absolute ``CLOCK_MONOTONIC`` time ``deadline_ns``, or disarm."""
        value = self._spec.it_value
        if deadline_ns is None:
            value.tv_sec = value.tv_nsec = 0  # an all-zero it_value disarms
        else:
            # All zero would disarm; a deadline at or before 0 means "now".
            sec, nsec = divmod(max(deadline_ns, 1), 1_000_000_000)
            value.tv_sec = sec
            value.tv_nsec = nsec
            self.arm_count += 1
        if _timerfd_settime(self._fd, TFD_TIMER_ABSTIME, self._spec_ref, None) < 0:
            err = ctypes.get_errno()
            raise HostTimerError("timerfd_settime", err, os.strerror(err))

    def fileno(self) -> int:
        """The timerfd, for a selector or epoll."""
        return self._fd

    def acknowledge(self) -> int:
        """Read the expiration count (0 when the fd was not readable)."""
        try:
            return int.from_bytes(os.read(self._fd, 8), "little")
        except BlockingIOError:
            return 0

    def close(self) -> None:
        """Close the timerfd (idempotent)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            TimerFd.open_count -= 1

    def __enter__(self) -> "TimerFd":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
