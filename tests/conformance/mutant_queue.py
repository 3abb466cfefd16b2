"""Blk mutants that change what the driver made available, for the conformance mutant tests.

A mutant that edits the available chains once, before ``process_queue``,
races the device's pop loop: a request completed inside the loop is seen
used at once, and the driver's next request is popped by the same loop,
unchanged.  :class:`MutantBlk` makes its change just before each pop.
"""

from __future__ import annotations

from typing import Any, Callable

from iovirt.virtio.blk.device import VirtioBlk
from iovirt.virtio.defs import VIRTQ_DESC_F_NEXT
from iovirt.virtio.queue import QueueWrapper


def available_chains(queue) -> list[list[tuple[int, int, int]]]:
    """The (addr, len, flags) descriptors of each chain the driver made available and the device has not taken
    (split rings; an indirect descriptor is listed as it is, not followed)."""
    state, memory = queue.state(), queue.memory
    chains, i = [], state.last_avail_idx
    while i != memory.read_u16(state.avail_addr + 2):
        desc, chain = memory.read_u16(state.avail_addr + 4 + 2 * (i % state.size)), []
        for _ in range(state.size):
            at = state.desc_addr + 16 * desc
            chain.append((memory.read_u64(at), memory.read_u32(at + 8), memory.read_u16(at + 12)))
            if not chain[-1][2] & VIRTQ_DESC_F_NEXT:
                break
            desc = memory.read_u16(at + 14)
        chains.append(chain)
        i = (i + 1) & 0xFFFF
    return chains


class MutatesBeforePop(QueueWrapper):
    """The device's queue, with a mutant's change made to each available chain just before each pop.

    ``mutate(queue, chain)`` changes one chain (its ``(addr, len, flags)``
    descriptors); False means the device refused the ring (it called
    ``fail``) and nothing is popped.  No more chains are popped than were
    looked at, so a chain published after the look waits for the next.
    """

    def __init__(self, inner, mutate: Callable[[Any, list[tuple[int, int, int]]], bool]) -> None:
        self.inner = inner
        self._mutate = mutate

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def pop_batch(self, max_chains: int, batch: Any = None) -> Any:
        chains = available_chains(self.inner)
        if not all(self._mutate(self.inner, chain) for chain in chains):
            return self.inner.pop_batch(0, batch)
        return self.inner.pop_batch(min(max_chains, len(chains)), batch)


class MutantBlk(VirtioBlk):
    """A blk device whose :meth:`mutate` changes each available chain before the device pops it."""

    def mutate(self, queue, chain: list[tuple[int, int, int]]) -> bool:
        raise NotImplementedError

    def process_queue(self, index, queue):
        super().process_queue(index, MutatesBeforePop(queue, self.mutate))
