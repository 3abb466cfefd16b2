"""Operations both sides run, their replayable text form, and shrinking a failing sequence.

An :class:`Op` is one access (``r`` read, ``w`` write, or an area-specific
kind such as MSI-X's ``fire``); running a sequence gives one observation per
op (the value read, the messages delivered, or ``None``).  Its text form is
one line, ``KIND SPACE OFFSET SIZE [VALUE]``, which :func:`parse_ops` reads
back, so a printed minimal sequence can be replayed with
``iovirt crosscheck --area A --replay FILE``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from iovirt.errors import IovirtError


class ReplayFormatError(IovirtError):
    """A line of a replay file is not ``KIND SPACE OFFSET SIZE [VALUE]``."""

    def __init__(self, line: str) -> None:
        self.line = line
        super().__init__(f"replay line {line!r} is not 'KIND SPACE OFFSET SIZE [VALUE]'")


@dataclass(frozen=True)
class Op:
    """One access: ``kind`` (``r``, ``w`` or area-specific), address ``space``, ``offset``, ``size``, ``value``."""

    kind: str
    space: str
    offset: int
    size: int
    value: int = 0

    def __str__(self) -> str:
        text = f"{self.kind} {self.space} {self.offset:#x} {self.size}"
        return text if self.kind == "r" else f"{text} {self.value:#x}"


def parse_ops(text: str) -> list[Op]:
    """Parse lines written by ``str(Op)``; ``#`` starts a comment."""
    ops = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) not in (4, 5):
            raise ReplayFormatError(raw)
        try:
            value = int(fields[4], 0) if len(fields) == 5 else 0
            ops.append(Op(fields[0], fields[1], int(fields[2], 0), int(fields[3], 0), value))
        except ValueError:
            raise ReplayFormatError(raw) from None
    return ops


def shrink(ops: Sequence[Op], fails: Callable[[Sequence[Op]], bool]) -> list[Op]:
    """Drop operations one at a time while ``fails`` still holds; ``ops[-1]`` (the failing read) stays.

    Repeats passes until a pass removes nothing, so the result is 1-minimal:
    removing any single remaining operation makes the failure go away.
    """
    current = list(ops)
    changed = True
    while changed:
        changed = False
        i = len(current) - 2
        while i >= 0:
            candidate = current[:i] + current[i + 1 :]
            if fails(candidate):
                current = candidate
                changed = True
            i -= 1
    return current
