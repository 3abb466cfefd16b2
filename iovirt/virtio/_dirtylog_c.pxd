# The C-level dirty-log marker, for the Cython ring code (no GIL, no Python objects).

from libc.stdint cimport uint8_t, uint64_t

cdef uint64_t log_mark(uint8_t *bits, uint64_t nbytes, uint64_t gpa, uint64_t length) noexcept nogil
