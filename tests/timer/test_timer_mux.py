"""The timer multiplexer: ordering, one host timer, lazy cancel, real timerfd."""

from __future__ import annotations

import selectors
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from iovirt.timer import CallbackTimer, MonotonicClock, TimerFd, TimerMultiplexer
from iovirt.timer.testing import fake_multiplexer, run_until


def _recorder(log, name):
    return CallbackTimer(lambda due, now: log.append((name, due, now)))


def test_host_timer_is_armed_at_earliest_deadline_and_rearmed():
    mux, clock = fake_multiplexer(0)
    log = []
    a, b, c = (_recorder(log, n) for n in "abc")
    mux.arm(a, 300)
    assert mux.host_timer.armed_at == 300
    mux.arm(b, 100)
    assert mux.host_timer.armed_at == 100
    mux.arm(c, 200)
    assert mux.host_timer.armed_at == 100
    mux.cancel(b)  # the earliest goes: re-armed at the next one
    assert mux.host_timer.armed_at == 200
    assert run_until(mux, clock, 1000) == 2
    assert [(n, due, now) for n, due, now in log] == [("c", 200, 200), ("a", 300, 300)]
    assert mux.host_timer.armed_at is None
    assert mux.host_timers == 1


def test_same_deadline_timers_fire_in_one_batch():
    mux, clock = fake_multiplexer(0)
    log = []
    timers = [_recorder(log, i) for i in range(50)]
    for t in timers:
        mux.arm(t, 1000)
    assert len(mux._heap) == 1  # one heap entry for the whole bucket
    clock.set(1000)
    assert mux.dispatch() == 50
    assert sorted(n for n, _, _ in log) == list(range(50))
    assert mux.dispatches == 1


def test_moving_a_timer_fires_it_once_at_the_new_deadline():
    mux, clock = fake_multiplexer(0)
    log = []
    t = _recorder(log, "t")
    mux.arm(t, 100)
    mux.arm(t, 500)
    mux.arm(t, 100)  # back to the stale bucket: must still fire only once
    assert run_until(mux, clock, 1000) == 1
    assert log == [("t", 100, 100)]


def test_timer_rearmed_from_its_callback_keeps_running():
    mux, clock = fake_multiplexer(0)
    fired = []

    def tick(due, now):
        fired.append(due)
        if len(fired) < 5:
            mux.arm(timer, due + 10)

    timer = CallbackTimer(tick)
    mux.arm(timer, 10)
    run_until(mux, clock, 1000)
    assert fired == [10, 20, 30, 40, 50]


def test_late_dispatch_fires_everything_due_in_deadline_order():
    mux, clock = fake_multiplexer(0)
    log = []
    for i, due in enumerate([50, 10, 30, 20, 40]):
        mux.arm(_recorder(log, i), due)
    clock.set(45)
    assert mux.dispatch() == 4
    assert [due for _, due, _ in log] == [10, 20, 30, 40]
    assert mux.next_deadline_ns() == 50
    assert mux.timeout_ns() == 5


def test_cancel_churn_keeps_the_structure_bounded():
    mux, clock = fake_multiplexer(0)
    t = _recorder([], "t")
    for i in range(10_000):
        mux.arm(t, 1_000_000 + i)
        mux.cancel(t)
    assert mux.armed_timers == 0
    assert len(mux._heap) < 200 and mux._entries < 200
    assert mux.next_deadline_ns() is None


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 500), st.booleans()), max_size=80))
def test_random_arm_cancel_matches_a_model(ops):
    """Every armed timer fires exactly once, at its last deadline, in deadline order."""
    mux, clock = fake_multiplexer(0)
    log = []
    timers = [_recorder(log, i) for i in range(21)]
    model = {}
    for idx, deadline, cancel in ops:
        if cancel:
            mux.cancel(timers[idx])
            model.pop(idx, None)
        else:
            mux.arm(timers[idx], deadline)
            model[idx] = deadline
    assert mux.armed_timers == len(model)
    run_until(mux, clock, 1000)
    assert sorted((due, n) for n, due, _ in log) == sorted((d, i) for i, d in model.items())
    assert [due for _, due, _ in log] == sorted(model.values())
    assert all(now == due for _, due, now in log)


def test_real_timerfd_in_a_selector_fires_in_order_and_never_early():
    """Integration: real monotonic clock, one timerfd, a selector loop."""
    start = TimerFd.open_count
    with TimerFd() as host_timer:
        assert TimerFd.open_count == start + 1
        mux = TimerMultiplexer(MonotonicClock(), host_timer)
        log = []
        now = time.monotonic_ns()
        for name, delay_ms in (("c", 12), ("a", 3), ("b", 6)):
            mux.arm(_recorder(log, name), now + delay_ms * 1_000_000)
        with selectors.DefaultSelector() as sel:
            sel.register(mux.fileno(), selectors.EVENT_READ)
            deadline = time.monotonic() + 2.0
            rearming_wakeups = 0  # wakeups after which timers were still pending
            while len(log) < 3 and time.monotonic() < deadline:
                if sel.select(timeout=0.5):
                    mux.on_host_timer()
                    rearming_wakeups += len(log) < 3
        assert [n for n, _, _ in log] == ["a", "b", "c"]
        assert all(now >= due for _, due, now in log)
        assert all(now - due < 200_000_000 for _, due, now in log)  # generous: shared 2-core box
        # c, then a (new earliest), then once per wakeup that leaves timers pending: 4 when
        # a, b and c expire in three wakeups, fewer when a late wakeup finds two due at once.
        assert host_timer.arm_count == 2 + rearming_wakeups
    assert TimerFd.open_count == start


def test_slack_delays_the_host_timer_but_never_fires_early():
    from iovirt.timer.testing import FakeClock, FakeHostTimer

    clock = FakeClock(0)
    mux = TimerMultiplexer(clock, FakeHostTimer(), slack_ns=100)
    log = []
    mux.arm(_recorder(log, "a"), 1000)
    mux.arm(_recorder(log, "b"), 1050)
    assert mux.host_timer.armed_at == 1100
    clock.set(999)
    assert mux.dispatch() == 0
    run_until(mux, clock, 2000)
    assert [(n, now) for n, _, now in log] == [("a", 1100), ("b", 1100)]  # one wakeup for both


def test_far_deadlines_wait_outside_the_expiry_path_and_fire_on_time():
    from iovirt.timer.mux import HORIZON_NS

    mux, clock = fake_multiplexer(0)
    log = []
    hour = 3600 * 10**9
    idle = [_recorder(log, f"idle{i}") for i in range(1000)]
    for i, timer in enumerate(idle):
        mux.arm(timer, hour + i)
    assert mux.host_timer.armed_at == hour  # the one host timer covers far deadlines too
    assert len(mux._heap) == 0  # nothing near: the expiry path sees none of them
    busy = _recorder(log, "busy")
    mux.arm(busy, 10_000_000)
    assert len(mux._heap) == 1 and mux.host_timer.armed_at == 10_000_000
    run_until(mux, clock, 20_000_000)
    assert [(name, due) for name, due, _ in log] == [("busy", 10_000_000)]
    mux.cancel(idle[0])  # a far timer can be cancelled
    run_until(mux, clock, hour + 5)
    assert [(name, due) for name, due, _ in log[1:]] == [(f"idle{i}", hour + i) for i in range(1, 6)]  # on time, in order
    assert mux.armed_timers == 1000 - 6
    # A deadline just inside the horizon is near; just past it, far.
    mux.arm(_recorder(log, "edge"), clock.now_ns() + HORIZON_NS - 1)
    assert len(mux._heap) >= 1
