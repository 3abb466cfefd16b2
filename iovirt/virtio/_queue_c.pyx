# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Split virtqueue, device side: the accelerated implementation.

Same API and the same rules as the reference ``_queue_py.py`` (virtio 1.2
section 2.7), which is the one to read first.  What differs is how:

- The ring parts are resolved to host pointers once, at setup and whenever
  the memory map changes (``refresh``); the hot path does no lookups for them.
- Descriptor buffers are checked against a C copy of the region table, with
  the GIL released around the batch loop.  A buffer that the table cannot
  resolve in one region (it spans regions or lies outside memory) takes the
  slow path through :class:`~iovirt.memory.GuestMemory` under the GIL, so
  both implementations accept and reject exactly the same chains.
- With a translator in front (an IOMMU), a
  :class:`~iovirt.virtio.iotlb.CachedTranslator` is asked in C: a hit in its
  IOTLB needs no GIL, a miss takes the GIL to call its ``fill``.  The buffer
  then gets a host pointer if it is one run in guest-physical memory and one
  region; a buffer contiguous in IOVA but not in GPA keeps a NULL host pointer
  (the data paths then go through GuestMemory).  Like the reference, buffers
  are checked for reading; a device-writable buffer gets a host pointer only
  if its pages are known to allow writing, so a write to a read-only page
  still goes through GuestMemory and faults there.  Other translators take
  the slow path for every buffer.
- The ring parts are translated once, at setup and ``refresh``: after the
  driver remaps a ring's IOVA, ``refresh`` must be called (as after a memory
  table change).
- Popped chains go into a :class:`ChainBatch` of flat C arrays; no Python
  object per descriptor or per chain is made unless a caller asks for one.
- Dirty logging (``set_dirty_log``, see :mod:`iovirt.virtio.dirtylog`) marks
  the bitmap in C with atomic ORs; a buffer's guest-physical address comes
  from its host pointer (or is its address, without a translator), and only
  a buffer without a host pointer behind a translator asks GuestMemory.
- Shared-memory ordering follows 2.7.13: the avail idx is loaded with acquire
  semantics before the ring entries, the used idx stored with release
  semantics after them, and a full fence separates publishing used entries
  from reading the driver's suppression fields.

The queue holds buffer exports of the regions' views, so a region cannot be
closed while a queue still resolves into it: call ``refresh`` (or drop the
queue) after removing regions and before closing them.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy
from cpython.mem cimport PyMem_Malloc, PyMem_Realloc, PyMem_Free

from iovirt.memory import Access, GuestMemoryError, TranslationPending
from iovirt.virtio._iotlb_c cimport CachedTranslator, TR_MAPPED, TR_PENDING, TR_SCATTERED
from iovirt.virtio._dirtylog_c cimport log_mark
from iovirt.virtio.chain import DescChain
from iovirt.virtio import _queue_checks as checks
from iovirt.virtio.layout import check_layout
from iovirt.virtio.state import QueueState

IMPLEMENTATION = "cython"
cdef Py_ssize_t USED_LEN_MAX = checks.USED_LEN_MAX

cdef extern from *:
    """
    static inline uint16_t iovirt_load_acquire_u16(const uint8_t *p) {
        uint16_t v; v = __atomic_load_n((const uint16_t *)p, __ATOMIC_ACQUIRE); return v;
    }
    static inline uint16_t iovirt_load_u16(const uint8_t *p) {
        uint16_t v; memcpy(&v, p, 2); return v;
    }
    static inline void iovirt_store_u16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
    static inline void iovirt_store_release_u16(uint8_t *p, uint16_t v) {
        __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELEASE);
    }
    static inline void iovirt_store_used_elem(uint8_t *p, uint32_t id, uint32_t len) {
        uint32_t e[2] = {id, len}; memcpy(p, e, 8);
    }
    static inline void iovirt_mb(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
    """
    uint16_t iovirt_load_acquire_u16(const uint8_t *p) nogil
    uint16_t iovirt_load_u16(const uint8_t *p) nogil
    void iovirt_store_u16(uint8_t *p, uint16_t v) nogil
    void iovirt_store_release_u16(uint8_t *p, uint16_t v) nogil
    void iovirt_store_used_elem(uint8_t *p, uint32_t id, uint32_t len) nogil
    void iovirt_mb() nogil

cdef enum:
    F_NEXT = 1
    F_WRITE = 2
    F_INDIRECT = 4
    USED_F_NO_NOTIFY = 1
    AVAIL_F_NO_INTERRUPT = 1

# Walk results: 0 is a good chain; the others name the rule broken.
cdef enum:
    E_HEAD = 1
    E_NEXT
    E_LOOP
    E_TOO_LONG
    E_NESTED
    E_INDIRECT_NEXT
    E_INDIRECT_LEN
    E_WRAP
    E_OUTSIDE
    E_ORDER
    E_UNREADABLE
    E_NOMEM
    E_PENDING


cdef class ChainBatch:
    """Chains popped by one ``pop_batch``, stored as flat arrays.

    ``len()``, indexing and iteration give :class:`~iovirt.virtio.chain.DescChain`
    objects (made on demand); ``head(i)`` and ``set_used_len(i, n)`` touch
    the arrays directly.
    """

    def __cinit__(self):
        self.n = 0
        self.nbufs = 0
        self.cap_chains = 0
        self.cap_bufs = 0

    def __dealloc__(self):
        PyMem_Free(self.heads)
        PyMem_Free(self.used_lens)
        PyMem_Free(self.first)
        PyMem_Free(self.addrs)
        PyMem_Free(self.lens)
        PyMem_Free(self.writable)
        PyMem_Free(self.hosts)

    cdef int _reserve_chains(self, Py_ssize_t cap) except -1:
        if cap <= self.cap_chains:
            return 0
        self.heads = <uint16_t *> _grow(self.heads, cap * sizeof(uint16_t))
        self.used_lens = <uint32_t *> _grow(self.used_lens, cap * sizeof(uint32_t))
        self.first = <uint32_t *> _grow(self.first, (cap + 1) * sizeof(uint32_t))
        self.cap_chains = cap
        return 0

    cdef int _reserve_bufs(self, Py_ssize_t cap) except -1:
        if cap <= self.cap_bufs:
            return 0
        self.addrs = <uint64_t *> _grow(self.addrs, cap * sizeof(uint64_t))
        self.lens = <uint32_t *> _grow(self.lens, cap * sizeof(uint32_t))
        self.writable = <uint8_t *> _grow(self.writable, cap * sizeof(uint8_t))
        self.hosts = <uint8_t **> _grow(self.hosts, cap * sizeof(uint8_t *))
        self.cap_bufs = cap
        return 0

    def __len__(self):
        return self.n

    def head(self, Py_ssize_t i):
        """Head descriptor index of chain ``i``."""
        self._check(i)
        return self.heads[i]

    def set_used_len(self, Py_ssize_t i, Py_ssize_t length):
        """Bytes the device wrote into chain ``i`` (reported in the used ring)."""
        self._check(i)
        if length < 0 or length > USED_LEN_MAX:
            raise checks.batch_used_len(length)
        self.used_lens[i] = <uint32_t> length

    cdef int _check(self, Py_ssize_t i) except -1:
        if i < 0 or i >= self.n:
            raise IndexError(f"chain {i} not in batch of {self.n}")
        return 0

    def __getitem__(self, Py_ssize_t i):
        if i < 0:
            i += self.n
        self._check(i)
        cdef uint32_t k
        bufs = [(self.addrs[k], self.lens[k], bool(self.writable[k])) for k in range(self.first[i], self.first[i + 1])]
        chain = DescChain(self.heads[i], bufs)
        chain.used_len = self.used_lens[i]
        return chain

    def __iter__(self):
        cdef Py_ssize_t i
        for i in range(self.n):
            yield self[i]


cdef void *_grow(void *p, size_t nbytes) except NULL:
    cdef void *q = PyMem_Realloc(p, nbytes)
    if q == NULL:
        raise MemoryError()
    return q


cdef ChainBatch _empty_batch(ChainBatch batch, Py_ssize_t chains):
    """``batch`` (or a new one) emptied, with room for ``chains`` chains."""
    if batch is None:
        batch = ChainBatch()
    batch.n = 0
    batch.nbufs = 0
    batch._reserve_chains(chains if chains > 0 else 1)
    batch.first[0] = 0
    return batch


cdef class Virtqueue:
    """The base of the accelerated split and packed queues: the device data paths take either."""


cdef class SplitQueue(Virtqueue):
    """The device side of one split virtqueue (accelerated; see ``_queue_py.SplitQueue``)."""

    def __cinit__(self):
        self._regions = NULL
        self._log_bits = NULL
        self._used_log = NULL
        self._order = NULL

    def __dealloc__(self):
        PyMem_Free(self._regions)
        PyMem_Free(self._used_log)
        PyMem_Free(self._order)

    def __init__(self, memory, uint32_t size, uint64_t desc_addr, uint64_t avail_addr, uint64_t used_addr,
                 *, int index=0, bint event_idx=False, int last_avail_idx=0, int used_idx=0, bint in_order=False):
        check_layout(memory, index, size, desc_addr, avail_addr, used_addr)
        self.memory = memory
        self.index = index
        self.size = size
        self._mask = size - 1
        self.desc_addr = desc_addr
        self.avail_addr = avail_addr
        self.used_addr = used_addr
        self.event_idx = event_idx
        self.in_order = in_order
        self._order = <uint16_t *> _grow(self._order, size * sizeof(uint16_t))
        self._order_first = 0
        self._order_n = 0
        self._last_avail_idx = last_avail_idx & 0xFFFF
        self._used_idx = used_idx & 0xFFFF
        self._signalled_valid = False
        self._notify_enabled = True
        self._in_flight = 0
        self._pending_error = None
        self._refused_rc = 0
        self._released = False
        self._resolve()

    # -- state ---------------------------------------------------------------
    @classmethod
    def from_state(cls, memory, state):
        """Rebuild a queue from saved state, re-validating every field."""
        checks.check_state(state)
        return cls(memory, state.size, state.desc_addr, state.avail_addr, state.used_addr,
                   index=state.index, event_idx=bool(state.event_idx),
                   last_avail_idx=state.last_avail_idx, used_idx=state.used_idx, in_order=bool(state.in_order))

    def state(self):
        """Plain-data snapshot of the queue."""
        return QueueState(size=self.size, desc_addr=self.desc_addr, avail_addr=self.avail_addr,
                          used_addr=self.used_addr, last_avail_idx=self._last_avail_idx,
                          used_idx=self._used_idx, event_idx=bool(self.event_idx), index=self.index,
                          in_order=bool(self.in_order))

    @property
    def last_avail_idx(self):
        """Index of the next avail entry the device will take."""
        return self._last_avail_idx

    @property
    def used_idx(self):
        """The device's used idx (published after each push)."""
        return self._used_idx

    # -- host pointer resolution -------------------------------------------------
    def refresh(self):
        """Re-validate the ring and re-resolve host pointers after the memory map changed."""
        if self._released:
            raise checks.released(self.index)
        self._views = None
        check_layout(self.memory, self.index, self.size, self.desc_addr, self.avail_addr, self.used_addr)
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
        (desc, desc_len), (avail, avail_len), (used, used_len) = checks.ring_parts(
            self.size, self.desc_addr, self.avail_addr, self.used_addr)
        self._desc = self._ring_host(desc, desc_len)
        self._avail = self._ring_host(avail, avail_len)
        self._used = self._ring_host(used, used_len)
        return 0

    cdef uint8_t *_ring_host(self, uint64_t addr, uint64_t length) except NULL:
        # check_layout proved the part is accessible; translate once here.
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
        self._desc = self._avail = self._used = NULL
        self._released = True

    cdef int _sync(self) except -1:
        if self._released:
            raise checks.released(self.index)
        # This runs on every pop and push: the counter is read through a pointer, not as a Python
        # attribute.  A view's translator is fixed (GuestMemory.translator): only the regions change.
        if self._gen_cell[0] != self._gen:
            self.refresh()
        return 0

    # -- avail side ----------------------------------------------------------------
    def avail_idx(self):
        """The driver's avail ``idx``."""
        self._sync()
        return iovirt_load_acquire_u16(self._avail + 2)

    cdef int _pending(self) except -1:
        cdef uint16_t count = <uint16_t> (iovirt_load_acquire_u16(self._avail + 2) - self._last_avail_idx)
        if count > self.size:
            raise checks.avail_index(self.index, count, self._last_avail_idx, self.size)
        return count

    def pending(self):
        """How many chains the driver has made available and we have not popped."""
        self._sync()
        return self._pending()

    def pop(self):
        """Take the next available chain, or ``None`` when there is none."""
        batch = self.pop_batch(1)
        return batch[0] if len(batch) else None

    cdef int _raise_pending(self) except -1:
        """Raise the error a previous batch deferred; then see the memory map as it is now."""
        if self._pending_error is not None:
            error, self._pending_error = self._pending_error, None
            raise error
        if self._refused_rc:
            rc, self._refused_rc = self._refused_rc, 0
            raise self._walk_error(self._refused_head, rc)
        return self._sync()

    def pop_batch(self, Py_ssize_t max_chains, ChainBatch batch=None):
        """Take up to ``max_chains`` available chains (into ``batch`` if given, reusing it).

        A malformed chain met after good ones is raised by the next call, so
        no valid chain is lost.  A chain whose translation is pending
        (``TranslationPending``) stays available and ends the batch.
        """
        if batch is None:
            batch = ChainBatch()
        self.pop_into(batch, max_chains)
        return batch

    cdef Py_ssize_t pop_into(self, ChainBatch batch, Py_ssize_t max_chains) except -1:
        """:meth:`pop_batch` for C callers: into ``batch`` (emptied first), no Python object made; how many."""
        cdef Py_ssize_t count, n
        cdef uint16_t failed = 0
        cdef int rc = 0
        self._raise_pending()
        count = self._pending()
        if count > max_chains:
            count = max_chains
        self._check_in_order_room(count)
        _empty_batch(batch, count)
        # The interpreter lock stays held: the walk of a batch is short, the caller's loop holds the lock
        # around it anyway, and releasing and retaking it was an eighth of the ring's time (benchmarks/ring.py, perf).
        n = self._take(batch, count, &rc, &failed)
        if rc != 0 and rc != E_PENDING:
            # The chain that failed counts as taken (the device fails before any of it is used); a chain whose
            # translation is pending is not the driver's fault: it stays available, for a later call.
            self._last_avail_idx += 1
            self._in_flight += 1
            if self.in_order:
                self._order[(self._order_first + self._order_n) & self._mask] = failed
                self._order_n += 1
        self._publish_avail_event()
        if rc != 0 and rc != E_PENDING:
            error = self._walk_error(failed, rc)
            if n == 0:
                raise error
            self._pending_error = error
        return n

    cdef inline Py_ssize_t _take(self, ChainBatch b, Py_ssize_t count, int *rc, uint16_t *failed) noexcept nogil:
        """Walk up to ``count`` available chains into ``b`` (emptied, with room for them); how many were taken.

        Stops before the first chain the walk refuses: ``rc[0]`` says why,
        ``failed[0]`` is its head, and it is not taken (``b`` as it was
        before it).  The chains taken move the avail index and the in-flight
        count, and go into the order ring of a queue in order (2.7.9).  The
        counters stay in locals until the loop ends: the walk takes the
        queue, so fields written in the loop went through memory on every chain.
        """
        cdef const uint8_t *ring = self._avail + 4
        cdef uint16_t last = self._last_avail_idx
        cdef Py_ssize_t n = 0, k
        cdef uint16_t head
        rc[0] = 0
        while n < count:
            head = iovirt_load_u16(ring + 2 * (<uint16_t> (last + n) & self._mask))
            # The cheapest walk that can take the chain: one descriptor, direct ones, the general walk.
            if not self._single(head, b) and not self._walk_direct(head, b):
                rc[0] = self._walk(head, b)
                if rc[0] != 0:
                    b.nbufs = b.first[n]
                    failed[0] = head
                    break
            b.heads[n] = head
            b.used_lens[n] = 0
            n += 1
            b.first[n] = <uint32_t> b.nbufs
        b.n = n
        if self.in_order:
            for k in range(n):
                self._order[(self._order_first + self._order_n + k) & self._mask] = b.heads[k]
            self._order_n += <uint32_t> n
        self._last_avail_idx = <uint16_t> (last + n)
        self._in_flight += <uint32_t> n
        return n

    # -- the same without the interpreter ----------------------------------------------
    # A data path's loop that runs with the GIL released (net's forward) pops and pushes with these.
    # They serve the common case only, and leave everything else to the calls above, unchanged: a
    # queue with dirty logging, translated addresses, a deferred error or a chain the walk refuses is not theirs.
    cdef int fast_ready(self) except -1:
        """Whether :meth:`pop_fast` and :meth:`push_fast` may serve the queue now (the memory map refreshed).

        The caller holds what keeps the queue as it is while they run (the
        data plane's lock: vhost-user requests take it too).
        """
        self._sync()
        return not (self._translated or self._log is not None or self._pending_error is not None or self._refused_rc)

    cdef Py_ssize_t pop_fast(self, ChainBatch b, Py_ssize_t max_chains) noexcept nogil:
        """:meth:`pop_into` for chains that walk cleanly: into ``b`` (emptied; room for ``max_chains`` chains).

        Stops before the first chain anything else would meet (an error, a
        translation pending) and before an avail index beyond Queue Size,
        leaving them available: :meth:`pop_into` takes them next, and raises
        or defers as it does.  In order, no more than the order ring has
        places for.  How many chains were taken; -1 if none was but some are
        available (they are :meth:`pop_into`'s).
        """
        cdef Py_ssize_t count = self.available_fast()
        cdef uint16_t failed
        cdef int rc
        cdef Py_ssize_t n
        b.n = 0
        b.nbufs = 0
        b.first[0] = 0
        if count < 0 or self._refused_rc:
            return -1
        if count > max_chains:
            count = max_chains
        if count > b.cap_chains:  # a caller's want may exceed the room it reserved (TSO: frames > chains)
            count = b.cap_chains
        if self.in_order and count > self.size - <Py_ssize_t> self._in_flight:
            count = self.size - <Py_ssize_t> self._in_flight  # pop_into raises for it: leave it that way
        n = self._take(b, count, &rc, &failed)
        self._publish_avail_event()
        if n > 0 and rc != 0 and rc != E_PENDING:
            # As pop_into: the good chains are taken, and the next pop raises for the one that failed (the
            # chain stays untaken here: the device fails before anything else is popped).
            self._refused_rc = rc
            self._refused_head = failed
        return -1 if n == 0 and count > 0 else n

    cdef void rewind_fast(self, Py_ssize_t count) noexcept nogil:
        """Give back the last ``count`` chains :meth:`pop_fast` took (unused; at most those)."""
        self._last_avail_idx -= <uint16_t> count
        self._in_flight -= <uint32_t> count
        if self.in_order:
            self._order_n -= <uint32_t> count

    cdef void push_fast(self, ChainBatch b, bint coalesce) noexcept nogil:
        """:meth:`push_chains` of a batch :meth:`pop_fast` took, whole: its used entries, then the idx (2.7.8.2).

        In order, the batch is the front of the order ring (its chains were
        taken and are returned in the order they were made available, so
        there is nothing to check), and with ``coalesce`` a run of chains
        used whole has one used entry, its last chain's (2.7.9), as
        :meth:`push_chains` writes it.
        """
        cdef Py_ssize_t i
        cdef uint16_t idx = self._used_idx, start = self._used_idx
        cdef uint32_t k, writable
        if self.in_order and coalesce:
            for i in range(b.n):
                idx += 1
                writable = 0
                for k in range(b.first[i], b.first[i + 1]):
                    if b.writable[k]:
                        writable += b.lens[k]
                if i == b.n - 1 or b.used_lens[i] != writable:
                    iovirt_store_used_elem(self._used + 4 + 8 * (start & self._mask), b.heads[i], b.used_lens[i])
                    start = idx
        else:
            for i in range(b.n):
                iovirt_store_used_elem(self._used + 4 + 8 * (idx & self._mask), b.heads[i], b.used_lens[i])
                idx += 1
        if self.in_order:
            self._order_first = (self._order_first + <uint32_t> b.n) & self._mask
            self._order_n -= <uint32_t> b.n
        self._in_flight -= <uint32_t> b.n
        self._used_idx = idx
        iovirt_store_release_u16(self._used + 2, idx)

    def resubmit(self, heads, ChainBatch batch=None):
        """Take the chains of ``heads`` again, in that order, without moving the avail index.

        vhost-user "Inflight I/O tracking": requests a previous back-end
        popped and never completed are resubmitted from the inflight region's
        list, not from the avail ring, since others popped with them may have
        completed out of order.  Returns the chains taken; one whose
        translation is pending ends the batch (the caller keeps the rest).
        """
        cdef Py_ssize_t k, n = len(heads)
        cdef uint16_t head = 0
        cdef int rc = 0
        self._raise_pending()
        self._check_in_order_room(n)
        batch = _empty_batch(batch, n)
        for k in range(n):
            if not 0 <= heads[k] < self.size:
                raise checks.head_index(self.index, heads[k], self.size)
            head = heads[k]
            rc = self._walk(head, batch)
            if rc != 0:
                batch.nbufs = batch.first[batch.n]
                break
            self._in_flight += 1
            if self.in_order:
                self._order[(self._order_first + self._order_n) & self._mask] = head
                self._order_n += 1
            batch.heads[batch.n] = head
            batch.used_lens[batch.n] = 0
            batch.n += 1
            batch.first[batch.n] = <uint32_t> batch.nbufs
        if rc != 0 and rc != E_PENDING:
            raise self._walk_error(head, rc)
        return batch

    def rewind(self, Py_ssize_t count):
        """Give back the last ``count`` popped chains unused: they will be popped again."""
        checks.check_rewind(self.index, count, self._in_flight)
        self._last_avail_idx -= <uint16_t> count
        self._in_flight -= count
        if self.in_order:
            self._order_n -= count

    cdef int _check_in_order_room(self, Py_ssize_t count) except -1:
        # See _queue_py.SplitQueue._check_in_order_room: the order ring has Queue Size places.
        if self.in_order and self._in_flight + count > self.size:
            raise checks.in_order_overrun(self.index, self._in_flight, count, self.size)
        return 0

    cdef int _read_desc(self, const uint8_t *table_host, uint64_t table_gpa, uint32_t i, Desc *d) noexcept nogil:
        if table_host != NULL:
            memcpy(d, table_host + 16 * <uint64_t> i, 16)
            return 0
        with gil:
            return self._read_desc_slow(table_gpa, i, d)

    # The slow paths below hold the GIL and keep their Python locals to
    # themselves: a Python local in a nogil function makes Cython take the
    # GIL on every exit, on the hot path too.
    cdef int _read_desc_slow(self, uint64_t table_gpa, uint32_t i, Desc *d) noexcept:
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
            # A device-writable buffer needs write permission, a readable one read.
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
            # Scattered in GPA, or not in one region: GuestMemory decides (the
            # translation is cached by now), and the buffer has no host pointer.
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

    cdef inline bint _single(self, uint16_t head, ChainBatch b) noexcept nogil:
        """Take the commonest chain without the general walk: one direct descriptor, inside one region.

        False where anything else holds, and :meth:`_walk_direct` or
        :meth:`_walk` takes the chain (several descriptors, an indirect table,
        a translated or unmapped address, a bad head, a full batch): small
        enough to inline, it saves most chains of a net queue the walk's setup
        (benchmarks/ring.py).
        """
        cdef Desc d
        cdef Py_ssize_t k = b.nbufs
        if head >= self.size or self._desc == NULL or self._translated or self._nregions == 0 or k >= b.cap_bufs:
            return False
        memcpy(&d, self._desc + 16 * <uint64_t> head, 16)
        if d.flags & (F_NEXT | F_INDIRECT):
            return False
        return append_in_region(b, &self._regions[self._last_region], d.addr, d.len, (d.flags & F_WRITE) != 0)

    cdef inline bint _walk_direct(self, uint16_t head, ChainBatch b) noexcept nogil:
        """Take the common chain without the general walk: direct descriptors, each inside the last region hit.

        False where anything else holds, with ``b`` as it was, and
        :meth:`_walk` takes the chain from its head (an indirect table, a
        translated or unmapped address, a region change, a bad head, next or
        order, a chain too long or a loop, a full batch: each of its errors is
        the general walk's).  A leaf with no call in its loop, so every
        variable stays in a register: the general walk's slow-path calls
        spilled its loop variables to the stack, a third of its time
        (benchmarks/ring.py, perf annotate).
        """
        cdef const uint8_t *table = self._desc
        cdef uint32_t size = self.size, i = head, n = 0
        cdef Region *r
        cdef uint64_t rgpa, rsize, off
        cdef uint8_t *rhost
        cdef Py_ssize_t k = b.nbufs, cap = b.cap_bufs
        cdef uint64_t *addrs = b.addrs
        cdef uint32_t *lens = b.lens
        cdef uint8_t *writables = b.writable
        cdef uint8_t **hosts = b.hosts
        cdef bint seen_writable = False, writable
        cdef Desc d
        if head >= size or table == NULL or self._translated or self._nregions == 0:
            return False
        r = &self._regions[self._last_region]
        rgpa, rsize, rhost = r.gpa, r.size, r.host
        while True:
            if n >= size or k >= cap:  # a (size + 1)-th buffer: too long or a loop (2.7.5.3.1)
                return False
            memcpy(&d, table + 16 * <uint64_t> i, 16)
            if d.flags & F_INDIRECT:
                return False
            writable = (d.flags & F_WRITE) != 0
            if seen_writable and not writable:
                return False
            seen_writable = writable
            off = d.addr - rgpa
            if off >= rsize or d.len > rsize - off:
                return False
            addrs[k] = d.addr
            lens[k] = d.len
            writables[k] = writable
            hosts[k] = rhost + off
            k += 1
            n += 1
            if not d.flags & F_NEXT:
                b.nbufs = k
                return True
            if d.next >= size:
                return False
            i = d.next

    cdef int _walk(self, uint16_t head, ChainBatch b) noexcept nogil:
        """Follow a chain from ``head``, appending its buffers to ``b`` (2.7.5 rules)."""
        cdef Desc d, slow
        cdef const uint8_t *table_host = self._desc
        cdef uint64_t table_gpa = self.desc_addr
        cdef uint32_t table_len = self.size
        cdef uint32_t i = head, visited = 0, count, nbufs = 0
        cdef bint indirect = False, seen_writable = False, writable
        # Untranslated addresses in a region table: each buffer's host pointer is looked up here,
        # in the last region hit, before the general _check_buffer (a call per buffer cost a
        # tenth of the ring benchmark's time).
        cdef bint direct = not self._translated and self._nregions > 0
        cdef Region *r
        cdef uint64_t off
        cdef uint8_t *host
        cdef uint8_t *slow_host
        cdef int rc = 0
        # b.nbufs, b's arrays and the last region in locals (b.nbufs stored when the chain is
        # whole: a failed chain's buffers are dropped by the caller): a byte store (``writable``)
        # may alias anything, so fields read in the loop were read again for every buffer.
        cdef Py_ssize_t k = b.nbufs
        cdef uint64_t *addrs = b.addrs
        cdef uint32_t *lens = b.lens
        cdef uint8_t *writables = b.writable
        cdef uint8_t **hosts = b.hosts
        # Queue Size in a local: a byte store (``writable``) may alias the field.
        cdef uint32_t size = self.size
        r = &self._regions[self._last_region]
        self._err.desc = head
        if head >= size:
            return E_HEAD
        # Errors break out of the loop with ``rc`` set; the descriptor at fault (``i``) is stored
        # once there, not on every turn.
        while True:
            visited += 1
            if visited > table_len:
                self._err.count = table_len
                rc = E_LOOP
                break
            if table_host != NULL:
                # Into ``d`` here, not through a pointer the slow path also takes: a ``d`` whose
                # address escapes lives on the stack, and reading its fields back after the 16-byte
                # copy stalled the walk (store forwarding) for a third of its time.
                memcpy(&d, table_host + 16 * <uint64_t> i, 16)
            else:
                rc = self._read_desc(NULL, table_gpa, i, &slow)  # through guest memory, with the GIL
                if rc:
                    self._err.addr = table_gpa
                    break
                d = slow
            if d.flags & F_INDIRECT:
                if indirect:
                    rc = E_NESTED
                    break
                if d.flags & F_NEXT:
                    rc = E_INDIRECT_NEXT
                    break
                if d.len == 0 or d.len % 16:
                    self._err.len = d.len
                    rc = E_INDIRECT_LEN
                    break
                rc = self._check_buffer(d.addr, d.len, False, &slow_host)
                if rc:
                    self._err.addr = d.addr
                    self._err.len = d.len
                    break
                count = d.len // 16
                if nbufs + count > size:
                    self._err.count = nbufs + count
                    rc = E_TOO_LONG
                    break
                table_host = slow_host
                table_gpa = d.addr
                table_len = count
                i = 0
                indirect = True
                visited = 0
                continue
            writable = (d.flags & F_WRITE) != 0
            if seen_writable and not writable:
                rc = E_ORDER
                break
            seen_writable = writable
            off = d.addr - r.gpa
            if direct and off < r.size and d.len <= r.size - off:
                host = r.host + off  # inside one region: no wrap, accessible
            else:
                # Through another variable, as ``slow`` above: ``host`` stays in a register.
                rc = self._check_buffer(d.addr, d.len, writable, &slow_host)
                if rc:
                    self._err.addr = d.addr
                    self._err.len = d.len
                    break
                host = slow_host
                r = &self._regions[self._last_region]  # the lookup may have moved to another region
            if k >= b.cap_bufs:
                b.nbufs = k
                with gil:
                    try:
                        b._reserve_bufs(2 * b.cap_bufs + 64)
                    except MemoryError:
                        rc = E_NOMEM
                if rc:
                    break
                addrs, lens, writables, hosts = b.addrs, b.lens, b.writable, b.hosts
            addrs[k] = d.addr
            lens[k] = d.len
            writables[k] = writable
            hosts[k] = host
            k += 1
            nbufs += 1
            if nbufs > size:
                self._err.count = nbufs
                rc = E_TOO_LONG
                break
            if not d.flags & F_NEXT:
                b.nbufs = k
                return 0
            if d.next >= table_len:
                self._err.count = d.next
                self._err.len = table_len
                rc = E_NEXT
                break
            i = d.next
        self._err.desc = <uint16_t> i
        return rc

    cdef object _walk_error(self, uint16_t head, int rc):
        cdef int q = self.index
        cdef int desc = self._err.desc
        cause, self._err_cause = self._err_cause, None
        if rc == E_HEAD:
            return checks.head_index(q, head, self.size)
        if rc == E_NEXT:
            return checks.next_index(q, desc, head, self._err.count, self._err.len)
        if rc == E_LOOP:
            return checks.loop(q, desc, head, self._err.count)
        if rc == E_TOO_LONG:
            return checks.too_long(q, desc, head, self._err.count, self.size)
        if rc == E_NESTED:
            return checks.nested_indirect(q, desc, head)
        if rc == E_INDIRECT_NEXT:
            return checks.indirect_next(q, desc, head)
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
        return MemoryError()

    # -- dirty logging (see _queue_py.SplitQueue.set_dirty_log) -------------------------
    def set_dirty_log(self, log, used_ranges=()):
        """Log device writes in ``log`` (a DirtyLog; None stops), and the used ring at ``used_ranges``."""
        cdef uint8_t[::1] bits
        cdef Py_ssize_t i
        self._log = None
        self._log_view = None
        self._log_bits = NULL
        self._log_size = 0
        self._used_log_n = 0
        self._log_beyond = 0
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

    cdef int _log_head(self, uint16_t head) except -1:
        """Log the writable buffers of the chain at ``head``, walking it again (as libvhost-user)."""
        cdef ChainBatch b = _empty_batch(self._log_scratch, 1)
        cdef uint32_t k
        self._log_scratch = b
        if self._walk(head, b) != 0:
            self._err_cause = None
            self._log.unresolved += 1  # the driver changed the chain under the device: its loss
            return 0
        for k in range(b.nbufs):
            if b.writable[k]:
                self._log_buffer(b.addrs[k], b.lens[k], b.hosts[k])
        return 0

    cdef void _log_used_ring(self) noexcept nogil:
        # The whole used ring (a page or two): cheaper than tracking which entries changed.
        cdef Py_ssize_t i
        for i in range(self._used_log_n):
            self._log_beyond += log_mark(self._log_bits, self._log_size, self._used_log[2 * i], self._used_log[2 * i + 1])

    cdef int _log_done(self) except -1:
        """After a used-ring update: account pages beyond the log, signal its eventfd."""
        self._log_used_ring()
        if self._log_beyond:
            self._log.beyond += self._log_beyond
            self._log_beyond = 0
        if self._log.notify_fd is not None:
            self._log.notify()
        return 0

    # -- used side -------------------------------------------------------------------
    cdef int _take_used(self, Py_ssize_t head, Py_ssize_t length) except -1:
        """Check a used entry for ``head`` and count its chain returned (the caller checked one is in flight)."""
        cdef uint16_t expected
        if head < 0 or head >= self.size:
            raise checks.used_id(self.index, head, self.size)
        if length < 0 or length > USED_LEN_MAX:
            raise checks.used_len(self.index, head, length)
        if self.in_order:
            # 2.7.9: buffers are used in the order they were made available.
            expected = self._order[self._order_first]
            if head != expected:
                raise checks.used_order(self.index, head, expected)
            self._order_first = (self._order_first + 1) & self._mask
            self._order_n -= 1
        self._in_flight -= 1
        return 0

    cdef int _push_one(self, Py_ssize_t head, Py_ssize_t length) except -1:
        self._take_used(head, length)
        iovirt_store_used_elem(self._used + 4 + 8 * (self._used_idx & self._mask), <uint32_t> head,
                               <uint32_t> length)
        self._used_idx += 1
        return 0

    def push(self, Py_ssize_t head, Py_ssize_t length):
        """Return one chain through the used ring with ``length`` bytes written."""
        self._sync()
        if self._in_flight < 1:
            raise checks.too_many_used(self.index, 1, self._in_flight)
        if self._log is not None and 0 <= head < self.size:
            self._log_head(<uint16_t> head)
        self._push_one(head, length)
        iovirt_store_release_u16(self._used + 2, self._used_idx)
        if self._log is not None:
            self._log_done()

    def push_batch(self, batch, bint coalesce=False):
        """Return every chain of ``batch`` with its used length; one idx update.

        ``coalesce`` (with ``in_order``): one used entry per run of chains
        used whole (2.7.9); see ``_queue_py.SplitQueue.push_batch``.
        """
        cdef Py_ssize_t n
        if isinstance(batch, ChainBatch):
            self.push_chains(<ChainBatch> batch, coalesce)
            return
        self._sync()
        chains = list(batch)
        n = len(chains)
        if n > <Py_ssize_t> self._in_flight:
            raise checks.too_many_used(self.index, n, self._in_flight)
        if self._log is not None:
            # The device wrote these buffers already: log them before the driver may see them used.
            for chain in chains:
                for addr, length, writable in chain.buffers:
                    if writable:
                        self._log_buffer(addr, length, NULL)
        if coalesce and self.in_order:
            self._push_coalesced(chains)
        else:
            for chain in chains:
                self._push_one(chain.head, chain.used_len)
        # 2.7.8.2 / 2.7.13: entries first, then the idx, with release ordering.
        iovirt_store_release_u16(self._used + 2, self._used_idx)
        if self._log is not None:
            self._log_done()

    cdef int push_chains(self, ChainBatch b, bint coalesce) except -1:
        """:meth:`push_batch` of a popped batch, for C callers: no Python object made."""
        cdef Py_ssize_t i
        cdef uint32_t k
        self._sync()
        if b.n > <Py_ssize_t> self._in_flight:
            raise checks.too_many_used(self.index, b.n, self._in_flight)
        if self._log is not None:
            # The device wrote these buffers already: log them before the driver may see them used.
            for k in range(b.first[b.n]):
                if b.writable[k]:
                    self._log_buffer(b.addrs[k], b.lens[k], b.hosts[k])
        if coalesce and self.in_order:
            self._push_coalesced(b)
        elif self.in_order:
            for i in range(b.n):
                self._push_one(b.heads[i], b.used_lens[i])
        else:
            self._push_entries(b)
        # 2.7.8.2 / 2.7.13: entries first, then the idx, with release ordering.
        iovirt_store_release_u16(self._used + 2, self._used_idx)
        if self._log is not None:
            self._log_done()
        return 0

    cdef int _push_entries(self, ChainBatch b) except -1:
        """The used entries of ``b`` (not in order): ``_push_one``'s checks and stores, in one loop."""
        cdef Py_ssize_t i
        cdef uint16_t head, idx = self._used_idx
        cdef uint32_t length
        for i in range(b.n):
            head = b.heads[i]
            length = b.used_lens[i]
            if head >= self.size:  # (a uint32 used length always fits the le32 field, USED_LEN_MAX)
                # The entries before it stay written and counted, as chain by chain; this one raises.
                self._in_flight -= <uint32_t> i
                self._used_idx = idx
                return self._take_used(head, length)
            iovirt_store_used_elem(self._used + 4 + 8 * (idx & self._mask), head, length)
            idx += 1
        self._in_flight -= <uint32_t> b.n
        self._used_idx = idx
        return 0

    cdef int _push_coalesced(self, batch) except -1:
        """2.7.9: a run's one used entry (its last chain's) at the run's first slot; idx moves by the run."""
        cdef ChainBatch b
        cdef Py_ssize_t i, last
        cdef uint32_t k
        cdef uint64_t writable
        cdef uint16_t start = self._used_idx
        if isinstance(batch, ChainBatch):
            b = <ChainBatch> batch
            last = b.n - 1
            for i in range(b.n):
                self._take_used(b.heads[i], b.used_lens[i])
                self._used_idx += 1
                writable = 0
                for k in range(b.first[i], b.first[i + 1]):
                    if b.writable[k]:
                        writable += b.lens[k]
                if i == last or b.used_lens[i] != writable:
                    iovirt_store_used_elem(self._used + 4 + 8 * (start & self._mask), b.heads[i], b.used_lens[i])
                    start = self._used_idx
        else:
            chains = list(batch)
            last = len(chains) - 1
            for i, chain in enumerate(chains):
                self._take_used(chain.head, chain.used_len)
                self._used_idx += 1
                if i == last or chain.used_len != chain.writable_len:
                    iovirt_store_used_elem(self._used + 4 + 8 * (start & self._mask), <uint32_t> chain.head,
                                           <uint32_t> chain.used_len)
                    start = self._used_idx
        return 0

    # -- notifications ---------------------------------------------------------------
    def need_notify(self):
        """Whether the driver must be notified of the used entries pushed so far (2.7.10)."""
        return bool(self.notify_needed())

    cdef int notify_needed(self) except -1:
        """:meth:`need_notify` for C callers: 1 or 0."""
        self._sync()
        return self.notify_fast()

    cdef Py_ssize_t available_fast(self) noexcept nogil:
        """Chains available now; -1 for an avail idx beyond Queue Size."""
        cdef uint16_t count = <uint16_t> (iovirt_load_acquire_u16(self._avail + 2) - self._last_avail_idx)
        return -1 if count > self.size else count

    cdef Py_ssize_t wait_fast(self) noexcept nogil:
        """Chains available now, after asking the driver to kick when it adds more (for :meth:`pop_fast`'s callers).

        The avail event (2.7.10) is published before avail idx is read
        again, with a full fence between: a chain added after the read is
        kicked, one added before is counted.  -1 for an avail idx beyond
        Queue Size (:meth:`pop_into` raises for it).
        """
        self._publish_avail_event()
        iovirt_mb()
        return self.available_fast()

    cdef bint notify_fast(self) noexcept nogil:
        """:meth:`notify_needed` once :meth:`fast_ready` held (the memory map is as it was)."""
        cdef uint16_t old, used_event
        # The used idx store must be visible before we read the driver's flags.
        iovirt_mb()
        if not self.event_idx:
            return not (iovirt_load_u16(self._avail) & AVAIL_F_NO_INTERRUPT)
        old = self._signalled_used
        self._signalled_used = self._used_idx
        if not self._signalled_valid:
            self._signalled_valid = True
            return True
        used_event = iovirt_load_u16(self._avail + 4 + 2 * self.size)
        return <uint16_t> (self._used_idx - used_event - 1) < <uint16_t> (self._used_idx - old)

    cdef void _publish_avail_event(self) noexcept nogil:
        if self.event_idx and self._notify_enabled:
            iovirt_store_u16(self._used + 4 + 8 * self.size, self._last_avail_idx)
            self._log_used_ring()

    def enable_notification(self):
        """Ask the driver to kick again; return True if chains arrived meanwhile."""
        self._sync()
        self._notify_enabled = True
        if self.event_idx:
            self._publish_avail_event()
        else:
            iovirt_store_u16(self._used, iovirt_load_u16(self._used) & ~USED_F_NO_NOTIFY)
            self._log_used_ring()
        iovirt_mb()
        return self._pending() > 0

    def disable_notification(self):
        """Tell the driver kicks are not needed (we are polling)."""
        self._sync()
        self._notify_enabled = False
        if not self.event_idx:
            iovirt_store_u16(self._used, iovirt_load_u16(self._used) | USED_F_NO_NOTIFY)
            self._log_used_ring()
