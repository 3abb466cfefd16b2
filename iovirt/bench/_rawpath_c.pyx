# cython: boundscheck=False, wraparound=False, cdivision=True
"""The bench port's raw data path in C: the twin of ``_rawpath_py.py`` (same functions, same results).

Read the reference first; this file differs only in how: guest memory is a
host pointer taken once (:class:`Window`), descriptors, avail entries and
frames are written with ``memcpy``, the avail idx is published with a
release store and a full fence before the device's suppression is read,
used entries are read after an acquire load of the used idx (2.7.13.3.1:
the device writes entries before the idx), and a received frame costs the
:class:`RawFrame`, its data ``bytes`` and a one-item tuple of used lengths
(the usual headers, all zero or all zero but ``num_buffers`` 1, are shared
``bytes``).
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memcmp, memset
from cpython.mem cimport PyMem_Realloc, PyMem_Free
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_WRITABLE, PyBUF_SIMPLE
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from cpython.list cimport PyList_GET_SIZE
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

from iovirt.bench.errors import BenchError, UsedRingError
from iovirt.memory import Access
from iovirt.virtio.defs import VIRTQ_DESC_F_WRITE as _F_WRITE, VIRTQ_DESC_SIZE as _DESC_SIZE
from iovirt.virtio.defs import VIRTQ_USED_F_NO_NOTIFY as _NO_NOTIFY
from iovirt.virtio.net.defs import ETH_HLEN as _ETH_HLEN

IMPLEMENTATION = "cython"
NUM_BUFFERS_OFFSET = 10
"""5.1.6: ``num_buffers`` is the le16 at byte 10 of the header (VERSION_1 or MRG_RXBUF forms)."""
cdef uint32_t NUM_BUFFERS_AT = NUM_BUFFERS_OFFSET

cdef uint16_t F_WRITE = _F_WRITE
cdef uint32_t DESC_SIZE = _DESC_SIZE
cdef uint32_t ETH_HLEN = _ETH_HLEN
cdef uint16_t USED_F_NO_NOTIFY = _NO_NOTIFY

cdef extern from *:
    """
    static inline uint16_t iovirt_bench_load_acquire_u16(const uint8_t *p) {
        return __atomic_load_n((const uint16_t *)p, __ATOMIC_ACQUIRE);
    }
    static inline void iovirt_bench_store_u16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
    static inline void iovirt_bench_store_release_u16(uint8_t *p, uint16_t v) {
        __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELEASE);
    }
    static inline void iovirt_bench_mb(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
    static inline uint16_t iovirt_bench_load_u16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
    static inline uint32_t iovirt_bench_load_u32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
    static inline void iovirt_bench_store_desc(uint8_t *p, uint64_t addr, uint32_t len, uint16_t flags) {
        memcpy(p, &addr, 8); memcpy(p + 8, &len, 4); memcpy(p + 12, &flags, 2); memset(p + 14, 0, 2);
    }
    """
    uint16_t iovirt_bench_load_acquire_u16(const uint8_t *p) nogil
    void iovirt_bench_store_u16(uint8_t *p, uint16_t v) nogil
    void iovirt_bench_store_release_u16(uint8_t *p, uint16_t v) nogil
    void iovirt_bench_mb() nogil
    uint16_t iovirt_bench_load_u16(const uint8_t *p) nogil
    uint32_t iovirt_bench_load_u32(const uint8_t *p) nogil
    void iovirt_bench_store_desc(uint8_t *p, uint64_t addr, uint32_t len, uint16_t flags) nogil


def monotonic_ns():
    """The clock of ingress and egress timestamps (CLOCK_MONOTONIC)."""
    return _now_ns()


cdef inline uint64_t _now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint64_t>ts.tv_sec * 1000000000ULL + <uint64_t>ts.tv_nsec


cdef class RawFrame:
    """One frame a device wrote to a bench port: bytes, dissected by scapy only when asked.

    ``hdr`` is the ``virtio_net_hdr`` the device wrote, ``data`` the
    Ethernet frame (without FCS), ``t_ns`` the egress timestamp
    (:func:`monotonic_ns` when the port took it from the used ring),
    ``buffer_lens`` the used len of every receive buffer it took.
    """

    cdef readonly bytes hdr
    cdef readonly bytes data
    cdef readonly object t_ns
    cdef readonly tuple buffer_lens
    cdef object _packet

    def __init__(self, bytes hdr, bytes data, t_ns, tuple buffer_lens):
        self.hdr = hdr
        self.data = data
        self.t_ns = t_ns
        self.buffer_lens = buffer_lens

    @property
    def packet(self):
        """``VirtioNetHdr* / Ether / ...`` (scapy), dissected on first use."""
        if self._packet is None:
            from iovirt.bench.layers import dissect  # scapy: off the raw path until asked for

            self._packet = dissect(self.hdr, self.data, self.t_ns)
        return self._packet

    def __bytes__(self):
        return self.data

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        return f"RawFrame({len(self.data)} bytes, t_ns={self.t_ns})"


cdef RawFrame _frame(bytes hdr, bytes data, object t_ns, tuple lens):
    cdef RawFrame f = RawFrame.__new__(RawFrame)
    f.hdr = hdr
    f.data = data
    f.t_ns = t_ns
    f.buffer_lens = lens
    return f


cdef class Window:
    """A writable view of guest memory ``[base, base+size)``, which must lie in one region."""

    cdef readonly uint64_t base, size
    cdef readonly object view
    cdef Py_buffer _buf
    cdef bint _held
    cdef uint8_t *host
    # Scratch for one harvest: used ids, lens, buffer addresses, and which heads were seen (by head).
    cdef uint32_t *heads
    cdef uint32_t *lens
    cdef uint64_t *slots
    cdef uint8_t *seen
    cdef Py_ssize_t cap, seen_cap

    def __init__(self, memory, uint64_t base, uint64_t size):
        self.base = base
        self.size = size
        self.view = memory.view(base, size, Access.WRITE)
        PyObject_GetBuffer(self.view, &self._buf, PyBUF_WRITABLE | PyBUF_SIMPLE)
        self._held = True
        self.host = <uint8_t *>self._buf.buf

    cdef int reserve(self, Py_ssize_t n, Py_ssize_t size) except -1:
        if n > self.cap:
            self.heads = <uint32_t *>PyMem_Realloc(self.heads, n * sizeof(uint32_t))
            self.lens = <uint32_t *>PyMem_Realloc(self.lens, n * sizeof(uint32_t))
            self.slots = <uint64_t *>PyMem_Realloc(self.slots, n * sizeof(uint64_t))
            if self.heads == NULL or self.lens == NULL or self.slots == NULL:
                raise MemoryError()
            self.cap = n
        if size > self.seen_cap:
            self.seen = <uint8_t *>PyMem_Realloc(self.seen, size)
            if self.seen == NULL:
                raise MemoryError()
            memset(self.seen + self.seen_cap, 0, size - self.seen_cap)
            self.seen_cap = size
        return 0

    cdef inline uint8_t *at(self, uint64_t addr, uint64_t length) except NULL:
        cdef uint64_t off = addr - self.base
        if not self._held:
            raise BenchError("the bench's memory window was released")
        if addr < self.base or off > self.size or length > self.size - off:
            raise BenchError(f"guest range [{addr:#x}, +{length:#x}) is outside the bench's memory window")
        return self.host + off

    def read(self, uint64_t addr, uint64_t length):
        """Copy bytes out."""
        return PyBytes_FromStringAndSize(<char *>self.at(addr, length), length)

    def write(self, uint64_t addr, const uint8_t[::1] data):
        """Copy bytes in."""
        cdef Py_ssize_t n = data.shape[0]
        if n:
            memcpy(self.at(addr, n), &data[0], n)

    def read_u16(self, uint64_t addr):
        """A le16."""
        return iovirt_bench_load_u16(self.at(addr, 2))

    def write_u16(self, uint64_t addr, uint16_t value):
        """A le16."""
        iovirt_bench_store_u16(self.at(addr, 2), value)

    def release(self):
        """Let go of the memory (before the region is closed)."""
        if self._held:
            PyBuffer_Release(&self._buf)
            self._held = False
            self.host = NULL
        self.view.release()

    def __dealloc__(self):
        if self._held:
            PyBuffer_Release(&self._buf)
        PyMem_Free(self.heads)
        PyMem_Free(self.lens)
        PyMem_Free(self.slots)
        PyMem_Free(self.seen)


cdef class _Ring:
    """A DriverQueue's layout and indexes, read once per call and written back by :meth:`store`."""

    cdef object q
    cdef uint32_t size
    cdef uint8_t *desc
    cdef uint8_t *avail
    cdef uint8_t *used
    cdef uint16_t avail_idx, last_used_idx
    cdef list free
    cdef dict inflight

    cdef int load(self, Window win, q) except -1:
        self.q = q
        self.size = q.size
        self.desc = win.at(q.desc_addr, DESC_SIZE * self.size)
        self.avail = win.at(q.avail_addr, 6 + 2 * self.size)
        self.used = win.at(q.used_addr, 6 + 8 * self.size)
        self.avail_idx = q.avail_idx
        self.last_used_idx = q.last_used_idx
        self.free = q._free
        self.inflight = q._inflight
        return 0

    cdef inline void post(self, uint16_t d, uint64_t addr, uint32_t length, uint16_t flags) noexcept:
        # One-descriptor chain ``d`` into the next avail slot (2.7.13.1, 2.7.13.2).
        iovirt_bench_store_desc(self.desc + DESC_SIZE * d, addr, length, flags)
        iovirt_bench_store_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), d)
        self.avail_idx += 1

    cdef int store(self) except -1:
        self.q.avail_idx = self.avail_idx
        self.q.last_used_idx = self.last_used_idx
        return 0


def publish(Window win, q):
    """Publish the avail idx; return whether the device wants a notification (2.7.10, as ``DriverQueue.publish``)."""
    cdef uint16_t old = q._published_idx, new = q.avail_idx, event
    cdef uint32_t size = q.size
    # The entries before the idx (release), and the idx before reading the device's suppression (full fence,
    # as Linux's virtqueue_kick_prepare).
    iovirt_bench_store_release_u16(win.at(q.avail_addr + 2, 2), new)
    q._published_idx = new
    iovirt_bench_mb()
    if q.event_idx:
        event = iovirt_bench_load_u16(win.at(q.used_addr + 4 + 8 * size, 2))
        return <uint16_t>(new - event - 1) < <uint16_t>(new - old)
    return not iovirt_bench_load_u16(win.at(q.used_addr, 2)) & USED_F_NO_NOTIFY


def tx_post(Window win, q, list frames, Py_ssize_t start, bytes hdr, list tx_free, dict tx_by_head, uint32_t buf_size):
    """Make ``hdr + frames[i]`` available from ``i = start`` while descriptors and buffers last; returns how many."""
    cdef _Ring r = _Ring()
    r.load(win, q)
    cdef Py_ssize_t i, n = PyList_GET_SIZE(frames), count = 0, hlen = len(hdr)
    cdef const uint8_t[::1] view
    cdef const uint8_t *src
    cdef Py_ssize_t flen
    cdef uint8_t *dst
    cdef object desc, slot, frame
    try:
        for i in range(start, n):
            if not r.free or not tx_free:
                break
            frame = frames[i]
            if type(frame) is bytes:
                src = <const uint8_t *>PyBytes_AS_STRING(frame)
                flen = len(<bytes>frame)
            else:
                view = bytes(frame)  # bytearray, memoryview, a scapy packet: bytes once
                src = &view[0] if view.shape[0] else NULL
                flen = view.shape[0]
            if hlen + flen > buf_size:
                raise BenchError(f"{flen}-byte frame with header exceeds the {buf_size}-byte TX buffer")
            desc = r.free.pop()
            slot = tx_free.pop()
            dst = win.at(slot, hlen + flen)
            memcpy(dst, PyBytes_AS_STRING(hdr), hlen)
            if flen:
                memcpy(dst + hlen, src, flen)
            r.post(desc, slot, hlen + flen, 0)
            r.inflight[desc] = ([desc], [])
            tx_by_head[desc] = slot
            count += 1
    finally:
        r.store()
    return count


cdef Py_ssize_t _pending(Window win, _Ring r, q) except -1:
    """How many new used entries there are, after checking the used idx is believable (2.7.8)."""
    cdef uint32_t in_flight = r.size - len(r.free)
    cdef uint16_t used_idx = iovirt_bench_load_acquire_u16(r.used + 2)
    cdef uint16_t pending = used_idx - r.last_used_idx
    if pending > in_flight:
        raise UsedRingError(
            q.index,
            f"used idx {used_idx} is {pending} entries past the last one read ({r.last_used_idx}), "
            f"but only {in_flight} descriptors are in flight (2.7.8)",
        )
    win.reserve(pending, r.size)
    return pending


cdef inline void _next_used(_Ring r, uint32_t *head, uint32_t *length) noexcept:
    cdef uint8_t *elem = r.used + 4 + 8 * (r.last_used_idx % r.size)
    head[0] = iovirt_bench_load_u32(elem)
    length[0] = iovirt_bench_load_u32(elem + 4)
    r.last_used_idx += 1


cdef object _not_in_flight(q, uint32_t head):
    return UsedRingError(
        q.index, f"used id {head} is not an in-flight head (2.7.8: used id must be the head of an available chain)"
    )


cdef inline void _used_event(_Ring r, q, Py_ssize_t taken):
    if taken and q.event_idx and q.interrupts:
        # As Linux's virtqueue_get_buf: ask for an interrupt at the next entry (2.7.10).
        iovirt_bench_store_u16(r.avail + 4 + 2 * r.size, r.last_used_idx)


def tx_reap(Window win, q, list tx_free, dict tx_by_head):
    """Take completed transmit chains, their buffers back to ``tx_free``; returns how many."""
    cdef _Ring r = _Ring()
    r.load(win, q)
    cdef Py_ssize_t k, n
    cdef uint32_t head, length
    try:
        n = _pending(win, r, q)
        for k in range(n):
            _next_used(r, &head, &length)
            entry = r.inflight.pop(head, None)
            if entry is None:
                raise _not_in_flight(q, head)
            descs = (<tuple>entry)[0]
            if len(descs) == 1:
                r.free.append(descs[0])
            else:
                r.free.extend(reversed(descs))
            tx_free.append(tx_by_head.pop(head))
        _used_event(r, q, n)
    finally:
        r.store()
    return n


cdef int _rx_post(Window win, _Ring r, list slots, dict rx_by_head, uint32_t buf_size) except -1:
    cdef object desc
    for slot in slots:
        desc = r.free.pop()
        win.at(slot, buf_size)
        r.post(desc, slot, buf_size, F_WRITE)
        r.inflight[desc] = ([desc], [(slot, buf_size)])
        rx_by_head[desc] = slot
    return 0


def rx_post(Window win, q, slots, dict rx_by_head, uint32_t buf_size):
    """Make each receive buffer of ``slots`` available as a one-descriptor writable chain."""
    cdef _Ring r = _Ring()
    r.load(win, q)
    try:
        _rx_post(win, r, list(slots), rx_by_head, buf_size)
    finally:
        r.store()


def rx_harvest(Window win, q, dict rx_by_head, uint32_t buf_size, uint32_t hdr_size, bint mergeable,
               list pending, list out):
    """Take used receive buffers, post their chains again, append whole frames to ``out``.

    Buffers of a frame whose ``num_buffers`` (5.1.6.4) says more are coming
    wait in ``pending`` (with everything after them, to keep the order).
    Returns ``(buffers taken, buffers given back unwritten)``.
    """
    cdef _Ring r = _Ring()
    r.load(win, q)
    cdef Py_ssize_t k, n = 0, filled = 0, empty = 0, bad = -1
    cdef uint32_t head, length
    cdef object slot
    try:
        n = _pending(win, r, q)
        for k in range(n):
            _next_used(r, &head, &length)
            slot = rx_by_head.get(head)
            if slot is None or win.seen[head]:
                raise _not_in_flight(q, head)
            win.seen[head] = 1
            win.heads[k] = head
            filled = k + 1
            win.lens[k] = length
            win.slots[k] = slot
            if length > buf_size and bad < 0:
                bad = k
        _used_event(r, q, n)
        if not n:
            return 0, 0
        if bad < 0 and not pending:
            empty = _fast_frames(win, n, hdr_size, mergeable, pending, out)
        else:
            for k in range(n):
                pending.append((win.lens[k], win.read(win.slots[k], min(win.lens[k], buf_size))))
        # Copied out: the same chains go back, each with its own buffer (rewritten, in case the device wrote it).
        for k in range(n):
            r.post(win.heads[k], win.slots[k], buf_size, F_WRITE)
    finally:
        for k in range(filled):
            win.seen[win.heads[k]] = 0
        r.store()
    if bad >= 0:
        del pending[:]
        raise UsedRingError(q.index, f"used len {win.lens[bad]} for head {win.heads[bad]} exceeds its {buf_size}-byte buffer")
    return n, empty + _assemble(q, hdr_size, mergeable, pending, out)


cdef dict _shared = {}


cdef tuple _shared_hdrs(uint32_t hdr_size):
    """Headers that come back again and again, shared: all zero, and all zero but ``num_buffers`` 1."""
    found = _shared.get(hdr_size)
    if found is None:
        one = bytearray(hdr_size)
        if hdr_size >= NUM_BUFFERS_AT + 2:
            one[NUM_BUFFERS_AT] = 1
        found = _shared[hdr_size] = (bytes(hdr_size), bytes(one))
    return <tuple>found


cdef Py_ssize_t _fast_frames(Window win, Py_ssize_t n, uint32_t hdr_size, bint mergeable, list pending, list out) except -1:
    """Whole one-buffer frames straight from guest memory; from the first that is not, everything to ``pending``."""
    cdef Py_ssize_t i, empty = 0
    cdef uint32_t length
    cdef uint8_t *p
    cdef bytes hdr, zero, one
    zero, one = _shared_hdrs(hdr_size)
    t_ns = _now_ns()
    for i in range(n):
        length = win.lens[i]
        p = win.at(win.slots[i], length)
        if pending or length < hdr_size + ETH_HLEN or (
            mergeable and iovirt_bench_load_u16(p + NUM_BUFFERS_AT) != 1
        ):
            if length == 0 and not pending:
                empty += 1
            else:
                pending.append((length, PyBytes_FromStringAndSize(<char *>p, length)))
            continue
        if memcmp(p, PyBytes_AS_STRING(zero), hdr_size) == 0:
            hdr = zero
        elif memcmp(p, PyBytes_AS_STRING(one), hdr_size) == 0:
            hdr = one
        else:
            hdr = PyBytes_FromStringAndSize(<char *>p, hdr_size)
        out.append(_frame(hdr, PyBytes_FromStringAndSize(<char *>p + hdr_size, length - hdr_size), t_ns, (length,)))
    return empty


cdef Py_ssize_t _assemble(q, uint32_t hdr_size, bint mergeable, list pending, list out) except -1:
    """Frames from ``pending`` (as the reference does); returns the buffers given back unwritten."""
    cdef Py_ssize_t empty = 0
    t_ns = None
    while pending:
        length, data = pending[0]
        if length == 0:
            # The device gave the buffer back unwritten: it dropped a frame.
            del pending[0]
            empty += 1
            continue
        if length < hdr_size + ETH_HLEN:
            del pending[0]
            raise UsedRingError(
                q.index, f"used len {length} is shorter than the {hdr_size}-byte header plus an Ethernet header"
            )
        spans = int.from_bytes(data[NUM_BUFFERS_OFFSET : NUM_BUFFERS_OFFSET + 2], "little") if mergeable else 1
        if spans == 0:
            del pending[0]
            raise UsedRingError(q.index, "num_buffers is 0; with MRG_RXBUF it must be at least 1 (5.1.6.4)")
        if spans > len(pending):
            break  # the rest of the frame has not been written yet
        if t_ns is None:
            t_ns = _now_ns()
        parts = pending[:spans]
        del pending[:spans]
        whole = b"".join([part for _n, part in parts])
        out.append(_frame(whole[:hdr_size], whole[hdr_size:], t_ns, tuple([n for n, _part in parts])))
    return empty
