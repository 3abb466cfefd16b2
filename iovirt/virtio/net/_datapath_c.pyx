# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""virtio-net's batch data path in C: transmit gather and receive scatter.

The Cython twin of ``_datapath_py.py`` (the reference), chosen by
``datapath.py``; it moves the per-frame work out of Python:

- :func:`tx_gather` copies the readable bytes of every chain of a transmit
  batch into one :class:`Frames` buffer, checking and parsing each
  ``virtio_net_hdr`` (virtio 1.2 5.1.6.2) and each frame's MAC addresses.
- :func:`rx_scatter` writes frames into receive chains it pops, each with its
  ``virtio_net_hdr`` (5.1.6.3, 5.1.6.4), one chain per frame; with
  GUEST_CSUM a frame whose TCP/UDP checksum it verified gets DATA_VALID.
- :func:`complete_checksum` fills in a partial checksum (NEEDS_CSUM) in place.

Buffers are reached through the host pointers the queue resolved when it
popped the batch; a buffer without one (it spans regions, or an IOMMU is in
front) is copied through :class:`~iovirt.memory.GuestMemory` instead.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t
from libc.string cimport memcpy, memset
from libc.stdlib cimport malloc, free
from cpython.mem cimport PyMem_Realloc, PyMem_Free
from cpython.exc cimport PyErr_Fetch, PyErr_NormalizeException
from cpython.ref cimport PyObject, Py_XDECREF
from libc.stdint cimport uintptr_t

cdef extern from *:
    """
    /* Six big-endian bytes (a MAC address) as an integer: a 4-byte and a 2-byte load, byte-swapped on
       little-endian hosts, instead of six loads and shifts. */
    static inline uint64_t iovirt_load_be48(const uint8_t *p) {
        uint32_t hi; uint16_t lo;
        memcpy(&hi, p, 4);
        memcpy(&lo, p + 4, 2);
    #if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
        hi = __builtin_bswap32(hi);
        lo = __builtin_bswap16(lo);
    #endif
        return ((uint64_t) hi << 16) | lo;
    }
    """
    uint64_t _mac "iovirt_load_be48" (const uint8_t *p) nogil
    void __builtin_prefetch(const void *p) nogil

from iovirt.virtio._queue_c cimport ChainBatch, SplitQueue, Virtqueue
from iovirt.virtio import kickjob
from iovirt.virtio.net import defs

# The spec constants, from defs.py, as C values for the loops.
cdef uint8_t NEEDS_CSUM = defs.VIRTIO_NET_HDR_F_NEEDS_CSUM
cdef uint8_t DATA_VALID = defs.VIRTIO_NET_HDR_F_DATA_VALID
cdef uint8_t GSO_TCPV6 = defs.VIRTIO_NET_HDR_GSO_TCPV6
cdef uint32_t ETH_HLEN = defs.ETH_HLEN, VLAN_HLEN = defs.VLAN_HLEN
cdef uint32_t MAX_FRAME = defs.MAX_FRAME
cdef uint32_t NET_HDR_SIZE = defs.NET_HDR_SIZE
cdef uint16_t ETH_P_IP = defs.ETH_P_IP, ETH_P_8021Q = defs.ETH_P_8021Q, ETH_P_IPV6 = defs.ETH_P_IPV6
cdef uint8_t IPPROTO_TCP = defs.IPPROTO_TCP, IPPROTO_UDP = defs.IPPROTO_UDP
# Why tx_gather rejected a chain (indexes of Frames.errors).
cdef Py_ssize_t TX_SHORT = defs.TX_SHORT, TX_LONG = defs.TX_LONG, TX_GSO = defs.TX_GSO, TX_CSUM = defs.TX_CSUM

# A C array's size must be known when compiling: a virtio_net_hdr buffer.
cdef enum:
    HDR_BUF = 12
    PREFETCH_CHAINS = 4  # how far ahead tx_gather prefetches (as DPDK's vhost dequeue does)
if defs.NET_HDR_SIZE != HDR_BUF:
    raise ImportError(f"virtio_net_hdr is {defs.NET_HDR_SIZE} bytes in defs.py, {HDR_BUF} here")


cdef void *_grow(void *p, size_t nbytes) except NULL:
    cdef void *q = PyMem_Realloc(p, nbytes)
    if q == NULL:
        raise MemoryError()
    return q


cdef class Frames:
    """Ethernet frames in one buffer, with their MACs and pending checksums.

    Frame ``i`` is ``frame(i)``; ``csum(i)`` is ``(csum_start, csum_offset)``
    or ``None``; ``macs()`` gives the destination and source MACs as 48-bit
    integers.  ``errors`` counts the chains :func:`tx_gather` rejected, by
    reason (short, long, gso, csum).
    """

    cdef readonly Py_ssize_t n
    cdef uint8_t *buf
    cdef Py_ssize_t used, cap, cap_frames
    cdef uint32_t *off
    cdef uint32_t *length
    cdef uint64_t *dst
    cdef uint64_t *src
    cdef int32_t *csum_start
    cdef int32_t *csum_offset
    cdef readonly list errors
    cdef list _every  # [0, 1, ..., len(_every) - 1]: groups()'s one group, kept between batches

    def __cinit__(self):
        self.n = self.used = self.cap = self.cap_frames = 0
        self.errors = [0, 0, 0, 0]
        self._every = []

    def __dealloc__(self):
        PyMem_Free(self.buf)
        PyMem_Free(self.off)
        PyMem_Free(self.length)
        PyMem_Free(self.dst)
        PyMem_Free(self.src)
        PyMem_Free(self.csum_start)
        PyMem_Free(self.csum_offset)

    def __len__(self):
        return self.n

    def clear(self):
        """Forget every frame (keeps the memory)."""
        self.n = 0
        self.used = 0
        self.errors = [0, 0, 0, 0]

    cdef inline int _reserve(self, Py_ssize_t frames, Py_ssize_t nbytes) except -1:
        """Room for ``frames`` frames of ``nbytes`` bytes in all; inlined, as it is checked once per frame."""
        if frames > self.cap_frames or nbytes > self.cap:
            return self._grow_to(frames, nbytes)
        return 0

    cdef int _grow_to(self, Py_ssize_t frames, Py_ssize_t nbytes) except -1:
        cdef Py_ssize_t cap
        if frames > self.cap_frames:
            cap = max(frames, 2 * self.cap_frames, 64)
            self.off = <uint32_t *> _grow(self.off, cap * sizeof(uint32_t))
            self.length = <uint32_t *> _grow(self.length, cap * sizeof(uint32_t))
            self.dst = <uint64_t *> _grow(self.dst, cap * sizeof(uint64_t))
            self.src = <uint64_t *> _grow(self.src, cap * sizeof(uint64_t))
            self.csum_start = <int32_t *> _grow(self.csum_start, cap * sizeof(int32_t))
            self.csum_offset = <int32_t *> _grow(self.csum_offset, cap * sizeof(int32_t))
            self.cap_frames = cap
        if nbytes > self.cap:
            cap = max(nbytes, 2 * self.cap, 1 << 16)
            self.buf = <uint8_t *> _grow(self.buf, cap)
            self.cap = cap
        return 0

    cdef inline void _finish(self, Py_ssize_t i) noexcept nogil:
        cdef const uint8_t *p = self.buf + self.off[i]
        self.dst[i] = _mac(p)
        self.src[i] = _mac(p + 6)

    def append(self, frame, csum=None):
        """Add one frame (bytes-like, at least 14 bytes) with its pending checksum or ``None``."""
        cdef const uint8_t[::1] data = memoryview(frame).cast("B")
        cdef Py_ssize_t n = data.shape[0]
        if n < ETH_HLEN:
            raise ValueError(f"frame of {n} bytes is shorter than an Ethernet header")
        self._reserve(self.n + 1, self.used + n)
        memcpy(self.buf + self.used, &data[0], n)
        self.off[self.n] = <uint32_t> self.used
        self.length[self.n] = <uint32_t> n
        self.csum_start[self.n] = -1 if csum is None else csum[0]
        self.csum_offset[self.n] = 0 if csum is None else csum[1]
        self._finish(self.n)
        self.used += n
        self.n += 1

    def subset(self, indexes):
        """A new :class:`Frames` holding copies of frames ``indexes`` (with their checksums), in that order.

        What a batch handed to another worker carries: the sender reuses its
        own buffer for its next batch.
        """
        cdef Frames out = Frames()
        out.extend(self, indexes)
        return out

    def extend(self, Frames other, indexes):
        """Append copies of frames ``indexes`` of ``other`` (with their checksums), in that order."""
        cdef Py_ssize_t i, k = self.n, nbytes = 0
        cdef list picked = list(indexes)
        for i in picked:
            other._check(i)
            nbytes += other.length[i]
        self._reserve(self.n + len(picked), self.used + nbytes)  # other's pointers are read after: it may be self
        for i in picked:
            memcpy(self.buf + self.used, other.buf + other.off[i], other.length[i])
            self.off[k] = <uint32_t> self.used
            self.length[k] = other.length[i]
            self.dst[k] = other.dst[i]
            self.src[k] = other.src[i]
            self.csum_start[k] = other.csum_start[i]
            self.csum_offset[k] = other.csum_offset[i]
            self.used += other.length[i]
            k += 1
        self.n = k

    def frame(self, Py_ssize_t i):
        """Frame ``i`` as bytes."""
        self._check(i)
        return (<char *> self.buf)[self.off[i] : self.off[i] + self.length[i]]

    def csum(self, Py_ssize_t i):
        """Frame ``i``'s pending checksum as ``(csum_start, csum_offset)``, or ``None``."""
        self._check(i)
        if self.csum_start[i] < 0:
            return None
        return (self.csum_start[i], self.csum_offset[i])

    def flow(self, Py_ssize_t i):
        """Frame ``i``'s flow key: its destination and source MACs as one 96-bit integer."""
        self._check(i)
        return (<object> self.dst[i]) << 48 | self.src[i]

    def macs(self):
        """``(destination MACs, source MACs)`` of every frame, as lists of 48-bit integers."""
        cdef Py_ssize_t i
        return [self.dst[i] for i in range(self.n)], [self.src[i] for i in range(self.n)]

    def total_bytes(self, indexes=None):
        """Bytes in the frames (all, or those at ``indexes``)."""
        cdef Py_ssize_t i
        cdef uint64_t total = 0
        if indexes is None:
            for i in range(self.n):
                total += self.length[i]
        else:
            for i in indexes:
                total += self.length[i]
        return total

    def longer(self, Py_ssize_t limit, indexes):
        """Those of frames ``indexes`` longer than ``limit`` bytes (a receiver's MTU check: usually none)."""
        cdef Py_ssize_t i
        cdef list out = []
        for i in indexes:
            self._check(i)
            if self.length[i] > limit:
                out.append(i)
        return out

    def sources(self):
        """The distinct source MACs of the frames, in first-seen order (what the switch learns from a batch)."""
        cdef Py_ssize_t i, j, n = 0
        cdef uint64_t seen[16]  # a batch is nearly always from one guest MAC: a set only past 16
        for i in range(self.n):
            for j in range(n):
                if seen[j] == self.src[i]:
                    break
            else:
                if n == 16:
                    return list(dict.fromkeys([self.src[k] for k in range(self.n)]))
                seen[n] = self.src[i]
                n += 1
        return [seen[j] for j in range(n)]

    def groups(self):
        """``[(destination MAC, [frame indexes]), ...]``: the frames grouped by destination, in first-seen order.

        What the switch looks up once per destination; a batch bound for
        one destination (the common case) is one group, found in one pass,
        whose index list is kept for the next such batch of the same size
        (callers only read the lists).
        """
        cdef Py_ssize_t i
        cdef uint64_t first
        cdef dict where
        cdef list group
        if self.n == 0:
            return []
        first = self.dst[0]
        for i in range(1, self.n):
            if self.dst[i] != first:
                break
        else:
            if len(self._every) != self.n:
                self._every = list(range(self.n))
            return [(first, self._every)]
        where = {}
        out = []
        for i in range(self.n):
            key = self.dst[i]
            group = where.get(key)
            if group is None:
                group = where[key] = []
                out.append((key, group))
            group.append(i)
        return out

    def fit(self, Py_ssize_t max_frames, long long max_bytes):
        """``(count, bytes)`` of the longest run from frame 0 of at most ``max_frames`` frames and ``max_bytes`` bytes."""
        cdef Py_ssize_t count = 0
        cdef long long nbytes = 0
        while count < min(max_frames, self.n) and nbytes + self.length[count] <= max_bytes:
            nbytes += self.length[count]
            count += 1
        return count, nbytes

    def truncate(self, Py_ssize_t n):
        """Keep the first ``n`` frames (all of them if there are fewer)."""
        if n < 0:
            raise ValueError(f"cannot keep {n} frames")
        if n < self.n:
            self.used = self.off[n]  # frames lie in the buffer in order
            self.n = n

    cdef int _check(self, Py_ssize_t i) except -1:
        if i < 0 or i >= self.n:
            raise IndexError(f"frame {i} not in {self.n}")
        return 0


cdef inline uint16_t _le16(const uint8_t *p) noexcept nogil:
    return p[0] | (p[1] << 8)


cdef inline int _copy_out(Virtqueue q, ChainBatch b, Py_ssize_t k, uint8_t *dst, uint32_t start,
                          uint32_t count) except -1 nogil:
    """Copy ``count`` bytes from offset ``start`` of buffer ``k`` to ``dst``."""
    if b.hosts[k] != NULL:  # inlined into the gather loop: a plain memcpy for nearly every buffer
        memcpy(dst, b.hosts[k] + start, count)
        return 0
    with gil:
        return _copy_through_memory(q, b, k, dst, start, count)


cdef int _copy_through_memory(Virtqueue q, ChainBatch b, Py_ssize_t k, uint8_t *dst, uint32_t start,
                              uint32_t count) except -1:
    """A buffer without a host pointer (it spans regions, or an IOMMU is in front): through GuestMemory."""
    data = q.memory.read(b.addrs[k] + start, count)
    memcpy(dst, <const char *> data, count)
    return 0


def tx_gather(ChainBatch b, Virtqueue q, uint32_t hdr_len, Frames out, uint32_t gso_mask=0):
    """Gather the frames of transmit batch ``b`` into ``out`` (appending); returns how many.

    Each chain's readable bytes are ``virtio_net_hdr`` + frame.  A TCP GSO
    frame whose ``gso_type`` bit is in ``gso_mask`` (1 << TCPV4, 1 << TCPV6:
    the host TSO features negotiated) is cut into its segments (5.1.6.2).  A
    chain shorter than header + Ethernet header, longer than 64 KiB + 14, with
    a GSO type not allowed or not segmentable, or with NEEDS_CSUM offsets
    outside its frame is rejected and counted in ``out.errors``.
    """
    cdef Py_ssize_t errors[4]
    cdef Py_ssize_t added, k
    memset(errors, 0, sizeof(errors))
    added = _gather(b, q, hdr_len, out, gso_mask, errors)
    for k in range(4):
        if errors[k]:
            out.errors[k] += errors[k]
    return added


cdef Py_ssize_t _gather(ChainBatch b, Virtqueue q, uint32_t hdr_len, Frames out, uint32_t gso_mask,
                        Py_ssize_t *errors) except -1 nogil:
    """:func:`tx_gather`, counting rejected chains in ``errors`` (by ``TX_*`` reason): runs without the GIL,
    taking it only to grow ``out``, to copy a buffer without a host pointer or to cut a GSO frame."""
    cdef Py_ssize_t i, k, total, added = 0
    cdef int count
    cdef uint32_t pos, take, skip, frame_len
    cdef uint8_t hdr[HDR_BUF]
    cdef uint8_t *dst
    cdef int32_t cs, co
    cdef const uint8_t *ahead
    for i in range(b.n):
        # The driver's core wrote these buffers: start fetching a later chain's first bytes (its
        # header and MACs) now, so they arrive while this chain is copied.
        if i + PREFETCH_CHAINS < b.n:
            ahead = b.hosts[b.first[i + PREFETCH_CHAINS]]
            if ahead != NULL:
                __builtin_prefetch(ahead)
                __builtin_prefetch(ahead + 64)
        total = 0
        for k in range(b.first[i], b.first[i + 1]):
            if not b.writable[k]:
                total += b.lens[k]
        if total < hdr_len + ETH_HLEN:
            errors[TX_SHORT] += 1
            continue
        if total - hdr_len > MAX_FRAME:
            errors[TX_LONG] += 1
            continue
        frame_len = <uint32_t> (total - hdr_len)
        if out.n + 1 > out.cap_frames or out.used + frame_len > out.cap:
            with gil:
                out._grow_to(out.n + 1, out.used + frame_len)
        memset(hdr, 0, NET_HDR_SIZE)
        dst = out.buf + out.used
        pos = 0  # bytes of the chain consumed so far
        for k in range(b.first[i], b.first[i + 1]):
            if b.writable[k]:
                break
            skip = 0
            if pos < hdr_len:
                skip = min(hdr_len - pos, b.lens[k])
                _copy_out(q, b, k, hdr + pos, 0, skip)
            take = b.lens[k] - skip
            if take:
                _copy_out(q, b, k, dst, skip, take)
                dst += take
            pos += b.lens[k]
        cs, co = -1, 0
        if hdr[0] & NEEDS_CSUM:
            cs, co = _le16(hdr + 6), _le16(hdr + 8)
            if <uint32_t> cs >= frame_len or <uint32_t> (cs + co + 2) > frame_len:
                errors[TX_CSUM] += 1
                continue
        if hdr[1] != 0:
            # GSO needs NEEDS_CSUM (csum_start marks the TCP header) and a negotiated type.
            if hdr[1] >= 32 or not (gso_mask >> hdr[1]) & 1 or cs < 0:
                errors[TX_GSO] += 1
                continue
            with gil:
                count = _cut(out, frame_len, cs, _le16(hdr + 4), hdr[1] == GSO_TCPV6)
            if count < 0:
                errors[TX_GSO] += 1
            else:
                added += count
            continue
        out.off[out.n] = <uint32_t> out.used
        out.length[out.n] = frame_len
        out.csum_start[out.n] = cs
        out.csum_offset[out.n] = co
        out._finish(out.n)
        out.used += frame_len
        out.n += 1
        added += 1
    return added


cdef int _cut(Frames out, uint32_t frame_len, uint32_t csum_start, uint32_t mss, bint ipv6) except -2:
    """The GSO frame just copied to the end of ``out``'s buffer (not yet a frame of it) as its TCP segments."""
    cdef int count
    cdef uint8_t *big = <uint8_t *> malloc(frame_len)  # out's buffer may move while it grows
    if big == NULL:
        raise MemoryError()
    memcpy(big, out.buf + out.used, frame_len)
    try:
        count = _tso(out, big, frame_len, csum_start, mss, ipv6)
    finally:
        free(big)
    return count


def complete_checksum(Frames f, Py_ssize_t i):
    """Fill in frame ``i``'s pending checksum in place (RFC 1071 sum from csum_start)."""
    f._check(i)
    _complete(f, i)


cdef void _complete(Frames f, Py_ssize_t i) noexcept nogil:
    """:func:`complete_checksum` of a frame that exists."""
    if f.csum_start[i] < 0:
        return
    cdef uint8_t *p = f.buf + f.off[i]
    cdef uint32_t start = f.csum_start[i], field = start + f.csum_offset[i], n = f.length[i], j
    cdef uint64_t total = 0
    for j in range(start, n - 1, 2):
        total += (p[j] << 8) | p[j + 1]
    if (n - start) & 1:
        total += p[n - 1] << 8
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    total = ~total & 0xFFFF
    if total == 0:
        total = 0xFFFF  # as Linux's CSUM_MANGLED_0: 0 means "no checksum" to UDP
    p[field] = total >> 8
    p[field + 1] = total & 0xFF
    f.csum_start[i] = -1


cdef inline uint16_t _be16(const uint8_t *p) noexcept nogil:
    return (p[0] << 8) | p[1]


cdef uint64_t _sum16(const uint8_t *p, uint32_t n) noexcept nogil:
    """Unfolded RFC 1071 sum of big-endian 16-bit words (an odd last byte padded with 0)."""
    cdef uint64_t total = 0
    cdef uint32_t j
    for j in range(0, n - 1 if n else 0, 2):
        total += (p[j] << 8) | p[j + 1]
    if n & 1:
        total += p[n - 1] << 8
    return total


cdef bint _l4_valid(const uint8_t *p, uint32_t n) noexcept nogil:
    """Whether the frame is Ethernet (one 802.1Q tag at most) / IPv4 or IPv6 / TCP or UDP with a right checksum.

    What virtio 1.2 5.1.6.4.1 asks before DATA_VALID ("the device MUST
    validate the packet checksum").  Anything not verified is not valid:
    other protocols, IPv4 fragments, IPv6 extension headers, lengths beyond
    the frame, a UDP length differing from the IP payload, and a UDP
    checksum of 0 (over IPv4 "no checksum", RFC 768: nothing to validate;
    over IPv6 invalid, RFC 8200 8.1).  Same rules as csum.py's
    ``l4_checksum_valid``.
    """
    cdef uint32_t off = ETH_HLEN, l4, l4len, ihl, total
    cdef uint16_t etype
    cdef uint8_t proto
    cdef uint64_t s
    if n < ETH_HLEN:
        return False
    etype = _be16(p + 12)
    if etype == ETH_P_8021Q:
        if n < ETH_HLEN + 4:
            return False
        off += 4
        etype = _be16(p + 16)
    if etype == ETH_P_IP:
        if n < off + 20 or p[off] >> 4 != 4:
            return False
        ihl = (p[off] & 0xF) * 4
        total = _be16(p + off + 2)
        if ihl < 20 or total < ihl or off + total > n or _be16(p + off + 6) & 0x3FFF:
            return False  # bad lengths, or a fragment (MF or an offset): its L4 checksum spans other frames
        proto = p[off + 9]
        l4 = off + ihl
        l4len = total - ihl
        s = _sum16(p + off + 12, 8)  # pseudo-header: source and destination addresses (RFC 793, 768)
    elif etype == ETH_P_IPV6:
        if n < off + 40 or p[off] >> 4 != 6:
            return False
        l4len = _be16(p + off + 4)
        proto = p[off + 6]
        l4 = off + 40
        if l4 + l4len > n:
            return False
        s = _sum16(p + off + 8, 32)  # pseudo-header: addresses (RFC 8200 8.1)
    else:
        return False
    if proto == IPPROTO_TCP:
        if l4len < 20:
            return False
    elif proto == IPPROTO_UDP:
        if l4len < 8 or _be16(p + l4 + 4) != l4len or _be16(p + l4 + 6) == 0:
            return False
    else:
        return False
    s += proto + l4len + _sum16(p + l4, l4len)
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s == 0xFFFF


def l4_checksum_valid(frame) -> bool:
    """Whether ``frame`` (bytes-like) would get DATA_VALID: the twin of csum.py's ``l4_checksum_valid``."""
    cdef const uint8_t[::1] data = memoryview(frame).cast("B")
    if data.shape[0] == 0:
        return False
    return _l4_valid(&data[0], data.shape[0])


cdef int _copy_in(Virtqueue q, ChainBatch b, Py_ssize_t k, uint32_t start, const uint8_t *src, uint32_t count) except -1 nogil:
    if b.hosts[k] != NULL:
        memcpy(b.hosts[k] + start, src, count)
    else:
        with gil:
            q.memory.write(b.addrs[k] + start, (<const char *> src)[:count])
    return 0


def complete_pending(Frames f, list indexes):
    """Complete the pending checksum of every frame at ``indexes`` that has one."""
    cdef Py_ssize_t i
    for i in indexes:
        if f.csum_start[i] >= 0:
            complete_checksum(f, i)


def rx_scatter(Virtqueue q, Frames f, list indexes, uint32_t hdr_len, bint guest_csum, bint mergeable, ChainBatch b):
    """Write frames ``indexes`` of ``f`` into receive chains of ``q``, one chain each.

    Pops one chain per frame (into ``b``), writes ``virtio_net_hdr`` (with
    ``num_buffers`` 1) and the frame, pushes the chains.  Returns
    ``(delivered, dropped, stopped_at, delivered_bytes)``; ``stopped_at`` is the position in
    ``indexes`` where this stopped (the caller handles the rest): chains ran
    out, or, with ``mergeable``, a frame needs more than one chain (it is
    given back unused for the caller's multi-chain path).  Without MRG_RXBUF
    a frame too big for its chain is dropped (a buffer must hold a whole
    frame, 5.1.6.3.1).  Frames with a pending checksum must have been
    completed by the caller unless ``guest_csum``; with ``guest_csum`` they
    get NEEDS_CSUM, and the others DATA_VALID when their checksum is right
    (5.1.6.4.1; csum_start/csum_offset stay 0, the driver must not use them
    without NEEDS_CSUM).
    """
    cdef Py_ssize_t want = len(indexes), got, j, idx
    cdef Py_ssize_t delivered = 0, dropped = 0
    cdef uint64_t nbytes = 0
    cdef Py_ssize_t stop
    q.pop_batch(want, b)
    got = b.n
    stop = got
    for j in range(got):
        idx = indexes[j]
        f._check(idx)
        if _receive_one(q, b, j, f, idx, hdr_len, guest_csum):
            delivered += 1
            nbytes += f.length[idx]
        elif mergeable:
            stop = j
            break
        else:
            b.used_lens[j] = 0
            dropped += 1
    if stop < got:
        q.rewind(got - stop)
        b.n = stop
    q.push_batch(b)
    return delivered, dropped, stop, nbytes


cdef int _receive_one(Virtqueue q, ChainBatch b, Py_ssize_t j, Frames f, Py_ssize_t idx, uint32_t hdr_len,
                      bint guest_csum) except -1 nogil:
    """Write frame ``idx`` of ``f`` into chain ``j`` of ``b`` (used length set); False if it does not fit."""
    cdef Py_ssize_t k
    cdef uint32_t need = hdr_len + f.length[idx], written = 0, room = 0, take, pos
    cdef uint8_t hdr[HDR_BUF]
    cdef const uint8_t *src
    for k in range(b.first[j], b.first[j + 1]):
        if b.writable[k]:
            room += b.lens[k]
    if room < need:
        return False
    memset(hdr, 0, NET_HDR_SIZE)
    if f.csum_start[idx] >= 0 and guest_csum:
        hdr[0] = NEEDS_CSUM
        hdr[6] = f.csum_start[idx] & 0xFF
        hdr[7] = f.csum_start[idx] >> 8
        hdr[8] = f.csum_offset[idx] & 0xFF
        hdr[9] = f.csum_offset[idx] >> 8
    elif guest_csum and _l4_valid(f.buf + f.off[idx], f.length[idx]):
        hdr[0] = DATA_VALID
    hdr[10] = 1  # num_buffers (5.1.6.4: 1 without MRG_RXBUF, and one chain here)
    for k in range(b.first[j], b.first[j + 1]):
        if not b.writable[k] or written >= need:
            continue
        pos = 0
        while pos < b.lens[k] and written < need:
            if written < hdr_len:
                src = hdr + written
                take = min(hdr_len - written, b.lens[k] - pos)
            else:
                src = f.buf + f.off[idx] + (written - hdr_len)
                take = min(need - written, b.lens[k] - pos)
            _copy_in(q, b, k, pos, src, take)
            pos += take
            written += take
    b.used_lens[j] = written
    return True


cdef enum:
    # What forward stopped at: defs.FORWARD_*, checked at import below.
    FWD_EMPTY, FWD_BUDGET, FWD_NOTIFY, FWD_SWITCH, FWD_HOLD, FWD_SLOW, FWD_WAIT, FWD_REFUSED
if (defs.FORWARD_EMPTY, defs.FORWARD_BUDGET, defs.FORWARD_NOTIFY, defs.FORWARD_SWITCH, defs.FORWARD_HOLD,
        defs.FORWARD_SLOW, defs.FORWARD_WAIT, defs.FORWARD_REFUSED) != (
            FWD_EMPTY, FWD_BUDGET, FWD_NOTIFY, FWD_SWITCH, FWD_HOLD, FWD_SLOW, FWD_WAIT, FWD_REFUSED):
    raise ImportError("defs.FORWARD_* differ from _datapath_c's")


cdef struct FwdArgs:
    # forward's parameters past its objects (see its docstring)
    uint32_t hdr_len, gso_mask, rx_hdr_len, max_len
    uint64_t src, dst
    bint guest_csum, mergeable
    Py_ssize_t max_chains, max_batches
    bint fit  # take no more transmit chains than the receive ring has chains; none: FWD_WAIT


cdef struct FwdOut:
    # what one run did: forward's answer
    int stopped
    Py_ssize_t batches, tx_frames, delivered, dropped, over_mtu, stop
    uint64_t tx_bytes, rx_bytes
    bint tx_notify, rx_notify
    Py_ssize_t errors[4]


def forward(SplitQueue tx, ChainBatch txb, Frames frames, uint32_t hdr_len, uint32_t gso_mask,
            uint64_t src, uint64_t dst, SplitQueue rx, ChainBatch rxb, uint32_t rx_hdr_len, bint guest_csum,
            bint mergeable, uint32_t max_len, Py_ssize_t max_chains, Py_ssize_t max_batches):
    """Transmit batches from ``tx`` and write each straight into receive queue ``rx``, with the GIL released.

    The whole batch loop of one flow: pop up to ``max_chains`` transmit
    chains, gather them into ``frames`` (:func:`tx_gather`), return them,
    and, while every frame of the batch is from MAC ``src`` to MAC ``dst``
    (the switch decided where that flow goes), write them into receive
    chains of ``rx`` (:func:`rx_scatter`, pending checksums completed unless
    ``guest_csum``), up to ``max_batches`` batches.  Returns ``(stopped,
    batches, tx_frames, tx_bytes, delivered, rx_bytes, dropped, over_mtu,
    stop, tx_notify, rx_notify)``: why it stopped (``defs.FORWARD_*``), the
    transmit batches taken, the frames and bytes of those it forwarded,
    what was written into ``rx`` (``dropped`` did not fit a buffer without
    ``mergeable``; ``over_mtu`` were longer than ``max_len``, the
    receiver's MTU plus the Ethernet header, and a VLAN tag's 4 bytes if
    they carry one: 5.1.4.1), ``stop`` the first frame of ``frames`` not
    delivered with ``FORWARD_HOLD``, and whether each ring's driver wants
    the notification it stopped for (asked once: the caller sends it).

    A batch with rejected chains (``frames.errors``) or another flow stops
    it with ``FORWARD_SWITCH`` (not counted in ``tx_frames``: the caller
    switches it); receive chains running out, a frame spanning several
    mergeable buffers or a receive buffer without a host pointer stop it
    with ``FORWARD_HOLD`` at that frame, for the receiver's own path.  A
    ring this cannot serve (see ``SplitQueue.fast_ready``, or a chain the
    walk refuses) is left untaken, for the queue's own calls, which raise
    or defer its errors as they do: ``FORWARD_SLOW`` for the transmit ring,
    ``FORWARD_HOLD`` for the receive ring.  The caller holds what keeps both
    rings as they are (the data plane's lock).
    """
    cdef FwdArgs a
    cdef FwdOut o
    a.hdr_len, a.gso_mask, a.src, a.dst, a.rx_hdr_len, a.max_len = hdr_len, gso_mask, src, dst, rx_hdr_len, max_len
    a.guest_csum, a.mergeable, a.max_chains, a.max_batches = guest_csum, mergeable, max_chains, max_batches
    a.fit = False
    if not _ready(tx, txb, rx, rxb, max_chains):
        return FWD_SLOW, 0, 0, 0, 0, 0, 0, 0, 0, False, False
    with nogil:
        _forward(tx, txb, frames, rx, rxb, &a, &o)
    if o.batches:
        frames.errors = [o.errors[0], o.errors[1], o.errors[2], o.errors[3]]  # the last batch's: the others had none
    return (o.stopped, o.batches, o.tx_frames, o.tx_bytes, o.delivered, o.rx_bytes, o.dropped, o.over_mtu, o.stop,
            o.tx_notify, o.rx_notify)


cdef int JOB_DONE = kickjob.JOB_DONE, JOB_AGAIN = kickjob.JOB_AGAIN, JOB_PYTHON = kickjob.JOB_PYTHON
cdef int JOB_WAIT = kickjob.JOB_WAIT
cdef unsigned NOTIFY_KICKED = kickjob.NOTIFY_KICKED, NOTIFY_OTHER = kickjob.NOTIFY_OTHER


cdef class _FlowJob:
    """What every kick job of a flow keeps: where it stopped for Python, and an exception a slow path raised."""

    cdef int pending  # -1, or the FORWARD_* stop the device's own path must finish
    cdef Py_ssize_t stop
    cdef Py_ssize_t errors[4]
    cdef object error
    cdef FwdOut total  # what the runs since the last take moved (batches: those not left for the switch)
    cdef FwdArgs args  # its loop's parameters

    def __cinit__(self):
        self.pending = -1
        memset(&self.total, 0, sizeof(FwdOut))
        memset(&self.args, 0, sizeof(FwdArgs))

    cdef object _pending(self):
        """The stop to finish (None: none), and the counts start again (for ``take``, after it read them)."""
        pending = None if self.pending < 0 else self.pending
        self.pending = -1
        memset(&self.total, 0, sizeof(FwdOut))
        return pending

    def entry(self):
        """``(function, context)``: the addresses of ``int run(void *context, unsigned *notify)`` and its context.

        Valid while this object lives: the caller keeps a reference.
        """
        return <uintptr_t> self._runner(), <uintptr_t> <void *> self

    cdef void *_runner(self):
        return NULL

    def ready(self):
        """Whether the job's rings are ones it serves, now (asked with the data plane's lock held)."""
        return bool(self._ready())

    cdef int _ready(self) except -1:
        return 0


cdef class ForwardJob(_FlowJob):
    """:func:`forward` on every kick of transmit queue ``tx``, run by a worker's C event loop (a kick job).

    The arguments are :func:`forward`'s.  Each run is one :func:`forward`
    call (``max_batches`` batches at most) that takes no more transmit chains
    than the receive ring has chains; what it moved adds up until
    :meth:`take`.  With no receive chain and transmit chains waiting it
    answers ``JOB_WAIT`` (``FORWARD_WAIT``: the receiver is asked to kick).
    Where :func:`forward` stops for the caller's own path
    (``FORWARD_SWITCH``, ``FORWARD_HOLD``, ``FORWARD_SLOW``, or an exception
    in a slow path) the job answers ``JOB_PYTHON`` and does nothing more
    until :meth:`take` gave that stop to the device.  ``iovirt/virtio/kickjob.py``
    says how a transport runs it.
    """

    cdef SplitQueue tx, rx
    cdef ChainBatch txb, rxb
    cdef Frames frames

    def __init__(self, SplitQueue tx, ChainBatch txb, Frames frames, uint32_t hdr_len, uint32_t gso_mask,
                 uint64_t src, uint64_t dst, SplitQueue rx, ChainBatch rxb, uint32_t rx_hdr_len, bint guest_csum,
                 bint mergeable, uint32_t max_len, Py_ssize_t max_chains, Py_ssize_t max_batches):
        self.tx, self.txb, self.frames, self.rx, self.rxb = tx, txb, frames, rx, rxb
        a = &self.args
        a.hdr_len, a.gso_mask, a.src, a.dst, a.rx_hdr_len = hdr_len, gso_mask, src, dst, rx_hdr_len
        a.guest_csum, a.mergeable, a.max_len, a.max_chains, a.max_batches = \
            guest_csum, mergeable, max_len, max_chains, max_batches
        a.fit = True  # a receiver short of buffers holds the sender's chains back a while (JOB_WAIT), not frames

    cdef int _ready(self) except -1:
        return _ready(self.tx, self.txb, self.rx, self.rxb, self.args.max_chains)

    cdef void *_runner(self):
        return <void *> &_run_job

    def take(self):
        """What the runs since the last call did, and where the last one stopped; the counts start again.

        ``(pending, stop, batches, tx_frames, tx_bytes, delivered, rx_bytes,
        dropped, over_mtu, error)``: ``pending`` is None or the
        ``FORWARD_*`` stop to finish (as :func:`forward` answers it: the
        frames of its batch are in ``frames``, ``stop`` the first not
        delivered), ``batches`` the batches switched whole, ``error`` an
        exception a slow path raised, or None.
        """
        cdef FwdOut t = self.total
        error, self.error = self.error, None
        if self.pending == FWD_SWITCH:
            self.frames.errors = [self.errors[0], self.errors[1], self.errors[2], self.errors[3]]
        return (self._pending(), self.stop, t.batches, t.tx_frames, t.tx_bytes, t.delivered, t.rx_bytes, t.dropped,
                t.over_mtu, error)


cdef int _ready(SplitQueue tx, ChainBatch txb, SplitQueue rx, ChainBatch rxb, Py_ssize_t max_chains) except -1:
    """Whether both rings are ones :func:`_forward` serves now; then both batches get room for ``max_chains``."""
    return _ring_ready(tx, txb, max_chains) and _ring_ready(rx, rxb, max_chains)


cdef int _ring_ready(SplitQueue q, ChainBatch b, Py_ssize_t max_chains) except -1:
    """Whether ``q`` is a ring the C loops serve now (``fast_ready``); then ``b`` gets room for ``max_chains`` chains."""
    if not q.fast_ready():
        return 0
    b._reserve_chains(max_chains)
    return 1


ctypedef int (*_job_loop)(_FlowJob, FwdOut *) noexcept nogil
"""A flow job's loop (``except -1`` cast away: its exception is fetched by :func:`_step`, not printed)."""


cdef int _run_job(void *context, unsigned *notify) noexcept nogil:
    return _step(<_FlowJob> context, <_job_loop> _forward_job, notify)


cdef int _forward_job(ForwardJob job, FwdOut *o) except -1 nogil:
    """One :func:`forward` run of ``job`` (its rings were ``ready`` when the loop was given it)."""
    return _forward(job.tx, job.txb, job.frames, job.rx, job.rxb, &job.args, o)


cdef int _step(_FlowJob job, _job_loop loop, unsigned *notify) noexcept nogil:
    """One run of a flow job's ``loop``: counted into ``job.total``, its notifications asked, its answer."""
    cdef FwdOut o
    cdef FwdOut *t = &job.total
    notify[0] = 0
    if job.pending >= 0:
        return JOB_PYTHON
    if loop(job, &o) == -1:
        _keep_error(job)
        job.pending = FWD_SLOW
        return JOB_PYTHON
    t.batches += o.batches - (o.stopped == FWD_SWITCH)
    t.tx_frames += o.tx_frames
    t.tx_bytes += o.tx_bytes
    t.delivered += o.delivered
    t.rx_bytes += o.rx_bytes
    t.dropped += o.dropped
    t.over_mtu += o.over_mtu
    if o.tx_notify:
        notify[0] |= NOTIFY_KICKED
    if o.rx_notify:
        notify[0] |= NOTIFY_OTHER
    if o.stopped == FWD_EMPTY:
        return JOB_DONE
    if o.stopped == FWD_BUDGET or o.stopped == FWD_NOTIFY:
        return JOB_AGAIN
    if o.stopped == FWD_WAIT:
        return JOB_WAIT
    job.pending = o.stopped
    job.stop = o.stop
    memcpy(job.errors, o.errors, sizeof(o.errors))
    return JOB_PYTHON


cdef void _keep_error(_FlowJob job) noexcept with gil:
    """Keep the exception a slow path of a flow job raised, for its ``take``."""
    cdef PyObject *kind = NULL
    cdef PyObject *value = NULL
    cdef PyObject *tb = NULL
    PyErr_Fetch(&kind, &value, &tb)
    PyErr_NormalizeException(&kind, &value, &tb)
    job.error = <object> value if value != NULL else RuntimeError("forward failed without an exception")
    Py_XDECREF(kind)
    Py_XDECREF(value)
    Py_XDECREF(tb)


# -- crossing to a port another worker serves ------------------------------------------------------------------
cdef extern from *:
    """
    static inline size_t iovirt_chan_load(const size_t *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
    static inline void iovirt_chan_store(size_t *p, size_t v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
    static inline int iovirt_chan_swap(int *p, int v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
    """
    size_t _load "iovirt_chan_load" (const size_t *p) nogil
    void _store "iovirt_chan_store" (size_t *p, size_t v) nogil
    int _swap "iovirt_chan_swap" (int *p, int v) nogil

cdef int CHANNEL_FULL = defs.CHANNEL_FULL, CHANNEL_PUSHED = defs.CHANNEL_PUSHED
cdef int CHANNEL_WAS_EMPTY = defs.CHANNEL_WAS_EMPTY


cdef class FrameChannel:
    """Batches of frames from one worker's thread to a port another worker serves: a single-producer ring.

    ``capacity`` slots (a power of two), each a :class:`Frames` kept for
    reuse.  The sender fills the slot at ``head`` and publishes it by
    storing ``head``; the receiver takes the batch at ``tail``, maybe over
    several runs (``start``: its frames already taken), and frees the slot
    by storing ``tail``.  No lock: each index is written by one side, with
    sequentially consistent atomics, so the sender's look at ``tail`` right
    after publishing tells whether the receiver may have seen the ring empty
    and gone to sleep (then it is woken), as in ``iovirt/vhost_user/_handoff_c.pyx``.
    A sender that finds the ring full may ask to be told when a slot is
    free (``want_space``), by the same ordering: either the receiver's
    exchange after freeing sees the request, or the sender's look after
    asking sees the slot.
    """

    cdef PyObject **slots
    cdef list _frames  # the slots' references
    cdef readonly size_t capacity
    cdef size_t mask
    cdef size_t _pad0[8]
    cdef size_t head  # the sender's
    cdef size_t _pad1[8]
    cdef size_t tail  # the receiver's, with start
    cdef Py_ssize_t start
    cdef size_t _pad2[8]
    cdef int want_space

    def __cinit__(self, size_t capacity):
        cdef size_t i
        if capacity < 2 or capacity & (capacity - 1):
            raise ValueError(f"frame channel capacity must be a power of two of at least 2, got {capacity}")
        self._frames = [Frames() for _ in range(capacity)]
        self.slots = <PyObject **> malloc(capacity * sizeof(PyObject *))
        if self.slots == NULL:
            raise MemoryError()
        for i in range(capacity):
            self.slots[i] = <PyObject *> self._frames[i]
        self.capacity = capacity
        self.mask = capacity - 1
        self.head = self.tail = 0
        self.start = 0
        self.want_space = 0

    def __dealloc__(self):
        free(self.slots)

    cdef inline bint _full(self) noexcept nogil:
        return self.head - _load(&self.tail) >= self.capacity

    cdef inline PyObject *_back(self) noexcept nogil:
        return self.slots[self.head & self.mask]

    cdef inline bint _publish(self) noexcept nogil:
        """The batch at ``head`` goes to the receiver; whether the ring was empty (wake it)."""
        cdef size_t head = self.head
        _store(&self.head, head + 1)
        return _load(&self.tail) == head

    cdef inline PyObject *_front(self) noexcept nogil:
        cdef size_t tail = self.tail
        if tail == _load(&self.head):
            return NULL
        return self.slots[tail & self.mask]

    cdef inline bint _pop(self) noexcept nogil:
        """Free the slot at ``tail``; whether the sender asked to be told."""
        self.start = 0
        _store(&self.tail, self.tail + 1)
        return _swap(&self.want_space, 0) != 0

    cdef inline bint _ask_space(self) noexcept nogil:
        """The sender found the ring full: ask to be told when a slot is free; whether it is full still."""
        _swap(&self.want_space, 1)
        return self._full()

    def push(self, Frames frames, indexes):
        """Copies of frames ``indexes`` of ``frames`` as one batch (the sender's side).

        ``defs.CHANNEL_FULL`` (nothing taken), ``CHANNEL_PUSHED`` or
        ``CHANNEL_WAS_EMPTY`` (taken into an empty ring: wake the receiver).
        """
        cdef Frames slot
        if self._full():
            return CHANNEL_FULL
        slot = <Frames> self._back()
        slot.clear()
        slot.extend(frames, indexes)
        return CHANNEL_WAS_EMPTY if self._publish() else CHANNEL_PUSHED

    def front(self):
        """``(frames, start)``: the oldest batch and its first frame not taken yet (the receiver's side), or None."""
        cdef PyObject *p = self._front()
        if p == NULL:
            return None
        return <Frames> p, self.start

    def pop(self):
        """Free the oldest batch's slot (the receiver's side); True: the sender asked to be told (ring its bell)."""
        if self._front() == NULL:
            raise IndexError("pop from an empty frame channel")
        return self._pop()

    def __len__(self):
        return _load(&self.head) - _load(&self.tail)


cdef class SendJob(_FlowJob):
    """The transmit loop of one flow whose port another worker serves: batches into a :class:`FrameChannel`.

    A kick job (``iovirt/virtio/kickjob.py``) of transmit queue ``tx``:
    each run pops, gathers and gives back batches of up to ``max_chains``
    chains (as :func:`forward`), and while every frame is from ``src`` to
    ``dst`` publishes the batch into ``channel``, up to ``max_batches``
    batches; the receiving worker's :class:`ReceiveJob` writes them into the
    port's ring.  A full channel with transmit chains waiting answers
    ``JOB_WAIT`` (the receiver tells when it frees a slot); a batch for the
    switch (``FORWARD_SWITCH``) or a ring for the queue's own calls
    (``FORWARD_SLOW``) answers ``JOB_PYTHON``.  ``NOTIFY_OTHER``: the channel
    was empty (wake the receiver).
    """

    cdef SplitQueue tx
    cdef ChainBatch txb
    cdef Frames frames  # the device's own: a batch for the switch is handed over in it
    cdef FrameChannel channel

    def __init__(self, SplitQueue tx, ChainBatch txb, Frames frames, FrameChannel channel, uint32_t hdr_len,
                 uint32_t gso_mask, uint64_t src, uint64_t dst, Py_ssize_t max_chains, Py_ssize_t max_batches):
        self.tx, self.txb, self.frames, self.channel = tx, txb, frames, channel
        a = &self.args
        a.hdr_len, a.gso_mask, a.src, a.dst, a.max_chains, a.max_batches = \
            hdr_len, gso_mask, src, dst, max_chains, max_batches

    cdef int _ready(self) except -1:
        return _ring_ready(self.tx, self.txb, self.args.max_chains)

    cdef void *_runner(self):
        return <void *> &_run_send

    def take(self):
        """``(pending, batches, tx_frames, tx_bytes, error)`` since the last call; the counts start again.

        ``pending``: None, or the ``FORWARD_*`` stop the device finishes
        (with ``FORWARD_SWITCH`` the batch is in the device's frames, with
        its rejected chains in ``errors``); ``batches`` went into the channel.
        """
        cdef Frames slot
        cdef FwdOut t = self.total
        error, self.error = self.error, None
        if self.pending == FWD_SWITCH:
            slot = <Frames> self.channel._back()  # gathered there, not published
            self.frames.clear()
            self.frames.extend(slot, range(slot.n))
            self.frames.errors = [self.errors[0], self.errors[1], self.errors[2], self.errors[3]]
        return self._pending(), t.batches, t.tx_frames, t.tx_bytes, error


cdef int _run_send(void *context, unsigned *notify) noexcept nogil:
    return _step(<_FlowJob> context, <_job_loop> _send, notify)


cdef int _send(SendJob job, FwdOut *o) except -1 nogil:
    """:class:`SendJob`'s loop: transmit batches of the flow into the job.channel."""
    cdef const FwdArgs *a = &job.args
    memset(o, 0, sizeof(FwdOut))
    o.stopped = FWD_EMPTY
    while True:
        if o.batches == a.max_batches:
            o.stopped = FWD_BUDGET
            break
        if job.channel._full():
            if job.tx.available_fast() == 0:
                break  # FWD_EMPTY: nothing to send either
            if job.channel._ask_space():
                o.stopped = FWD_WAIT
                break
        if not _transmit_batch(job.tx, job.txb, <Frames> job.channel._back(), a.max_chains, a, o):
            break
        if job.channel._publish():
            o.rx_notify = True  # the receiver may sleep: its doorbell is rung before anything else
        if o.tx_notify or o.rx_notify:
            o.stopped = FWD_NOTIFY
            break
    return 0


cdef class ReceiveJob(_FlowJob):
    """A port's receive queue ``rx`` taking the batches another worker published into ``channel``.

    A kick job run by the receiving worker when the channel's doorbell
    rings, and when ``rx``'s driver posts buffers: each run writes the
    frames of the oldest batches into ``rx`` (as :func:`forward` writes a
    batch, the other arguments are its ``rx_*`` ones), up to ``max_batches``
    whole batches.  No receive chain while frames wait answers ``JOB_WAIT``;
    frames it cannot write (``FORWARD_HOLD``: a frame spanning mergeable
    buffers or a buffer without a host pointer; ``FORWARD_REFUSED`` or
    ``FORWARD_SLOW``: a receive ring for the queue's own calls) answer
    ``JOB_PYTHON``: the oldest batch from its ``start`` on is the port's own
    path's.  ``NOTIFY_KICKED``: the sender asked to be told of a free slot;
    ``NOTIFY_OTHER``: ``rx``'s driver wants its notification.
    """

    cdef FrameChannel channel
    cdef SplitQueue rx
    cdef ChainBatch rxb

    def __init__(self, FrameChannel channel, SplitQueue rx, ChainBatch rxb, uint32_t rx_hdr_len, bint guest_csum,
                 bint mergeable, uint32_t max_len, Py_ssize_t max_chains, Py_ssize_t max_batches):
        self.channel, self.rx, self.rxb = channel, rx, rxb
        a = &self.args
        a.rx_hdr_len, a.guest_csum, a.mergeable, a.max_len, a.max_chains, a.max_batches = \
            rx_hdr_len, guest_csum, mergeable, max_len, max_chains, max_batches

    cdef int _ready(self) except -1:
        return _ring_ready(self.rx, self.rxb, self.args.max_chains)

    cdef void *_runner(self):
        return <void *> &_run_receive

    def take(self):
        """``(pending, batches, delivered, rx_bytes, dropped, over_mtu, error)`` since the last call; counts start again.

        ``pending``: None, or the ``FORWARD_*`` stop for the port's own path
        (the channel's ``front()`` is what is left); ``batches``: the
        batches taken whole; the rest as :func:`forward` counts them.
        """
        cdef FwdOut t = self.total
        error, self.error = self.error, None
        return self._pending(), t.batches, t.delivered, t.rx_bytes, t.dropped, t.over_mtu, error


cdef int _run_receive(void *context, unsigned *notify) noexcept nogil:
    return _step(<_FlowJob> context, <_job_loop> _receive, notify)


cdef int _receive(ReceiveJob job, FwdOut *o) except -1 nogil:
    """:class:`ReceiveJob`'s loop: the channel's batches into the receive ring."""
    cdef const FwdArgs *a = &job.args
    cdef PyObject *batch
    cdef Py_ssize_t room
    cdef int written
    memset(o, 0, sizeof(FwdOut))
    o.stopped = FWD_EMPTY
    while True:
        if o.batches == a.max_batches:
            o.stopped = FWD_BUDGET
            break
        batch = job.channel._front()
        if batch == NULL:
            break
        room = job.rx.available_fast()
        if room == 0:
            room = job.rx.wait_fast()  # none: the driver is asked to kick when it posts buffers
        if room < 0:
            o.stopped = FWD_SLOW  # the receive ring's avail idx is bad: the port's own path fails it
            break
        if room == 0:
            o.stopped = FWD_WAIT
            break
        written = _receive_batch(<Frames> batch, job.channel.start, job.rx, job.rxb, a, o)
        if written == RX_ALL:
            o.batches += 1
            if job.channel._pop():
                o.tx_notify = True  # the sender waits for a slot: its bell
        else:
            job.channel.start = o.stop
            if written == RX_REFUSED:
                o.stopped = FWD_REFUSED
                break
            if written == RX_SLOW:
                o.stopped = FWD_HOLD
                break
            # RX_OUT: the ring ran out of chains; the next turn waits for more
        if o.tx_notify or o.rx_notify:
            o.stopped = FWD_NOTIFY
            break
    return 0


cdef int _forward(SplitQueue tx, ChainBatch txb, Frames frames, SplitQueue rx, ChainBatch rxb, const FwdArgs *a,
                  FwdOut *o) except -1 nogil:
    """:func:`forward`'s loop: the rings are ``fast_ready`` and both batches hold ``max_chains`` chains."""
    cdef Py_ssize_t take, room
    cdef int written
    memset(o, 0, sizeof(FwdOut))
    o.stopped = FWD_EMPTY
    while True:
        if o.batches == a.max_batches:
            o.stopped = FWD_BUDGET
            break
        take = a.max_chains
        if a.fit:
            room = rx.available_fast()
            if room == 0:
                room = rx.wait_fast()  # none: the driver is asked to kick when it posts buffers
            if room < 0:
                o.stopped = FWD_SLOW  # the receive ring's avail idx is bad: the receiver's own path fails it
                break
            if room == 0:
                if tx.available_fast() != 0:
                    o.stopped = FWD_WAIT
                break  # FWD_EMPTY: nothing to send either
            take = min(take, room)
        if not _transmit_batch(tx, txb, frames, take, a, o):
            break
        written = _receive_batch(frames, 0, rx, rxb, a, o)
        if written != RX_ALL:
            # A chain pop_fast refused at the head of the receive ring: the receiver's batch path pops it and
            # raises as for a batch from the switch; chains that ran out, or a frame it cannot write: what
            # that path does with the frames its ring did not take.
            o.stopped = FWD_REFUSED if written == RX_REFUSED else FWD_HOLD
            break
        if o.tx_notify or o.rx_notify:
            o.stopped = FWD_NOTIFY
            break
    return 0


cdef Py_ssize_t _transmit_batch(SplitQueue tx, ChainBatch txb, Frames frames, Py_ssize_t take, const FwdArgs *a,
                                FwdOut *o) except -1 nogil:
    """One transmit batch of a flow: up to ``take`` chains popped, gathered into ``frames``, given back (2.7.9).

    Returns its frame count, or 0 with ``o.stopped`` saying why: the ring
    empty (``FWD_EMPTY``) or for the queue's own calls (``FWD_SLOW``),
    rejected chains or a frame of another flow (``FWD_SWITCH``, the batch
    in ``frames``).
    """
    cdef Py_ssize_t n, i
    n = tx.pop_fast(txb, take)
    if n <= 0:
        o.stopped = FWD_EMPTY if n == 0 else FWD_SLOW
        return 0
    frames.n = 0
    frames.used = 0
    _gather(txb, tx, a.hdr_len, frames, a.gso_mask, o.errors)
    # Copied out: the buffers go back now, used whole (read, nothing written): in order, one used entry (2.7.9).
    tx.push_fast(txb, True)
    o.tx_notify = tx.notify_fast()
    o.batches += 1
    n = frames.n
    if o.errors[0] or o.errors[1] or o.errors[2] or o.errors[3]:
        o.stopped = FWD_SWITCH
        return 0
    for i in range(n):
        if frames.src[i] != a.src or frames.dst[i] != a.dst:
            o.stopped = FWD_SWITCH
            return 0
    o.tx_frames += n
    for i in range(n):
        o.tx_bytes += frames.length[i]
    return n


cdef enum:
    # How _receive_batch ended.
    RX_ALL, RX_OUT, RX_SLOW, RX_REFUSED


cdef int _receive_batch(Frames frames, Py_ssize_t start, SplitQueue rx, ChainBatch rxb, const FwdArgs *a,
                        FwdOut *o) except -1 nogil:
    """Write ``frames`` from ``start`` on into receive chains of ``rx`` (the receiver's batch path in C).

    ``o.stop`` gets the first frame not written: ``RX_ALL`` (none left),
    ``RX_OUT`` (the ring ran out of chains), ``RX_SLOW`` (a frame spans
    mergeable buffers, or a buffer has no host pointer) or ``RX_REFUSED``
    (pop_fast refused the ring's next chain) say why.
    """
    cdef Py_ssize_t n = frames.n, i, j, want = 0, got
    cdef int written = RX_ALL
    if not a.guest_csum:
        for i in range(start, n):
            _complete(frames, i)  # 5.1.6.3: the driver cannot take partial checksums
    # 5.1.4.1: frames longer than the receiver's MTU allows are dropped, not given a buffer.
    for i in range(start, n):
        want += not _over(frames, i, a.max_len)
    if want > rxb.cap_chains:  # segments cut from GSO frames: more frames than chains (5.1.6.2)
        with gil:
            rxb._reserve_chains(want)
    got = rx.pop_fast(rxb, want) if want else 0
    i = start
    j = 0
    while i < n:
        if _over(frames, i, a.max_len):
            o.over_mtu += 1
            i += 1
            continue
        if j >= got:
            written = RX_REFUSED if got < 0 else RX_OUT
            break
        if not _mapped(rxb, j):  # GuestMemory's way: the receiver's path
            written = RX_SLOW
            break
        if _receive_one(rx, rxb, j, frames, i, a.rx_hdr_len, a.guest_csum):
            o.delivered += 1
            o.rx_bytes += frames.length[i]
        elif a.mergeable:  # it spans several buffers: the receiver's own path
            written = RX_SLOW
            break
        else:
            rxb.used_lens[j] = 0  # 5.1.6.3.1: without MRG_RXBUF a buffer holds a whole frame
            o.dropped += 1
        i += 1
        j += 1
    o.stop = i
    if j < got:
        rx.rewind_fast(got - j)
        rxb.n = j
    if got > 0 and rxb.n > 0:
        rx.push_fast(rxb, False)
        if rx.notify_fast():
            o.rx_notify = True
    return written


cdef inline bint _over(Frames f, Py_ssize_t i, uint32_t max_len) noexcept nogil:
    """Whether frame ``i`` is longer than ``max_len`` bytes, plus 4 if it carries an 802.1Q tag (5.1.4.1)."""
    cdef uint32_t n = f.length[i]
    return n > max_len and (n > max_len + VLAN_HLEN or _be16(f.buf + f.off[i] + 12) != ETH_P_8021Q)


cdef inline bint _mapped(ChainBatch b, Py_ssize_t j) noexcept nogil:
    """Whether every buffer of chain ``j`` has a host pointer."""
    cdef Py_ssize_t k
    for k in range(b.first[j], b.first[j + 1]):
        if b.hosts[k] == NULL:
            return False
    return True


cdef inline uint16_t _fold(uint64_t acc) noexcept nogil:
    while acc >> 16:
        acc = (acc & 0xFFFF) + (acc >> 16)
    return <uint16_t> (~acc & 0xFFFF)


cdef int _tso(Frames out, const uint8_t *f, uint32_t n, uint32_t l4, uint32_t mss, bint ipv6) except -2:
    """Append the TCP segments of GSO frame ``f`` (see ``gso.tso_segments``); -1 if it is malformed."""
    cdef uint32_t l3 = ETH_HLEN, ethertype, ihl, payload_at, payload, count, k, take, seg_len, tcp_len, seq0, seq
    cdef uint16_t ip_id0 = 0, csum
    cdef uint8_t flags0, flags
    cdef uint8_t *d
    cdef uint64_t acc
    cdef uint8_t pseudo[40]
    if n < ETH_HLEN:
        return -1
    ethertype = (f[12] << 8) | f[13]
    if ethertype == ETH_P_8021Q and n >= 18:
        ethertype, l3 = (f[16] << 8) | f[17], 18
    if ethertype != (ETH_P_IPV6 if ipv6 else ETH_P_IP) or l4 + 20 > n:
        return -1
    if ipv6:
        if l4 != l3 + 40 or f[l3 + 6] != IPPROTO_TCP:
            return -1
    else:
        ihl = (f[l3] & 0x0F) * 4
        if f[l3] >> 4 != 4 or ihl < 20 or l4 != l3 + ihl or f[l3 + 9] != IPPROTO_TCP:
            return -1
        ip_id0 = (f[l3 + 4] << 8) | f[l3 + 5]
    payload_at = l4 + (f[l4 + 12] >> 4) * 4
    if payload_at < l4 + 20 or payload_at > n or mss == 0:
        return -1
    payload = n - payload_at
    count = (payload + mss - 1) // mss if payload else 1
    if count > 1024:
        return -1
    out._reserve(out.n + count, out.used + count * payload_at + payload)
    seq0 = (<uint32_t> f[l4 + 4] << 24) | (f[l4 + 5] << 16) | (f[l4 + 6] << 8) | f[l4 + 7]
    flags0 = f[l4 + 13]
    for k in range(count):
        take = min(mss, payload - k * mss) if payload else 0
        seg_len = payload_at + take
        d = out.buf + out.used
        memcpy(d, f, payload_at)
        memcpy(d + payload_at, f + payload_at + k * mss, take)
        tcp_len = seg_len - l4
        if ipv6:
            d[l3 + 4] = (seg_len - l3 - 40) >> 8
            d[l3 + 5] = (seg_len - l3 - 40) & 0xFF
            memcpy(pseudo, d + l3 + 8, 32)
            pseudo[32] = tcp_len >> 24
            pseudo[33] = (tcp_len >> 16) & 0xFF
            pseudo[34] = (tcp_len >> 8) & 0xFF
            pseudo[35] = tcp_len & 0xFF
            pseudo[36] = pseudo[37] = pseudo[38] = 0
            pseudo[39] = IPPROTO_TCP
            acc = _sum16(pseudo, 40)
        else:
            d[l3 + 2] = (seg_len - l3) >> 8
            d[l3 + 3] = (seg_len - l3) & 0xFF
            d[l3 + 4] = ((ip_id0 + k) >> 8) & 0xFF
            d[l3 + 5] = (ip_id0 + k) & 0xFF
            d[l3 + 10] = d[l3 + 11] = 0
            csum = _fold(_sum16(d + l3, l4 - l3))
            d[l3 + 10] = csum >> 8
            d[l3 + 11] = csum & 0xFF
            memcpy(pseudo, d + l3 + 12, 8)
            pseudo[8] = 0
            pseudo[9] = IPPROTO_TCP
            pseudo[10] = tcp_len >> 8
            pseudo[11] = tcp_len & 0xFF
            acc = _sum16(pseudo, 12)
        seq = seq0 + k * mss
        d[l4 + 4] = seq >> 24
        d[l4 + 5] = (seq >> 16) & 0xFF
        d[l4 + 6] = (seq >> 8) & 0xFF
        d[l4 + 7] = seq & 0xFF
        flags = flags0
        if k != count - 1:
            flags &= ~0x09  # FIN, PSH on the last segment only
        if k != 0:
            flags &= ~0x80  # CWR on the first only
        d[l4 + 13] = flags
        d[l4 + 16] = d[l4 + 17] = 0
        csum = _fold(_sum16(d + l4, tcp_len) + acc)
        if csum == 0:
            csum = 0xFFFF
        d[l4 + 16] = csum >> 8
        d[l4 + 17] = csum & 0xFF
        out.off[out.n] = <uint32_t> out.used
        out.length[out.n] = seg_len
        out.csum_start[out.n] = -1
        out.csum_offset[out.n] = 0
        out._finish(out.n)
        out.used += seg_len
        out.n += 1
    return count


def tso_segments(frame, uint32_t csum_start, uint32_t gso_size, bint ipv6):
    """The C segmentation on one frame (for differential tests): a list of frames, or ValueError."""
    cdef const uint8_t[::1] data = memoryview(frame).cast("B")
    cdef Frames out = Frames()
    if data.shape[0] == 0 or _tso(out, &data[0], data.shape[0], csum_start, gso_size, ipv6) < 0:
        raise ValueError("malformed GSO frame")
    return [out.frame(i) for i in range(out.n)]
