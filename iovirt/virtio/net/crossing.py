"""Frames crossing from the ports of one data-plane worker to a port another worker serves.

With ``iovirt serve --workers N`` each port is served by one worker's
thread (:meth:`LearningSwitch.set_owner`).  A batch the switch sends from a
port of worker S to port P of worker R goes through P's :class:`Crossing`
from S: a ``FrameChannel`` (``_datapath_c``, a single-producer,
single-consumer ring of batches; no lock) and two :class:`Bell` eventfds.

- S publishes a batch and, if the channel was empty, rings the
  *doorbell*, which R watches.
- R writes the batches into P's receive ring and frees their slots; if S
  asked (it found the channel full), it rings the *space* bell, which S
  watches.

Both sides run in C where they can, as kick jobs of their workers' C loops
(``iovirt/vhost_user/kickloop.py``): on S the sending port's transmit loop
of one flow (``datapath.send_job``, armed on its transmit ring and on the
space bell), on R the receiving port's side (``datapath.receive_job``,
armed on the doorbell and on P's receive ring).  So a flow between two
workers runs without the interpreter on either.  Whatever they leave, and
every batch the switch itself sends across (other flows, floods), goes the
same way in Python: :meth:`Crossing.push` on S, :meth:`Crossing.drain` on
R, which delivers as the switch delivers on P's own thread.  Batches from
S to P so stay in order whichever side sent them.

A crossing needs the C twin (the channel is C).  Without it, or from a
thread that is not the sending port's worker, the switch posts a copy to
R's hand-off ring instead (``DataPlane.post``).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Protocol

from iovirt.virtio.kickjob import KickJob
from iovirt.virtio.net import datapath
from iovirt.virtio.net.defs import CHANNEL_FULL, CHANNEL_WAS_EMPTY

log = logging.getLogger("iovirt.switch")

CHANNEL_SLOTS = 64
"""Batches in flight from one worker to one port.  Then a sending kick job waits for a slot (1 ms at most:
``iovirt/vhost_user/kickloop.py``) and the switch drops, as a congested switch drops (``handoff_dropped``)."""
DRAIN_BUDGET = 64  # batches the receiving worker's Python side takes per turn; more: it rings its own doorbell


class Watcher(Protocol):
    """A worker as a crossing sees it (:class:`~iovirt.vhost_user.dataplane.DataPlane`)."""

    def watch(self, fd: int, handler: Callable[[], None], queue: object,
              job_of: Callable[[], KickJob | None] | None) -> None:
        """Serve eventfd ``fd`` on this worker: ``handler`` when it rings, or the kick job ``job_of()`` offers."""

    def remove(self, fd: int) -> None:
        """Stop serving ``fd``."""


class Bell:
    """An eventfd one worker rings to wake another; also a notifier a kick job's loop rings itself.

    ``rung`` counts the rings, whoever wrote them (:meth:`count`).
    """

    __slots__ = ("eventfd", "rung")

    def __init__(self) -> None:
        self.eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.rung = 0

    def __call__(self) -> None:
        try:
            os.eventfd_write(self.eventfd, 1)
        except BlockingIOError:
            pass  # the counter is full: it rings already
        self.rung += 1

    def count(self, n: int) -> None:
        """Count ``n`` rings written to :attr:`eventfd` by a kick job's loop."""
        self.rung += n

    def close(self) -> None:
        """Close the eventfd (both workers stopped watching it)."""
        os.close(self.eventfd)


class Crossing:
    """Batches from the ports of worker ``sender`` to ``port``, which worker ``receiver`` serves.

    ``deliver(port, frames, indexes)`` is the switch's delivery on
    ``port``'s own thread (impairments, then the port); ``takes_jobs()``
    says whether the receiving side may run as a kick job now (the port
    not impaired).  Made and :meth:`open`-ed on the sender's thread.
    """

    def __init__(self, port: Any, deliver: Callable[[Any, Any, list[int]], int], takes_jobs: Callable[[], bool],
                 sender: Watcher, receiver: Watcher) -> None:
        self.port = port
        self.channel = datapath.accel.FrameChannel(CHANNEL_SLOTS)
        self.doorbell = Bell()  # rung by the sender: batches wait; the receiver watches it
        self.space = Bell()  # rung by the receiver: a slot the sender asked for is free; the sender watches it
        self._deliver = deliver
        self._takes_jobs = takes_jobs
        self.sender = sender
        self.receiver = receiver

    def open(self) -> None:
        """Have both workers watch their bell."""
        self.receiver.watch(self.doorbell.eventfd, self.drain, self.channel, self._receive_job)
        self.sender.watch(self.space.eventfd, _nothing, self.channel, None)

    def close(self) -> None:
        """Stop watching and close the bells; batches still in the channel are dropped.

        The caller holds both workers' locks: no job that rings a bell runs.
        """
        self.receiver.remove(self.doorbell.eventfd)
        self.sender.remove(self.space.eventfd)
        self.doorbell.close()
        self.space.close()

    def push(self, frames: Any, indexes: list[int]) -> bool:
        """Copies of frames ``indexes`` to the port (on the sender's thread); False: the channel is full, none taken."""
        answer = self.channel.push(frames, indexes)
        if answer == CHANNEL_FULL:
            return False
        if answer == CHANNEL_WAS_EMPTY:
            self.doorbell()
        return True

    def drain(self) -> None:
        """Deliver what waits, :data:`DRAIN_BUDGET` batches at most (on the receiver's thread, under its lock)."""
        channel = self.channel
        for _ in range(DRAIN_BUDGET):
            item = channel.front()
            if item is None:
                return
            frames, start = item
            try:
                self._deliver(self.port, frames, list(range(start, len(frames))))
            finally:
                self.taken()
        self.doorbell()  # more left: served again on the next turn, after what else waits

    def taken(self) -> None:
        """The oldest batch is done with (on the receiver's thread): its slot is free, and the sender told if it asked."""
        if self.channel.pop():
            self.space()

    def _receive_job(self) -> KickJob | None:
        offer = getattr(self.port, "crossing_job", None)
        return None if offer is None or not self._takes_jobs() else offer(self)


def _nothing() -> None:
    """The space bell rang with no kick job armed: nothing waits (the switch drops when the channel is full)."""
