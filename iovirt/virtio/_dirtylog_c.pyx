# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Dirty-page log bit setting in C: the accelerated twin of ``dirtylog._mark_py``.

vhost-user.rst "Migration": one bit per 4 KiB page of guest-physical
address, bit ``page % 8`` of byte ``page / 8``; the front-end clears bits
(atomically) while the back-end sets them, so every set is an atomic OR with
a full barrier, ordered after the device's write of the page it logs (as
libvhost-user's ``__sync_fetch_and_or``).
"""

from libc.stdint cimport uint8_t, uint64_t

cdef extern from *:
    """
    static inline void iovirt_log_or(uint8_t *p, uint8_t bit) { __sync_fetch_and_or(p, bit); }
    """
    void iovirt_log_or(uint8_t *p, uint8_t bit) nogil

cdef uint64_t LOG_PAGE_SHIFT = 12  # VHOST_LOG_PAGE, 4 KiB


cdef uint64_t log_mark(uint8_t *bits, uint64_t nbytes, uint64_t gpa, uint64_t length) noexcept nogil:
    """Set the bits of the pages ``[gpa, gpa+length)`` touches; returns how many lay beyond the log."""
    cdef uint64_t page, last, beyond = 0
    if length == 0:
        return 0
    page = gpa >> LOG_PAGE_SHIFT
    last = (gpa + (length - 1)) >> LOG_PAGE_SHIFT if gpa <= <uint64_t> 0xFFFFFFFFFFFFFFFF - (length - 1) else (
        <uint64_t> 0xFFFFFFFFFFFFFFFF >> LOG_PAGE_SHIFT)
    while True:
        if (page >> 3) < nbytes:
            iovirt_log_or(bits + (page >> 3), <uint8_t> (1 << (page & 7)))
        else:
            beyond += 1
        if page == last:
            return beyond
        page += 1


def mark(bitmap, uint64_t gpa, uint64_t length):
    """Set the bits of ``[gpa, gpa+length)`` in the writable buffer ``bitmap``; returns the pages beyond it."""
    cdef uint8_t[::1] view = bitmap
    if view.shape[0] == 0:
        return log_mark(NULL, 0, gpa, length)
    return log_mark(&view[0], view.shape[0], gpa, length)
