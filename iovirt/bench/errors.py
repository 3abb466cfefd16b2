"""Errors of the packet bench.

The bench plays the guest driver against devices it does not trust: a back-end
that answers nonsense, closes its socket, hangs, or writes garbage into a used
ring ends the affected call with one of these, never with a hang (every wait
is bounded) or an unrelated exception.
"""

from __future__ import annotations

from iovirt.errors import IovirtError


class BenchError(IovirtError):
    """Root of the bench's errors."""


class BenchTimeout(BenchError):
    """The device did not complete what was asked within the timeout.

    ``where`` names what was waited on (a port's queue, a capture port), ``wanted``/``got`` count what was
    expected and what arrived, ``timeout`` is the bound in seconds, and
    ``frames`` holds whatever frames did arrive (for ``recv``).
    """

    def __init__(self, what: str, where: str, wanted: int, got: int, timeout: float, frames: list | None = None) -> None:
        super().__init__(f"{where}: {what}: {got} of {wanted} within {timeout:g} s")
        self.where = where
        self.wanted = wanted
        self.got = got
        self.timeout = timeout
        self.frames = frames or []


class TargetError(BenchError):
    """The device behind the bench cannot be driven: unreachable, closed, or speaking nonsense.

    ``target`` names it (a socket path, or ``in-process``).
    """

    def __init__(self, target: str, message: str) -> None:
        super().__init__(f"{target}: {message}")
        self.target = target


class UsedRingError(BenchError):
    """The device wrote something impossible into a used ring (or a received header).

    ``queue`` is the queue index; the message says what was found and what the
    spec allows.
    """

    def __init__(self, queue: int, message: str) -> None:
        super().__init__(f"queue {queue}: {message}")
        self.queue = queue
