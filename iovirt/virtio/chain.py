"""A popped descriptor chain, and copying data in and out of one."""

from __future__ import annotations

from typing import Iterator

from iovirt.memory import GuestMemory
from iovirt.virtio._queue_checks import USED_LEN_MAX, batch_used_len


class DescChain:
    """One available chain as the device sees it (2.7.5).

    ``buffers`` lists ``(addr, len, writable)`` per descriptor in chain order,
    indirect tables already expanded; device-readable buffers come first.
    ``used_len`` is what the device reports in the used ring when it pushes
    this chain with ``push_batch``.
    """

    __slots__ = ("head", "buffers", "used_len")

    def __init__(self, head: int, buffers: list[tuple[int, int, bool]]) -> None:
        self.head = head
        self.buffers = buffers
        self.used_len = 0

    @property
    def readable(self) -> list[tuple[int, int]]:
        """``(addr, len)`` of the device-readable buffers."""
        return [(a, n) for a, n, w in self.buffers if not w]

    @property
    def writable(self) -> list[tuple[int, int]]:
        """``(addr, len)`` of the device-writable buffers."""
        return [(a, n) for a, n, w in self.buffers if w]

    @property
    def readable_len(self) -> int:
        """Total bytes the device may read."""
        return sum(n for _, n, w in self.buffers if not w)

    @property
    def writable_len(self) -> int:
        """Total bytes the device may write."""
        return sum(n for _, n, w in self.buffers if w)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DescChain) and (self.head, self.buffers) == (other.head, other.buffers)

    def __repr__(self) -> str:
        return f"DescChain(head={self.head}, buffers={self.buffers!r})"


def read_chain(memory: GuestMemory, chain: DescChain, limit: int | None = None) -> bytes:
    """Gather the chain's readable bytes (at most ``limit``)."""
    parts = []
    left = chain.readable_len if limit is None else limit
    for addr, length in chain.readable:
        if left <= 0:
            break
        n = min(length, left)
        parts.append(memory.read(addr, n))
        left -= n
    return b"".join(parts)


def write_chain(memory: GuestMemory, chain: DescChain, data: bytes | memoryview) -> int:
    """Scatter ``data`` over the chain's writable buffers; returns bytes written."""
    src = memoryview(data)
    pos = 0
    for addr, length in chain.writable:
        if pos >= len(src):
            break
        n = min(length, len(src) - pos)
        memory.write(addr, src[pos : pos + n])
        pos += n
    return pos


class ChainBatch:
    """Chains popped in one ``pop_batch`` call (the reference implementation's batch).

    The accelerated queue has its own batch type with the same interface:
    ``len()``, indexing and iteration give :class:`DescChain`; ``head(i)``;
    ``set_used_len(i, n)``.
    """

    __slots__ = ("chains",)

    def __init__(self, chains: list[DescChain]) -> None:
        self.chains = chains

    def __len__(self) -> int:
        return len(self.chains)

    def __getitem__(self, i: int) -> DescChain:
        return self.chains[i]

    def __iter__(self) -> Iterator[DescChain]:
        return iter(self.chains)

    def head(self, i: int) -> int:
        """Head descriptor index of chain ``i``."""
        return self.chains[i].head

    def set_used_len(self, i: int, length: int) -> None:
        """Bytes the device wrote into chain ``i`` (reported in the used ring)."""
        chain = self.chains[i]
        if not 0 <= length <= USED_LEN_MAX:
            raise batch_used_len(length)
        chain.used_len = length
