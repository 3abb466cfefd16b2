"""The token bucket and the limit checks of iovirt/virtio/qos.py, on a fake clock."""

from __future__ import annotations

import math

import pytest

from iovirt.virtio.qos import BURST_SECONDS, Limits, TokenBucket, check_limits


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_bucket_starts_full_and_refills_at_its_rate_up_to_burst():
    clock = Clock()
    bucket = TokenBucket(1000, clock=clock)
    assert bucket.burst == 1000 * BURST_SECONDS
    assert bucket.refill() == 100
    bucket.take(100)
    clock.now += 0.05
    assert bucket.refill() == pytest.approx(50)
    clock.now += 10
    assert bucket.refill() == 100  # never more than the burst


def test_min_burst_lets_the_largest_unit_through():
    bucket = TokenBucket(1000, min_burst=65549, clock=Clock())
    assert bucket.burst == 65549


def test_debt_is_paid_by_waiting():
    clock = Clock()
    bucket = TokenBucket(100, clock=clock)
    bucket.take(30)  # 10 held: 20 in debt
    assert bucket.refill() == -20
    assert bucket.wait_time(1) == pytest.approx(0.21)
    clock.now += 0.21
    assert bucket.refill() == pytest.approx(1)
    assert bucket.wait_time(1) == pytest.approx(0, abs=1e-9)


def test_long_run_rate_is_the_rate_plus_one_burst():
    clock = Clock()
    bucket = TokenBucket(500, clock=clock)
    taken = 0
    for _ in range(5000):  # 5 s in 1 ms steps, taking whatever is held
        clock.now += 0.001
        n = int(bucket.refill())
        bucket.take(n)
        taken += n
    assert 500 * 5 <= taken <= 500 * 5 + bucket.burst


@pytest.mark.parametrize("rate", [0, -1, math.nan, math.inf])
def test_bucket_refuses_a_bad_rate(rate):
    with pytest.raises(ValueError, match="not a positive finite number"):
        TokenBucket(rate)


@pytest.mark.parametrize(
    "limits, message",
    [
        ({"iops": 1}, "unknown limit 'iops'; the limits are pps, bps"),
        ({"pps": -1}, "limit pps=-1 must be a finite number >= 0"),
        ({"bps": math.nan}, "limit bps=nan must be a finite number >= 0"),
        ({"bps": math.inf}, "limit bps=inf must be a finite number >= 0"),
        ({"pps": "10"}, "limit pps='10' is not a number"),
        ({"pps": True}, "limit pps=True is not a number"),
    ],
)
def test_check_limits_names_the_problem(limits, message):
    with pytest.raises(ValueError, match=f"^port0: {message}"):
        check_limits(limits, ("pps", "bps"), "port0")


def test_limits_update_keeps_the_others_and_zero_removes():
    applied = []
    limits = Limits(("pps", "bps"), "port0", clock=Clock())
    assert limits.values() == {"pps": 0.0, "bps": 0.0}
    limits.update({"pps": 100}, applied.append)
    first = applied[-1]["pps"]
    limits.update({"bps": 1e6}, applied.append)
    assert limits.values() == {"pps": 100.0, "bps": 1e6}
    assert applied[-1]["pps"] is first  # an unchanged limit keeps its bucket (and its tokens)
    limits.update({"pps": 200}, applied.append)
    assert applied[-1]["pps"] is not first and applied[-1]["pps"].rate == 200
    limits.update({"pps": 0, "bps": 0}, applied.append)
    assert applied[-1] == {} and limits.values() == {"pps": 0.0, "bps": 0.0}


def test_a_refused_update_changes_nothing():
    applied = []
    limits = Limits(("iops", "bps"), "blk0")
    limits.update({"iops": 10}, applied.append)
    with pytest.raises(ValueError):
        limits.update({"iops": 20, "bps": -5}, applied.append)
    assert limits.values() == {"iops": 10.0, "bps": 0.0} and len(applied) == 1
