# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""A translation cache in C, and a translator base class built on it (accelerated build).

The reference twin is ``_iotlb_py.py``; :mod:`iovirt.virtio.iotlb` picks one.

:class:`IotlbCache` maps IOVA pages to guest-physical pages with R/W
permissions.  An entry is one 4 KiB page or one 2 MiB / 1 GiB leaf (VT-d
super-pages, spec 3.7.1), kept as one entry, as the hardware's IOTLB does.
It is an open-addressing hash (linear probing, backward-shift deletion) of
at most ``capacity`` entries in twice as many slots; inserting into a full
cache empties it first, which a cache may always do (nobody may rely on an
entry staying cached).

Lookups run without the GIL (the ring's batch loop) while another thread may
insert or invalidate under the GIL: a sequence counter (seqlock) around every
change makes a lookup that raced with a writer report a miss, and the miss
path takes the GIL, which orders it after the writer.  So a translation that
was invalidated is never served once the invalidation has returned, except to
a lookup already past its check (a DMA in flight).

:class:`CachedTranslator` is an :class:`iovirt.memory.Translator` whose
``translate`` serves hits from its cache and hands misses to ``fill``, a
Python-level method that subclasses implement: walk the tables or ask for the
mapping, insert what it learnt into ``self.cache``, and return the pieces (or
raise ``TranslationFault`` / ``TranslationPending``).  The accelerated ring
calls :meth:`CachedTranslator.resolve` in C.
"""

import logging

from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memset
from cpython.mem cimport PyMem_Malloc, PyMem_Free

from iovirt.memory import Access, GuestMemoryError, TranslationPending

log = logging.getLogger(__name__)

IMPLEMENTATION = "cython"

#: Leaf sizes an entry may have: 4 KiB, 2 MiB, 1 GiB (size classes 0, 1, 2).
PAGE_SIZES = (1 << 12, 1 << 21, 1 << 30)
_U64_MAX = (1 << 64) - 1
DEFAULT_CAPACITY = 4096

cdef extern from *:
    """
    static inline uint64_t iovirt_seq_load_acquire(const uint64_t *p) {
        return __atomic_load_n(p, __ATOMIC_ACQUIRE);
    }
    static inline uint64_t iovirt_seq_load_relaxed(const uint64_t *p) {
        return __atomic_load_n(p, __ATOMIC_RELAXED);
    }
    static inline void iovirt_seq_store_relaxed(uint64_t *p, uint64_t v) {
        __atomic_store_n(p, v, __ATOMIC_RELAXED);
    }
    static inline void iovirt_seq_store_release(uint64_t *p, uint64_t v) {
        __atomic_store_n(p, v, __ATOMIC_RELEASE);
    }
    static inline void iovirt_fence_acquire(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }
    static inline void iovirt_fence_release(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }
    """
    uint64_t iovirt_seq_load_acquire(const uint64_t *p) nogil
    uint64_t iovirt_seq_load_relaxed(const uint64_t *p) nogil
    void iovirt_seq_store_relaxed(uint64_t *p, uint64_t v) nogil
    void iovirt_seq_store_release(uint64_t *p, uint64_t v) nogil
    void iovirt_fence_acquire() nogil
    void iovirt_fence_release() nogil

cdef enum:
    PERM_MASK = 3
    LOW_MASK = 0xFFF
    CLASS_MASK = 3

cdef int[3] _SHIFT = [12, 21, 30]
cdef object _READ = Access.READ
cdef object _WRITE = Access.WRITE


cdef inline uint64_t _home(uint64_t tag, uint64_t mask, int bits) noexcept nogil:
    # Fibonacci hashing: neighbouring pages spread over the table.
    return ((tag * <uint64_t> 0x9E3779B97F4A7C15) >> (64 - bits)) & mask


cdef inline uint64_t _entry_size(uint64_t tag) noexcept nogil:
    return (<uint64_t> 1) << _SHIFT[(tag & CLASS_MASK) - 1]


cdef class IotlbCache:
    """IOVA page -> (GPA page, permission) entries, looked up in C without the GIL.

    ``insert(iova, gpa, size, perm)`` adds one leaf (``size`` in
    :data:`PAGE_SIZES`, both addresses aligned to it, ``perm`` a mask of
    :class:`~iovirt.memory.Access` bits); ``lookup`` returns the contiguous
    run a range starts with; ``invalidate(iova, size)`` drops every entry
    overlapping the range; ``invalidate_all`` drops everything.
    ``hits``/``misses`` count lookups.
    """

    def __cinit__(self, Py_ssize_t capacity=DEFAULT_CAPACITY):
        if capacity < 1:
            raise ValueError(f"IOTLB capacity {capacity} must be at least 1")
        self._bits = 1
        while (<Py_ssize_t> 1 << self._bits) < 2 * capacity:
            self._bits += 1
        self._mask = ((<uint64_t> 1) << self._bits) - 1
        self._slots = <IotlbSlot *> PyMem_Malloc((self._mask + 1) * sizeof(IotlbSlot))
        if self._slots == NULL:
            raise MemoryError()
        memset(self._slots, 0, (self._mask + 1) * sizeof(IotlbSlot))
        self.capacity = capacity

    def __dealloc__(self):
        PyMem_Free(self._slots)

    # -- the C interface ---------------------------------------------------------
    cdef IotlbSlot *_find(self, uint64_t iova) noexcept nogil:
        """The entry holding ``iova`` (smallest leaf first), or NULL."""
        cdef int c
        cdef uint64_t tag, i, probes
        cdef IotlbSlot *s
        for c in range(3):
            if self._class_count[c] == 0:
                continue
            tag = (iova & ~(((<uint64_t> 1) << _SHIFT[c]) - 1)) | <uint64_t> (c + 1)
            i = _home(tag, self._mask, self._bits)
            # Bounded: a lookup racing a writer must not spin on a torn table.
            for probes in range(self._mask + 1):
                s = &self._slots[i]
                if s.tag == tag:
                    return s
                if s.tag == 0:
                    break
                i = (i + 1) & self._mask
        return NULL

    cdef bint _lookup(self, uint64_t iova, uint64_t length, uint32_t need,
                      uint64_t *gpa, uint64_t *run, uint32_t *perm) noexcept nogil:
        """Hit: the GPA of ``iova`` and how many bytes from it (at most ``length``, at
        least 1) are contiguous in GPA and allow ``need``; ``perm`` is what they all allow."""
        cdef uint64_t seq = iovirt_seq_load_acquire(&self._seq)
        cdef IotlbSlot *s
        cdef uint64_t base, g, r, nxt, size
        cdef uint32_t p
        if seq & 1:
            self.misses += 1
            return False
        s = self._find(iova)
        if s == NULL or (s.gpa & need) != need:
            self.misses += 1
            return False
        base = s.tag & ~(<uint64_t> LOW_MASK)
        size = _entry_size(s.tag)
        g = (s.gpa & ~(<uint64_t> LOW_MASK)) + (iova - base)
        p = s.gpa & PERM_MASK
        r = base + size - iova
        if r > length:
            r = length
        while r < length:
            nxt = iova + r
            s = self._find(nxt)
            if s == NULL or (s.gpa & need) != need:
                break
            base = s.tag & ~(<uint64_t> LOW_MASK)
            if (s.gpa & ~(<uint64_t> LOW_MASK)) + (nxt - base) != g + r:
                break
            size = base + _entry_size(s.tag) - nxt
            r += size if size < length - r else length - r
            p &= s.gpa & PERM_MASK
        iovirt_fence_acquire()
        if iovirt_seq_load_relaxed(&self._seq) != seq:
            self.misses += 1
            return False
        gpa[0] = g
        run[0] = r
        perm[0] = p
        self.hits += 1
        return True

    cdef void _write_begin(self) noexcept nogil:
        iovirt_seq_store_relaxed(&self._seq, self._seq + 1)
        iovirt_fence_release()

    cdef void _write_end(self) noexcept nogil:
        iovirt_seq_store_release(&self._seq, self._seq + 1)

    cdef void _put(self, uint64_t tag, uint64_t gpa) noexcept nogil:
        cdef uint64_t i = _home(tag, self._mask, self._bits)
        while self._slots[i].tag != 0 and self._slots[i].tag != tag:
            i = (i + 1) & self._mask
        if self._slots[i].tag == 0:
            self._count += 1
            self._class_count[(tag & CLASS_MASK) - 1] += 1
        self._slots[i].tag = tag
        self._slots[i].gpa = gpa

    cdef void _delete_key(self, uint64_t tag) noexcept nogil:
        cdef uint64_t i = _home(tag, self._mask, self._bits), j, k
        while self._slots[i].tag != tag:
            if self._slots[i].tag == 0:
                return
            i = (i + 1) & self._mask
        self._count -= 1
        self._class_count[(tag & CLASS_MASK) - 1] -= 1
        # Backward-shift deletion: pull later members of the probe run into the hole.
        j = i
        while True:
            j = (j + 1) & self._mask
            if self._slots[j].tag == 0:
                break
            k = _home(self._slots[j].tag, self._mask, self._bits)
            # Leave slot j where it is if its home lies cyclically in (i, j].
            if (i <= j and i < k <= j) or (i > j and (k > i or k <= j)):
                continue
            self._slots[i] = self._slots[j]
            i = j
        self._slots[i].tag = 0
        self._slots[i].gpa = 0

    # -- the Python interface ------------------------------------------------------
    def insert(self, iova, gpa, size, perm) -> None:
        """Cache one leaf: ``[iova, iova+size)`` -> ``[gpa, gpa+size)`` with ``perm``."""
        # Checked as Python ints, in the reference's order, so that both twins refuse alike.
        if size not in PAGE_SIZES:
            raise ValueError(f"IOTLB entry size {size:#x} is not 4 KiB, 2 MiB or 1 GiB")
        if iova & (size - 1) or gpa & (size - 1):
            raise ValueError(f"IOTLB entry {iova:#x} -> {gpa:#x} is not aligned to its size {size:#x}")
        if perm & ~PERM_MASK:
            raise ValueError(f"IOTLB permission {perm:#x} has bits other than READ|WRITE")
        if not 0 <= iova <= _U64_MAX or not 0 <= gpa <= _U64_MAX:
            raise OverflowError(f"IOTLB entry {iova:#x} -> {gpa:#x} is not a 64-bit address pair")
        cdef int c = PAGE_SIZES.index(size)
        cdef uint64_t addr = iova
        cdef uint64_t tag = addr | <uint64_t> (c + 1)
        if self._count >= self.capacity and self._find(addr) == NULL:
            self.invalidate_all()
        self._write_begin()
        self._put(tag, <uint64_t> gpa | <uint64_t> perm)
        self._write_end()

    def lookup(self, uint64_t iova, uint64_t length=1, uint32_t access=1):
        """``(gpa, run, perm)`` for the run of ``[iova, iova+length)`` that hits, or ``None``."""
        cdef uint64_t g, r
        cdef uint32_t p
        if length == 0 or iova + (length - 1) < iova:
            raise ValueError(f"lookup range [{iova:#x}, +{length:#x}) is empty or wraps")
        if not self._lookup(iova, length, access & PERM_MASK, &g, &r, &p):
            return None
        return g, r, p

    def invalidate(self, iova, size) -> None:
        """Drop every entry overlapping ``[iova, iova+size)`` (a large leaf goes whole)."""
        if size <= 0:
            return
        cdef uint64_t first = iova
        cdef uint64_t last = min(iova + size - 1, (1 << 64) - 1)
        cdef uint64_t candidates = 0, base
        cdef int c
        for c in range(3):
            if self._class_count[c]:
                candidates += ((last >> _SHIFT[c]) - (first >> _SHIFT[c])) + 1
        if candidates == 0:
            return
        self._write_begin()
        if candidates <= self._mask // 4:
            for c in range(3):
                if self._class_count[c] == 0:
                    continue
                base = first & ~(((<uint64_t> 1) << _SHIFT[c]) - 1)
                while True:
                    self._delete_key(base | <uint64_t> (c + 1))
                    if base >= (last & ~(((<uint64_t> 1) << _SHIFT[c]) - 1)):
                        break
                    base += (<uint64_t> 1) << _SHIFT[c]
        else:
            self._drop_overlapping(first, last)
        self._write_end()

    cdef void _drop_overlapping(self, uint64_t first, uint64_t last) noexcept:
        # Many candidate keys: one pass over the table, then reinsert the survivors.
        cdef Py_ssize_t n = 0, i
        cdef uint64_t base
        cdef IotlbSlot *keep = <IotlbSlot *> PyMem_Malloc((self._count + 1) * sizeof(IotlbSlot))
        if keep == NULL:  # cannot filter: dropping everything is always allowed
            self._clear()
            return
        for i in range(<Py_ssize_t> (self._mask + 1)):
            base = self._slots[i].tag & ~(<uint64_t> LOW_MASK)
            if self._slots[i].tag != 0 and (base > last or base + (_entry_size(self._slots[i].tag) - 1) < first):
                keep[n] = self._slots[i]
                n += 1
        self._clear()
        for i in range(n):
            self._put(keep[i].tag, keep[i].gpa)
        PyMem_Free(keep)

    cdef void _clear(self) noexcept nogil:
        memset(self._slots, 0, (self._mask + 1) * sizeof(IotlbSlot))
        self._count = 0
        self._class_count[0] = self._class_count[1] = self._class_count[2] = 0

    def invalidate_all(self) -> None:
        """Drop every entry."""
        self._write_begin()
        self._clear()
        self._write_end()

    def entries(self) -> list:
        """Every entry as ``(iova, gpa, size, perm)``, sorted by IOVA (for tests and debugging)."""
        cdef Py_ssize_t i
        out = []
        for i in range(<Py_ssize_t> (self._mask + 1)):
            if self._slots[i].tag:
                out.append((self._slots[i].tag & ~(<uint64_t> LOW_MASK), self._slots[i].gpa & ~(<uint64_t> LOW_MASK),
                            _entry_size(self._slots[i].tag), self._slots[i].gpa & PERM_MASK))
        return sorted(out)

    def __len__(self):
        return self._count


cdef class CachedTranslator:
    """A translator with an :class:`IotlbCache` in front of a Python-level miss handler.

    Subclasses implement ``fill(iova, length, access)``: translate
    ``[iova, iova+length)``, insert what was learnt into ``self.cache`` (or
    not, for answers that must not be cached) and return the pieces
    ``[(gpa, len), ...]``, or raise ``TranslationFault`` /
    ``TranslationPending``.  They call ``super().__init__(capacity)``.
    Whoever changes the mappings behind a subclass invalidates its cache.
    """

    def __cinit__(self, *args, **kwargs):
        self.cache = IotlbCache(DEFAULT_CAPACITY)

    def __init__(self, Py_ssize_t capacity=DEFAULT_CAPACITY):
        if capacity != self.cache.capacity:
            self.cache = IotlbCache(capacity)

    def fill(self, iova: int, length: int, access: Access) -> list:
        """The miss handler: subclasses translate, cache and return the pieces."""
        raise NotImplementedError(f"{type(self).__name__} must implement fill(iova, length, access)")

    def translate(self, addr: int, length: int, access: Access) -> list:
        """Guest-physical pieces of ``[addr, addr+length)``: cached runs, then ``fill`` from the first miss."""
        cdef uint64_t g, r, pos, left
        cdef uint32_t p
        cdef uint32_t need = int(access) & PERM_MASK
        if length <= 0 or addr < 0 or addr + length > (1 << 64):
            return self.fill(addr, length, access)
        pieces = []
        pos = addr
        left = length
        while left:
            if not self.cache._lookup(pos, left, need, &g, &r, &p):
                pieces.extend(self.fill(pos, left, access))
                break
            pieces.append((g, r))
            pos += r
            left -= r
        return pieces

    cdef int resolve(self, uint64_t iova, uint64_t length, uint32_t access, uint64_t *gpa, bint *writable) noexcept nogil:
        """Check ``[iova, iova+length)`` (length > 0) for ``access`` (1 read, 2 write), as ``translate`` would.

        Returns ``TR_MAPPED`` with the start in ``*gpa`` when the range is one
        GPA run, ``TR_SCATTERED`` when it is not; ``*writable`` says whether
        every byte is known to allow writing too.  Hits need no GIL; a miss
        takes it to call ``fill``.
        """
        cdef uint64_t g, r, start = 0, expect = 0
        cdef uint32_t p, perms = PERM_MASK
        cdef bint first = True, contiguous = True, answered
        cdef int rc
        while length:
            if self.cache._lookup(iova, length, access, &g, &r, &p):
                if first:
                    start = g
                    first = False
                elif g != expect:
                    contiguous = False
                expect = g + r
                perms &= p
                iova += r
                length -= r
                continue
            with gil:
                rc = self._miss(iova, length, access, &g, &contiguous, &answered)
                if rc != TR_MAPPED:
                    return rc
            if answered:
                continue  # fill cached its answer: take it from the cache
            # fill answered without caching (e.g. translation off): use its pieces as they are.
            if not first and g != expect:
                contiguous = False
            if first:
                start = g
                first = False
            perms = 0  # permissions unknown beyond READ
            break
        gpa[0] = start
        writable[0] = (perms & 2) != 0
        return TR_MAPPED if contiguous else TR_SCATTERED

    cdef int _miss(self, uint64_t iova, uint64_t length, uint32_t access, uint64_t *first_gpa, bint *contiguous,
                   bint *cached) noexcept:
        """Call ``fill``; report whether the cache now holds ``iova`` and, if not, the pieces' shape."""
        cdef uint64_t g, r, expect
        cdef uint32_t p
        try:
            pieces = self.fill(iova, length, _WRITE if access == 2 else _READ)
        except TranslationPending:
            return TR_PENDING
        except GuestMemoryError as exc:
            self.last_error = exc
            return TR_FAULT
        except Exception as exc:
            log.exception("translator %r: miss handler failed for [%#x, +%#x)", self, iova, length)
            self.last_error = exc
            return TR_ERROR
        cached[0] = self.cache._lookup(iova, length, access, &g, &r, &p)
        if cached[0]:
            return TR_MAPPED
        try:
            first_gpa[0] = expect = pieces[0][0]
            for piece_gpa, piece_len in pieces:
                if piece_gpa != expect:
                    contiguous[0] = False
                expect = piece_gpa + piece_len
        except Exception:
            log.exception("translator %r: miss handler returned %r for [%#x, +%#x), not pieces",
                          self, pieces, iova, length)
            return TR_ERROR
        return TR_MAPPED
