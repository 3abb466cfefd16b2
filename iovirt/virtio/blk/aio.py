"""Block I/O off the data-plane thread: what both data-path twins share.

A virtio-blk device hands its IN, OUT and FLUSH requests to an engine and
completes them later, out of order (the used ring allows it, virtio 1.2
2.7.8): the data plane never waits for the disk, so a slow image does not
stall the other devices it serves.  Three engines exist:

* ``io_uring``, through liburing, in the C twin (``_datapath_c.pyx``): one
  ring per device, submissions batched (one ``io_uring_submit`` per popped
  batch), completions signalled on the device's eventfd, which the ring
  registers (``io_uring_register_eventfd``);
* a thread pool (:class:`ThreadPool`), where io_uring is not compiled in or
  the kernel refuses it (``io_uring_disabled``, a seccomp filter), and in the
  pure-Python twin: workers run ``preadv``/``pwritev``/``fdatasync`` and
  signal the same eventfd;
* ``inline``, in the C twin, for an image in memory (tmpfs, ramfs,
  hugetlbfs): each request is done when it is submitted, since it is a copy
  that never waits for a device; an image without holes is mapped and the
  copy needs no system call (``Engine.map_image``).

With the first two the completions are pushed on the thread that serves the
queues, which reads the eventfd (:attr:`~iovirt.virtio.device.VirtioDevice.wake_fd`).

A FLUSH is a barrier (5.2.6.4 asks that it cover the writes completed
before it; the block layer above may count one as completed the moment it
was submitted): it starts once every request submitted before it completed
(``IOSQE_IO_DRAIN``, or :class:`ThreadPool`'s barrier).

:class:`ImageHook` is a test hook: latency added to every image request,
and requests that fail with EIO.  :class:`Image` is the open image (a
buffered fd and, where the file system takes it, an ``O_DIRECT`` one).
"""

from __future__ import annotations

import collections
import errno
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from iovirt.virtio.blk.defs import SECTOR_SIZE

__all__ = ["ENGINE_ENV", "Image", "ImageHook", "ThreadPool", "WORKERS", "io_uring_refused", "open_image",
           "refuse_io_uring"]

ENGINE_ENV = "IOVIRT_BLK_ENGINE"
"""Environment variable that forces an engine: ``io_uring`` or ``threads`` (default: io_uring where it works)."""

WORKERS = 8
"""Threads of a :class:`ThreadPool`: requests in flight at once on the image (queue depth) without io_uring."""

DIRECT_ALIGN = SECTOR_SIZE
"""Alignment of buffer addresses and lengths for an ``O_DIRECT`` request (a disk's logical block size).

A request not aligned so goes through the buffered fd; one the file system
still refuses (EINVAL, a 4 KiB-sector disk) is submitted again through it.
"""


_refused: str | None = None


def refuse_io_uring(reason: str) -> None:
    """Engines made from now on run on the thread pool, for ``reason``.

    The seccomp sandbox (:mod:`iovirt.sandbox`) says so before it installs
    its filter: io_uring's calls are not among those it allows, since the
    operations a ring runs escape the filter (a ring may open files and
    sockets).
    """
    global _refused
    _refused = reason


def io_uring_refused() -> str | None:
    """Why engines may not use io_uring (:func:`refuse_io_uring`), or ``None``."""
    return _refused


@dataclass
class ImageHook:
    """A test hook on a device's image I/O: latency and failures.

    ``delay`` seconds are added before every read and write reaches the
    image (a timeout linked before it in io_uring; a sleep in a worker of
    the thread pool), so the image behaves as a slow disk; a FLUSH is not
    delayed, so it shows whether it waits for the writes before it.  ``fail(op, offset,
    nbytes)``, with ``op`` one of ``"read"``, ``"write"``, ``"flush"``,
    returning True completes that request with EIO (VIRTIO_BLK_S_IOERR).
    """

    delay: float = 0.0
    fail: Callable[[str, int, int], bool] | None = None


@dataclass
class Image:
    """An open raw image: ``fd`` (buffered), ``direct_fd`` (``O_DIRECT``, or -1), size in sectors."""

    fd: int
    direct_fd: int
    capacity: int
    read_only: bool

    def close(self) -> None:
        """Close both fds."""
        for fd in (self.fd, self.direct_fd):
            if fd >= 0:
                os.close(fd)


def open_image(path: str, read_only: bool, direct: bool) -> Image:
    """Open ``path``; with ``direct``, also with ``O_DIRECT`` unless its file system refuses it (tmpfs)."""
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
    fd = os.open(path, flags)
    direct_fd = -1
    if direct:
        try:
            direct_fd = os.open(path, flags | os.O_DIRECT)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                os.close(fd)
                raise
    return Image(fd, direct_fd, os.fstat(fd).st_size // SECTOR_SIZE, read_only)


class ThreadPool:
    """Worker threads that run jobs and signal an eventfd as each completes.

    ``run(job)`` returns the job's result (bytes moved, or a negative errno;
    an ``OSError`` it raises becomes ``-errno``).  Only one thread submits
    and reaps (the one serving the device's queues); workers only run jobs.
    A job submitted as a barrier starts after every job submitted before
    it completed and was reaped, and the jobs submitted after it wait for
    it: the FLUSH ordering of the module docstring.
    """

    def __init__(self, run: Callable[[Any], int], wake_fd: int, workers: int = WORKERS, delay: float = 0.0) -> None:
        self._run = run
        self._wake_fd = wake_fd
        self._workers = workers
        self._delay = delay
        self._jobs: queue.SimpleQueue[tuple[Any, bool] | None] = queue.SimpleQueue()
        self._done: collections.deque[tuple[Any, bool, int]] = collections.deque()
        self._cond = threading.Condition()
        self._held: collections.deque[tuple[Any, bool]] = collections.deque()  # behind a barrier
        self._started = 0  # handed to the workers, not reaped yet
        self._barrier = False  # a barrier job is started and not reaped
        self._threads: list[threading.Thread] = []

    @property
    def in_flight(self) -> int:
        """Jobs submitted and not reaped."""
        return self._started + len(self._held)

    def submit(self, job: Any, barrier: bool = False) -> None:
        """Run ``job`` on a worker, now or once the barrier ahead of it (or before it, for a barrier) allows."""
        if self._held or self._barrier or (barrier and self._started):
            self._held.append((job, barrier))
        else:
            self._start(job, barrier)

    def _start(self, job: Any, barrier: bool) -> None:
        if not self._threads:
            self._threads = [
                threading.Thread(target=self._work, name=f"iovirt-blk-io-{i}", daemon=True)
                for i in range(self._workers)
            ]
            for t in self._threads:
                t.start()
        self._started += 1
        self._barrier = self._barrier or barrier
        self._jobs.put((job, barrier))

    def reap(self) -> list[tuple[Any, int]]:
        """The jobs completed since the last call, with their results; starts jobs a barrier held."""
        out = []
        with self._cond:
            done = list(self._done)
            self._done.clear()
        for job, barrier, result in done:
            out.append((job, result))
            self._started -= 1
            if barrier:
                self._barrier = False
        while self._held and not self._barrier:
            job, barrier = self._held[0]
            if barrier and self._started:
                break
            self._held.popleft()
            self._start(job, barrier)
        return out

    def wait(self) -> None:
        """Block until a job completed that :meth:`reap` has not returned (call only with jobs in flight)."""
        with self._cond:
            while not self._done:
                self._cond.wait()

    def close(self) -> None:
        """Stop the workers (after the jobs in flight; the caller reaped them)."""
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join()
        self._threads = []

    def _work(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            job, barrier = item
            if self._delay and not barrier:
                time.sleep(self._delay)  # the test hook's slow disk
            try:
                result = self._run(job)
            except OSError as exc:
                result = -(exc.errno or errno.EIO)
            # Signalled under the lock :meth:`reap` takes: a result reaped was signalled already.
            with self._cond:
                self._done.append((job, barrier, result))
                self._cond.notify()
                try:
                    os.eventfd_write(self._wake_fd, 1)
                except OSError:
                    pass  # closed under us: the device is gone, nobody reaps
