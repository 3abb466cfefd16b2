"""The virtio-blk device (virtio 1.2 section 5.2) on a raw image file.

A request is a chain: ``struct virtio_blk_req { le32 type; le32 reserved;
le64 sector; u8 data[]; u8 status; }`` (5.2.6) with the header and any
output data device-readable, then the input data and the status byte
device-writable.  IN, OUT and FLUSH go through ``datapath.py`` (the Cython
twin, or the Python reference with the reference queue) to an engine of
asynchronous block I/O (:mod:`iovirt.virtio.blk.aio`: io_uring, or a thread
pool) that moves data between the image and guest memory straight on guest
memory (no copies), ``O_DIRECT`` where the image's file system takes it.
They complete out of order, later: the engine signals :attr:`wake_fd`, the
transport kicks the queues from the thread that serves them, and
:meth:`process_queue` pushes what completed.  The other request types are
served here, at once.

A transport that does not serve :attr:`wake_fd` (the in-process one, tests
that kick by hand) gets every request completed before :meth:`kick`
returns; the vhost-user back-end sets :attr:`complete_async`.  No request
is in flight when a queue stops (:meth:`stop_queue`: migration's
GET_VRING_BASE, reset, a front-end gone) or when the memory map changes (the
queue's ``refresh``): both wait for the I/O first, as the buffers it reads
and writes may be unmapped next.

Write-back caching is honest: writes land in the host page cache (or the
disk, with ``O_DIRECT``) and a ``VIRTIO_BLK_T_FLUSH`` completes only after
every request submitted before it completed and ``fdatasync`` returned
(5.2.6.4).
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import errno
import os
import struct
import time
from typing import Any, Callable, Mapping, cast

from iovirt.errors import IovirtError
from iovirt.memory import GuestMemory, GuestMemoryError
from iovirt.virtio.blk import datapath
from iovirt.virtio.blk._datapath_py import gather, parse_request
from iovirt.virtio.blk.aio import ImageHook, open_image
from iovirt.virtio.blk.defs import (
    DISCARD_SEG,
    SECTOR_SIZE,
    VIRTIO_BLK_F_BLK_SIZE,
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
    VIRTIO_ID_BLOCK,
)
from iovirt.virtio.chain import ChainBatch as Chains
from iovirt.virtio.chain import DescChain
from iovirt.virtio.counters import restore_counters
from iovirt.virtio.device import COMMON_FEATURES, Notify, VirtioDevice
from iovirt.virtio.queue import IMPLEMENTATION as QUEUE_IMPLEMENTATION
from iovirt.virtio.queue import ChainBatch, QueueWrapper, SplitQueue
from iovirt.virtio.qos import Limits, TokenBucket
from iovirt.virtio.state import QueueState

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

BATCH = 64
SLOTS = 256
"""Requests in flight on one device's image at most (the engine's slots; a ring holds the rest)."""
LIMITS = ("iops", "bps")  # requests/s, bytes read and written/s (docs/qos.md)
REQUEST_NAMES = {VIRTIO_BLK_T_GET_ID: "get_id", VIRTIO_BLK_T_DISCARD: "discard", VIRTIO_BLK_T_WRITE_ZEROES: "write_zeroes"}
"""Counter names of the request types served outside the batch data path (others count as "unsupported")."""


class RequestError(Exception):
    """A request that completes with a non-OK status; carries the status to report."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, ctypes.c_long(offset), ctypes.c_long(length)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class VirtioBlk(VirtioDevice):
    """A virtio-blk device backed by a raw image file."""

    device_id = VIRTIO_ID_BLOCK
    name = "virtio-blk"

    def __init__(
        self,
        path: str,
        *,
        read_only: bool = False,
        num_queues: int = 1,
        size: int | None = None,
        serial: str = "iovirt",
        seg_max: int = 126,
        size_max: int = 1 << 20,
        blk_size: int = 512,
        queue_max_size: int = 1024,
        label: str = "",
        direct: bool = True,
        hook: ImageHook | None = None,
        engine: str | None = None,
    ) -> None:
        """``direct``: ``O_DIRECT`` where the image's file system takes it; ``hook``: a test hook on the
        image I/O; ``engine``: ``"io_uring"``, ``"threads"`` or ``"inline"`` (default:
        :data:`~iovirt.virtio.blk.aio.ENGINE_ENV`, else inline for an image in memory, else io_uring where it
        works)."""
        super().__init__(num_queues, queue_max_size, label or os.path.basename(path))
        if size is not None and not os.path.exists(path):
            with open(path, "wb") as f:
                f.truncate(size)
        self.image = open_image(path, read_only, direct)
        self.fd = self.image.fd
        self.path = path
        self.read_only = read_only
        self.capacity = self.image.capacity
        self.hook = hook
        self._engine_kind = engine
        # Asked now, not when the first request comes: a sandboxed process (--sandbox) may no longer ask.
        self._in_memory = datapath.memory_backed(self.image.fd)
        self._mappable = self._in_memory and datapath.fully_allocated(self.image.fd)
        self._engines: dict[str, Any] = {}  # by twin (datapath.engine_key), made when a queue needs one
        self._popped_from: dict[int, SplitQueue] = {}  # by queue index: the queue its requests in flight go back to
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.wake_fd = self._wake_fd  # the engines signal completions on it
        self._signalling = False  # whether an engine signals it (the inline one never does)
        self._poking = False  # a _poke is due on the timer
        self.complete_async = False
        """True: requests complete when :attr:`wake_fd` is served; False: before :meth:`kick` returns."""
        self.serial = serial.encode()[:VIRTIO_BLK_ID_BYTES]
        self.seg_max = seg_max
        self.size_max = size_max
        self.blk_size = blk_size
        self.stats: collections.Counter[str] = collections.Counter()
        # A batch the Cython queue pops into again and again (the reference queue allocates its own);
        # the Cython batch is built empty, the reference one from its chains.
        batch_type: Any = ChainBatch
        self._batch = batch_type() if QUEUE_IMPLEMENTATION == "cython" else None
        # Limits: None without any (the data path's one check), else the iops and bps buckets.
        self._limits = Limits(LIMITS, self.label)
        self._buckets: tuple[TokenBucket | None, TokenBucket | None] | None = None
        self._request_bytes = float(SECTOR_SIZE)  # data bytes per request in the last batch: what bps pops by
        self._wake_at = 0.0  # when the timer set last will serve the queues again (monotonic seconds)

    def close(self) -> None:
        """Wait for the I/O in flight, stop the engines, close the image."""
        self._drain()
        for engine in self._engines.values():
            engine.close()
        self._engines.clear()
        self.image.close()
        os.close(self._wake_fd)

    def engine(self) -> str:
        """Which engine runs the image I/O of this device's queues, and why (the log says it too)."""
        engine = self._engine(datapath.default_key())
        return f"{engine.kind} ({engine.reason})"

    # -- saved state (counters; the disk's identity as a consistency check) ---------
    def state(self) -> dict[str, Any]:
        """Counters, and capacity, read-only flag and serial to check the destination by (:meth:`restore`)."""
        return {
            "capacity": self.capacity,
            "read_only": self.read_only,
            "serial": self.serial.hex(),
            "stats": dict(self.stats),
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Take another device's :meth:`state`: untrusted, checked before anything is applied.

        The image is not in the state: the destination serves the same disk,
        so a capacity, read-only flag or serial that differs from this
        device's is refused (``ValueError``) rather than shown to the driver.
        """
        try:
            saved = {key: state[key] for key in ("capacity", "read_only", "serial")}
            stats = restore_counters(state["stats"])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a virtio-blk state: {exc!r} missing or malformed") from exc
        mine = {"capacity": self.capacity, "read_only": self.read_only, "serial": self.serial.hex()}
        for key, value in saved.items():
            if value != mine[key] or type(value) is not type(mine[key]):
                raise ValueError(f"{key} {value!r} saved, this device's is {mine[key]!r} (not the same disk?)")
        self.stats = stats

    # -- QoS: request limits (docs/qos.md) -------------------------------------------
    def set_limits(self, limits: Mapping[str, float]) -> None:
        """Limit the device to ``iops`` requests/s and ``bps`` data bytes (read + written)/s.

        Keys not given keep their limit; 0 removes one.  Requests beyond a
        limit wait in the ring (none fails); the queues are served again
        when tokens are back.  Safe from any thread; takes effect at once.
        ``ValueError`` for an unknown key or a value not a finite number >= 0.
        """

        def apply(buckets: dict[str, TokenBucket]) -> None:
            self._buckets = (buckets.get("iops"), buckets.get("bps")) if buckets else None

        self._limits.update(limits, apply)
        call_later = self.call_later
        if call_later is not None:
            call_later(0.0, self._wake)  # requests held back under the old limits may go now

    def limits(self) -> dict[str, float]:
        """The limits, ``iops`` and ``bps``; 0.0 where there is none."""
        return self._limits.values()

    def _admit(self, buckets: tuple[TokenBucket | None, TokenBucket | None]) -> int:
        """How many requests to pop now (0: wait; a timer is set to serve the queues again)."""
        iops, bps = buckets
        count, delay = BATCH, 0.0
        if iops is not None:
            tokens = iops.refill()
            if tokens < 1:
                delay = iops.wait_time(1)
            count = min(count, int(tokens))
        if bps is not None:
            # A request's size is known once it is popped: pop as many as the bytes held pay for
            # at the last batch's size, at least one; what it costs beyond is a debt paid by waiting.
            tokens = bps.refill()
            if tokens <= 0:
                delay = max(delay, bps.wait_time(self._request_bytes))
            count = min(count, max(1, int(tokens // self._request_bytes)))
        if delay > 0:
            call_later, now = self.call_later, time.monotonic()
            # One timer at a time; past its time (a lost timer) the next kick sets another.
            if call_later is not None and now >= self._wake_at:
                self._wake_at = now + delay
                call_later(delay, self._wake)
            return 0
        return count

    def _charge(self, buckets: tuple[TokenBucket | None, TokenBucket | None], requests: int, nbytes: int) -> None:
        iops, bps = buckets
        if iops is not None:
            iops.take(requests)
        if bps is not None:
            bps.take(nbytes)
            self._request_bytes = max(float(SECTOR_SIZE), nbytes / requests)

    def _wake(self) -> None:
        """The timer: serve every queue again (requests waited for tokens)."""
        self._wake_at = 0.0
        for index in range(self.num_queues):
            self.kick(index)

    # -- features and config (5.2.3, 5.2.4) -------------------------------------
    def device_features(self) -> int:
        """Offered: the common bits, SIZE_MAX, SEG_MAX, BLK_SIZE, FLUSH, MQ, DISCARD, WRITE_ZEROES (+RO)."""
        bits = [
            VIRTIO_BLK_F_SIZE_MAX,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_MQ,
        ]
        bits += [VIRTIO_BLK_F_RO] if self.read_only else [VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES]
        return COMMON_FEATURES | sum(1 << b for b in bits)

    def config_space(self) -> bytes:
        """``struct virtio_blk_config`` up to ``unused1`` (60 bytes)."""
        max_sectors = 0xFFFFFFFF // SECTOR_SIZE
        return struct.pack(
            "<QII HBB I BBHI BBH III IIB3x",
            self.capacity,
            self.size_max,
            self.seg_max,
            0, 0, 0,  # geometry: not offered
            self.blk_size,
            0, 0, 0, 0,  # topology: not offered
            0, 0,  # writeback, unused0 (CONFIG_WCE not offered)
            self.num_queues,
            max_sectors,  # max_discard_sectors
            1,  # max_discard_seg
            1,  # discard_sector_alignment (in 512-byte sectors)
            max_sectors,  # max_write_zeroes_sectors
            1,  # max_write_zeroes_seg
            1,  # write_zeroes_may_unmap
        )

    # -- queues: I/O in flight is waited for before a queue stops or memory moves -----------
    def start_queue(
        self,
        index: int,
        memory: GuestMemory,
        state: QueueState,
        notify: Notify,
        wrap: Callable[[SplitQueue], SplitQueue] | None = None,
        *,
        packed: bool = False,
        in_order: bool = False,
    ) -> SplitQueue:
        """Start queue ``index``; its ``refresh`` (the memory map changed) waits for the I/O in flight first.

        blk never offers VIRTIO_F_IN_ORDER (its engine completes in the disk's order), so ``in_order`` is
        passed on only to keep the signature of :meth:`VirtioDevice.start_queue`.
        """

        def drained(queue: SplitQueue) -> SplitQueue:
            return cast(SplitQueue, _DrainOnRefresh(queue if wrap is None else wrap(queue), self._drain))

        return super().start_queue(index, memory, state, notify, drained, packed=packed, in_order=in_order)

    def stop_queue(self, index: int) -> QueueState | None:
        """Wait for every request in flight to complete (and be pushed), then stop queue ``index``."""
        self._drain()
        self._popped_from.pop(index, None)
        return super().stop_queue(index)

    def _engine(self, key: str) -> Any:
        engine = self._engines.get(key)
        if engine is None:
            kind = self._engine_kind or datapath.default_kind(key, self._in_memory, self.hook)
            engine = datapath.new_engine(key, self._wake_fd, SLOTS, self.hook, kind)
            if engine.kind == datapath.INLINE and self._mappable:
                engine.map_image(self.fd, self.capacity * SECTOR_SIZE, not self.read_only)
            self._engines[key] = engine
            self._signalling = any(e.kind != datapath.INLINE for e in self._engines.values())
            self.log.info("%s: block I/O on %s (%s)%s", self.label, engine.kind, engine.reason,
                          ", O_DIRECT" if self.image.direct_fd >= 0 else "")
        return engine

    def _drain(self) -> None:
        """Wait for every request in flight, pushing each as it completes."""
        for engine in self._engines.values():
            while engine.in_flight:
                engine.wait()
                self._complete()

    def _complete(self) -> None:
        """Push the completed requests to their queues and notify the driver."""
        reaped = False
        for engine in self._engines.values():
            if not engine.in_flight:
                continue
            for index, batch, read, written, errors in engine.complete():
                reaped = True
                # Counted before the driver can see the requests used (a reader of the counters after
                # its completion sees them).
                if self.counting:
                    stats = self.stats
                    stats["read_bytes"] += read
                    stats["write_bytes"] += written
                    self.queue_stats[index]["bytes"] += read + written
                    if errors:
                        stats["errors"] += errors
                        self.queue_stats[index]["errors"] += errors
                if errors:
                    self._log_errors(errors)
                try:
                    self._popped_from[index].push_batch(batch)
                except IovirtError as exc:
                    self.fail(exc)
                    continue
                self.signal(index)
        in_flight = any(engine.in_flight for engine in self._engines.values())
        if reaped and self._signalling and not in_flight:
            # Nothing left in flight: a completion signal still pending is for requests pushed
            # already (one done inside the submit); without it no wake-up kicks the rings again.
            # (Not for the inline engine alone: nothing signals, and the read was a syscall per kick.)
            _drain_eventfd(self._wake_fd)
        if in_flight and self._signalling and not self._poking and self.call_later is not None:
            self._poking = True
            self.call_later(POKE_S, self._poke)

    def _poke(self) -> None:
        """Requests still in flight after ``POKE_S``: let the engines look for completions held back, then take them.

        An io_uring completion can reach the ring only when the submitting
        thread enters it (task work), with the wake-up eventfd silent until
        then: ``pytest -n 2 tests/backend`` lost a write that way about
        every second run, until the thread exited.  The timer runs on the
        data-plane thread, the one that submits.
        """
        self._poking = False
        if self.needs_reset:
            return
        for engine in self._engines.values():
            if engine.in_flight:
                engine.poll()
        self._complete()

    def _log_errors(self, errors: int) -> None:
        self.log.warning(
            "%s: %d requests failed with IOERR (beyond capacity %d sectors, not whole sectors, "
            "a write to a read-only image, a data buffer no longer in guest memory, or the image I/O failed)",
            self.label, errors, self.capacity,
        )

    # -- requests (5.2.6) ------------------------------------------------------------
    def process_queue(self, index: int, queue: SplitQueue) -> None:
        """Submit every available request of ``queue`` (none while it is disabled), then push what completed.

        Completions are pushed after the pops: a driver that sees them used
        and publishes more without a kick finds them served only on a kick
        (or a later completion's wake-up), as with a synchronous device.
        """
        if not self.enabled[index]:
            # vhost-user "Ring states": a started, disabled ring has no side effects.
            self._complete()
            return
        key = datapath.engine_key(queue)
        engine = self._engine(key)
        self._popped_from[index] = queue
        # A wrapper (a transport's bookkeeping) pops into the same flat batches as the queue beneath it.
        reuse = self._batch if key == "cython" else None
        while True:
            buckets = self._buckets
            count = BATCH if buckets is None else self._admit(buckets)
            if count and not engine.free:
                self._complete()  # slots back for the requests waiting in the ring
            count = min(count, engine.free)
            if not count:
                break  # at a limit, or every slot in flight: the requests wait in the ring
            batch = queue.pop_batch(count, reuse)
            if not len(batch):
                break
            left, nbytes, reads, writes, flushes = datapath.submit(engine, batch, index, queue, self.image)
            if self.counting:
                stats = self.stats
                stats["read"] += reads
                stats["write"] += writes
                stats["flush"] += flushes
                self.queue_stats[index]["requests"] += len(batch)
            if left:
                nbytes += self._serve_left(index, queue, batch, left, key == "cython")
            if buckets is not None:
                self._charge(buckets, len(batch), nbytes)
        self._complete()
        if not self.complete_async:
            self._drain()

    def _serve_left(self, index: int, queue: SplitQueue, batch: Any, left: list[int], io: bool) -> int:
        """Serve at once, and push, the chains ``left`` of ``batch``; returns the data bytes moved.

        With ``io`` (the C twin's leftovers) IN/OUT/FLUSH among them run
        synchronously here, once every request in flight completed, so a
        FLUSH stays ordered after the writes before it.
        """
        served = list(left)
        nbytes = 0
        if io:
            self._drain()
            left, read, written, flushes, errors, reads, writes = datapath.serve_batch(
                batch, queue, self.fd, self.capacity, self.read_only, left
            )
            nbytes = read + written
            if self.counting:
                stats = self.stats
                stats["read_bytes"] += read
                stats["write_bytes"] += written
                stats["read"] += reads
                stats["write"] += writes
                stats["flush"] += flushes
                stats["errors"] += errors
                self.queue_stats[index]["bytes"] += nbytes
            if errors:
                self._log_errors(errors)
        memory = queue.memory
        for i in left:
            batch.set_used_len(i, self._serve(memory, batch[i]))
        # Chains with their used lengths, in a batch either queue twin (and any wrapper) pushes.
        queue.push_batch(Chains([batch[i] for i in served]))
        self.signal(index)
        return nbytes

    def _serve(self, memory: GuestMemory, chain: DescChain) -> int:
        """Execute one request the data path left (GET_ID, DISCARD, WRITE_ZEROES, unknown); returns the used length.

        As QEMU does, the used length covers every device-writable byte (data
        and status) whatever the outcome, so the status byte is within
        ``len`` for a driver that reads ``len`` bytes from the front (2.7.8.2).
        """
        request = parse_request(memory, chain)
        if request is None:
            # No room for a header or a status byte: nothing can be reported.
            self.stats["malformed"] += 1
            self.log.warning("%s: request chain %d has no header or no status byte; dropped", self.label, chain.head)
            return 0
        rtype = request.type
        self.stats[REQUEST_NAMES.get(rtype, "unsupported")] += 1
        try:
            if rtype == VIRTIO_BLK_T_GET_ID:
                ident = self.serial.ljust(VIRTIO_BLK_ID_BYTES, b"\0")
                _scatter(memory, request.din, ident)
            elif rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
                self._discard_or_zero(memory, rtype, request.dout)
            else:
                raise RequestError(VIRTIO_BLK_S_UNSUPP, f"request type {rtype} not supported")
            status = VIRTIO_BLK_S_OK
        except RequestError as exc:
            status = exc.status
            self.stats["errors"] += 1
            self.log.warning("%s: request type %d sector %d: %s", self.label, rtype, request.sector, exc)
        except GuestMemoryError as exc:
            status = VIRTIO_BLK_S_IOERR
            self.stats["errors"] += 1
            self.log.warning("%s: request type %d: %s", self.label, rtype, exc)
        memory.write(request.status_addr, bytes([status]))
        return chain.writable_len

    def _check_range(self, sector: int, nbytes: int) -> int:
        if nbytes % SECTOR_SIZE:
            raise RequestError(VIRTIO_BLK_S_IOERR, f"data length {nbytes} is not a multiple of {SECTOR_SIZE}")
        if sector + nbytes // SECTOR_SIZE > self.capacity:
            raise RequestError(
                VIRTIO_BLK_S_IOERR, f"sectors [{sector}, +{nbytes // SECTOR_SIZE}) beyond capacity {self.capacity}"
            )
        return sector * SECTOR_SIZE

    def _discard_or_zero(self, memory: GuestMemory, rtype: int, bufs: list[tuple[int, int]]) -> None:
        if self.read_only:
            raise RequestError(VIRTIO_BLK_S_IOERR, "discard/write-zeroes on a read-only device")
        data = gather(memory, bufs, sum(n for _, n in bufs))
        if not data or len(data) % DISCARD_SEG.size:
            raise RequestError(VIRTIO_BLK_S_UNSUPP, f"segment list of {len(data)} bytes is not a multiple of 16")
        for off in range(0, len(data), DISCARD_SEG.size):
            sector, num_sectors, flags = DISCARD_SEG.unpack_from(data, off)
            if flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP or (rtype == VIRTIO_BLK_T_DISCARD and flags):
                raise RequestError(VIRTIO_BLK_S_UNSUPP, f"segment flags {flags:#x} not supported")  # 5.2.6.2
            offset = self._check_range(sector, num_sectors * SECTOR_SIZE)
            length = num_sectors * SECTOR_SIZE
            unmap = rtype == VIRTIO_BLK_T_DISCARD or flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE if unmap else FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE
            try:
                _fallocate(self.fd, mode, offset, length)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS) or rtype == VIRTIO_BLK_T_DISCARD:
                    raise RequestError(VIRTIO_BLK_S_IOERR, f"fallocate failed: {exc}") from exc
                os.pwrite(self.fd, bytes(length), offset)  # no ZERO_RANGE here: write the zeroes


POKE_S = 0.01
"""How long requests may stay in flight before the device looks for completions held back (``_poke``)."""


def _drain_eventfd(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass  # no signal pending


class _DrainOnRefresh(QueueWrapper):
    """A blk queue whose ``refresh`` (the memory map changed) first waits for the device's I/O in flight.

    The memory table swaps regions and then unmaps the old ones
    (:mod:`iovirt.vhost_user.memtable`): a request still reading into guest
    memory would write into a mapping gone, or reused.  Everything else is
    the wrapped queue's.
    """

    def __init__(self, inner: SplitQueue, drain: Callable[[], None]) -> None:
        self.inner = inner
        self._drain = drain

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def pop_batch(self, max_chains: int, batch: Any = None) -> Any:
        """The wrapped queue's."""
        return self.inner.pop_batch(max_chains, batch)

    def push_batch(self, batch: Any) -> None:
        """The wrapped queue's."""
        self.inner.push_batch(batch)

    def refresh(self) -> None:
        """Wait for the I/O in flight, then re-resolve the ring."""
        self._drain()
        self.inner.refresh()


def _scatter(memory: GuestMemory, bufs: list[tuple[int, int]], data: bytes) -> None:
    pos = 0
    for addr, n in bufs:
        if pos >= len(data):
            break
        k = min(n, len(data) - pos)
        memory.write(addr, data[pos : pos + k])
        pos += k
