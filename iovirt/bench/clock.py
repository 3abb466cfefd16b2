"""The bench's timestamps: CLOCK_MONOTONIC nanoseconds, and the wall-clock time they stand for.

Ingress and egress timestamps (and so latencies) are taken on the monotonic
clock, which does not jump; pcap and pcapng records want wall-clock time,
so :func:`wall_ns` adds the offset between the two clocks, measured once.
"""

from __future__ import annotations

import time

_WALL_OFFSET_NS = time.time_ns() - time.monotonic_ns()


def wall_ns(t_ns: int) -> int:
    """The wall-clock time (ns since the epoch) of monotonic timestamp ``t_ns``."""
    return t_ns + _WALL_OFFSET_NS


def wall_time(t_ns: int) -> float:
    """The wall-clock time (s since the epoch, as scapy's ``Packet.time``) of monotonic timestamp ``t_ns``."""
    return wall_ns(t_ns) / 1e9
