# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""virtio-scsi's batch data path in C: READ/WRITE(10/16) that end GOOD, straight from a popped batch.

The Cython twin of ``_datapath_py.py`` (virtio 1.2 5.6.6.1), chosen by
``datapath.py``, which gives the reference what this leaves: every chain
the reference leaves (other commands, a lun field naming no LUN of target
0, protection information, an LBA out of range, a transfer beyond the
maximum, a write to a read-only LUN, buffers smaller than the transfer,
data-out and data-in together, image I/O that fails), and chains whose
buffers have no host pointer (they span regions or an IOMMU is in front) or
whose layout is unusual (the header or the response not alone in its
buffer).  The image I/O is ``preadv`` / ``pwritev`` on iovecs that point
into guest memory, with the GIL released.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy, memset
from posix.uio cimport iovec, preadv, pwritev
from posix.types cimport off_t

from iovirt.virtio._queue_c cimport ChainBatch, Virtqueue
from iovirt.virtio.scsi import defs
from iovirt.virtio.scsi.target import MAX_TRANSFER_BLOCKS

# The spec constants, from defs.py and target.py, as C values for the loop.
cdef uint8_t OP_READ_10 = defs.READ_10, OP_READ_16 = defs.READ_16
cdef uint8_t OP_WRITE_10 = defs.WRITE_10, OP_WRITE_16 = defs.WRITE_16
cdef uint8_t LUN_FIRST = defs.LUN_FIRST_BYTE, LUN_FLAT = defs.LUN_FLAT_ADDRESSING
cdef uint8_t LUN_METHOD_MASK = defs.LUN_ADDRESS_METHOD_MASK
cdef uint8_t STATUS_GOOD = defs.GOOD, RESPONSE_OK = defs.VIRTIO_SCSI_S_OK
cdef uint32_t REQ_HDR = defs.REQ_CMD_HDR.size, RESP_HDR = defs.RESP_CMD_HDR.size
cdef uint64_t BLOCK = defs.BLOCK_SIZE, MAX_BLOCKS = MAX_TRANSFER_BLOCKS


cdef inline uint32_t _be32(const uint8_t *p) noexcept nogil:
    return (<uint32_t> p[0] << 24) | (<uint32_t> p[1] << 16) | (<uint32_t> p[2] << 8) | p[3]


def serve_batch(ChainBatch b, Virtqueue q, tuple luns, uint32_t sense_size, uint32_t cdb_size):
    """Serve the READ/WRITE(10/16) commands of batch ``b`` that end GOOD.

    ``luns`` holds one ``(fd, blocks, read_only)`` per LUN.  Writes each
    served chain's response and sets its used length (the response and the
    data-in bytes).  Returns ``(left, reads, writes, read_bytes,
    written_bytes)``: ``left`` lists the chains for the Python path.
    """
    cdef Py_ssize_t i, k, first, last, resp_at
    cdef uint32_t hdr_size = REQ_HDR + cdb_size, resp_size = RESP_HDR + sense_size
    cdef const uint8_t *h
    cdef const uint8_t *cdb
    cdef uint8_t *resp
    cdef uint8_t opcode
    cdef bint write, fits
    cdef uint32_t number, count, cdb_len
    cdef uint64_t lba, blocks, nbytes, buf_len, need, other_len
    cdef int fd, niov
    cdef Py_ssize_t got
    cdef iovec *iov
    cdef uint32_t residual
    cdef uint64_t reads = 0, writes = 0, read_bytes = 0, written_bytes = 0
    cdef Py_ssize_t nluns = len(luns)
    left = []
    iov = <iovec *> malloc(sizeof(iovec) * (q.size + 1))
    if iov == NULL:
        raise MemoryError()
    try:
        for i in range(b.n):
            first, last = b.first[i], b.first[i + 1]
            # The header alone in the first (readable) buffer, the response alone in the
            # first writable one: the layout Linux's virtio_scsi uses.
            if last - first < 2 or b.writable[first] or b.lens[first] != hdr_size or b.hosts[first] == NULL:
                left.append(i)
                continue
            resp_at = -1
            for k in range(first + 1, last):
                if b.writable[k]:
                    resp_at = k
                    break
            if resp_at < 0 or b.lens[resp_at] != resp_size or b.hosts[resp_at] == NULL:
                left.append(i)
                continue
            h = b.hosts[first]
            # 5.6.6.1: a single-level lun field naming target 0.
            if (h[0] != LUN_FIRST or h[1] != 0 or (h[2] & LUN_METHOD_MASK != 0 and h[2] & LUN_METHOD_MASK != LUN_FLAT)
                    or h[4] or h[5] or h[6] or h[7]):
                left.append(i)
                continue
            number = (<uint32_t> (h[2] & ~LUN_METHOD_MASK & 0xFF) << 8) | h[3]
            if number >= nluns:
                left.append(i)
                continue
            cdb = h + REQ_HDR
            opcode = cdb[0]
            if opcode == OP_READ_10 or opcode == OP_WRITE_10:
                cdb_len = 10
                lba = _be32(cdb + 2)
                count = (<uint32_t> cdb[7] << 8) | cdb[8]
            elif opcode == OP_READ_16 or opcode == OP_WRITE_16:
                cdb_len = 16
                lba = (<uint64_t> _be32(cdb + 2) << 32) | _be32(cdb + 6)
                count = _be32(cdb + 10)
            else:
                left.append(i)
                continue
            # A CDB cut short by cdb_size, or protection information (RDPROTECT/WRPROTECT).
            if cdb_size < cdb_len or cdb[1] & 0xE0:
                left.append(i)
                continue
            write = opcode == OP_WRITE_10 or opcode == OP_WRITE_16
            entry = <tuple> luns[number]
            fd = entry[0]
            blocks = entry[1]
            if (write and entry[2]) or lba > blocks or count > blocks - lba or count > MAX_BLOCKS:
                left.append(i)
                continue
            # The data buffers: data-out after the header for a WRITE, data-in after the response for
            # a READ; the other direction must carry none (no VIRTIO_SCSI_F_INOUT).
            nbytes = <uint64_t> count * BLOCK
            need = nbytes
            buf_len = other_len = 0
            niov = 0
            fits = True
            for k in range(first + 1, last):
                if k == resp_at:
                    continue
                if (b.writable[k] != 0) != (not write):
                    other_len += b.lens[k]
                    continue
                buf_len += b.lens[k]
                if need and b.lens[k]:
                    if b.hosts[k] == NULL:
                        fits = False
                        break
                    iov[niov].iov_base = b.hosts[k]
                    iov[niov].iov_len = b.lens[k] if b.lens[k] < need else need
                    need -= iov[niov].iov_len
                    niov += 1
            if not fits or other_len or need:
                left.append(i)
                continue
            if nbytes:
                with nogil:
                    if write:
                        got = pwritev(fd, iov, niov, <off_t> (lba * BLOCK))
                    else:
                        got = preadv(fd, iov, niov, <off_t> (lba * BLOCK))
                if got != <Py_ssize_t> nbytes:
                    left.append(i)  # the device tries once more and reports MEDIUM ERROR
                    continue
            # struct virtio_scsi_resp_cmd: sense_len 0, residual, status_qualifier 0, GOOD, VIRTIO_SCSI_S_OK.
            resp = b.hosts[resp_at]
            residual = <uint32_t> (buf_len - nbytes)
            memset(resp, 0, RESP_HDR)
            memcpy(resp + 4, &residual, 4)
            resp[10] = STATUS_GOOD
            resp[11] = RESPONSE_OK
            if write:
                writes += 1
                written_bytes += nbytes
                b.used_lens[i] = resp_size
            else:
                reads += 1
                read_bytes += nbytes
                b.used_lens[i] = <uint32_t> (resp_size + nbytes)
    finally:
        free(iov)
    return left, reads, writes, read_bytes, written_bytes
