"""The second-level page walk (VT-d spec 3.7, 9.8): the readable reference.

The accelerated twin is ``_walk_c.pyx``; :mod:`iovirt.vtd.walk` picks one.
:func:`walk_second_level` is self-contained (guest memory in, plain ints
out) so that the C twin replaces it one for one.  Permissions
are the AND of R/W over every level; an entry with R and W both clear is not
present and ends the walk with no permission (the caller turns that into a
read or write fault); reserved bits are checked only in present entries.
"""

from __future__ import annotations

from iovirt.memory import GuestMemoryError, GuestMemory
from iovirt.vtd.errors import WalkError
from iovirt.vtd.faults import FR_CONTEXT_INVALID, FR_PAGING_ENTRY_INVALID, FR_PAGING_ENTRY_RSVD
from iovirt.vtd.regs import ADDR_MASK, PAGE_SHIFT
from iovirt.vtd.tables import (
    PTE_PERM,
    PTE_PS,
    PTE_RSVD_LEAF_1G,
    PTE_RSVD_LEAF_2M,
    PTE_RSVD_LEAF_4K,
    PTE_RSVD_NONLEAF,
)

#: Reserved bits of a PS=1 entry by level; level 4 has no large leaves (PS reserved).
_LARGE_RSVD = {2: PTE_RSVD_LEAF_2M, 3: PTE_RSVD_LEAF_1G}

IMPLEMENTATION = "python"


def walk_second_level(mem: GuestMemory, slptptr: int, levels: int, iova: int) -> tuple[int, int, int]:
    """Translate ``iova`` through a ``levels``-deep table at ``slptptr``.

    Returns ``(leaf_gpa, leaf_shift, perm)``: the guest-physical base of the
    leaf page, log2 of its size (12, 21 or 30) and the effective R/W bits
    (0 when some level is not present).  Raises :class:`WalkError` for an
    inaccessible table or reserved bits.  The caller checks the width.
    """
    table = slptptr
    perm = PTE_PERM
    for level in range(levels, 0, -1):
        shift = PAGE_SHIFT + 9 * (level - 1)
        entry_addr = table + ((iova >> shift) & 0x1FF) * 8
        try:
            entry = mem.read_u64(entry_addr)
        except GuestMemoryError:
            # The top table is reached through the context entry's SLPTPTR (FR 3).
            raise WalkError(
                FR_CONTEXT_INVALID if level == levels else FR_PAGING_ENTRY_INVALID, level, entry_addr
            ) from None
        present = entry & PTE_PERM
        if not present:
            return 0, shift, 0
        perm &= present
        if level == 1:
            if entry & PTE_RSVD_LEAF_4K:
                raise WalkError(FR_PAGING_ENTRY_RSVD, level, entry_addr)
            return entry & ADDR_MASK, shift, perm
        if entry & PTE_PS:
            rsvd = _LARGE_RSVD.get(level)
            if rsvd is None or entry & rsvd:
                raise WalkError(FR_PAGING_ENTRY_RSVD, level, entry_addr)
            return entry & ADDR_MASK, shift, perm
        if entry & PTE_RSVD_NONLEAF:
            raise WalkError(FR_PAGING_ENTRY_RSVD, level, entry_addr)
        table = entry & ADDR_MASK
    raise AssertionError("unreachable: level 1 always returns")


class TableWalker:
    """``walk(slptptr, levels, iova) -> (leaf_gpa, leaf_shift, perm)`` over ``memory``."""

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory

    def walk(self, slptptr: int, levels: int, iova: int) -> tuple[int, int, int]:
        """Translate ``iova`` through a ``levels``-deep table at ``slptptr`` (see :func:`walk_second_level`)."""
        return walk_second_level(self.memory, slptptr, levels, iova)
