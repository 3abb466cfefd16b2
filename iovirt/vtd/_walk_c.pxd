# The C-level interface of the page walk, for the C miss path (_dma_c) and any other Cython code
# that walks second-level tables with the GIL held.

from libc.stdint cimport uint8_t, uint64_t


cdef struct HostRange:
    uint64_t gpa
    uint64_t size
    const uint8_t *host


# TableWalker._walk's answer: the leaf on success (perm 0: not present), or where it failed.
cdef struct WalkResult:
    uint64_t leaf       # guest-physical base of the leaf page
    int shift           # log2 of the leaf size: 12, 21 or 30
    uint64_t perm       # effective R/W bits
    int level           # on a fault: the level whose entry failed
    uint64_t entry_addr # on a fault: that entry's address


cdef class TableWalker:
    cdef object memory
    cdef const unsigned long long[::1] _gen_cell  # RegionTable.generation_cell
    cdef unsigned long long _gen
    cdef bint _resolved
    cdef HostRange *_ranges
    cdef int _nranges, _last
    cdef bint _direct

    cdef int _resolve(self) except -1
    cdef bint _load(self, uint64_t gpa, uint64_t *value) noexcept
    cdef int _walk(self, uint64_t slptptr, int levels, uint64_t iova, WalkResult *out) except -1
