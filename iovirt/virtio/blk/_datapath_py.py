"""virtio-blk's batch data path in Python: the readable reference of ``_datapath_c.pyx``.

:func:`serve_batch` serves the IN, OUT and FLUSH requests of a popped batch
(virtio 1.2 5.2.6) with ``preadv``/``pwritev`` straight on views of guest
memory, and leaves the other request types to the device.  Unlike the C twin
it takes any buffer layout (the header split over buffers, data in the
header's buffer, buffers without a host pointer), so it also serves what the
C twin leaves; a buffer that crosses from one memory region into the next, or
whose IOVA pages are scattered, becomes several views (a scatter list,
:meth:`~iovirt.memory.GuestMemory.views`).  :func:`parse_request` is the request layout both this and
the device's other request types read.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple, Sequence

from iovirt.memory import Access, GuestMemory, GuestMemoryError
from iovirt.virtio.blk.defs import (
    REQ_HDR,
    SECTOR_SIZE,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
)
from iovirt.virtio.chain import DescChain

__all__ = ["Request", "parse_request", "serve_batch", "gather"]

Buffers = list[tuple[int, int]]

IOV_MAX = os.sysconf("SC_IOV_MAX")
"""The most iovecs one ``preadv``/``pwritev`` takes (POSIX ``IOV_MAX``; 1024 on Linux)."""


class Request(NamedTuple):
    """A request chain read as ``struct virtio_blk_req`` (5.2.6)."""

    type: int
    sector: int
    dout: Buffers  # device-readable data after the header
    din: Buffers  # device-writable data before the status byte
    status_addr: int


def parse_request(memory: GuestMemory, chain: DescChain) -> Request | None:
    """The request in ``chain``, or ``None`` without room for a header or a status byte."""
    writable = chain.writable
    if chain.readable_len < REQ_HDR.size or not writable or writable[-1][1] < 1:
        return None
    last_addr, last_len = writable[-1]
    din = writable[:-1] + ([(last_addr, last_len - 1)] if last_len > 1 else [])
    rtype, _reserved, sector = REQ_HDR.unpack(gather(memory, chain.readable, REQ_HDR.size))
    return Request(rtype, sector, _skip(chain.readable, REQ_HDR.size), din, last_addr + last_len - 1)


def serve_batch(
    batch: Any, queue: Any, fd: int, capacity: int, read_only: bool, indexes: Sequence[int] | None = None
) -> tuple[list[int], int, int, int, int, int, int]:
    """Serve the IN/OUT/FLUSH requests among chains ``indexes`` (all by default) of ``batch`` on image ``fd``.

    Sets each served chain's used length (every device-writable byte, as
    QEMU does, so the status byte is within it, 2.7.8.2) and writes its
    status.  Returns ``(left, read_bytes, written_bytes, flushes, errors, reads, writes)``
    as the C twin does: ``left`` lists the chains for the device (other
    request types, or no room for a header or status byte); ``errors``
    counts requests completed with IOERR (out of range, not whole sectors, a
    write to a read-only image, guest buffers outside memory, or the system
    call failing); ``reads`` and ``writes`` count the IN and OUT requests.
    """
    memory = queue.memory
    left: list[int] = []
    read = written = flushes = errors = reads = writes = 0
    for i in range(len(batch)) if indexes is None else indexes:
        chain = batch[i]
        request = parse_request(memory, chain)
        if request is None or request.type not in (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH):
            left.append(i)
            continue
        status = VIRTIO_BLK_S_OK
        if request.type == VIRTIO_BLK_T_FLUSH:
            # 5.2.6.4: a flush completes after the written data is on stable storage.
            if not read_only:
                try:
                    os.fdatasync(fd)
                except OSError:
                    status = VIRTIO_BLK_S_IOERR
            flushes += 1
        else:
            write = request.type == VIRTIO_BLK_T_OUT
            writes += write
            reads += not write
            nbytes = _transfer(memory, fd, capacity, read_only, request, write)
            if nbytes < 0:
                status = VIRTIO_BLK_S_IOERR
            elif write:
                written += nbytes
            else:
                read += nbytes
        if status != VIRTIO_BLK_S_OK:
            errors += 1
        memory.write(request.status_addr, bytes([status]))
        batch.set_used_len(i, chain.writable_len)
    return left, read, written, flushes, errors, reads, writes


def _transfer(memory: GuestMemory, fd: int, capacity: int, read_only: bool, request: Request, write: bool) -> int:
    """IN (image to guest buffers) or OUT (guest buffers to image), zero-copy; bytes moved, or -1 for IOERR."""
    bufs = request.dout if write else request.din
    nbytes = sum(n for _, n in bufs)
    sector = request.sector
    if nbytes % SECTOR_SIZE or sector > capacity or nbytes // SECTOR_SIZE > capacity - sector:
        return -1
    if write and read_only:
        return -1  # 5.2.6.2: a read-only device fails writes
    if not nbytes:
        return 0
    # The device writes guest memory for IN, reads it for OUT (VT-d R/W).
    access = Access.READ if write else Access.WRITE
    views: list[memoryview] = []
    try:
        # A scatter list: a buffer that crosses from one region into the next is several views.
        for addr, n in bufs:
            if n:
                views += memory.views(addr, n, access)
        offset = sector * SECTOR_SIZE
        # preadv/pwritev take at most IOV_MAX iovecs: a longer list goes in slices.
        for start in range(0, len(views), IOV_MAX):
            part = views[start : start + IOV_MAX]
            done = os.pwritev(fd, part, offset) if write else os.preadv(fd, part, offset)
            if done != sum(v.nbytes for v in part):
                return -1
            offset += done
    except (GuestMemoryError, OSError):
        return -1
    finally:
        for v in views:
            v.release()
    return nbytes


def gather(memory: GuestMemory, bufs: Buffers, limit: int) -> bytes:
    """The first ``limit`` bytes of ``bufs``."""
    out = bytearray()
    for addr, n in bufs:
        if len(out) >= limit:
            break
        out += memory.read(addr, min(n, limit - len(out)))
    return bytes(out)


def _skip(bufs: Buffers, nbytes: int) -> Buffers:
    """The buffers left after skipping ``nbytes`` from the front."""
    out = []
    for addr, n in bufs:
        if nbytes >= n:
            nbytes -= n
            continue
        out.append((addr + nbytes, n - nbytes))
        nbytes = 0
    return out
