"""The data plane: one thread that waits on kick eventfds (and TAP fds) and runs the devices.

The control thread never processes queues; it only changes what the data
plane serves.  ``lock`` is the data-path lock: the data plane holds it while
it runs a device, and the control thread holds it while it starts or stops a
ring or replaces the memory table, so neither sees the other half-done.  One
thread serves every device of the process, so a frame switched from one
port's transmit queue into another port's receive queue never needs two
locks (no lock order, no deadlock).  So the data plane never blocks while
it holds the lock: every fd it reads or writes is non-blocking, including
eventfds a front-end passed, which it may drain itself (issue 12, failure 4).

Timers (:meth:`DataPlane.call_later`) run a handler once, later, on the
data-plane thread: a device that holds requests back (a blk device at its
rate limit) is served again when its tokens are back, without a new kick.

Busy polling (``poll_us``, ``iovirt serve --poll-us``; off by default), as
DPDK's poll-mode drivers do: after a ring's kick the thread keeps looking at
that ring for ``poll_us`` microseconds after its last work, with the
driver's notifications suppressed (virtio 1.2 2.7.10 VIRTQ_USED_F_NO_NOTIFY,
2.8.10 RING_EVENT_FLAGS_DISABLE: the ring's ``disable_notification``), so
a busy driver stops kicking and its chains are served without the eventfd
round trip.  When the time is up notifications are enabled again, and the
ring is looked at once more: a chain made available after the last look and
before the enable would otherwise wait for a kick the driver never sends
(2.7.14's note on the race, from the device's side).

Kick jobs (:mod:`iovirt.vhost_user.kickloop`): with the C twin and
without busy polling, the thread waits for its fds in a C loop, with the
interpreter lock released, that serves the kicks of rings whose device
offered a kick job (net's transmit loop of one flow) entirely in C; the
thread comes back to this loop for everything else.  ``lock`` is then a
:class:`PlaneLock`: another thread taking it also waits until no job runs.
A device that yields a ring with work left asks for it to be served again
(:meth:`DataPlane.requeue`), by its job if one is armed by then.

Workers (``iovirt serve --workers N``, :mod:`iovirt.vhost_user.workers`):
a process may run several data planes, one thread each, every device's
rings owned by one of them.  Work for another worker's device (a frame the
switch sends to a port it serves) is :meth:`DataPlane.post`-ed to that worker:
pushed onto a lock-free single-producer ring (:mod:`iovirt.vhost_user.handoff`)
that only it pops, then run on its thread under its own lock.  A thread that
is not a worker (the control thread) posts through one more ring whose
producers take a lock among themselves; the workers never do.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import select
import threading
import time
from typing import Any, Callable

from iovirt.errors import IovirtError
from iovirt.virtio.kickjob import KickJob
from iovirt.vhost_user import kickloop
from iovirt.vhost_user.handoff import FULL, WAS_EMPTY, HandoffRing
from iovirt.vhost_user.kickloop import Lanes, Ring

log = logging.getLogger("iovirt.dataplane")

Handler = Callable[[], None]

POLL_INTERVAL_S = 0.001  # for rings set up with the "no fd, poll" bit
INBOX_SLOTS = 1024  # batches a worker may have waiting from one other worker; then the sender drops (congestion)
INBOX_BUDGET = 256  # items taken from the inboxes per loop turn, so posted work cannot starve the worker's rings

_current = threading.local()  # .worker: the DataPlane whose thread this is

QueueOf = Callable[[], Any]
"""A ring's running queue (``pending``, ``enable_notification``, ``disable_notification``), or None."""


class _Busy:
    """A ring being busy-polled: its kick handler, its queue, the queue suppressing kicks, its last work."""

    __slots__ = ("handler", "queue_of", "quiet", "last_work")

    def __init__(self, handler: Handler, queue_of: QueueOf, last_work: float) -> None:
        self.handler = handler
        self.queue_of = queue_of
        self.quiet: Any = None
        self.last_work = last_work


class DataPlane:
    """An epoll loop on its own thread; fds map to handlers run under ``lock``.

    ``poll_us``: busy-poll a kicked ring for that many microseconds after its
    last work (0: never; see the module docstring).
    """

    def __init__(self, poll_us: float = 0, index: int = 0, name: str = "iovirt-dataplane") -> None:
        if poll_us < 0:
            raise ValueError(f"poll_us must be 0 or more, got {poll_us}")
        self.poll_s = poll_us / 1e6
        self.index = index
        self.name = name
        # Work posted by other threads: one ring per worker of the pool (see connect), and one for the rest.
        self._inbox: list[Any] = []
        self._foreign = HandoffRing(INBOX_SLOTS)
        self._foreign_lock = threading.Lock()
        self.posts_dropped = 0
        self._epoll = select.epoll()
        # Kick jobs run in C between the loop's Python turns (the C twin, without busy polling).
        self._lanes = Lanes(self._epoll.fileno(), name) if kickloop.accel is not None and not poll_us else None
        self.lock = PlaneLock(self)
        self._handlers: dict[int, tuple[Handler, bool]] = {}
        self._pollers: dict[object, Handler] = {}
        # Kick fds of rings (busy-polled, or given kick jobs), and those being busy-polled now.
        self._rings: dict[int, Ring] = {}
        self._busy: dict[int, _Busy] = {}
        # (deadline, sequence, handler), a heap; the lock because any thread may add one.
        self._timers: list[tuple[float, int, Handler]] = []
        self._timers_lock = threading.Lock()
        self._timer_seq = itertools.count()
        self._requeued: list[int] = []  # rings to serve again on the next turn (requeue)
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wake, select.EPOLLIN)
        self._stop = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the data-plane thread."""
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and close the epoll set."""
        self._stop = True
        os.eventfd_write(self._wake, 1)
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._epoll.close()
        os.close(self._wake)

    def connect(self, workers: int) -> None:
        """Make room for work posted by each of the ``workers`` workers of this one's pool (before :meth:`start`)."""
        self._inbox = [HandoffRing(INBOX_SLOTS) for _ in range(workers)]

    def is_current(self) -> bool:
        """Whether the caller runs on this data plane's thread."""
        return getattr(_current, "worker", None) is self

    def post(self, handler: Callable[..., object], *args: Any) -> bool:
        """Run ``handler(*args)`` soon on this data plane's thread, under its lock; False: no room (dropped).

        From a worker of the pool, the work goes onto that worker's own ring
        to this one, without a lock; from any other thread, onto the shared
        one.  The thread is woken only when the ring was empty: a non-empty
        ring is being drained and the new work is seen in the same drain.
        """
        if self._stop:
            return False
        me = getattr(_current, "worker", None)
        item = (handler, args)
        if me is not None and me.index < len(self._inbox) and me is not self:
            pushed = self._inbox[me.index].push(item)
        else:
            with self._foreign_lock:
                pushed = self._foreign.push(item)
        if pushed == FULL:
            self.posts_dropped += 1
            return False
        if pushed == WAS_EMPTY:
            os.eventfd_write(self._wake, 1)
        return True

    def _run_posted(self) -> None:
        """Run what other threads posted, at most INBOX_BUDGET items; more left: wake again at once."""
        budget = INBOX_BUDGET
        for ring in (*self._inbox, self._foreign):
            while budget:
                item = ring.pop()
                if item is None:
                    break
                budget -= 1
                handler, args = item
                try:
                    handler(*args)
                except Exception:  # one device's bug must not stop the worker
                    log.exception("%s: posted work %r failed", self.name, handler)
        if not budget:
            os.eventfd_write(self._wake, 1)

    def add_eventfd(self, fd: int, handler: Handler) -> None:
        """Run ``handler`` whenever eventfd ``fd`` is signalled (its counter is drained first).

        ``fd`` is made non-blocking: whoever else holds it may drain it
        between the epoll and the read.
        """
        os.set_blocking(fd, False)
        self._add(fd, handler, True)

    def add_ring(self, fd: int, handler: Handler, queue_of: QueueOf, serve: Handler | None = None,
                 kicked: Callable[[int], None] | None = None,
                 job_of: Callable[[], KickJob | None] | None = None) -> None:
        """:meth:`add_eventfd` for a ring's kick eventfd: with ``poll_us``, the ring is busy-polled after a kick.

        ``queue_of()`` is the ring's running queue (None when stopped);
        ``serve`` what polling runs when chains are there (default ``handler``;
        a handler that counts kicks gives the uncounted one); ``kicked(n)``
        counts kicks served without ``handler`` and ``job_of()`` offers a
        kick job for the ring (:mod:`iovirt.vhost_user.kickloop`).
        """
        self.add_eventfd(fd, handler)
        self._rings[fd] = Ring(serve or handler, queue_of, kicked, job_of)

    def watch(self, fd: int, handler: Handler, queue: object, job_of: Callable[[], KickJob | None] | None) -> None:
        """Serve eventfd ``fd``, a bell another worker rings (``iovirt/virtio/net/crossing.py``), on this worker.

        ``handler`` runs when it rings, unless ``job_of()`` offered a kick
        job that the C loop runs for it; a kick job whose other queue is
        ``queue`` runs when it rings too.  From another thread that does not
        hold this worker's lock, the watch is handed to this worker (as a
        timer due now: unlike :meth:`post`, that never runs out of room).
        """
        if not self.is_current() and not self.lock.is_owned():
            self.call_later(0.0, lambda: self.watch(fd, handler, queue, job_of))
            return
        if self._lanes is None:  # busy polling (no lanes) polls the queues of its rings: this is no queue
            self.add_eventfd(fd, handler)
        else:
            self.add_ring(fd, handler, lambda: queue, job_of=job_of)

    def add_fd(self, fd: int, handler: Handler) -> None:
        """Run ``handler`` whenever ``fd`` is readable (the handler reads it)."""
        self._add(fd, handler, False)

    def _add(self, fd: int, handler: Handler, is_eventfd: bool) -> None:
        if fd in self._handlers:
            self._epoll.modify(fd, select.EPOLLIN)
        else:
            self._epoll.register(fd, select.EPOLLIN)
        self._handlers[fd] = (handler, is_eventfd)

    def remove(self, fd: int) -> None:
        """Stop watching ``fd`` (the caller closes it)."""
        self._rings.pop(fd, None)
        self._busy.pop(fd, None)  # its queue stops with it: notifications start enabled on the next
        if self._handlers.pop(fd, None) is not None:
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass

    def requeue(self, fd: int) -> None:
        """Serve ring ``fd`` (added with :meth:`add_ring`) again on this worker's next turn, without a kick.

        On the worker's thread only (a device yielding its ring): its kick
        job, if one is armed by then, takes it in C; else its handler runs.
        """
        if fd not in self._requeued:
            self._requeued.append(fd)

    def add_poller(self, key: object, handler: Handler) -> None:
        """Run ``handler`` every poll interval (rings without a kick fd)."""
        self._pollers[key] = handler
        os.eventfd_write(self._wake, 1)

    def remove_poller(self, key: object) -> None:
        """Stop polling ``key``."""
        self._pollers.pop(key, None)

    def call_later(self, delay: float, handler: Handler) -> None:
        """Run ``handler`` once, under ``lock`` on the data-plane thread, ``delay`` seconds from now.

        Any thread may call this.  There is no cancelling: a handler whose
        work went away (its device stopped) finds nothing to do.
        """
        with self._timers_lock:
            heapq.heappush(self._timers, (time.monotonic() + delay, next(self._timer_seq), handler))
        os.eventfd_write(self._wake, 1)  # the loop recomputes how long it may sleep

    def _timeout(self) -> float:
        """How long the loop may wait for an fd: -1 (forever) without pollers and timers."""
        timeout = POLL_INTERVAL_S if self._pollers else -1.0
        with self._timers_lock:
            if self._timers:
                until = max(0.0, self._timers[0][0] - time.monotonic())
                timeout = until if timeout < 0 else min(timeout, until)
        return timeout

    def _due_timers(self) -> list[Handler]:
        now = time.monotonic()
        due = []
        with self._timers_lock:
            while self._timers and self._timers[0][0] <= now:
                due.append(heapq.heappop(self._timers)[2])
        return due

    def _run(self) -> None:
        _current.worker = self
        lanes = self._lanes
        requeued: list[int] = []  # rings requeued last turn that no kick job took: served now
        while not self._stop:
            timeout = 0.0 if self._busy or requeued else self._timeout()
            resume: list[int] = requeued
            if lanes is not None and not self._pollers:
                fds, resumed = lanes.run(timeout)
                resume += resumed
                events = [(fd, select.EPOLLIN) for fd in fds]
            else:
                try:
                    events = self._epoll.poll(timeout)
                except InterruptedError:
                    continue
            with self.lock:
                if lanes is not None:
                    armed = lanes.armed  # (before settle drops them)
                    resume += lanes.settle(self._rings) + lanes.take_resume()
                for fd in resume:  # a ring whose kick the C loop took, with work left
                    ring = self._rings.get(fd)
                    if ring is not None:
                        self._call(ring.serve)
                for fd, _mask in events:
                    if fd == self._wake:
                        _drain(fd)
                        continue
                    entry = self._handlers.get(fd)
                    if entry is None:
                        continue
                    handler, is_eventfd = entry
                    if is_eventfd:
                        _drain(fd)
                    self._call(handler)
                    if self.poll_s and fd in self._rings:
                        busy = self._busy.get(fd)
                        if busy is None:
                            ring = self._rings[fd]
                            self._busy[fd] = _Busy(ring.serve, ring.queue_of, time.monotonic())
                        else:
                            busy.last_work = time.monotonic()
                self._run_posted()
                for handler in list(self._pollers.values()):
                    self._call(handler)
                for handler in self._due_timers():
                    self._call(handler)
                if self._busy:
                    self._poll_busy()
                if lanes is not None:
                    lanes.arm([*armed, *resume, *(fd for fd, _mask in events)], self._rings)
                requeued, self._requeued = self._requeued, []
                if lanes is not None:
                    requeued = lanes.again(requeued)

    def _poll_busy(self) -> None:
        """One look at every busy-polled ring; a ring idle for ``poll_s`` goes back to kicks."""
        for fd, busy in list(self._busy.items()):
            queue = busy.queue_of()
            if queue is None:
                del self._busy[fd]
                continue
            try:
                if queue is not busy.quiet:  # first look, or the ring restarted with a new queue
                    queue.disable_notification()
                    busy.quiet = queue
                # The clock is read after each look, not once per pass: a thread held up between the two
                # (a loaded machine) would otherwise date the work too early and end the polling too soon.
                if self._serve(queue, busy.handler):
                    busy.last_work = time.monotonic()
                    continue
                if time.monotonic() - busy.last_work < self.poll_s:
                    continue
                # Kicks back on, then one more look (the lost-wakeup race): what arrived in between is
                # served now, and polling goes on.
                if queue.enable_notification() and self._serve(queue, busy.handler):
                    queue.disable_notification()
                    busy.last_work = time.monotonic()
                    continue
            except IovirtError:
                # A broken or released ring: the device's own kick path reports it, once.
                self._call(busy.handler)
            del self._busy[fd]

    def _serve(self, queue: Any, handler: Handler) -> bool:
        """Run a ring's kick handler if chains are available; whether the device took any.

        A device that leaves them (its ring disabled, a rate limit, a reset
        pending) is not kept busy: it is served again on its own terms.
        """
        if not queue.pending():
            return False
        before = queue.last_avail_idx
        self._call(handler)
        return bool(queue.last_avail_idx != before)

    def _call(self, handler: Handler) -> None:
        try:
            handler()
        except Exception:  # a device bug must not stop every other device
            log.exception("data-plane handler failed")


class PlaneLock:
    """A data plane's lock: an ``RLock`` that, taken by another thread, also holds the worker's C loop.

    The worker's thread takes it around its Python turns.  Any other thread
    (the control thread applying a vhost-user request) also waits until no
    kick job runs, and drops them all (:meth:`Lanes.hold`), so it changes
    rings and memory with nothing running on them; on release the worker is
    woken if a job it dropped had work left.
    """

    def __init__(self, plane: DataPlane) -> None:
        self._plane = plane
        self._rlock = threading.RLock()
        self._depth = 0  # how deep the owning thread holds it
        self._held = False  # whether the owner holds the C loop too

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """Take the lock (``threading.RLock.acquire``'s arguments); True if taken."""
        if not self._rlock.acquire(blocking, timeout):
            return False
        self._depth += 1
        plane = self._plane
        if self._depth == 1 and plane._lanes is not None and not plane.is_current():
            self._held = True
            if plane._lanes.hold(plane._rings):
                os.eventfd_write(plane._wake, 1)
        return True

    def release(self) -> None:
        """Give the lock back (and the C loop, by the outermost release)."""
        self._depth -= 1
        if self._depth == 0 and self._held:
            self._held = False
            assert self._plane._lanes is not None
            self._plane._lanes.release()
        self._rlock.release()

    def is_owned(self) -> bool:
        """Whether the calling thread holds the lock."""
        return bool(self._rlock._is_owned())  # type: ignore[attr-defined]  # RLock's own check

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _drain(fd: int) -> None:
    """Reset eventfd ``fd``'s counter; nothing to read (EAGAIN: someone else drained it) is fine."""
    try:
        os.eventfd_read(fd)
    except (BlockingIOError, OSError):
        pass
