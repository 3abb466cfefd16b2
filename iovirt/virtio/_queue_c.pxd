# The C-level interface of the accelerated split queue (and of the base it shares
# with the packed queue, _packed_c.pyx), for other Cython modules (device data
# paths) that read popped batches without Python objects.

cimport cython
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

from iovirt.virtio._iotlb_c cimport CachedTranslator

cdef struct Region:
    uint64_t gpa
    uint64_t size
    uint8_t *host

cdef struct Desc:
    uint64_t addr
    uint32_t len
    uint16_t flags
    uint16_t next

cdef struct WalkError:
    int code
    uint16_t desc
    uint64_t addr
    uint64_t len
    uint32_t count


cdef class ChainBatch:
    # chains [0, n): head, used length, and buffers [first[i], first[i+1])
    cdef Py_ssize_t n, nbufs, cap_chains, cap_bufs
    cdef uint16_t *heads
    cdef uint32_t *used_lens
    cdef uint32_t *first
    # per buffer: guest address, length, device-writable, host pointer (NULL: use GuestMemory)
    cdef uint64_t *addrs
    cdef uint32_t *lens
    cdef uint8_t *writable
    cdef uint8_t **hosts

    cdef int _reserve_chains(self, Py_ssize_t cap) except -1
    cdef int _reserve_bufs(self, Py_ssize_t cap) except -1
    cdef int _check(self, Py_ssize_t i) except -1


cdef class Virtqueue:
    # What the split and the packed queue share at C level, so a device data path
    # takes either (both fill a ChainBatch; pops and pushes go through their methods).
    cdef readonly object memory
    cdef readonly int index
    cdef readonly uint32_t size


cdef inline bint append_in_region(ChainBatch b, Region *r, uint64_t addr, uint32_t length, bint writable) noexcept nogil:
    # One buffer appended to ``b`` (room checked by the caller) with its host pointer, if it lies
    # inside region ``r``; False, ``b`` untouched, if not.  The split and packed rings' one-descriptor
    # fast paths (``_single``).
    cdef uint64_t off = addr - r.gpa
    cdef Py_ssize_t k = b.nbufs
    if off >= r.size or length > r.size - off:
        return False
    b.addrs[k] = addr
    b.lens[k] = length
    b.writable[k] = writable
    b.hosts[k] = r.host + off
    b.nbufs = k + 1
    return True


# final: no subclass, so the per-chain methods (_walk, _read_desc, _check_buffer, _host) are direct C
# calls the compiler can inline, not calls through the type's method table.
@cython.final
cdef class SplitQueue(Virtqueue):
    cdef readonly uint64_t desc_addr, avail_addr, used_addr
    cdef readonly bint event_idx, in_order
    # With in_order: heads in flight, oldest first, in a ring of Queue Size places
    cdef uint16_t *_order
    cdef uint32_t _order_first, _order_n
    cdef uint16_t _last_avail_idx, _used_idx, _signalled_used
    cdef bint _signalled_valid, _notify_enabled, _translated, _released
    cdef uint32_t _mask
    cdef uint32_t _in_flight
    cdef uint8_t *_desc
    cdef uint8_t *_avail
    cdef uint8_t *_used
    cdef Region *_regions
    cdef int _nregions, _last_region
    cdef object _views
    cdef CachedTranslator _ct
    # The region table's generation when the host pointers were resolved, and the table's counter
    # (RegionTable.generation_cell) read on every pop and push without Python.
    cdef unsigned long long _gen
    cdef const unsigned long long[::1] _gen_cell
    cdef object _pending_error
    # A chain pop_fast left untaken after good ones (it cannot raise): the next pop raises it, as pop_into defers.
    cdef int _refused_rc
    cdef uint16_t _refused_head
    cdef WalkError _err
    cdef object _err_cause  # the GuestMemoryError behind a walk error, if any
    # Dirty logging (set_dirty_log): the DirtyLog, its bitmap held while in use.
    cdef object _log
    cdef object _log_view
    cdef uint8_t *_log_bits
    cdef uint64_t _log_size
    cdef uint64_t *_used_log  # (gpa, length) pairs of the used ring
    cdef Py_ssize_t _used_log_n
    cdef uint64_t _log_beyond
    cdef ChainBatch _log_scratch

    # The C interface of the batch calls (pop_batch, push_batch of a popped batch, need_notify): the same
    # checks and errors, without a Python object per call, for data paths written in C.
    cdef Py_ssize_t pop_into(self, ChainBatch batch, Py_ssize_t max_chains) except -1
    cdef int push_chains(self, ChainBatch b, bint coalesce) except -1
    cdef int notify_needed(self) except -1
    # The same without the interpreter, for a data path's loop that runs with the GIL released
    # (net's forward): fast_ready (with the GIL) says whether they may serve the queue now.
    cdef int fast_ready(self) except -1
    cdef Py_ssize_t pop_fast(self, ChainBatch b, Py_ssize_t max_chains) noexcept nogil
    cdef void rewind_fast(self, Py_ssize_t count) noexcept nogil
    cdef void push_fast(self, ChainBatch b, bint coalesce) noexcept nogil
    cdef bint notify_fast(self) noexcept nogil
    cdef Py_ssize_t available_fast(self) noexcept nogil
    cdef Py_ssize_t wait_fast(self) noexcept nogil

    cdef int _resolve(self) except -1
    cdef uint8_t *_ring_host(self, uint64_t addr, uint64_t length) except NULL
    cdef uint8_t *_host(self, uint64_t gpa, uint64_t length) noexcept nogil
    cdef int _sync(self) except -1
    cdef int _raise_pending(self) except -1
    cdef int _pending(self) except -1
    cdef int _read_desc(self, const uint8_t *table_host, uint64_t table_gpa, uint32_t i, Desc *d) noexcept nogil
    cdef int _check_buffer(self, uint64_t addr, uint64_t length, bint writable, uint8_t **host) noexcept nogil
    cdef int _read_desc_slow(self, uint64_t table_gpa, uint32_t i, Desc *d) noexcept
    cdef int _check_range_slow(self, uint64_t addr, uint64_t length, bint writable) noexcept
    cdef bint _single(self, uint16_t head, ChainBatch b) noexcept nogil
    cdef bint _walk_direct(self, uint16_t head, ChainBatch b) noexcept nogil
    cdef int _walk(self, uint16_t head, ChainBatch b) noexcept nogil
    cdef inline Py_ssize_t _take(self, ChainBatch b, Py_ssize_t count, int *rc, uint16_t *failed) noexcept nogil
    cdef object _walk_error(self, uint16_t head, int rc)
    cdef int _take_used(self, Py_ssize_t head, Py_ssize_t length) except -1
    cdef int _push_one(self, Py_ssize_t head, Py_ssize_t length) except -1
    cdef int _push_entries(self, ChainBatch b) except -1
    cdef int _check_in_order_room(self, Py_ssize_t count) except -1
    cdef int _push_coalesced(self, batch) except -1
    cdef void _publish_avail_event(self) noexcept nogil
    cdef int _log_buffer(self, uint64_t addr, uint64_t length, uint8_t *host) except -1
    cdef int _log_head(self, uint16_t head) except -1
    cdef void _log_used_ring(self) noexcept nogil
    cdef int _log_done(self) except -1
