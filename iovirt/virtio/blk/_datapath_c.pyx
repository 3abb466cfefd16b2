# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""virtio-blk's batch data path in C: IN, OUT and FLUSH straight from a popped batch.

The Cython twin of ``_datapath_py.py`` (virtio 1.2 5.2.6), chosen by
``datapath.py``, which gives the reference what this leaves: request types
other than IN/OUT/FLUSH, and requests whose buffers have no host pointer
(they span regions or an IOMMU is in front) or whose layout is unusual (data
in the header's buffer).  The image I/O is ``preadv`` /
``pwritev`` / ``fdatasync`` on iovecs that point into guest memory, with the
GIL released.
"""

from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy
from posix.uio cimport iovec, preadv, pwritev
from posix.types cimport off_t

from iovirt.virtio._queue_c cimport ChainBatch, Virtqueue
from iovirt.virtio.blk import defs

cdef extern from "unistd.h" nogil:
    int fdatasync(int fd)

# The spec constants, from defs.py, as C values for the loop.
cdef uint32_t T_IN = defs.VIRTIO_BLK_T_IN, T_OUT = defs.VIRTIO_BLK_T_OUT, T_FLUSH = defs.VIRTIO_BLK_T_FLUSH
cdef int S_OK = defs.VIRTIO_BLK_S_OK, S_IOERR = defs.VIRTIO_BLK_S_IOERR
cdef uint64_t SECTOR = defs.SECTOR_SIZE
cdef uint32_t HDR = defs.REQ_HDR.size


def serve_batch(ChainBatch b, Virtqueue q, int fd, uint64_t capacity, bint read_only):
    """Serve the IN/OUT/FLUSH requests of batch ``b`` on image ``fd``.

    Sets each served chain's used length (every device-writable byte, as
    the reference does) and writes its status byte.  Returns ``(left, read_bytes,
    written_bytes, flushes, errors, reads, writes)``: ``left`` lists the chains for the
    Python path; ``errors`` counts requests completed with IOERR (out of
    range, not whole sectors, a write to a read-only image, or the system
    call failing); ``reads`` and ``writes`` count the IN and OUT requests.
    """
    cdef Py_ssize_t i, k, first, last, nbufs
    cdef uint32_t rtype, writable_len
    cdef uint64_t sector, nbytes
    cdef uint8_t *status
    cdef const uint8_t *h
    cdef iovec *iov
    cdef int niov, status_value
    cdef Py_ssize_t got
    cdef uint64_t read_bytes = 0, written_bytes = 0, flushes = 0, errors = 0, reads = 0, writes = 0
    left = []
    iov = <iovec *> malloc(sizeof(iovec) * (q.size + 1))
    if iov == NULL:
        raise MemoryError()
    try:
        for i in range(b.n):
            first, last = b.first[i], b.first[i + 1]
            nbufs = last - first
            # The header alone in the first (readable) buffer, the status byte
            # at the end of the last (writable) one: the layout every driver uses.
            if (nbufs < 2 or b.writable[first] or b.lens[first] != HDR or b.hosts[first] == NULL
                    or not b.writable[last - 1] or b.lens[last - 1] < 1 or b.hosts[last - 1] == NULL):
                left.append(i)
                continue
            h = b.hosts[first]
            memcpy(&rtype, h, 4)
            memcpy(&sector, h + 8, 8)
            if rtype != T_IN and rtype != T_OUT and rtype != T_FLUSH:
                left.append(i)
                continue
            writable_len = 0
            niov = 0
            nbytes = 0
            for k in range(first + 1, last):
                if b.writable[k]:
                    writable_len += b.lens[k]
                if b.hosts[k] == NULL:
                    niov = -1
                    break
                if (rtype == T_IN) != (b.writable[k] != 0):
                    continue  # OUT takes the readable data, IN the writable
                iov[niov].iov_base = b.hosts[k]
                iov[niov].iov_len = b.lens[k]
                nbytes += b.lens[k]
                niov += 1
            if niov < 0:
                left.append(i)
                continue
            if rtype == T_IN:
                # The last writable buffer ends with the status byte.
                iov[niov - 1].iov_len -= 1
                nbytes -= 1
                if iov[niov - 1].iov_len == 0:
                    niov -= 1
            if rtype == T_IN:
                reads += 1
            elif rtype == T_OUT:
                writes += 1
            status = b.hosts[last - 1] + b.lens[last - 1] - 1
            status_value = S_OK
            if rtype == T_FLUSH:
                if not read_only:
                    with nogil:
                        if fdatasync(fd) != 0:
                            status_value = S_IOERR
                flushes += 1
            elif nbytes % SECTOR or sector > capacity or nbytes // SECTOR > capacity - sector:
                status_value = S_IOERR
            elif rtype == T_OUT and read_only:
                status_value = S_IOERR  # 5.2.6.2: a read-only device fails writes
            elif nbytes:
                with nogil:
                    if rtype == T_IN:
                        got = preadv(fd, iov, niov, <off_t> (sector * SECTOR))
                    else:
                        got = pwritev(fd, iov, niov, <off_t> (sector * SECTOR))
                if got != <Py_ssize_t> nbytes:
                    status_value = S_IOERR
                elif rtype == T_IN:
                    read_bytes += nbytes
                else:
                    written_bytes += nbytes
            if status_value != S_OK:
                errors += 1
            status[0] = status_value
            b.used_lens[i] = writable_len
    finally:
        free(iov)
    return left, read_bytes, written_bytes, flushes, errors, reads, writes
