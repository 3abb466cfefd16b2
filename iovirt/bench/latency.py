"""Per-frame latency through a device: ingress to egress timestamps, as a histogram with percentiles.

A :class:`LatencyMeter` is handed to :meth:`BenchPort.send_raw
<iovirt.bench.port.BenchPort.send_raw>` on the sending port and to
:meth:`BenchPort.recv_raw <iovirt.bench.port.BenchPort.recv_raw>` on the
receiving one (the same thread drives both).  Ingress is when a frame's batch
was made available to the device (the avail idx published, just before the
kick); egress is when the receiving port found it in its used ring.  Both are
CLOCK_MONOTONIC nanoseconds (:mod:`iovirt.bench.clock`), so the resolution is
a batch: every frame of one publish shares its ingress time, every frame of
one used-ring harvest its egress time.

Frames are matched by their bytes, first in first out, so the frames need
no stamp of their own (a pcap replays unchanged).  A frame that changed on
the way (NAT, corruption) or came twice counts as ``unmatched``; a frame
sent and never received stays ``outstanding``.
"""

from __future__ import annotations

import bisect
import collections
from array import array
from typing import Any, Iterable

PERCENTILES = {"p50": 50.0, "p99": 99.0, "p999": 99.9}
"""The percentiles every report gives, by key."""


class LatencyHistogram:
    """Latency samples in nanoseconds: exact percentiles, and power-of-two buckets for display."""

    def __init__(self) -> None:
        self._samples = array("q")
        self._sorted = True

    def add(self, ns: int) -> None:
        """One sample."""
        self._samples.append(ns)
        self._sorted = False

    def extend(self, samples: Iterable[int]) -> None:
        """Many samples."""
        self._samples.extend(samples)
        self._sorted = False

    def __len__(self) -> int:
        return len(self._samples)

    def _ordered(self) -> array:
        if not self._sorted:
            self._samples = array("q", sorted(self._samples))
            self._sorted = True
        return self._samples

    def percentile(self, pct: float) -> int:
        """The nearest-rank ``pct``-th percentile in ns (the smallest sample with ``pct`` % at or below it)."""
        if not 0 < pct <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {pct}")
        ordered = self._ordered()
        if not ordered:
            raise ValueError("no latency samples")
        rank = max(1, -(-len(ordered) * pct // 100))  # ceil(n * pct / 100)
        return int(ordered[int(rank) - 1])

    def buckets(self) -> list[tuple[int, int, int]]:
        """``(low_ns, high_ns, count)`` for each power-of-two bucket ``[low, high)`` from the first to the last sample."""
        ordered = self._ordered()
        if not ordered:
            return []
        out = []
        low = 1 << max(0, int(ordered[0]).bit_length() - 1) if ordered[0] > 0 else 0
        high = max(1, low * 2)
        start = 0
        while start < len(ordered):
            end = bisect.bisect_left(ordered, high, start)
            out.append((low, high, end - start))
            start, low, high = end, high, high * 2
        return out

    def summary_us(self) -> dict[str, float]:
        """``min``, ``p50``, ``p99``, ``p999``, ``max`` in microseconds (empty without samples)."""
        ordered = self._ordered()
        if not ordered:
            return {}
        out = {"min": ordered[0] / 1e3}
        out.update({key: self.percentile(pct) / 1e3 for key, pct in PERCENTILES.items()})
        out["max"] = ordered[-1] / 1e3
        return out

    def format(self, width: int = 40) -> str:
        """The histogram as text: one line per bucket with a bar, then the percentiles."""
        rows = self.buckets()
        if not rows:
            return "no latency samples"
        top = max(count for _low, _high, count in rows)
        lines = [
            f"{_us(low):>10} - {_us(high):<10} {count:>9} {'#' * max(1 if count else 0, round(width * count / top))}"
            for low, high, count in rows
        ]
        summary = self.summary_us()
        lines.append(
            f"{len(self)} frames: p50 {summary['p50']:.1f} us, p99 {summary['p99']:.1f} us, "
            f"p999 {summary['p999']:.1f} us (min {summary['min']:.1f}, max {summary['max']:.1f})"
        )
        return "\n".join(lines)


def _us(ns: int) -> str:
    return f"{ns / 1e3:.1f} us" if ns < 1_000_000 else f"{ns / 1e6:.2f} ms"


class LatencyMeter:
    """Matches frames sent on one port to frames received on another; their latencies go to :attr:`histogram`."""

    def __init__(self) -> None:
        self.histogram = LatencyHistogram()
        self.unmatched = 0
        """Frames received that were not sent (changed on the way, duplicated, or from elsewhere)."""
        self._sent: dict[bytes, collections.deque[int]] = {}

    def sent(self, frames: Iterable[Any], t_ns: int) -> None:
        """``frames`` (bytes) entered the device at ``t_ns``."""
        book = self._sent
        for frame in frames:
            key = frame if type(frame) is bytes else bytes(frame)
            queue = book.get(key)
            if queue is None:
                queue = book[key] = collections.deque()
            queue.append(t_ns)

    def received(self, frames: Iterable[Any]) -> None:
        """Frames (with ``data`` and ``t_ns``, as :class:`~iovirt.bench.rawpath.RawFrame`) left the device."""
        book = self._sent
        add = self.histogram.add
        for frame in frames:
            queue = book.get(frame.data)
            if not queue:
                self.unmatched += 1
                continue
            add(frame.t_ns - queue.popleft())
            if not queue:
                del book[frame.data]

    @property
    def outstanding(self) -> int:
        """Frames sent and not (yet) received."""
        return sum(len(queue) for queue in self._sent.values())
