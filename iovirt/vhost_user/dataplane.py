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
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import select
import threading
import time
from typing import Callable

log = logging.getLogger("iovirt.dataplane")

Handler = Callable[[], None]

POLL_INTERVAL_S = 0.001  # for rings set up with the "no fd, poll" bit


class DataPlane:
    """An epoll loop on its own thread; fds map to handlers run under ``lock``."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._epoll = select.epoll()
        self._handlers: dict[int, tuple[Handler, bool]] = {}
        self._pollers: dict[object, Handler] = {}
        # (deadline, sequence, handler), a heap; the lock because any thread may add one.
        self._timers: list[tuple[float, int, Handler]] = []
        self._timers_lock = threading.Lock()
        self._timer_seq = itertools.count()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wake, select.EPOLLIN)
        self._stop = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the data-plane thread."""
        self._thread = threading.Thread(target=self._run, name="iovirt-dataplane", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and close the epoll set."""
        self._stop = True
        os.eventfd_write(self._wake, 1)
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._epoll.close()
        os.close(self._wake)

    def add_eventfd(self, fd: int, handler: Handler) -> None:
        """Run ``handler`` whenever eventfd ``fd`` is signalled (its counter is drained first).

        ``fd`` is made non-blocking: whoever else holds it may drain it
        between the epoll and the read.
        """
        os.set_blocking(fd, False)
        self._add(fd, handler, True)

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
        if self._handlers.pop(fd, None) is not None:
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass

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
        while not self._stop:
            timeout = self._timeout()
            try:
                events = self._epoll.poll(timeout)
            except InterruptedError:
                continue
            with self.lock:
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
                for handler in list(self._pollers.values()):
                    self._call(handler)
                for handler in self._due_timers():
                    self._call(handler)

    def _call(self, handler: Handler) -> None:
        try:
            handler()
        except Exception:  # a device bug must not stop every other device
            log.exception("data-plane handler failed")


def _drain(fd: int) -> None:
    """Reset eventfd ``fd``'s counter; nothing to read (EAGAIN: someone else drained it) is fine."""
    try:
        os.eventfd_read(fd)
    except (BlockingIOError, OSError):
        pass
