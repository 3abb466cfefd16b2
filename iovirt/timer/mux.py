"""Every VM's timer deadlines in one ordered structure, served by one host timer.

Design: a binary min-heap of *distinct*
absolute deadlines plus a dict mapping each deadline to the timers due then.
Timers that share a deadline (periodic timers started together) form one
bucket, so an expiry batch costs one heap pop however many timers it holds.
Cancel is lazy: the timer forgets its deadline and the stale bucket entry is
skipped when popped; the heap is rebuilt when stale entries outnumber live
ones, so every operation stays O(log n) amortised.  One host timer is armed at
the heap's minimum and re-armed whenever that minimum changes (after an
add, a cancel of the earliest timer, or an expiry batch) -- the rule of Linux
``timerqueue_add`` returning "new leftmost".

Deadlines beyond a horizon (one second past the last dispatch) wait in a
second, *far* heap that the expiry path never touches, and move to the near
heap once, when the horizon reaches them (as Linux's timer wheel keeps
distant timers in coarse levels).  So timers armed far ahead -- a guest's
idle TSC-deadline an hour away -- cost the busy timers' expirations nothing,
however many there are.
"""

from __future__ import annotations

import heapq
from typing import Callable

from iovirt.timer.clock import Clock
from iovirt.timer.hosttimer import HostTimer

# Rebuild once stale entries exceed live ones by this factor (plus a floor).
_COMPACT_FACTOR = 2
_COMPACT_FLOOR = 64
# Deadlines further than this past the last dispatch wait in the far heap.
HORIZON_NS = 1_000_000_000


class MuxTimer:
    """A timer the multiplexer can hold; subclasses implement :meth:`expire`."""

    __slots__ = ("_mux_deadline",)

    def __init__(self) -> None:
        self._mux_deadline: int | None = None

    @property
    def deadline_ns(self) -> int | None:
        """The absolute deadline this timer is armed at, or None."""
        return self._mux_deadline

    def expire(self, due_ns: int, now_ns: int) -> None:
        """Called once when the deadline ``due_ns`` has passed (at ``now_ns``)."""
        raise NotImplementedError


class CallbackTimer(MuxTimer):
    """A MuxTimer that calls ``callback(due_ns, now_ns)`` on expiry."""

    __slots__ = ("callback",)

    def __init__(self, callback: Callable[[int, int], None]) -> None:
        super().__init__()
        self.callback = callback

    def expire(self, due_ns: int, now_ns: int) -> None:
        self.callback(due_ns, now_ns)


class TimerMultiplexer:
    """All pending deadlines of all VMs, one host timer armed at the earliest.

    Drive it from an event loop: register :meth:`fileno` for reading and call
    :meth:`on_host_timer` when it is readable, or use :meth:`timeout_ns` as the
    poll timeout and call :meth:`dispatch` after the poll returns.
    """

    def __init__(self, clock: Clock, host_timer: HostTimer, slack_ns: int = 0) -> None:
        self.clock = clock
        # Like Linux hrtimer slack: the host timer may fire up to slack_ns after
        # the earliest deadline (never before), so nearby deadlines share one wakeup.
        self.slack_ns = slack_ns
        self.now_ns = clock.now_ns
        self.host_timer = host_timer
        self._heap: list[int] = []  # near deadlines: before the horizon
        self._far: list[int] = []  # deadlines at or after the horizon
        self._horizon = clock.now_ns() + HORIZON_NS
        self._buckets: dict[int, list[MuxTimer]] = {}  # near deadline -> timers
        self._far_buckets: dict[int, list[MuxTimer]] = {}  # far deadline -> timers
        self._live = 0  # armed timers
        self._entries = 0  # bucket entries, live and stale
        self._armed_at: int | None = None  # deadline the host timer is set to
        self._dispatching = False
        self.expirations = 0
        self.dispatches = 0

    # --- arming ----------------------------------------------------------------------
    def arm(self, timer: MuxTimer, deadline_ns: int) -> None:
        """Arm (or move) ``timer`` to fire at absolute time ``deadline_ns``."""
        old = timer._mux_deadline
        if old == deadline_ns:
            return
        if old is None:
            self._live += 1
        timer._mux_deadline = deadline_ns
        near = deadline_ns < self._horizon
        buckets = self._buckets if near else self._far_buckets
        bucket = buckets.get(deadline_ns)
        if bucket is None:
            buckets[deadline_ns] = [timer]
            heapq.heappush(self._heap if near else self._far, deadline_ns)
        else:
            bucket.append(timer)
        self._entries += 1
        if not self._dispatching:
            self._maybe_compact()
            if old is not None and old == self._head():
                self._drop_stale_heads()
            self._rearm()

    def cancel(self, timer: MuxTimer) -> None:
        """Disarm ``timer``; a no-op when it is not armed."""
        old = timer._mux_deadline
        if old is None:
            return
        timer._mux_deadline = None
        self._live -= 1
        if not self._dispatching and old == self._head():
            self._drop_stale_heads()
            self._rearm()

    # --- expiry -------------------------------------------------------------------------
    def dispatch(self) -> int:
        """Expire every timer whose deadline has passed; return how many fired.

        Buckets are handled in deadline order.  The clock is read once per
        catch-up pass, not per timer, and read again before giving control
        back so timers that fell due meanwhile are handled in the same call.
        """
        heap = self._heap
        buckets = self._buckets
        pop = heapq.heappop
        now_ns = self.now_ns
        now = now_ns()
        self._advance_horizon(now)
        fired = 0
        self._dispatching = True
        try:
            while heap:
                due = heap[0]
                if due > now:
                    now = now_ns()
                    if due > now:
                        break
                pop(heap)
                bucket = buckets.pop(due)
                self._entries -= len(bucket)
                for timer in bucket:
                    # Stale entries (cancelled or moved) no longer carry this deadline.
                    if timer._mux_deadline == due:
                        timer._mux_deadline = None
                        self._live -= 1
                        fired += 1
                        timer.expire(due, now)
        finally:
            self._dispatching = False
        self.expirations += fired
        self.dispatches += 1
        self._maybe_compact()
        self._drop_stale_heads()
        self._rearm()
        return fired

    def on_host_timer(self) -> int:
        """Handle the host timer's fd becoming readable: acknowledge and dispatch."""
        self.host_timer.acknowledge()
        return self.dispatch()

    # --- queries ------------------------------------------------------------------------
    def next_deadline_ns(self) -> int | None:
        """The earliest live deadline, or None when nothing is armed."""
        self._drop_stale_heads()
        return self._head()

    def timeout_ns(self) -> int | None:
        """Nanoseconds until the earliest deadline (0 if past), None when idle."""
        nxt = self.next_deadline_ns()
        return None if nxt is None else max(0, nxt - self.now_ns())

    def fileno(self) -> int:
        """The host timer's descriptor, for a selector next to other sockets."""
        return self.host_timer.fileno()

    @property
    def armed_timers(self) -> int:
        """How many timers are armed."""
        return self._live

    @property
    def host_timers(self) -> int:
        """How many host timers this multiplexer programs: always one."""
        return 1

    # --- internals ----------------------------------------------------------------------
    def _head(self) -> int | None:
        """The earliest deadline held (near ones all precede far ones)."""
        if self._heap:
            return self._heap[0]
        return self._far[0] if self._far else None

    def _advance_horizon(self, now: int) -> None:
        """Move the horizon to ``now + HORIZON_NS``; far deadlines before it become near."""
        self._horizon = horizon = now + HORIZON_NS
        far = self._far
        while far and far[0] < horizon:
            due = heapq.heappop(far)
            heapq.heappush(self._heap, due)
            self._buckets[due] = self._far_buckets.pop(due)

    def _drop_stale_heads(self) -> None:
        """Pop buckets at the top of the heaps that hold no live timer."""
        self._drop_stale_head(self._heap, self._buckets)
        if not self._heap:
            self._drop_stale_head(self._far, self._far_buckets)

    def _drop_stale_head(self, heap: list[int], buckets: dict[int, list[MuxTimer]]) -> None:
        while heap:
            due = heap[0]
            bucket = buckets[due]
            for timer in bucket:
                if timer._mux_deadline == due:
                    return
            heapq.heappop(heap)
            del buckets[due]
            self._entries -= len(bucket)

    def _rearm(self) -> None:
        head = self._head()
        if head != self._armed_at:
            self._armed_at = head
            self.host_timer.arm(None if head is None else head + self.slack_ns)

    def _maybe_compact(self) -> None:
        """Rebuild heap and buckets from the live timers once stale entries dominate.

        Never called mid-dispatch: the dispatch loop holds the heap and buckets.
        """
        if self._entries <= _COMPACT_FACTOR * self._live + _COMPACT_FLOOR:
            return
        near: dict[int, list[MuxTimer]] = {}
        far: dict[int, list[MuxTimer]] = {}
        seen: set[int] = set()
        for old in (self._buckets, self._far_buckets):
            for due, bucket in old.items():
                for timer in bucket:
                    if timer._mux_deadline == due and id(timer) not in seen:
                        seen.add(id(timer))
                        (near if due < self._horizon else far).setdefault(due, []).append(timer)
        self._buckets, self._far_buckets = near, far
        self._heap, self._far = list(near), list(far)
        heapq.heapify(self._heap)
        heapq.heapify(self._far)
        self._entries = len(seen)
