# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""virtio-net's batch data path in C: transmit gather and receive scatter.

The device logic is in ``device.py`` and reads the same with or without this
module; what this does is move the per-frame work out of Python:

- :func:`tx_gather` copies the readable bytes of every chain of a transmit
  batch into one :class:`Frames` buffer, checking and parsing each
  ``virtio_net_hdr`` (virtio 1.2 5.1.6.2) and each frame's MAC addresses.
- :func:`rx_scatter` writes frames into receive chains it pops, each with its
  ``virtio_net_hdr`` (5.1.6.3, 5.1.6.4), one chain per frame.
- :func:`complete_checksum` fills in a partial checksum (NEEDS_CSUM) in place.

Buffers are reached through the host pointers the queue resolved when it
popped the batch; a buffer without one (it spans regions, or an IOMMU is in
front) is copied through :class:`~iovirt.memory.GuestMemory` instead.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t
from libc.string cimport memcpy, memset
from cpython.mem cimport PyMem_Realloc, PyMem_Free

from iovirt.virtio._queue_c cimport ChainBatch, SplitQueue

cdef enum:
    NEEDS_CSUM = 1
    ETH_HLEN = 14
    MAX_FRAME = 65535 + 14
    NET_HDR_SIZE = 12

# Why a frame was rejected by tx_gather (counts in Frames.errors).
TX_SHORT = 0
TX_LONG = 1
TX_GSO = 2
TX_CSUM = 3


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

    def __cinit__(self):
        self.n = self.used = self.cap = self.cap_frames = 0
        self.errors = [0, 0, 0, 0]

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

    cdef int _reserve(self, Py_ssize_t frames, Py_ssize_t nbytes) except -1:
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

    cdef void _finish(self, Py_ssize_t i) noexcept:
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

    cdef int _check(self, Py_ssize_t i) except -1:
        if i < 0 or i >= self.n:
            raise IndexError(f"frame {i} not in {self.n}")
        return 0


cdef inline uint64_t _mac(const uint8_t *p) noexcept nogil:
    return (<uint64_t> p[0] << 40) | (<uint64_t> p[1] << 32) | (<uint64_t> p[2] << 24) | \
           (<uint64_t> p[3] << 16) | (<uint64_t> p[4] << 8) | p[5]


cdef inline uint16_t _le16(const uint8_t *p) noexcept nogil:
    return p[0] | (p[1] << 8)


cdef int _copy_out(SplitQueue q, ChainBatch b, Py_ssize_t k, uint8_t *dst, uint32_t start, uint32_t count) except -1:
    """Copy ``count`` bytes from offset ``start`` of buffer ``k`` to ``dst``."""
    if b.hosts[k] != NULL:
        memcpy(dst, b.hosts[k] + start, count)
    else:
        data = q.memory.read(b.addrs[k] + start, count)
        memcpy(dst, <const char *> data, count)
    return 0


def tx_gather(ChainBatch b, SplitQueue q, uint32_t hdr_len, Frames out):
    """Gather the frames of transmit batch ``b`` into ``out`` (appending); returns how many.

    Each chain's readable bytes are ``virtio_net_hdr`` + frame.  A chain
    shorter than header + Ethernet header, longer than 64 KiB + 14, with a GSO
    type (no host GSO offered) or with NEEDS_CSUM offsets outside its frame is
    rejected and counted in ``out.errors``.
    """
    cdef Py_ssize_t i, k, total, added = 0
    cdef uint32_t pos, take, skip, frame_len
    cdef uint8_t hdr[NET_HDR_SIZE]
    cdef uint8_t *dst
    cdef int32_t cs, co
    for i in range(b.n):
        total = 0
        for k in range(b.first[i], b.first[i + 1]):
            if not b.writable[k]:
                total += b.lens[k]
        if total < hdr_len + ETH_HLEN:
            out.errors[TX_SHORT] += 1
            continue
        if total - hdr_len > MAX_FRAME:
            out.errors[TX_LONG] += 1
            continue
        frame_len = <uint32_t> (total - hdr_len)
        out._reserve(out.n + 1, out.used + frame_len)
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
        if hdr[1] != 0:
            out.errors[TX_GSO] += 1
            continue
        cs, co = -1, 0
        if hdr[0] & NEEDS_CSUM:
            cs, co = _le16(hdr + 6), _le16(hdr + 8)
            if <uint32_t> cs >= frame_len or <uint32_t> (cs + co + 2) > frame_len:
                out.errors[TX_CSUM] += 1
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


def complete_checksum(Frames f, Py_ssize_t i):
    """Fill in frame ``i``'s pending checksum in place (RFC 1071 sum from csum_start)."""
    f._check(i)
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


cdef int _copy_in(SplitQueue q, ChainBatch b, Py_ssize_t k, uint32_t start, const uint8_t *src, uint32_t count) except -1:
    if b.hosts[k] != NULL:
        memcpy(b.hosts[k] + start, src, count)
    else:
        q.memory.write(b.addrs[k] + start, (<const char *> src)[:count])
    return 0


def complete_pending(Frames f, list indexes):
    """Complete the pending checksum of every frame at ``indexes`` that has one."""
    cdef Py_ssize_t i
    for i in indexes:
        if f.csum_start[i] >= 0:
            complete_checksum(f, i)


def rx_scatter(SplitQueue q, Frames f, list indexes, uint32_t hdr_len, bint guest_csum, bint mergeable, ChainBatch b):
    """Write frames ``indexes`` of ``f`` into receive chains of ``q``, one chain each.

    Pops one chain per frame (into ``b``), writes ``virtio_net_hdr`` (with
    ``num_buffers`` 1) and the frame, pushes the chains.  Returns
    ``(delivered, dropped, stopped_at, delivered_bytes)``; ``stopped_at`` is the position in
    ``indexes`` where this stopped (the caller handles the rest): chains ran
    out, or, with ``mergeable``, a frame needs more than one chain (it is
    given back unused for the caller's multi-chain path).  Without MRG_RXBUF
    a frame too big for its chain is dropped (a buffer must hold a whole
    frame, 5.1.6.3.1).  Frames with a pending checksum must have been
    completed by the caller unless ``guest_csum``.
    """
    cdef Py_ssize_t want = len(indexes), got, j, k, idx
    cdef uint32_t need, written, room, take, pos
    cdef uint8_t hdr[NET_HDR_SIZE]
    cdef const uint8_t *src
    cdef Py_ssize_t delivered = 0, dropped = 0
    cdef uint64_t nbytes = 0
    cdef Py_ssize_t stop
    q.pop_batch(want, b)
    got = b.n
    stop = got
    for j in range(got):
        idx = indexes[j]
        f._check(idx)
        need = hdr_len + f.length[idx]
        room = 0
        for k in range(b.first[j], b.first[j + 1]):
            if b.writable[k]:
                room += b.lens[k]
        if room < need:
            if mergeable:
                stop = j
                break
            b.used_lens[j] = 0
            dropped += 1
            continue
        memset(hdr, 0, NET_HDR_SIZE)
        if f.csum_start[idx] >= 0 and guest_csum:
            hdr[0] = NEEDS_CSUM
            hdr[6] = f.csum_start[idx] & 0xFF
            hdr[7] = f.csum_start[idx] >> 8
            hdr[8] = f.csum_offset[idx] & 0xFF
            hdr[9] = f.csum_offset[idx] >> 8
        hdr[10] = 1  # num_buffers (5.1.6.4: 1 without MRG_RXBUF, and one chain here)
        written = 0
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
        delivered += 1
        nbytes += f.length[idx]
    if stop < got:
        q.rewind(got - stop)
        b.n = stop
    q.push_batch(b)
    return delivered, dropped, stop, nbytes
