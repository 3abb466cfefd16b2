"""Rate limits for devices (QoS): a token bucket, and the checks on the limits a user sets.

A :class:`TokenBucket` of ``rate`` tokens per second holds at most ``burst``
tokens and starts full (the model of Linux's ``tbf`` qdisc and of
Firecracker's rate limiter).  Over any window of ``T`` seconds at most
``burst + rate * T`` tokens are taken, so the bucket is kept small
(:data:`BURST_SECONDS` of traffic) and a limit holds within a few percent
over a few seconds.

The data path takes tokens per batch, never per frame or request, and a
device without limits holds ``None`` instead of a bucket: one comparison per
batch is all an unlimited device pays.

Buckets belong to the thread that serves the queues (they are not locked);
a control thread that changes a limit builds new buckets and swaps them in
with one attribute assignment (see ``VirtioNet.set_limits`` and
``VirtioBlk.set_limits``).
"""

from __future__ import annotations

import math
import threading
import time
from typing import Callable, Mapping

Clock = Callable[[], float]

BURST_SECONDS = 0.1
"""A bucket holds this much of its rate (at least ``min_burst``): the most a limit lets through at once."""


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` held; ``clock`` gives seconds (monotonic)."""

    __slots__ = ("rate", "burst", "tokens", "_clock", "_stamp")

    def __init__(self, rate: float, min_burst: float = 1.0, clock: Clock = time.monotonic) -> None:
        if not rate > 0 or math.isinf(rate):
            raise ValueError(f"rate {rate!r} is not a positive finite number")
        self.rate = float(rate)
        self.burst = max(self.rate * BURST_SECONDS, float(min_burst))
        self.tokens = self.burst
        self._clock = clock
        self._stamp = clock()

    def refill(self) -> float:
        """Add the tokens earned since the last refill (up to ``burst``); returns the tokens held.

        The count may be negative: :meth:`take` lets a caller that could not
        know a cost in advance (a block request's size) go into debt.
        """
        now = self._clock()
        self.tokens = min(self.burst, self.tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        return self.tokens

    def take(self, n: float) -> None:
        """Spend ``n`` tokens (the balance may go below zero)."""
        self.tokens -= n

    def wait_time(self, need: float) -> float:
        """Seconds until the bucket holds ``need`` tokens (at most ``burst``), counted from the last refill."""
        return max(0.0, (min(need, self.burst) - self.tokens) / self.rate)


def check_limits(limits: Mapping[str, float], keys: tuple[str, ...], device: str) -> dict[str, float]:
    """``limits`` as floats, checked: only ``keys``, each a finite number >= 0 (0: no limit).

    Raises ``ValueError`` naming ``device`` and the offending key or value.
    """
    checked: dict[str, float] = {}
    for key, value in limits.items():
        if key not in keys:
            raise ValueError(f"{device}: unknown limit {key!r}; the limits are {', '.join(keys)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{device}: limit {key}={value!r} is not a number")
        if math.isnan(value) or math.isinf(value) or value < 0:
            raise ValueError(f"{device}: limit {key}={value!r} must be a finite number >= 0 (0 removes it)")
        checked[key] = float(value)
    return checked


class Limits:
    """A device's limits (``keys``, 0 meaning none) and the buckets enforcing them.

    :meth:`update` is for the control plane: it checks the new values, keeps
    the bucket of a limit whose rate did not change, and hands the buckets
    to ``apply`` while holding a lock, so two concurrent updates land in
    order.  ``min_burst`` gives a bucket's least burst by key (a bytes bucket
    must hold the largest frame, or that frame never passes).
    """

    def __init__(
        self, keys: tuple[str, ...], device: str, min_burst: Mapping[str, float] | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.keys = keys
        self.device = device
        self.clock = clock
        self._min_burst = dict(min_burst or {})
        self._values = dict.fromkeys(keys, 0.0)
        self._buckets: dict[str, TokenBucket] = {}
        self._lock = threading.Lock()

    def values(self) -> dict[str, float]:
        """Every limit, 0.0 where there is none."""
        with self._lock:
            return dict(self._values)

    def update(self, limits: Mapping[str, float], apply: Callable[[dict[str, TokenBucket]], None]) -> None:
        """Set the limits given in ``limits`` (the others stay); ``apply`` takes the buckets of the non-zero ones.

        ``ValueError`` (nothing changed) for an unknown key or a value that is
        not a finite number >= 0.
        """
        checked = check_limits(limits, self.keys, self.device)
        with self._lock:
            values = {**self._values, **checked}
            buckets: dict[str, TokenBucket] = {}
            for key, rate in values.items():
                bucket = self._buckets.get(key)
                if rate and (bucket is None or self._values[key] != rate):
                    bucket = TokenBucket(rate, self._min_burst.get(key, 1.0), self.clock)
                if rate and bucket is not None:
                    buckets[key] = bucket
            apply(buckets)
            self._values, self._buckets = values, buckets
