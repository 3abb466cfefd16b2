"""The single-producer, single-consumer hand-off ring between two data-plane workers: the reference.

The readable twin of ``_handoff_c.pyx`` (whose docstring explains the
ordering argument).  Here every index read and write is one bytecode-level
attribute access, atomic under the interpreter lock, which gives the same
order as the C twin's sequentially consistent atomics.
"""

from __future__ import annotations

from typing import Any

FULL = 0
PUSHED = 1
WAS_EMPTY = 2


class HandoffRing:
    """A bounded SPSC ring of Python objects; ``capacity`` must be a power of two.

    :meth:`push` returns ``FULL`` (0, nothing taken), ``PUSHED`` (1) or
    ``WAS_EMPTY`` (2: the consumer may be asleep, wake it); :meth:`pop`
    returns the oldest item or ``None``.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 2 or capacity & (capacity - 1):
            raise ValueError(f"hand-off ring capacity must be a power of two of at least 2, got {capacity}")
        self.capacity = capacity
        self._mask = capacity - 1
        self._slots: list[Any] = [None] * capacity
        self.head = 0  # written by the producer only
        self.tail = 0  # written by the consumer only

    def push(self, item: Any) -> int:
        """Append ``item`` (producer side only); FULL, PUSHED or WAS_EMPTY."""
        head = self.head
        if head - self.tail >= self.capacity:
            return FULL
        self._slots[head & self._mask] = item
        self.head = head + 1
        return WAS_EMPTY if self.tail == head else PUSHED

    def pop(self) -> Any:
        """The oldest item (consumer side only), or ``None`` when the ring is empty."""
        tail = self.tail
        if tail == self.head:
            return None
        item = self._slots[tail & self._mask]
        self._slots[tail & self._mask] = None
        self.tail = tail + 1
        return item

    def __len__(self) -> int:
        return self.head - self.tail
