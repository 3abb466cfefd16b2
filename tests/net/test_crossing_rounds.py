"""A flow crossing between two workers: the C kick jobs against the Python path, over random rounds.

``iovirt/virtio/net/crossing.py``: port a is served by worker S, port b by
worker R, so a's frames to b cross through b's crossing from S.  Here both
workers are simulated on one thread (which one runs is ``Worker.current``)
and each round is served to the end, once by the kick jobs a worker's C loop
would run (``VirtioNet.kick_job`` gives a ``SendJob``, ``crossing_job`` a
``ReceiveJob``; their C functions are called through ctypes, as the loop
calls them, and settled as it settles them) and once by the Python path
alone (``Crossing.push`` from the switch, ``Crossing.drain``).  The guests
must see the same bytes in the same buffers, the same used chains, the same
counters and device states; and what b received is what it receives when
both ports share one worker.
"""

from __future__ import annotations

import ctypes
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iovirt.virtio.kickjob import JOB_AGAIN, JOB_DONE, JOB_PYTHON, JOB_WAIT, NOTIFY_KICKED, NOTIFY_OTHER
from iovirt.virtio.net import datapath
from iovirt.virtio.net.switch import LearningSwitch

from test_forward import A, B, FEATURE_SETS, Guest, observe, rounds, rounds_mtu, rounds_of, udp_frame

pytestmark = pytest.mark.skipif(datapath.accel is None, reason="the C data path is not built (IOVIRT_NO_EXTENSIONS)")

RUN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint))
TIMING = {"kicks", "calls", "notifications", "interrupts"}  # how many notifications a round took, not what moved


class Worker:
    """A data-plane worker as the switch and a crossing see it; ``current`` is the one "running"."""

    current: "Worker | None" = None

    def __init__(self, name: str) -> None:
        self.name = name
        self.watched: dict[int, Any] = {}

    def is_current(self) -> bool:
        return Worker.current is self

    def post(self, handler: Any, *args: Any) -> bool:
        raise AssertionError("every frame here crosses from its sender's own worker: nothing is posted")

    def watch(self, fd: int, handler: Any, queue: object, job_of: Any) -> None:
        self.watched[fd] = (handler, job_of)

    def remove(self, fd: int) -> None:
        self.watched.pop(fd, None)


def run_job(offer: Any) -> int:
    """Run a kick job's C function until it answers something but AGAIN; its notifications sent as the loop would."""
    function, context = offer.job.entry()
    run = RUN(function)
    notify = ctypes.c_uint(0)
    while True:
        answer = run(context, ctypes.byref(notify))
        if notify.value & NOTIFY_KICKED:
            offer.notifiers[0]()
        if notify.value & NOTIFY_OTHER:
            offer.notifiers[1]()
        if answer != JOB_AGAIN:
            return int(answer)


class Crossed:
    """Ports a (on S) and b (on R) of one switch; ``jobs``: served by the kick jobs, else by the Python path."""

    def __init__(self, features: tuple[int, int], mtu: int, in_order: bool, jobs: bool, workers: int = 2) -> None:
        self.switch = LearningSwitch()
        self.a = Guest(A, self.switch, features[0], in_order=in_order)
        self.b = Guest(B, self.switch, features[1], mtu=mtu, in_order=in_order)
        self.jobs = jobs
        self.S, self.R = Worker("S"), Worker("R")
        if workers == 2:
            self.switch.set_owner(self.a.dev, self.S, self.S)
            self.switch.set_owner(self.b.dev, self.R, self.S)
        for guest, worker in ((self.a, self.S), (self.b, self.R)):
            kick = guest.dev.kick
            guest.dev.kick = lambda index, kick=kick, worker=worker: self._kick(worker, kick, index)
        self.a.post_rx(8)
        self.b.send([udp_frame(A, B, 0)])  # B learned on b (its frame crosses to a)
        self.a.send([udp_frame(B, A, 0)])  # A learned on a; a's transmit flow is A -> B from now on

    def _kick(self, worker: Worker, kick: Any, index: int) -> None:
        Worker.current = worker
        guest = self.a if worker is self.S else self.b
        offer = guest.dev.kick_job(index) if self.jobs and index == 1 else None
        if offer is None:
            kick(index)
        else:
            while True:
                answer = run_job(offer)
                if answer == JOB_WAIT:  # the channel is full: the receiver makes room, then the job goes on
                    self._serve_receivers()
                    Worker.current = worker
                    continue
                offer.settle()
                if answer == JOB_PYTHON:
                    kick(index)  # the kick handler serves what the job left
                assert answer in (JOB_DONE, JOB_PYTHON)
                break
        self._serve_receivers()

    def _serve_receivers(self) -> None:
        """Each worker takes what crossed to its ports, as its doorbell makes it do."""
        for crossing in list(self.switch._crossings.values()):
            owner = crossing.receiver
            Worker.current = owner
            offer = crossing.port.crossing_job(crossing) if self.jobs else None
            if offer is not None:
                answer = run_job(offer)
                offer.settle()  # WAIT: no buffers for a while, then Python holds or drops (the loop's expiry)
                assert answer in (JOB_DONE, JOB_PYTHON, JOB_WAIT)
            while len(crossing.channel):
                crossing.drain()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(features=st.sampled_from(FEATURE_SETS), in_order=st.booleans(), script=rounds)
def test_random_rounds_cross_as_the_python_path_and_one_worker_give(features, in_order, script):
    """Random sends, receive buffers and broken chains on either ring: the crossing's kick jobs, its Python path
    and one worker give the guests the same, and the two crossings count the same."""
    scenario = rounds_of(script, features)

    def play(**kw: Any) -> Any:
        net = Crossed(features, rounds_mtu(features), in_order, **kw)
        scenario(net.a, net.b)
        Worker.current = None
        return observe(net.a, net.b, net.switch)

    jobs, python, one = play(jobs=True), play(jobs=False), play(jobs=False, workers=1)
    for seen in (jobs, python, one):
        seen.calls = []
        seen.switch = ()
        seen.queue_stats = [[{k: v for k, v in q.items() if k not in TIMING} for q in port] for port in seen.queue_stats]
        if seen.needs_reset[1]:
            # b's receive ring broke: the frames of the batch in hand when it did are lost either way, but counted
            # as dropped (link down) only where they reach b after it failed, and the two paths meet the broken
            # chain at different points of that batch.
            for key in ("rx_dropped", "rx_dropped_link_down"):
                seen.stats[1].pop(key, None)
    assert jobs == python
    assert jobs.received == one.received and jobs.needs_reset == one.needs_reset
