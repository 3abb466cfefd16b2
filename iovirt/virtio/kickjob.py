"""Kick jobs: a queue's kick served in C, without the interpreter, by a transport's event loop.

A device may serve some kicks without Python at all: net's transmit loop of
one flow (``datapath.forward``) pops, switches and pushes in C.  It offers
that to the transport as a :class:`KickJob`, which the transport's worker
runs on each kick of the queue, with the GIL released, for as long as the
job holds (``iovirt/vhost_user/kickloop.py`` says when it stops holding).

The job's C side is a function ``int run(void *context, unsigned *notify)``
(``job.entry()`` gives its address and its context's, as integers).  It
runs without the GIL and answers:

- :data:`JOB_DONE`: the queue is empty;
- :data:`JOB_AGAIN`: there is more (a budget was spent, or a notification
  was due); run it again after the other kicks at hand;
- :data:`JOB_PYTHON`: it stopped at something only the device's own path
  does (another flow, a malformed chain, a frame the receiver cannot take);
  :attr:`KickJob.settle` must run, then the queue's kick handler;
- :data:`JOB_WAIT`: work waits on the other queue (a receiver with no
  buffer): run it again when that queue is kicked, and hand it to Python
  (as :data:`JOB_PYTHON`) if that does not come soon.

``*notify`` gets :data:`NOTIFY_KICKED` when the kicked queue's driver wants
its used-buffer notification (2.7.7, asked once: the caller sends it) and
:data:`NOTIFY_OTHER` for the job's other queue.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

JOB_DONE, JOB_AGAIN, JOB_PYTHON, JOB_WAIT = 0, 1, 2, 3
NOTIFY_KICKED, NOTIFY_OTHER = 1, 2


@dataclass
class KickJob:
    """What a device offers for one queue's kicks (``VirtioDevice.kick_job``).

    ``job``: the C side (``entry()``); ``notifiers``: the kicked queue's
    notifier and the other queue's (the transport's, as the device was
    given them: what :data:`NOTIFY_KICKED` and :data:`NOTIFY_OTHER` ask
    for); ``other_queue``: the job's other queue, whose kicks run the job
    too (what waits on it, :data:`JOB_WAIT`, goes on);
    ``settle``: counts what the job did into the devices' counters and
    finishes what it stopped at (:data:`JOB_PYTHON`).
    """

    job: Any
    notifiers: tuple[Any, Any]
    other_queue: Any
    settle: Callable[[], None]
