# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The second-level page walk in C: the accelerated twin of ``_walk_py.py``; :mod:`iovirt.vtd.walk` picks one.

Same rules, same results, same :class:`~iovirt.vtd.errors.WalkError`\\ s (VT-d
spec 3.7, 9.8); read that one first.  Table entries are read through a C
copy of the memory's region table (re-made when the memory map changes), so
an IOTLB miss costs a few loads instead of a Python read per level.  An entry
the copy cannot serve (it straddles regions, or a translator sits in front
of the memory) is read through :class:`~iovirt.memory.GuestMemory`.

The copy holds no buffer exports of the regions (the unit lives as long as
the memory and must not keep a region from closing): it is valid while the
memory's generation is unchanged, which every walk checks first.  Regions
are removed from the map before they are closed, and walks run under the
GIL, so a walk never reads a closed region.
"""

from libc.stdint cimport uint8_t, uint64_t
from libc.string cimport memcpy
from cpython.mem cimport PyMem_Realloc, PyMem_Free

from iovirt.memory import GuestMemoryError
from iovirt.vtd.faults import FR_CONTEXT_INVALID, FR_PAGING_ENTRY_INVALID, FR_PAGING_ENTRY_RSVD
from iovirt.vtd.regs import ADDR_MASK as _ADDR_MASK, PAGE_SHIFT as _PAGE_SHIFT
from iovirt.vtd.tables import (
    PTE_PERM as _PTE_PERM,
    PTE_PS as _PTE_PS,
    PTE_RSVD_LEAF_1G as _RSVD_1G,
    PTE_RSVD_LEAF_2M as _RSVD_2M,
    PTE_RSVD_LEAF_4K as _RSVD_4K,
    PTE_RSVD_NONLEAF as _RSVD_NONLEAF,
)
from iovirt.vtd.errors import WalkError

cdef uint64_t ADDR_MASK = _ADDR_MASK
cdef uint64_t PTE_PERM = _PTE_PERM
cdef uint64_t PTE_PS = _PTE_PS
cdef uint64_t RSVD_4K = _RSVD_4K
cdef uint64_t RSVD_2M = _RSVD_2M
cdef uint64_t RSVD_1G = _RSVD_1G
cdef uint64_t RSVD_NONLEAF = _RSVD_NONLEAF
cdef int PAGE_SHIFT = _PAGE_SHIFT
cdef int C_FR_CONTEXT_INVALID = FR_CONTEXT_INVALID
cdef int C_FR_PAGING_ENTRY_INVALID = FR_PAGING_ENTRY_INVALID
cdef int C_FR_PAGING_ENTRY_RSVD = FR_PAGING_ENTRY_RSVD

IMPLEMENTATION = "cython"


cdef class TableWalker:
    """``walk(slptptr, levels, iova) -> (leaf_gpa, leaf_shift, perm)`` over ``memory``.

    Cython code calls ``_walk`` (declared in ``_walk_c.pxd``), which reports a
    fault by its reason code instead of raising.
    """

    def __init__(self, memory):
        self.memory = memory
        self._gen_cell = memory.region_table.generation_cell
        self._resolved = False

    def __dealloc__(self):
        PyMem_Free(self._ranges)

    cdef int _resolve(self) except -1:
        cdef const uint8_t[::1] view
        cdef void *p
        gen = self._gen_cell[0]  # before the regions: a change while copying shows next walk
        regions = self.memory.regions
        p = PyMem_Realloc(self._ranges, (len(regions) + 1) * sizeof(HostRange))
        if p == NULL:
            raise MemoryError()
        self._ranges = <HostRange *> p
        for i, region in enumerate(regions):
            view = region.view
            self._ranges[i].gpa = region.gpa
            self._ranges[i].size = region.size
            self._ranges[i].host = &view[0]
        self._nranges = len(regions)
        self._last = 0
        self._direct = self.memory.translator is None
        self._gen = gen
        self._resolved = True
        return 0

    cdef bint _load(self, uint64_t gpa, uint64_t *value) noexcept:
        cdef HostRange *r
        cdef uint64_t off
        cdef int i
        if self._direct and self._nranges:
            r = &self._ranges[self._last]
            off = gpa - r.gpa
            if not (off < r.size and 8 <= r.size - off):
                for i in range(self._nranges):
                    r = &self._ranges[i]
                    off = gpa - r.gpa
                    if off < r.size and 8 <= r.size - off:
                        self._last = i
                        break
                else:
                    r = NULL
            if r != NULL:
                memcpy(value, r.host + off, 8)
                return True
        try:
            value[0] = self.memory.read_u64(gpa)
        except GuestMemoryError:
            return False
        return True

    def walk(self, uint64_t slptptr, int levels, uint64_t iova):
        """Translate ``iova`` through a ``levels``-deep table at ``slptptr`` (see ``walk_second_level``)."""
        cdef WalkResult r
        cdef int reason = self._walk(slptptr, levels, iova, &r)
        if reason:
            raise WalkError(reason, r.level, r.entry_addr)
        return r.leaf, r.shift, r.perm

    cdef int _walk(self, uint64_t slptptr, int levels, uint64_t iova, WalkResult *out) except -1:
        """The walk: 0 with the leaf in ``*out`` (``perm`` 0: not present), or the fault
        reason (FR code) with ``out.level`` and ``out.entry_addr`` saying where."""
        cdef uint64_t table = slptptr, perm = PTE_PERM, entry, present, entry_addr, rsvd
        cdef int level, shift
        # The table's counter through a pointer, not GuestMemory.generation: that is a Python
        # property, whose call cost more than the rest of the walk.  A view's translator is fixed.
        if not self._resolved or self._gen_cell[0] != self._gen:
            self._resolve()
        for level in range(levels, 0, -1):
            shift = PAGE_SHIFT + 9 * (level - 1)
            entry_addr = table + ((iova >> shift) & 0x1FF) * 8
            out.level = level
            out.entry_addr = entry_addr
            if not self._load(entry_addr, &entry):
                # The top table is reached through the context entry's SLPTPTR (FR 3).
                return C_FR_CONTEXT_INVALID if level == levels else C_FR_PAGING_ENTRY_INVALID
            out.shift = shift
            present = entry & PTE_PERM
            if not present:
                out.leaf = 0
                out.perm = 0
                return 0
            perm &= present
            if level == 1:
                if entry & RSVD_4K:
                    return C_FR_PAGING_ENTRY_RSVD
                out.leaf = entry & ADDR_MASK
                out.perm = perm
                return 0
            if entry & PTE_PS:
                # Level 4 has no large leaves: PS is reserved there.
                rsvd = RSVD_2M if level == 2 else RSVD_1G if level == 3 else <uint64_t> 0xFFFFFFFFFFFFFFFF
                if entry & rsvd:
                    return C_FR_PAGING_ENTRY_RSVD
                out.leaf = entry & ADDR_MASK
                out.perm = perm
                return 0
            if entry & RSVD_NONLEAF:
                return C_FR_PAGING_ENTRY_RSVD
            table = entry & ADDR_MASK
        raise AssertionError("unreachable: level 1 always returns")
