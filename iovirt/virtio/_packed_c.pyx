# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Packed virtqueue, device side: the accelerated implementation.

Same API and the same rules as the reference ``_packed_py.py`` (virtio 1.2
section 2.8), which is the one to read first; built the way the split
ring's ``_queue_c.pyx`` is:

- The ring parts are resolved to host pointers at setup and whenever the
  memory map changes; buffers are checked against a C copy of the region
  table (or a :class:`~iovirt.virtio.iotlb.CachedTranslator`) with the GIL
  released around the batch loop; what the table cannot resolve takes the
  slow path through :class:`~iovirt.memory.GuestMemory` in GIL-holding
  helpers, so both twins accept and reject exactly the same lists.
- Popped lists go into the split ring's flat :class:`ChainBatch`
  (``heads`` hold Buffer IDs), which the C device data paths read.
- Shared-memory ordering (2.8.21): a descriptor's flags are loaded with
  acquire semantics before its other fields; a used descriptor's flags are
  stored with release semantics after its ``id`` and ``len``; a full fence
  separates publishing used descriptors from reading the Driver area.
"""

cimport cython
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy
from cpython.mem cimport PyMem_Realloc, PyMem_Free

from iovirt.memory import Access, GuestMemoryError, TranslationPending
from iovirt.virtio._iotlb_c cimport CachedTranslator, TR_MAPPED, TR_PENDING, TR_SCATTERED
from iovirt.virtio._dirtylog_c cimport log_mark
from iovirt.virtio._queue_c cimport ChainBatch, Region, Virtqueue, WalkError, append_in_region
from iovirt.virtio import _packed_checks as pchecks
from iovirt.virtio import _queue_checks as checks
from iovirt.virtio.state import QueueState

IMPLEMENTATION = "cython"
cdef Py_ssize_t USED_LEN_MAX = checks.USED_LEN_MAX

cdef extern from *:
    """
    static inline uint16_t iovirt_pk_load_acquire_u16(const uint8_t *p) {
        return __atomic_load_n((const uint16_t *)p, __ATOMIC_ACQUIRE);
    }
    static inline uint16_t iovirt_pk_load_u16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
    static inline void iovirt_pk_store_u16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
    static inline void iovirt_pk_store_release_u16(uint8_t *p, uint16_t v) {
        __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELEASE);
    }
    static inline void iovirt_pk_store_used(uint8_t *p, uint32_t len, uint16_t id) {
        memcpy(p + 8, &len, 4); memcpy(p + 12, &id, 2);
    }
    static inline void iovirt_pk_mb(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
    """
    uint16_t iovirt_pk_load_acquire_u16(const uint8_t *p) nogil
    uint16_t iovirt_pk_load_u16(const uint8_t *p) nogil
    void iovirt_pk_store_u16(uint8_t *p, uint16_t v) nogil
    void iovirt_pk_store_release_u16(uint8_t *p, uint16_t v) nogil
    void iovirt_pk_store_used(uint8_t *p, uint32_t len, uint16_t id) nogil
    void iovirt_pk_mb() nogil

cdef enum:
    F_NEXT = 1
    F_WRITE = 2
    F_INDIRECT = 4
    F_AVAIL = 1 << 7
    F_USED = 1 << 15
    WRAP_BIT = 1 << 15
    EV_ENABLE = 0
    EV_DISABLE = 1
    EV_DESC = 2

# Walk results: 0 is a good list; the others name the rule broken.
cdef enum:
    E_TOO_LONG = 1
    E_NESTED
    E_INDIRECT_NEXT
    E_INDIRECT_IN_CHAIN
    E_INDIRECT_LEN
    E_WRAP
    E_OUTSIDE
    E_ORDER
    E_UNREADABLE
    E_BUF_ID
    E_ID_IN_FLIGHT
    E_NOMEM
    E_PENDING

cdef struct PDesc:
    uint64_t addr
    uint32_t len
    uint16_t id
    uint16_t flags


cdef void *_grow(void *p, size_t nbytes) except NULL:
    cdef void *q = PyMem_Realloc(p, nbytes)
    if q == NULL:
        raise MemoryError()
    return q


cdef ChainBatch _empty_batch(ChainBatch batch, Py_ssize_t chains):
    if batch is None:
        batch = ChainBatch()
    batch.n = 0
    batch.nbufs = 0
    batch._reserve_chains(chains if chains > 0 else 1)
    batch.first[0] = 0
    return batch


@cython.final  # as SplitQueue (_queue_c.pxd): direct, inlinable calls on the per-descriptor path
cdef class PackedQueue(Virtqueue):
    """The device side of one packed virtqueue (accelerated; see ``_packed_py.PackedQueue``)."""

    cdef readonly uint64_t desc_addr, driver_addr, device_addr
    cdef readonly bint event_idx, in_order
    cdef uint16_t *_order  # with in_order: Buffer IDs in flight, oldest first, in a ring of Queue Size places
    cdef uint32_t _order_first, _order_n
    cdef uint32_t _next_avail, _next_used
    cdef bint _avail_wrap, _used_wrap, _notify_enabled, _translated, _released, _signalled_valid
    cdef uint32_t _signalled
    cdef uint64_t _since_signal
    cdef uint16_t *_taken  # per Buffer ID: ring slots its list took; 0: not in flight
    cdef uint32_t *_mark  # per Buffer ID: the push_batch (its _stamp) that last named it, to find one named twice
    cdef uint32_t _stamp
    cdef uint32_t _n_in_flight
    cdef uint16_t *_recent_ids  # lists popped since the last push: Buffer ID and start position
    cdef uint16_t *_recent_pos
    cdef uint32_t _n_recent
    cdef uint8_t *_desc
    cdef uint8_t *_driver
    cdef uint8_t *_device
    cdef Region *_regions
    cdef int _nregions, _last_region
    cdef object _views, _pending_error, _err_cause
    cdef unsigned long long _gen  # as in _queue_c.pxd: the generation resolved, and the table's counter
    cdef const unsigned long long[::1] _gen_cell
    cdef CachedTranslator _ct
    cdef WalkError _err
    cdef uint32_t _walked
    cdef object _log, _log_view, _log_bufs
    cdef uint8_t *_log_bits
    cdef uint64_t _log_size
    cdef uint64_t *_used_log
    cdef Py_ssize_t _used_log_n
    cdef uint64_t _log_beyond

    def __cinit__(self):
        self._regions = NULL
        self._taken = NULL
        self._mark = NULL
        self._recent_ids = NULL
        self._recent_pos = NULL
        self._used_log = NULL
        self._log_bits = NULL
        self._order = NULL

    def __dealloc__(self):
        PyMem_Free(self._regions)
        PyMem_Free(self._taken)
        PyMem_Free(self._mark)
        PyMem_Free(self._recent_ids)
        PyMem_Free(self._recent_pos)
        PyMem_Free(self._used_log)
        PyMem_Free(self._order)

    def __init__(self, memory, uint32_t size, uint64_t desc_addr, uint64_t driver_addr, uint64_t device_addr,
                 *, int index=0, bint event_idx=False, int last_avail_idx=WRAP_BIT, int used_idx=WRAP_BIT,
                 bint in_order=False):
        cdef uint32_t i
        pchecks.check_layout(memory, index, size, desc_addr, driver_addr, device_addr)
        self.memory = memory
        self.index = index
        self.size = size
        self.desc_addr = desc_addr
        self.driver_addr = driver_addr
        self.device_addr = device_addr
        self.event_idx = event_idx
        self.in_order = in_order
        self._next_avail = (last_avail_idx & ~WRAP_BIT) % size
        self._avail_wrap = (last_avail_idx & WRAP_BIT) != 0
        self._next_used = (used_idx & ~WRAP_BIT) % size
        self._used_wrap = (used_idx & WRAP_BIT) != 0
        self._notify_enabled = True
        self._signalled_valid = False
        self._since_signal = 0
        self._pending_error = None
        self._released = False
        self._taken = <uint16_t *> _grow(self._taken, size * sizeof(uint16_t))
        self._mark = <uint32_t *> _grow(self._mark, size * sizeof(uint32_t))
        self._stamp = 0
        self._recent_ids = <uint16_t *> _grow(self._recent_ids, size * sizeof(uint16_t))
        self._recent_pos = <uint16_t *> _grow(self._recent_pos, size * sizeof(uint16_t))
        self._order = <uint16_t *> _grow(self._order, size * sizeof(uint16_t))
        self._order_first = 0
        self._order_n = 0
        for i in range(size):
            self._taken[i] = 0
            self._mark[i] = 0
        self._n_in_flight = 0
        self._n_recent = 0
        self._log_bufs = {}
        self._resolve()

    # -- state ---------------------------------------------------------------
    @classmethod
    def from_state(cls, memory, state):
        """Rebuild a queue from saved state (``avail_addr``/``used_addr``: the Driver/Device areas)."""
        pchecks.check_state(state)
        return cls(memory, state.size, state.desc_addr, state.avail_addr, state.used_addr,
                   index=state.index, event_idx=bool(state.event_idx),
                   last_avail_idx=state.last_avail_idx, used_idx=state.used_idx, in_order=bool(state.in_order))

    def state(self):
        """Plain-data snapshot of the queue (positions with their wrap counters in bit 15)."""
        return QueueState(size=self.size, desc_addr=self.desc_addr, avail_addr=self.driver_addr,
                          used_addr=self.device_addr, last_avail_idx=self.last_avail_idx,
                          used_idx=self.used_idx, event_idx=bool(self.event_idx), index=self.index,
                          in_order=bool(self.in_order))

    @property
    def last_avail_idx(self):
        """Slot of the next descriptor the device will take, wrap counter in bit 15."""
        return self._next_avail | (WRAP_BIT if self._avail_wrap else 0)

    @property
    def used_idx(self):
        """Slot of the next used descriptor the device will write, wrap counter in bit 15."""
        return self._next_used | (WRAP_BIT if self._used_wrap else 0)

    # -- host pointer resolution -------------------------------------------------
    def refresh(self):
        """Re-validate the ring and re-resolve host pointers after the memory map changed."""
        if self._released:
            raise checks.released(self.index)
        self._views = None
        pchecks.check_layout(self.memory, self.index, self.size, self.desc_addr, self.driver_addr, self.device_addr)
        self._resolve()

    cdef int _resolve(self) except -1:
        cdef const uint8_t[::1] view
        cdef int i
        self._gen_cell = self.memory.region_table.generation_cell
        self._gen = self._gen_cell[0]  # before the regions: a change while copying shows at the next sync
        regions = self.memory.regions
        self._views = None
        self._regions = <Region *> _grow(self._regions, (len(regions) + 1) * sizeof(Region))
        views = []
        for i, region in enumerate(regions):
            view = region.view
            views.append(view)
            self._regions[i].gpa = region.gpa
            self._regions[i].size = region.size
            self._regions[i].host = <uint8_t *> &view[0]
        self._views = views
        self._nregions = len(views)
        self._last_region = 0
        translator = self.memory.translator
        self._translated = translator is not None
        self._ct = translator if isinstance(translator, CachedTranslator) else None
        (desc, desc_len), (driver, driver_len), (device, device_len) = pchecks.ring_parts(
            self.size, self.desc_addr, self.driver_addr, self.device_addr)
        self._desc = self._ring_host(desc, desc_len)
        self._driver = self._ring_host(driver, driver_len)
        self._device = self._ring_host(device, device_len)
        return 0

    cdef uint8_t *_ring_host(self, uint64_t addr, uint64_t length) except NULL:
        cdef uint64_t gpa = checks.ring_part_gpa(self.memory, self.index, addr, length)
        cdef uint8_t *p = self._host(gpa, length)
        if p == NULL:
            raise AssertionError(f"ring part at {addr:#x} (GPA {gpa:#x}) is in one region but not in the region copy")
        return p

    cdef uint8_t *_host(self, uint64_t gpa, uint64_t length) noexcept nogil:
        """Host pointer of a guest-physical range inside one region, or NULL."""
        cdef Region *r
        cdef uint64_t off
        cdef int i
        if self._nregions == 0:
            return NULL
        r = &self._regions[self._last_region]
        off = gpa - r.gpa
        if off < r.size and length <= r.size - off:
            return r.host + off
        for i in range(self._nregions):
            r = &self._regions[i]
            off = gpa - r.gpa
            if off < r.size and length <= r.size - off:
                self._last_region = i
                return r.host + off
        return NULL

    def release(self):
        """Let go of guest memory (the queue is stopped); any later use raises."""
        self.set_dirty_log(None)
        self._views = None
        self._nregions = 0
        self._desc = self._driver = self._device = NULL
        self._released = True

    cdef int _sync(self) except -1:
        if self._released:
            raise checks.released(self.index)
        if self._gen_cell[0] != self._gen:  # as SplitQueue._sync
            self.refresh()
        return 0

    # -- avail side ----------------------------------------------------------------
    cdef inline bint _is_avail(self, uint32_t slot, bint wrap) noexcept nogil:
        # 2.8.1: available when AVAIL matches the driver's wrap counter and USED does not.
        cdef uint16_t flags = iovirt_pk_load_acquire_u16(self._desc + 16 * <uint64_t> slot + 14)
        return ((flags & F_AVAIL) != 0) == wrap and ((flags & F_USED) != 0) != wrap

    def pending(self):
        """How many lists the driver has made available and we have not popped."""
        cdef uint32_t count = 0, slot = self._next_avail, k, j
        cdef bint wrap = self._avail_wrap
        cdef uint16_t flags
        self._sync()
        for k in range(self.size):
            if not self._is_avail(slot, wrap):
                break
            count += 1
            flags = iovirt_pk_load_u16(self._desc + 16 * <uint64_t> slot + 14)
            for j in range(self.size):
                slot += 1
                if slot == self.size:
                    slot = 0
                    wrap = not wrap
                if not flags & F_NEXT:
                    break
                flags = iovirt_pk_load_u16(self._desc + 16 * <uint64_t> slot + 14)
        return count

    def pop(self):
        """Take the next available list, or ``None`` when there is none."""
        batch = self.pop_batch(1)
        return batch[0] if len(batch) else None

    cdef int _raise_pending(self) except -1:
        if self._pending_error is not None:
            error, self._pending_error = self._pending_error, None
            raise error
        return self._sync()

    cdef inline uint32_t _order_slot(self, uint32_t k) noexcept nogil:
        """The place in ``_order`` ``k`` (at most Queue Size) after the oldest; no division per list popped
        and pushed, as ``%`` would be: a packed ring's size need not be a power of 2 (2.8)."""
        cdef uint32_t at = self._order_first + k
        return at - self.size if at >= self.size else at

    cdef inline void _order_append(self, uint16_t buf_id) noexcept nogil:
        if self.in_order:
            self._order[self._order_slot(self._order_n)] = buf_id
            self._order_n += 1

    cdef inline uint16_t _order_at(self, uint32_t k) noexcept nogil:
        """With in_order: the ``k``-th oldest Buffer ID in flight."""
        return self._order[self._order_slot(k)]

    cdef inline void _advance_avail(self, uint32_t n) noexcept nogil:
        self._next_avail += n
        if self._next_avail >= self.size:
            self._next_avail -= self.size
            self._avail_wrap = not self._avail_wrap

    def pop_batch(self, Py_ssize_t max_chains, ChainBatch batch=None):
        """Take up to ``max_chains`` available lists (into ``batch`` if given, reusing it)."""
        cdef Py_ssize_t k
        cdef uint32_t first = 0, start
        cdef uint16_t buf_id
        cdef int rc = 0
        self._raise_pending()
        # Each list popped holds a distinct Buffer ID below Queue Size: at most that many fit.
        batch = _empty_batch(batch, max_chains if max_chains < self.size else self.size)
        # The interpreter lock stays held: releasing it around a batch's short walk cost more than
        # the walk gains (the caller's loop holds it anyway; benchmarks/ring.py, perf).
        for k in range(max_chains):
            if not self._is_avail(self._next_avail, self._avail_wrap):
                break
            first = self._next_avail
            start = first | (WRAP_BIT if self._avail_wrap else 0)
            if self._single(first, batch, &buf_id):
                self._walked = 1
            else:
                rc = self._walk(self._desc, self.size, first, batch, &buf_id)
                if rc != 0:
                    batch.nbufs = batch.first[batch.n]
                    if rc != E_PENDING:
                        self._advance_avail(self._walked)
                    break
            self._advance_avail(self._walked)
            self._taken[buf_id] = <uint16_t> self._walked
            self._n_in_flight += 1
            self._order_append(buf_id)
            self._recent_ids[self._n_recent] = buf_id
            self._recent_pos[self._n_recent] = <uint16_t> start
            self._n_recent += 1
            batch.heads[batch.n] = buf_id
            batch.used_lens[batch.n] = 0
            batch.n += 1
            batch.first[batch.n] = <uint32_t> batch.nbufs
        if rc == E_PENDING:
            rc = 0  # not the driver's fault: the list stays available, retry later
        if self._log is not None:
            self._keep_for_log(batch)
        if rc != 0:
            error = self._walk_error(first, rc)
            if batch.n == 0:
                self._publish_avail_event()
                raise error
            self._pending_error = error
        self._publish_avail_event()
        return batch

    cdef int _keep_for_log(self, ChainBatch b) except -1:
        cdef Py_ssize_t i
        cdef uint32_t k
        for i in range(b.n):
            self._log_bufs[b.heads[i]] = [(b.addrs[k], b.lens[k], bool(b.writable[k]))
                                          for k in range(b.first[i], b.first[i + 1])]
        return 0

    def resubmit(self, lists, ChainBatch batch=None):
        """Take again lists a previous back-end popped and never completed (see ``_packed_py``).

        Each of ``lists`` is the list's ring descriptors as they were popped
        (16 bytes each); the avail position does not move.
        """
        cdef Py_ssize_t k, n = len(lists)
        cdef uint16_t buf_id = 0
        cdef uint32_t count = 0
        cdef int rc = 0
        cdef const uint8_t[::1] raw
        self._raise_pending()
        batch = _empty_batch(batch, n)
        for k in range(n):
            raw = pchecks.saved_list(self.index, lists[k], self.size)
            count = raw.shape[0] // 16
            rc = self._walk(&raw[0], count, 0, batch, &buf_id)
            if rc != 0:
                batch.nbufs = batch.first[batch.n]
                break
            self._taken[buf_id] = <uint16_t> count
            self._n_in_flight += 1
            self._order_append(buf_id)
            batch.heads[batch.n] = buf_id
            batch.used_lens[batch.n] = 0
            batch.n += 1
            batch.first[batch.n] = <uint32_t> batch.nbufs
        if self._log is not None:
            self._keep_for_log(batch)
        if rc != 0 and rc != E_PENDING:
            raise self._walk_error(0, rc)
        return batch

    def rewind(self, Py_ssize_t count):
        """Give back the last ``count`` popped lists unused; only lists popped since the last push."""
        cdef uint32_t i, start
        pchecks.check_rewind(self.index, count, self._n_recent)
        if count == 0:
            return
        start = self._recent_pos[self._n_recent - count]
        for i in range(self._n_recent - count, self._n_recent):
            self._taken[self._recent_ids[i]] = 0
            self._n_in_flight -= 1
            self._log_bufs.pop(self._recent_ids[i], None)
        if self.in_order:
            self._order_n -= count
        self._n_recent -= count
        self._next_avail = start & ~WRAP_BIT
        self._avail_wrap = (start & WRAP_BIT) != 0

    cdef int _read_desc(self, const uint8_t *table_host, uint64_t table_gpa, uint32_t i, PDesc *d) noexcept nogil:
        if table_host != NULL:
            memcpy(d, table_host + 16 * <uint64_t> i, 16)
            return 0
        with gil:
            return self._read_desc_slow(table_gpa, i, d)

    # The slow paths below hold the GIL and keep their Python locals to themselves
    # (see _queue_c.pyx: a Python local in a nogil function takes the GIL on every exit).
    cdef int _read_desc_slow(self, uint64_t table_gpa, uint32_t i, PDesc *d) noexcept:
        try:
            raw = self.memory.read(table_gpa + 16 * i, 16)
        except TranslationPending:
            return E_PENDING
        except GuestMemoryError as exc:
            self._err_cause = exc
            return E_UNREADABLE
        memcpy(d, <const char *> raw, 16)
        return 0

    cdef int _check_buffer(self, uint64_t addr, uint64_t length, bint writable, uint8_t **host) noexcept nogil:
        cdef uint64_t gpa
        cdef bint may_write
        cdef int rc
        if length != 0 and addr > <uint64_t> 0xFFFFFFFFFFFFFFFF - (length - 1):
            return E_WRAP
        host[0] = NULL
        if not self._translated:
            host[0] = self._host(addr, length)
            if host[0] != NULL or length == 0:
                return 0
        elif self._ct is not None and length != 0:
            rc = self._ct.resolve(addr, length, 2 if writable else 1, &gpa, &may_write)
            if rc == TR_PENDING:
                return E_PENDING
            if rc != TR_MAPPED and rc != TR_SCATTERED:
                with gil:
                    self._err_cause, self._ct.last_error = self._ct.last_error, None
                return E_OUTSIDE
            if rc == TR_MAPPED:
                host[0] = self._host(gpa, length)
                if host[0] != NULL:
                    if writable and not may_write:
                        host[0] = NULL  # GuestMemory checks (and faults) the device's writes
                    return 0
        with gil:
            return self._check_range_slow(addr, length, writable)

    cdef int _check_range_slow(self, uint64_t addr, uint64_t length, bint writable) noexcept:
        try:
            self.memory.check_range(addr, length, Access.WRITE if writable else Access.READ)
        except TranslationPending:
            return E_PENDING
        except GuestMemoryError as exc:
            self._err_cause = exc
            return E_OUTSIDE
        return 0

    cdef int _add_buffer(self, ChainBatch b, PDesc *d, uint32_t desc, bint *seen_writable) noexcept nogil:
        cdef bint writable = (d.flags & F_WRITE) != 0
        cdef uint8_t *host
        cdef int rc
        self._err.desc = <uint16_t> desc
        if seen_writable[0] and not writable:
            return E_ORDER
        seen_writable[0] = writable
        rc = self._check_buffer(d.addr, d.len, writable, &host)
        if rc:
            self._err.addr = d.addr
            self._err.len = d.len
            return rc
        if b.nbufs >= b.cap_bufs:
            with gil:
                try:
                    b._reserve_bufs(2 * b.cap_bufs + 64)
                except MemoryError:
                    return E_NOMEM
        b.addrs[b.nbufs] = d.addr
        b.lens[b.nbufs] = d.len
        b.writable[b.nbufs] = writable
        b.hosts[b.nbufs] = host
        b.nbufs += 1
        return 0

    cdef inline bint _single(self, uint32_t slot, ChainBatch b, uint16_t *buf_id) noexcept nogil:
        """Take the commonest list without the general walk: one direct descriptor inside the last region hit.

        False where anything else holds, with ``b`` as it was, and
        :meth:`_walk` takes the list from ``slot`` (a chained or indirect
        list, a translated or unmapped address, a Buffer ID out of range or in
        flight, a full batch: each of its errors is the general walk's).
        Inlined into the pop loop, as the split ring's ``_single``: a net
        queue's lists are nearly all one descriptor, and the walk's calls for
        each held the packed 64 B sink at 0.82 of the split one's (0.91-0.94
        without them; benchmarks/vhost_user.py --only packed).
        """
        cdef PDesc d
        cdef Py_ssize_t k = b.nbufs
        if self._desc == NULL or self._translated or self._nregions == 0 or k >= b.cap_bufs:
            return False
        memcpy(&d, self._desc + 16 * <uint64_t> slot, 16)
        if d.flags & (F_NEXT | F_INDIRECT) or d.id >= self.size or self._taken[d.id] != 0:
            return False
        if not append_in_region(b, &self._regions[self._last_region], d.addr, d.len, (d.flags & F_WRITE) != 0):
            return False
        buf_id[0] = d.id
        return True

    cdef int _walk(self, const uint8_t *ring, uint32_t ring_len, uint32_t first, ChainBatch b,
                   uint16_t *buf_id) noexcept nogil:
        """Read the list at slot ``first`` of ``ring`` into ``b`` (2.8.6-2.8.7, 2.8.19-2.8.20 rules).

        ``ring`` is the Descriptor Ring (``ring_len`` = Queue Size), or the
        saved descriptors of one list being resubmitted (``ring_len`` of them).
        """
        cdef PDesc d, t
        cdef uint32_t slot = first, taken = 0, count, i
        cdef bint seen_writable = False
        cdef uint8_t *host
        cdef int rc
        while True:
            self._err.desc = <uint16_t> slot
            if taken == self.size:
                self._err.count = self.size + 1
                return E_TOO_LONG
            if slot >= ring_len:  # a resubmitted list whose last saved descriptor has NEXT
                self._err.count = ring_len + 1
                return E_TOO_LONG
            taken += 1
            self._walked = taken
            memcpy(&d, ring + 16 * <uint64_t> slot, 16)
            if d.flags & F_INDIRECT:
                if taken > 1:
                    return E_INDIRECT_IN_CHAIN
                if d.flags & F_NEXT:
                    return E_INDIRECT_NEXT
                if d.len == 0 or d.len % 16:
                    self._err.len = d.len
                    return E_INDIRECT_LEN
                rc = self._check_buffer(d.addr, d.len, False, &host)
                if rc:
                    self._err.addr = d.addr
                    self._err.len = d.len
                    return rc
                count = d.len // 16
                if count > self.size:
                    self._err.count = count
                    return E_TOO_LONG
                for i in range(count):
                    self._err.desc = <uint16_t> i
                    rc = self._read_desc(host, d.addr, i, &t)
                    if rc:
                        self._err.addr = d.addr
                        return rc
                    if t.flags & F_INDIRECT:
                        return E_NESTED
                    rc = self._add_buffer(b, &t, i, &seen_writable)
                    if rc:
                        return rc
                self._err.desc = <uint16_t> slot
            else:
                rc = self._add_buffer(b, &d, slot, &seen_writable)
                if rc:
                    return rc
                if d.flags & F_NEXT:
                    slot = slot + 1 if slot + 1 < self.size else 0
                    continue
            # 2.8.6: the Buffer ID is in the list's last descriptor.
            self._err.count = d.id
            if d.id >= self.size:
                return E_BUF_ID
            if self._taken[d.id] != 0:
                return E_ID_IN_FLIGHT
            buf_id[0] = d.id
            return 0

    cdef object _walk_error(self, uint32_t head, int rc):
        cdef int q = self.index
        cdef int desc = self._err.desc
        cause, self._err_cause = self._err_cause, None
        if rc == E_TOO_LONG:
            return checks.too_long(q, desc, head, self._err.count, self.size)
        if rc == E_NESTED:
            return checks.nested_indirect(q, desc, head)
        if rc == E_INDIRECT_NEXT:
            return checks.indirect_next(q, desc, head)
        if rc == E_INDIRECT_IN_CHAIN:
            return pchecks.indirect_in_chain(q, desc, head)
        if rc == E_INDIRECT_LEN:
            return checks.indirect_length(q, desc, head, self._err.len)
        if rc == E_WRAP:
            return checks.buffer_wraps(q, desc, head, self._err.addr, self._err.len)
        if rc == E_OUTSIDE:
            return checks.buffer_outside(q, desc, head, self._err.addr, self._err.len, cause)
        if rc == E_ORDER:
            return checks.order(q, desc, head)
        if rc == E_UNREADABLE:
            return checks.table_unreadable(q, desc, head, self._err.addr, cause)
        if rc == E_BUF_ID:
            return pchecks.buffer_id(q, desc, head, self._err.count, self.size)
        if rc == E_ID_IN_FLIGHT:
            return pchecks.id_in_flight(q, desc, head, self._err.count)
        return MemoryError()

    # -- dirty logging (see _packed_py.PackedQueue.set_dirty_log) -------------------------
    def set_dirty_log(self, log, used_ranges=()):
        """Log device writes in ``log`` (a DirtyLog; None stops), and the ring at ``used_ranges``."""
        cdef uint8_t[::1] bits
        cdef Py_ssize_t i
        self._log = None
        self._log_view = None
        self._log_bits = NULL
        self._log_size = 0
        self._used_log_n = 0
        self._log_beyond = 0
        self._log_bufs = {}
        if log is None:
            return
        ranges = list(used_ranges)
        self._used_log = <uint64_t *> _grow(self._used_log, (2 * len(ranges) + 2) * sizeof(uint64_t))
        for i, (gpa, length) in enumerate(ranges):
            self._used_log[2 * i] = gpa
            self._used_log[2 * i + 1] = length
        self._used_log_n = len(ranges)
        if len(log.bitmap):
            bits = log.bitmap
            self._log_view = bits
            self._log_bits = &bits[0]
            self._log_size = bits.shape[0]
        self._log = log

    cdef int _log_buffer(self, uint64_t addr, uint64_t length, uint8_t *host) except -1:
        """Log a device-writable buffer at its guest-physical pages."""
        cdef Region *r
        cdef int i
        if length == 0:
            return 0
        if not self._translated:
            self._log_beyond += log_mark(self._log_bits, self._log_size, addr, length)
            return 0
        if host != NULL:
            for i in range(self._nregions):
                r = &self._regions[i]
                if r.host <= host and host < r.host + r.size:
                    self._log_beyond += log_mark(self._log_bits, self._log_size, r.gpa + <uint64_t> (host - r.host),
                                                 length)
                    return 0
        try:
            pieces = self.memory.translate(addr, length, Access.WRITE)
        except GuestMemoryError:
            self._log.unresolved += 1
            return 0
        for gpa, n in pieces:
            self._log_beyond += log_mark(self._log_bits, self._log_size, gpa, n)
        return 0

    cdef void _log_used_ring(self) noexcept nogil:
        cdef Py_ssize_t i
        for i in range(self._used_log_n):
            self._log_beyond += log_mark(self._log_bits, self._log_size, self._used_log[2 * i], self._used_log[2 * i + 1])

    cdef int _log_done(self) except -1:
        self._log_used_ring()
        if self._log_beyond:
            self._log.beyond += self._log_beyond
            self._log_beyond = 0
        if self._log.notify_fd is not None:
            self._log.notify()
        return 0

    # -- used side -------------------------------------------------------------------
    cdef int _check_used(self, Py_ssize_t head, Py_ssize_t length) except -1:
        if head < 0 or head >= self.size or self._taken[head] == 0:
            raise pchecks.used_not_in_flight(self.index, head)
        if length < 0 or length > USED_LEN_MAX:
            raise checks.used_len(self.index, head, length)
        return 0

    cdef inline uint32_t _take(self, uint16_t head) noexcept nogil:
        """Count the list of ``head`` returned (the caller checked it is in flight); the ring slots it took."""
        cdef uint32_t taken = self._taken[head]
        self._taken[head] = 0
        self._n_in_flight -= 1
        if self.in_order:
            self._order_first = self._order_slot(1)
            self._order_n -= 1
        return taken

    cdef void _push_one(self, uint16_t head, uint32_t length, uint32_t skipped) noexcept nogil:
        """Write the used descriptor of ``head`` for it and the ``skipped`` slots of lists it stands for (2.8.8)."""
        cdef uint8_t *at = self._desc + 16 * <uint64_t> self._next_used
        cdef uint32_t taken = self._take(head) + skipped
        cdef uint16_t flags = (F_AVAIL | F_USED) if self._used_wrap else 0
        # 2.8.6 / 2.8.21: id and len first, then flags (AVAIL = USED = the device's wrap counter).
        iovirt_pk_store_used(at, length, head)
        if length:
            flags |= F_WRITE
        iovirt_pk_store_release_u16(at + 14, flags)
        self._next_used += taken
        if self._next_used >= self.size:
            self._next_used -= self.size
            self._used_wrap = not self._used_wrap
        self._since_signal += taken

    def push(self, Py_ssize_t head, Py_ssize_t length):
        """Return the list of Buffer ID ``head`` with ``length`` bytes written."""
        self._sync()
        if self._n_in_flight == 0:
            raise checks.too_many_used(self.index, 1, 0)
        self._check_used(head, length)
        if self.in_order and head != self._order_at(0):
            raise checks.used_order(self.index, head, self._order_at(0))
        if self._log is not None:
            buffers = self._log_bufs.pop(head, None)
            if buffers is None:
                self._log.unresolved += 1  # popped before logging started
            else:
                for addr, n, writable in buffers:
                    if writable:
                        self._log_buffer(addr, n, NULL)
        self._n_recent = 0
        self._push_one(<uint16_t> head, <uint32_t> length, 0)
        if self._log is not None:
            self._log_done()

    def push_batch(self, batch, bint coalesce=False):
        """Return every list of ``batch`` with its used length.

        ``coalesce`` (with ``in_order``): one used descriptor per run of
        lists used whole (2.8.8); see ``_packed_py.PackedQueue.push_batch``.
        """
        cdef Py_ssize_t i, n, pos = 0
        cdef uint32_t skipped = 0
        self._sync()
        n = (<ChainBatch> batch).n if isinstance(batch, ChainBatch) else len(batch)
        if n > <Py_ssize_t> self._n_in_flight:
            raise checks.too_many_used(self.index, n, self._n_in_flight)
        if isinstance(batch, ChainBatch):
            self._push_chain_batch(<ChainBatch> batch, coalesce)
            return
        chains = list(batch)
        seen = set()
        for chain in chains:
            head, length = chain.head, chain.used_len
            if head in seen:  # twice in one batch: the second is no longer in flight
                raise pchecks.used_not_in_flight(self.index, head)
            self._check_used(head, length)
            # 2.8.8: buffers are used in the order they were made available.
            if self.in_order and head != self._order_at(pos):
                raise checks.used_order(self.index, head, self._order_at(pos))
            pos += 1
            seen.add(head)
        if self._log is not None:
            for chain in chains:
                for addr, length, writable in chain.buffers:
                    if writable:
                        self._log_buffer(addr, length, NULL)
                self._log_bufs.pop(chain.head, None)
        if n:
            self._n_recent = 0
        for i, chain in enumerate(chains):
            if coalesce and self.in_order and i != n - 1 and chain.used_len == chain.writable_len:
                skipped += self._take(chain.head)
            else:
                self._push_one(chain.head, chain.used_len, skipped)
                skipped = 0
        if self._log is not None:
            self._log_done()

    cdef int _push_chain_batch(self, ChainBatch b, bint coalesce) except -1:
        """push_batch of a popped batch, without a Python object per list: the same checks in the same order."""
        cdef Py_ssize_t i
        cdef uint16_t head
        cdef uint32_t k, skipped = 0
        cdef uint64_t writable
        self._stamp += 1
        if self._stamp == 0:  # wrapped: forget every old mark
            for k in range(self.size):
                self._mark[k] = 0
            self._stamp = 1
        for i in range(b.n):
            head = b.heads[i]
            if head < self.size and self._mark[head] == self._stamp:  # twice in one batch
                raise pchecks.used_not_in_flight(self.index, head)
            self._check_used(head, b.used_lens[i])
            # 2.8.8: buffers are used in the order they were made available.
            if self.in_order and head != self._order_at(<uint32_t> i):
                raise checks.used_order(self.index, head, self._order_at(<uint32_t> i))
            self._mark[head] = self._stamp
        if self._log is not None:
            for k in range(b.first[b.n]):
                if b.writable[k]:
                    self._log_buffer(b.addrs[k], b.lens[k], b.hosts[k])
            for i in range(b.n):
                self._log_bufs.pop(b.heads[i], None)
        if b.n:
            self._n_recent = 0
        if coalesce and self.in_order:
            # A run ends at a list not used whole (its used length short of its writable bytes).
            for i in range(b.n):
                writable = 0
                for k in range(b.first[i], b.first[i + 1]):
                    if b.writable[k]:
                        writable += b.lens[k]
                if i == b.n - 1 or b.used_lens[i] != writable:
                    self._push_one(b.heads[i], b.used_lens[i], skipped)
                    skipped = 0
                else:
                    skipped += self._take(b.heads[i])
        else:
            for i in range(b.n):
                self._push_one(b.heads[i], b.used_lens[i], 0)
        if self._log is not None:
            self._log_done()
        return 0

    # -- notifications ---------------------------------------------------------------
    cdef inline uint32_t _lap(self, uint32_t pos) noexcept nogil:
        cdef uint32_t slot = (pos & ~WRAP_BIT) % self.size
        return slot if pos & WRAP_BIT else slot + self.size

    def need_notify(self):
        """Whether the driver must be notified of the used descriptors written so far (2.8.10, 2.8.14)."""
        cdef uint16_t flags
        cdef uint32_t old, event
        cdef uint64_t since
        cdef bint had = self._signalled_valid
        self._sync()
        # The used descriptors must be visible before we read the driver's suppression fields.
        iovirt_pk_mb()
        flags = iovirt_pk_load_u16(self._driver + 2) & 3
        old, since = self._signalled, self._since_signal
        self._signalled = self._lap(self._next_used | (WRAP_BIT if self._used_wrap else 0))
        self._signalled_valid = True
        self._since_signal = 0
        if flags != EV_DESC or not self.event_idx:
            return flags != EV_DISABLE
        if not had:
            return True
        event = self._lap(iovirt_pk_load_u16(self._driver))
        return (event + 2 * self.size - old) % (2 * self.size) < since

    cdef void _publish_avail_event(self) noexcept:
        # 2.8.14: with VIRTIO_F_EVENT_IDX, ask for a kick when the next slot is made available.
        if self.event_idx and self._notify_enabled:
            iovirt_pk_store_u16(self._device, self._next_avail | (WRAP_BIT if self._avail_wrap else 0))
            self._log_used_ring()

    def enable_notification(self):
        """Ask the driver to kick again; return True if lists arrived meanwhile."""
        self._sync()
        self._notify_enabled = True
        self._publish_avail_event()
        iovirt_pk_store_u16(self._device + 2, EV_DESC if self.event_idx else EV_ENABLE)
        self._log_used_ring()
        iovirt_pk_mb()
        return self.pending() > 0

    def disable_notification(self):
        """Tell the driver kicks are not needed (we are polling)."""
        self._sync()
        self._notify_enabled = False
        iovirt_pk_store_u16(self._device + 2, EV_DISABLE)
        self._log_used_ring()
