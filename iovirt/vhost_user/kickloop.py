"""Kick jobs on a worker: kicks served in C, without the interpreter, while nothing else happens.

A worker (:class:`~iovirt.vhost_user.dataplane.DataPlane`) with the C twin
waits for its fds in :meth:`Lanes.run` (``_kickloop_c.KickLoop``), with the
GIL released.  A kick of a ring that has a kick job armed
(``iovirt/virtio/kickjob.py``: net's transmit loop of one flow) runs the
job there, and writes the call eventfds it asks for; so does a kick of the
job's other ring (the receiver's, posting buffers: a job that waited for
them goes on; one that waits more than a millisecond goes to Python,
which holds or drops frames as it does for a receiver out of buffers).  So
two workers whose traffic stays on their own ports run side by side,
without taking the interpreter lock from each other.

A job holds only while nothing changed since it was armed.  Every time the
worker runs Python (any other fd, a timer, posted work, a job that stopped
at something only the device's own path does) it first settles every job
(:meth:`Lanes.settle`: counters into the devices, then the device finishes
where the job stopped) and drops them all; when it is done, it asks the
rings it served, and those armed before, for a job again
(:meth:`Lanes.arm`).  A thread that changes what the worker serves takes
the worker's lock, which holds the C loop (:meth:`Lanes.hold`): it waits
until no job runs, drops them all and settles them, so the device's
counters are whole when the control thread reads them.

Without the C twin (``IOVIRT_NO_EXTENSIONS``), or with busy polling, the
worker's Python loop serves every kick, as it always did.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Iterable

from iovirt import _accel
from iovirt.virtio.kickjob import NOTIFY_KICKED, NOTIFY_OTHER, KickJob

__all__ = ["MAX_STINT_S", "Lanes", "Ring", "accel"]

log = logging.getLogger("iovirt.dataplane")

accel: Any = _accel.load("iovirt.vhost_user._kickloop_c")

MAX_STINT_S = 0.1
"""The longest the C loop runs before the worker's Python loop looks around and arms its jobs again.  A job holds
a route of the switch; a change the worker makes itself, or the control thread makes under its lock, drops the
jobs at once, but another worker learning a MAC address elsewhere does not: such a move is seen within this
time.  Arming a job also refreshes the sender's entry in the switch, which ages entries out after minutes."""


class Ring:
    """A ring a worker serves: its kick handlers, its queue, and what counts kicks and offers kick jobs.

    ``serve`` runs it without counting a kick; ``queue_of()`` is its
    running queue (or None); ``kicked(n)`` counts ``n`` kicks the C loop
    took; ``job_of()`` offers a :class:`~iovirt.virtio.kickjob.KickJob`, or None.
    """

    __slots__ = ("serve", "queue_of", "kicked", "job_of")

    def __init__(self, serve: Callable[[], None], queue_of: Callable[[], Any],
                 kicked: Callable[[int], None] | None, job_of: Callable[[], KickJob | None] | None) -> None:
        self.serve = serve
        self.queue_of = queue_of
        self.kicked = kicked
        self.job_of = job_of


class Lanes:
    """The kick jobs armed on one worker's epoll set ``epfd``; see the module docstring."""

    def __init__(self, epfd: int, label: str) -> None:
        self.loop = accel.KickLoop(epfd)
        self.label = label
        self._jobs: dict[int, tuple[KickJob, int | None]] = {}  # kicked ring fd -> (its job, the other ring's fd)
        self._rings_armed: set[int] = set()  # both ring fds of every job
        self._resume: list[int] = []  # see hold
        self._ran = False  # whether a job ran in the last run

    def run(self, timeout: float) -> tuple[list[int], list[int]]:
        """Wait and serve armed kicks in C, at most ``timeout`` seconds (-1: no end), and :data:`MAX_STINT_S` with jobs armed.

        ``(fds, resume)``: ready fds for the caller's loop, and rings it
        must serve without a kick (see ``KickLoop.run``).  A worker with no
        job armed sleeps as long as its own loop would: an idle worker
        costs nothing.
        """
        if self._jobs:
            timeout = MAX_STINT_S if timeout < 0 else min(timeout, MAX_STINT_S)
        fds: list[int]
        resume: list[int]
        runs = self.loop.runs
        fds, resume = self.loop.run(-1 if timeout < 0 else math.ceil(timeout * 1000))
        self._ran = self.loop.runs != runs
        return fds, resume

    @property
    def armed(self) -> list[int]:
        """The kicked ring fds with a job armed that ran in the last :meth:`run` (to arm again after a turn).

        A job that did not run is not armed again: its ring's next kick
        arms it, and meanwhile an idle worker sleeps without a time limit.
        """
        return list(self._jobs) if self._ran else []

    def settle(self, rings: dict[int, Ring]) -> list[int]:
        """Drop every job and settle it (counters, then where it stopped); returns rings left with work to do.

        Runs on the worker, or on a thread that holds the loop (:meth:`hold`).
        """
        self.loop.invalidate()
        again: list[int] = self.loop.take_again()
        jobs, self._jobs = self._jobs, {}
        self._rings_armed = set()
        for fd, (offer, other) in jobs.items():
            for ring_fd in (fd, other):
                if ring_fd is None:
                    continue
                kicks, calls_kicked, calls_other, failed = self.loop.take_counts(ring_fd)
                ring = rings.get(ring_fd)
                if kicks and ring is not None and ring.kicked is not None:
                    ring.kicked(kicks)
                for notifier, calls, bit in ((offer.notifiers[0], calls_kicked, NOTIFY_KICKED),
                                             (offer.notifiers[1], calls_other, NOTIFY_OTHER)):
                    if calls:
                        notifier.count(calls)
                    if failed & bit:
                        notifier()  # the eventfd was full: the transport's own way counts and logs it
            try:
                offer.settle()
            except Exception:  # a device's bug must not stop the worker
                log.exception("%s: settling the kick job of fd %d failed", self.label, fd)
        return again

    def arm(self, fds: Iterable[int], rings: dict[int, Ring]) -> None:
        """Ask rings ``fds`` for a kick job, and arm those offered, on both their rings.

        A job whose other ring is another job's already is not armed: a
        ring runs one job (several senders to one receiver: the first only).
        """
        by_queue: dict[int, int] | None = None
        for fd in fds:
            ring = rings.get(fd)
            if ring is None or ring.job_of is None or fd in self._rings_armed:
                continue
            offer = ring.job_of()
            if offer is None:
                continue
            call_kicked = getattr(offer.notifiers[0], "eventfd", None)
            call_other = getattr(offer.notifiers[1], "eventfd", None)
            if call_kicked is None or call_other is None:
                continue  # a notifier without an eventfd (a transport in process): only Python can notify
            if by_queue is None:
                by_queue = {id(r.queue_of()): f for f, r in rings.items()}
            other = by_queue.get(id(offer.other_queue))
            if other is not None and other in self._rings_armed:
                continue
            run, context = offer.job.entry()
            for ring_fd in (fd, other):
                if ring_fd is not None:
                    self.loop.arm_job(ring_fd, run, context, call_kicked, call_other, fd)
                    self._rings_armed.add(ring_fd)
            self._jobs[fd] = (offer, other)

    def again(self, fds: list[int]) -> list[int]:
        """Rings ``fds`` have work left (requeued): those with a job armed run it again in C; returns the others."""
        return [fd for fd in fds if not self.loop.again_now(fd)]

    def hold(self, rings: dict[int, Ring]) -> bool:
        """Wait until no job runs and keep it so (:meth:`release`); the jobs are settled, and dropped.

        True if rings were left with work to do: the worker must be woken
        to serve them (:meth:`take_resume`), since no kick will come for it.
        """
        self.loop.hold()
        self._resume.extend(self.settle(rings))
        return bool(self._resume)

    def take_resume(self) -> list[int]:
        """Rings a :meth:`hold` left with work to do (no kick will come): for the worker to serve."""
        resume, self._resume = self._resume, []
        return resume

    def release(self) -> None:
        """The loop may run jobs again (those the worker arms next)."""
        self.loop.release()
