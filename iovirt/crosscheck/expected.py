"""Expected differences: where QEMU's model departs from the spec and iovirt keeps the spec's behaviour.

Each entry names the register bits that differ, the operation that shows
them, what the spec says (in our own words, with its section) and why the
difference is QEMU's.  A mismatching read is *expected* only when every bit
that differs lies in an entry's bits for that register; any other differing
bit is an unexplained mismatch.  The report counts the two separately.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExpectedDifference:
    """QEMU deviates from the spec in ``bits`` of the ``size``-byte register at ``offset`` of ``space``."""

    area: str
    space: str
    offset: int
    size: int
    bits: int
    operation: str
    spec: str
    reason: str
    condition: str = ""
    """Applies only when the area reports this condition for the read (e.g. ``after-reset``: a
    Function Level Reset earlier in the sequence); empty: always."""

    def covers(self, space: str, byte_offset: int, byte_bits: int) -> bool:
        """Whether the differing ``byte_bits`` of the byte at ``byte_offset`` are within this entry."""
        if space != self.space or not self.offset <= byte_offset < self.offset + self.size:
            return False
        mine = (self.bits >> (8 * (byte_offset - self.offset))) & 0xFF
        return byte_bits & ~mine == 0


def explain_read(
    table: tuple[ExpectedDifference, ...],
    space: str,
    offset: int,
    size: int,
    qemu: int,
    iovirt: int,
    conditions: frozenset[str] = frozenset(),
) -> ExpectedDifference | None:
    """The entry explaining every differing bit of a read, or None (an unexplained mismatch).

    Entries with a ``condition`` apply only when it is in ``conditions``.  A read whose differing bytes
    need two different entries is explained by the first.
    """
    table = tuple(e for e in table if not e.condition or e.condition in conditions)
    diff = qemu ^ iovirt
    found: ExpectedDifference | None = None
    for k in range(size):
        byte_bits = (diff >> (8 * k)) & 0xFF
        if not byte_bits:
            continue
        entry = next((e for e in table if e.covers(space, offset + k, byte_bits)), None)
        if entry is None:
            return None
        found = found or entry
    return found
