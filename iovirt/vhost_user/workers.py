"""Data-plane workers: ``iovirt serve --workers N``, N data-plane threads sharing the process's devices.

Each device socket (:class:`~iovirt.vhost_user.server.Endpoint`) is given to
one worker when it is added, round robin, and keeps it across front-end
reconnections: that worker's thread waits on the device's kick eventfds and
serves all its queues, and its timers run there.  A device's queues stay on
one worker because they share the device's state (a net port's receive
backlog and counters, a blk device's engine), which so needs no lock.

What crosses workers is posted (:meth:`DataPlane.post`): a frame the switch
sends from a port on one worker to a port on another goes through a lock-free
hand-off ring to the receiving worker (:mod:`iovirt.vhost_user.handoff`), never
through a shared lock.  A device that misbehaves is failed and reset by its
own worker; the other workers never wait for it.

:attr:`WorkerPool.lock` takes every worker's lock, in index order: the
control plane holds it for what touches several devices at once (the
switch's ports, every device's counters).  A worker never takes another
worker's lock, so the order cannot invert.  Process-wide fds (a TAP uplink,
the control socket's FIFOs) are served by the first worker, :attr:`WorkerPool.home`.
"""

from __future__ import annotations

import itertools
from types import TracebackType
from typing import Any

from iovirt.vhost_user.dataplane import DataPlane, Handler

MAX_WORKERS = 64  # threads; beyond the cores there is nothing to gain, and every worker is a thread and an epoll set
DEFAULT_WORKERS = 1
"""``--workers``'s default.  Not one per core: devices are given to workers round robin, so two guests that talk
to each other would most often sit on two workers, and a frame crossing from one worker to another takes the
Python path on both (two crossing flows: 0.25 of one worker's rate, ``benchmarks/workers.py``).  A flow between
two ports of one worker runs in the worker's C kick loop without the interpreter lock
(``iovirt/vhost_user/kickloop.py``): two such flows on two workers measured 1.19 times one worker."""


class AllLocks:
    """Every worker's lock, taken in index order and released in reverse (a context manager)."""

    def __init__(self, workers: list[DataPlane]) -> None:
        self._locks = [w.lock for w in workers]

    def __enter__(self) -> None:
        for lock in self._locks:
            lock.acquire()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for lock in reversed(self._locks):
            lock.release()


class WorkerPool:
    """``workers`` data planes, or the ones given; :meth:`assign` hands them out round robin."""

    def __init__(self, workers: int = 1, poll_us: float = 0, planes: list[DataPlane] | None = None) -> None:
        if planes is None:
            if workers < 1:
                raise ValueError(f"a pool needs at least one worker, got {workers}")
            planes = [
                DataPlane(poll_us, i, "iovirt-dataplane" if workers == 1 else f"iovirt-worker-{i}")
                for i in range(workers)
            ]
        self.workers = planes
        for plane in planes:
            plane.connect(len(planes))
        self.home = planes[0]
        # One worker: its own lock (with acquire's timeout); more: all of them.
        self.lock: Any = planes[0].lock if len(planes) == 1 else AllLocks(planes)
        self._turn = itertools.cycle(planes)

    def __len__(self) -> int:
        return len(self.workers)

    def assign(self) -> DataPlane:
        """The worker for the next device (round robin)."""
        return next(self._turn)

    def start(self) -> None:
        """Start every worker's thread."""
        for plane in self.workers:
            plane.start()

    def stop(self) -> None:
        """Stop every worker's thread."""
        for plane in self.workers:
            plane.stop()

    # -- process-wide work: on the home worker --------------------------------------------
    def add_fd(self, fd: int, handler: Handler) -> None:
        """Serve ``fd`` (a TAP, a FIFO) on the home worker."""
        self.home.add_fd(fd, handler)

    def add_eventfd(self, fd: int, handler: Handler) -> None:
        """Serve eventfd ``fd`` on the home worker."""
        self.home.add_eventfd(fd, handler)

    def remove(self, fd: int) -> None:
        """Stop serving ``fd`` (added with :meth:`add_fd` or :meth:`add_eventfd`)."""
        self.home.remove(fd)
