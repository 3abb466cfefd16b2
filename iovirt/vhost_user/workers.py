"""Data-plane workers: ``iovirt serve --workers N``, N data-plane threads sharing the process's devices.

Each device socket (:class:`~iovirt.vhost_user.server.Endpoint`) is given to
one worker when it is added, round robin, and keeps it across front-end
reconnections: that worker's thread waits on the device's kick eventfds and
serves all its queues, and its timers run there.  A device's queues stay on
one worker because they share the device's state (a net port's receive
backlog and counters, a blk device's engine), which so needs no lock.

What crosses workers goes through lock-free rings, never a shared lock: a
frame the switch sends from a port on one worker to a port on another goes
through that port's crossing from the sending worker
(``iovirt/virtio/net/crossing.py``: a channel both workers may serve in C),
other work through a hand-off ring to the receiving worker
(:meth:`DataPlane.post`, :mod:`iovirt.vhost_user.handoff`).  A device that misbehaves is failed and reset by its
own worker; the other workers never wait for it.

:attr:`WorkerPool.lock` takes every worker's lock, in index order: the
control plane holds it for what touches several devices at once (the
switch's ports, every device's counters).  A worker never takes another
worker's lock, so the order cannot invert.  Process-wide fds (a TAP uplink,
the control socket's FIFOs) are served by the first worker, :attr:`WorkerPool.home`.
"""

from __future__ import annotations

import itertools
import os
from types import TracebackType
from typing import Any

from iovirt.vhost_user import kickloop
from iovirt.vhost_user.dataplane import DataPlane, Handler

MAX_WORKERS = 64  # threads; beyond the cores there is nothing to gain, and every worker is a thread and an epoll set
DEFAULT_WORKERS = max(1, min(len(os.sched_getaffinity(0)), MAX_WORKERS)) if kickloop.accel is not None else 1
"""``--workers``'s default: one per core this process may run on.  Each worker waits for its devices' kicks in a
C loop without the interpreter lock (``iovirt/vhost_user/kickloop.py``), and a flow between ports of two workers
runs in C on both (``iovirt/virtio/net/crossing.py``), so devices given round robin lose nothing when two that
talk sit on two workers: two such crossing flows measured 1.26 times their rate on one worker, two flows each
within one worker 1.23 times (``benchmarks/workers.py``).  An idle worker costs no CPU.  Without the C twin
(``IOVIRT_NO_EXTENSIONS``) one: there every worker runs Python, and two took 0.64-0.76 of one's rate."""


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
