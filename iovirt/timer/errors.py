"""Errors raised on purpose by :mod:`iovirt.timer`.

Guest accesses never raise (they are ignored, recorded in ESR, or reported as a
#GP result); these cover the host side: a bad configuration or a failing
host-timer system call.
"""

from __future__ import annotations

from iovirt.errors import IovirtError


class TimerError(IovirtError):
    """Root of the timer/APIC package's exceptions."""


class ApicConfigError(TimerError):
    """A VM's APIC/timer configuration value is out of range."""

    def __init__(self, field: str, value: object, expected: str) -> None:
        self.field = field
        self.value = value
        self.expected = expected
        super().__init__(f"APIC config {field}={value!r} is invalid: expected {expected}")


class HostTimerError(TimerError):
    """A host timer system call (timerfd_create/timerfd_settime) failed."""

    def __init__(self, operation: str, errno: int, detail: str) -> None:
        self.operation = operation
        self.errno = errno
        super().__init__(f"host timer {operation} failed with errno {errno} ({detail})")
