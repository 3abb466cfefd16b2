# The C-level interface of the translation cache, for the accelerated ring
# (_queue_c) and any other Cython code that translates IOVAs without the GIL.

from libc.stdint cimport uint8_t, uint32_t, uint64_t

cdef struct IotlbSlot:
    uint64_t tag    # page-aligned IOVA base | (size class + 1); 0: empty
    uint64_t gpa    # page-aligned GPA base | permission bits (Access.READ=1, WRITE=2)

# CachedTranslator.resolve results.
cdef enum:
    TR_MAPPED = 0     # contiguous in guest-physical space: *gpa holds the start
    TR_SCATTERED = 1  # translated, but not one contiguous GPA run (or permissions unknown)
    TR_FAULT = 2      # the translator refused (TranslationFault / GuestMemoryError)
    TR_PENDING = 3    # TranslationPending: the answer is on its way
    TR_ERROR = 4      # anything else went wrong in the miss handler


cdef class IotlbCache:
    cdef IotlbSlot *_slots
    cdef uint64_t _mask
    cdef int _bits
    cdef uint64_t _seq            # seqlock: odd while a writer changes the table
    cdef Py_ssize_t _count
    cdef Py_ssize_t _class_count[3]
    cdef readonly Py_ssize_t capacity
    cdef readonly uint64_t hits, misses

    cdef IotlbSlot *_find(self, uint64_t iova) noexcept nogil
    cdef bint _lookup(self, uint64_t iova, uint64_t length, uint32_t need,
                      uint64_t *gpa, uint64_t *run, uint32_t *perm) noexcept nogil
    cdef void _put(self, uint64_t tag, uint64_t gpa) noexcept nogil
    cdef void _delete_key(self, uint64_t tag) noexcept nogil
    cdef void _write_begin(self) noexcept nogil
    cdef void _write_end(self) noexcept nogil
    cdef void _drop_overlapping(self, uint64_t first, uint64_t last) noexcept
    cdef void _clear(self) noexcept nogil


cdef class CachedTranslator:
    cdef readonly IotlbCache cache
    cdef object last_error  # what the last failed fill raised (TR_FAULT, TR_ERROR), for the ring's error

    cdef int resolve(self, uint64_t iova, uint64_t length, uint32_t access, uint64_t *gpa, bint *writable) noexcept nogil
    cdef int _miss(self, uint64_t iova, uint64_t length, uint32_t access, uint64_t *first_gpa, bint *contiguous,
                   bint *cached) noexcept
