"""The hand-off ring between data-plane workers, both twins, and DataPlane.post (issue 15).

A frame switched to a port on another worker is posted to that worker:
pushed onto a single-producer, single-consumer ring only it pops.  The ring
must keep order, refuse when full (the sender drops, counted), and say when
the consumer may be asleep; posted work must run on the owner's thread, in
each producer's order, and a full inbox must drop, never block.
"""

from __future__ import annotations

import threading
import time

import pytest

from iovirt.vhost_user import _handoff_py, handoff
from iovirt.vhost_user.dataplane import INBOX_SLOTS, DataPlane
from iovirt.vhost_user.workers import WorkerPool

from twins import outcome

TWINS = [pytest.param(_handoff_py.HandoffRing, id="python"), pytest.param(handoff.HandoffRing, id="selected")]


@pytest.mark.parametrize("ring_cls", TWINS)
def test_fifo_full_and_was_empty(ring_cls):
    ring = ring_cls(4)
    assert [ring.push(i) for i in range(5)] == [handoff.WAS_EMPTY, handoff.PUSHED, handoff.PUSHED, handoff.PUSHED,
                                                handoff.FULL]
    assert len(ring) == 4
    assert [ring.pop() for _ in range(5)] == [0, 1, 2, 3, None]
    assert ring.push("x") == handoff.WAS_EMPTY  # drained: the consumer may sleep again
    assert ring.push("y") == handoff.PUSHED
    assert ring.pop() == "x" and ring.pop() == "y" and ring.pop() is None


def test_the_compiled_twin_runs():
    assert handoff.IMPLEMENTATION == "cython" or _accel_disabled()


def _accel_disabled() -> bool:
    from iovirt import _accel

    return _accel.NO_EXTENSIONS


@pytest.mark.parametrize("capacity", [0, 1, 3, 6, 1000])
def test_capacity_must_be_a_power_of_two_in_both_twins(capacity):
    assert outcome(_handoff_py.HandoffRing, capacity) == outcome(handoff.HandoffRing, capacity)
    with pytest.raises(ValueError, match="power of two"):
        handoff.HandoffRing(capacity)


@pytest.mark.parametrize("ring_cls", TWINS)
def test_wraps_many_times_and_drops_references(ring_cls):
    ring = ring_cls(8)
    marker = object()
    before = _refs(marker)
    for lap in range(1000):
        assert ring.push((lap, marker)) != handoff.FULL
        assert ring.push((lap + 1, marker)) != handoff.FULL
        assert ring.pop() == (lap, marker) and ring.pop() == (lap + 1, marker)
    ring.push(marker)
    del ring  # what was left in it is released
    assert _refs(marker) == before


def _refs(obj: object) -> int:
    import sys

    return sys.getrefcount(obj)


@pytest.mark.parametrize("ring_cls", TWINS)
def test_one_producer_one_consumer_thread_keep_order(ring_cls):
    ring, n = ring_cls(64), 100_000
    got: list[int] = []

    def consume():
        while len(got) < n:
            item = ring.pop()
            if item is None:
                time.sleep(0)  # let the producer run (the interpreter lock)
            else:
                got.append(item)

    consumer = threading.Thread(target=consume)
    consumer.start()
    i = 0
    while i < n:
        if ring.push(i) == handoff.FULL:
            time.sleep(0)
        else:
            i += 1
    consumer.join(timeout=60)
    assert got == list(range(n))


def test_posted_work_runs_on_the_owner_thread_in_each_producers_order():
    pool = WorkerPool(3)
    pool.start()
    try:
        target = pool.workers[2]
        ran: list[tuple[str, int, bool]] = []
        done = threading.Event()
        total = 3 * 500

        def record(source: str, i: int) -> None:
            ran.append((source, i, target.is_current()))
            if len(ran) == total:
                done.set()

        def produce(source: str) -> None:
            for i in range(500):
                while not target.post(record, source, i):
                    time.sleep(0)  # full: a switch would drop; here the test retries

        # Two producers are workers (each its own ring), one is not (the shared ring).
        for worker, source in ((pool.workers[0], "w0"), (pool.workers[1], "w1")):
            assert worker.post(produce, source)
        produce("control")
        assert done.wait(20)
        assert all(on_owner for _, _, on_owner in ran)
        for source in ("w0", "w1", "control"):
            assert [i for s, i, _ in ran if s == source] == list(range(500))
    finally:
        pool.stop()


def test_a_full_inbox_drops_and_counts_without_blocking():
    plane = DataPlane()  # not started: nothing drains
    plane.connect(1)
    taken = sum(plane.post(print) for _ in range(INBOX_SLOTS + 10))
    assert taken == INBOX_SLOTS
    assert plane.posts_dropped == 10
    plane.stop()
    assert plane.post(print) is False  # a stopped worker takes nothing


def test_posted_work_that_raises_is_logged_and_the_worker_goes_on(caplog):
    pool = WorkerPool(2)
    pool.start()
    try:
        done = threading.Event()

        def boom() -> None:
            raise RuntimeError("device bug")

        assert pool.workers[1].post(boom)
        assert pool.workers[1].post(done.set)
        assert done.wait(5)
        assert "posted work" in caplog.text and "device bug" in caplog.text
    finally:
        pool.stop()


def test_pool_takes_every_lock_in_order():
    pool = WorkerPool(3)
    with pool.lock:
        assert all(w.lock.is_owned() for w in pool.workers)
    assert not any(w.lock.is_owned() for w in pool.workers)
    one = WorkerPool(1)
    assert one.lock is one.workers[0].lock  # one worker: its own lock (acquire with a timeout works)
    with pytest.raises(ValueError, match="at least one worker"):
        WorkerPool(0)
