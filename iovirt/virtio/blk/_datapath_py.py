"""virtio-blk's batch data path in Python: the readable reference of ``_datapath_c.pyx``.

:class:`Engine` starts the IN, OUT and FLUSH requests of a popped batch
(virtio 1.2 5.2.6) on a :class:`~iovirt.virtio.blk.aio.ThreadPool` whose
workers run ``preadv``/``pwritev`` straight on views of guest memory, and
completes them later into batches per queue; it leaves the other request
types to the device.  Unlike the C twin it takes any buffer layout (the
header split over buffers, data in the header's buffer, buffers without a
host pointer); a buffer that crosses from one memory region into the next,
or whose IOVA pages are scattered, becomes several views (a scatter list,
:meth:`~iovirt.memory.GuestMemory.views`).  :func:`serve_batch` serves
requests synchronously, the same way: the device runs it on what the C twin
leaves, once every request in flight completed (so a FLUSH stays ordered).
:func:`parse_request` is the request layout both this and the device's other
request types read.
"""

from __future__ import annotations

import errno
import os
from typing import Any, NamedTuple, Sequence

from iovirt.memory import Access, GuestMemory, GuestMemoryError
from iovirt.virtio.blk.aio import DIRECT_ALIGN, Image, ImageHook, ThreadPool
from iovirt.virtio.blk.defs import (
    REQ_HDR,
    SECTOR_SIZE,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
)
from iovirt.virtio.chain import ChainBatch, DescChain

__all__ = ["Engine", "Request", "parse_request", "serve_batch", "gather"]

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


OP_READ, OP_WRITE, OP_FLUSH, OP_NONE = range(4)
OP_NAMES = ("read", "write", "flush")


class _Op:
    """One request in flight: where its status goes, what the worker does, and the outcome."""

    __slots__ = ("queue", "chain", "memory", "status_addr", "op", "fd", "buffered_fd", "direct", "offset",
                 "nbytes", "views", "result")

    def __init__(self, queue: int, chain: DescChain, memory: GuestMemory, status_addr: int, fd: int) -> None:
        self.queue = queue
        self.chain = chain
        self.memory = memory
        self.status_addr = status_addr
        self.op = OP_NONE
        self.fd = self.buffered_fd = fd
        self.direct = False
        self.offset = 0
        self.nbytes = 0
        self.views: list[memoryview] = []
        self.result = 0


def _run(op: _Op) -> int:
    """A worker runs one request: bytes moved, or -errno (the pool turns an OSError into it)."""
    if op.op == OP_FLUSH:
        # 5.2.6.4: a flush completes after the written data is on stable storage.
        os.fdatasync(op.fd)
        return 0
    offset, moved = op.offset, 0
    # preadv/pwritev take at most IOV_MAX iovecs: a longer list goes in slices.
    for start in range(0, len(op.views), IOV_MAX):
        part = op.views[start : start + IOV_MAX]
        done = os.pwritev(op.fd, part, offset) if op.op == OP_WRITE else os.preadv(op.fd, part, offset)
        moved += done
        if done != sum(v.nbytes for v in part):
            break
        offset += done
    return moved


class Engine:
    """Requests in flight on one device's image, on a thread pool (the C twin's ``Engine``, in Python).

    ``wake_fd`` is signalled as requests complete; ``slots`` bounds the
    requests in flight; ``hook`` is an :class:`~iovirt.virtio.blk.aio.ImageHook`
    or ``None``; ``kind`` may only be ``"threads"`` (or ``None``): io_uring
    is the C twin's.
    """

    def __init__(self, wake_fd: int, slots: int, hook: ImageHook | None = None, kind: str | None = None) -> None:
        if kind not in (None, "threads"):
            raise ValueError(f"blk engine {kind!r}: the pure-Python data path has only threads")
        self.kind = "threads"
        self.reason = "the pure-Python data path"
        self._slots = slots
        self._pool = ThreadPool(_run, wake_fd, delay=0.0 if hook is None else hook.delay)
        self._fail = None if hook is None else hook.fail
        self._ready: list[_Op] = []
        self._count = 0

    @property
    def in_flight(self) -> int:
        """Requests submitted and not completed yet."""
        return self._count

    @property
    def free(self) -> int:
        """How many more requests may be submitted now."""
        return self._slots - self._count

    def close(self) -> None:
        """Stop the workers (after :meth:`complete` took every request)."""
        self._pool.close()

    def submit(self, batch: Any, queue: int, memory: GuestMemory, image: Image) -> tuple[list[int], int, int, int, int]:
        """Start the IN/OUT/FLUSH requests of ``batch`` of queue ``queue``.

        Returns ``(left, nbytes, reads, writes, flushes)`` as the C twin
        does: ``left`` lists the chains for the device (other request types,
        or no room for a header or status byte).  Requests that need no I/O
        (out of range, not whole sectors, a write to a read-only image, no
        data, guest buffers outside memory) complete at the next :meth:`complete`.
        """
        left: list[int] = []
        total = reads = writes = flushes = 0
        for i, chain in enumerate(batch):
            request = parse_request(memory, chain)
            if request is None or request.type not in (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH):
                left.append(i)
                continue
            if self._count >= self._slots:
                raise RuntimeError("blk engine: more requests popped than slots free")
            self._count += 1
            chain.used_len = chain.writable_len
            op = _Op(queue, chain, memory, request.status_addr, image.fd)
            if request.type == VIRTIO_BLK_T_FLUSH:
                flushes += 1
                op.op = OP_FLUSH
                if image.read_only:
                    self._done_now(op, VIRTIO_BLK_S_OK)
                else:
                    self._pool.submit(op, barrier=True)
                continue
            write = request.type == VIRTIO_BLK_T_OUT
            writes += write
            reads += not write
            op.op = OP_WRITE if write else OP_READ
            bufs = request.dout if write else request.din
            nbytes = sum(n for _, n in bufs)
            sector = request.sector
            if nbytes % SECTOR_SIZE or sector > image.capacity or nbytes // SECTOR_SIZE > image.capacity - sector:
                self._done_now(op, VIRTIO_BLK_S_IOERR)
                continue
            if write and image.read_only:
                self._done_now(op, VIRTIO_BLK_S_IOERR)  # 5.2.6.2: a read-only device fails writes
                continue
            if not nbytes:
                self._done_now(op, VIRTIO_BLK_S_OK)
                continue
            # The device writes guest memory for IN, reads it for OUT (VT-d R/W).
            access = Access.READ if write else Access.WRITE
            try:
                # A scatter list: a buffer that crosses from one region into the next is several views.
                for addr, n in bufs:
                    if n:
                        op.views += memory.views(addr, n, access)
            except GuestMemoryError:
                _release(op)
                self._done_now(op, VIRTIO_BLK_S_IOERR)
                continue
            op.offset, op.nbytes = sector * SECTOR_SIZE, nbytes
            # Guest pages sit at the same offsets in their host pages: guest alignment is host alignment.
            if image.direct_fd >= 0 and all(a % DIRECT_ALIGN == 0 and n % DIRECT_ALIGN == 0 for a, n in bufs):
                op.fd, op.direct = image.direct_fd, True
            total += nbytes
            self._pool.submit(op)
        return left, total, reads, writes, flushes

    def _done_now(self, op: _Op, status: int) -> None:
        op.op, op.result = OP_NONE, status
        self._ready.append(op)

    def wait(self) -> None:
        """Block until a request completed (call only with requests in flight)."""
        if not self._ready:
            self._pool.wait()

    def poll(self) -> None:
        """The C twin enters its io_uring here; the thread pool signals every completion, nothing to do."""

    def complete(self) -> list[tuple[int, ChainBatch, int, int, int]]:
        """Take the completed requests: write their status bytes, gather them per queue.

        Returns a list of ``(queue, batch, read_bytes, written_bytes, errors)``.
        An ``O_DIRECT`` request the file system refused (EINVAL) goes again
        through the buffered fd instead of completing.
        """
        finished, self._ready = self._ready, []
        for op, result in self._pool.reap():
            op.result = result
            finished.append(op)
        out: dict[int, tuple[list[DescChain], list[int]]] = {}
        for op in finished:
            if op.op == OP_NONE:
                status = op.result
            else:
                if op.direct and op.result == -errno.EINVAL:
                    op.direct, op.fd = False, op.buffered_fd
                    self._pool.submit(op)
                    continue
                ok = op.result == (0 if op.op == OP_FLUSH else op.nbytes)
                if ok and self._fail is not None and self._fail(OP_NAMES[op.op], op.offset, op.nbytes):
                    ok = False
                status = VIRTIO_BLK_S_OK if ok else VIRTIO_BLK_S_IOERR
            _release(op)
            self._count -= 1
            chains, counts = out.setdefault(op.queue, ([], [0, 0, 0]))
            try:
                op.memory.write(op.status_addr, bytes([status]))
            except GuestMemoryError:
                status = VIRTIO_BLK_S_IOERR  # nowhere to report it; the chain still goes back
            chains.append(op.chain)
            if status != VIRTIO_BLK_S_OK:
                counts[2] += 1
            elif op.op == OP_READ:
                counts[0] += op.nbytes
            elif op.op == OP_WRITE:
                counts[1] += op.nbytes
        return [(q, ChainBatch(chains), *counts) for q, (chains, counts) in out.items()]  # type: ignore[misc]


def _release(op: _Op) -> None:
    for v in op.views:
        v.release()
    op.views = []
