"""Traffic through bench ports without scapy: throughput and latency runs, pcap replay, capture.

* :func:`measure` - frames per second from one port to another (raw path),
  optionally with per-frame latency (:class:`~iovirt.bench.latency.LatencyMeter`).
* :func:`replay` - frames of a capture file into one port, as fast as
  possible, at a fixed rate, or on the file's own timing (sped up or not);
  what every port receives is recorded.
* :func:`capture` - record what arrives on ports for a time or a count.
* :class:`Recorder` - frames with their port and direction into pcapng
  (or, for a ``.pcap`` name, what came out, into classic pcap).
"""

from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from iovirt.bench.clock import wall_ns
from iovirt.bench.latency import LatencyHistogram, LatencyMeter
from iovirt.bench.pcapio import (
    DIRECTION_INBOUND,
    DIRECTION_OUTBOUND,
    LINKTYPE_ETHERNET,
    PCAP_MAGIC_NS,
    PcapNgWriter,
    Record,
)
from iovirt.bench.port import BenchPort
from iovirt.bench.rawpath import monotonic_ns

ETHERTYPE_EXPERIMENTAL = 0x88B5
"""IEEE 802 local experimental EtherType: the payload of the bench's own test frames."""

SRC_MAC = bytes.fromhex("02000000000a")
DST_MAC = bytes.fromhex("02000000000b")


def make_frame(size: int, src: bytes = SRC_MAC, dst: bytes = DST_MAC) -> bytes:
    """An Ethernet frame of ``size`` bytes (no FCS; at least the 14-byte header) from ``src`` to ``dst``."""
    if size < 14:
        raise ValueError(f"a frame has at least 14 bytes (the Ethernet header), got {size}")
    return dst + src + struct.pack("!H", ETHERTYPE_EXPERIMENTAL) + bytes(size - 14)


@dataclass
class Throughput:
    """What :func:`measure` saw: frames through, over how long, and the latencies if measured."""

    frames: int
    seconds: float
    cpu_seconds: float
    """CPU time this process used meanwhile (all its threads; an in-process device's work included)."""
    latency: LatencyHistogram | None = None
    unmatched: int = 0

    @property
    def frames_per_s(self) -> float:
        """Frames per second (wall clock)."""
        return self.frames / self.seconds if self.seconds else 0.0

    @property
    def frames_per_cpu_s(self) -> float:
        """Frames per second of this process's CPU time: the rate on a core of its own, load elsewhere aside."""
        return self.frames / self.cpu_seconds if self.cpu_seconds else 0.0


def measure(tx: BenchPort, rx: BenchPort, size: int = 64, seconds: float = 2.0, batch: int = 64, latency: bool = False) -> Throughput:
    """Send batches of ``size``-byte frames on ``tx`` and take them on ``rx`` for ``seconds``.

    Every round sends ``batch`` frames and waits (bounded by the ports'
    timeouts) until they all arrived.  With ``latency`` each frame's ingress
    to egress time goes into the histogram.
    """
    frames = [make_frame(size)] * batch
    tx.send_raw(frames)  # warm up: the switch learns, buffers are touched
    rx.recv_raw(batch)
    meter = LatencyMeter() if latency else None
    done = 0
    cpu = time.process_time()
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        tx.send_raw(frames, latency=meter)
        done += len(rx.recv_raw(batch, latency=meter))
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu
    if meter is None:
        return Throughput(done, elapsed, cpu)
    return Throughput(done, elapsed, cpu, meter.histogram, meter.unmatched)


class Recorder:
    """Frames with their port and direction, into pcapng; or, for a ``.pcap`` path, the received frames into pcap.

    Classic pcap has no field for a port or a direction, so there only what
    came out of the devices (what the ports received) is written.
    """

    def __init__(self, path: str | os.PathLike, ports: Sequence[str]) -> None:
        self.path = os.fspath(path)
        self.count = 0
        self._ng: PcapNgWriter | None = None
        if self.path.endswith(".pcap"):
            self._pcap: Any = open(self.path, "wb")
            # libpcap file header, nanosecond magic, version 2.4, Ethernet.
            self._pcap.write(struct.pack("<IHHiIII", PCAP_MAGIC_NS, 2, 4, 0, 0, 262144, LINKTYPE_ETHERNET))
        else:
            self._pcap = None
            self._ng = PcapNgWriter(self.path)
            for name in ports:
                self._ng.add_interface(name)

    def sent(self, port: int, frames: Sequence[bytes], t_ns: int) -> None:
        """``frames`` went from ``port`` into its device at monotonic ``t_ns`` (pcapng only)."""
        if self._ng is not None:
            for frame in frames:
                self._ng.write(port, wall_ns(t_ns), frame, DIRECTION_OUTBOUND)
                self.count += 1

    def received(self, port: int, frames: Sequence[Any]) -> None:
        """``frames`` (:class:`~iovirt.bench.rawpath.RawFrame`) came out of ``port``'s device."""
        for frame in frames:
            if self._ng is not None:
                self._ng.write(port, wall_ns(frame.t_ns), frame.data, DIRECTION_INBOUND)
            else:
                t = wall_ns(frame.t_ns)
                self._pcap.write(struct.pack("<IIII", t // 10**9, t % 10**9, len(frame.data), len(frame.data)))
                self._pcap.write(frame.data)
            self.count += 1

    def close(self) -> None:
        """Flush and close."""
        if self._ng is not None:
            self._ng.close()
        else:
            self._pcap.close()


@dataclass
class ReplayResult:
    """What :func:`replay` did: frames sent, frames each port received, time taken, latencies."""

    sent: int
    received: list[int]
    seconds: float
    latency: LatencyHistogram
    unmatched: int
    outstanding: int
    rates: dict[str, float] = field(default_factory=dict)

    @property
    def frames_per_s(self) -> float:
        """Frames sent per second."""
        return self.sent / self.seconds if self.seconds else 0.0


def schedule(records: Sequence[Record], rate: float | None = None, speedup: float | None = None) -> list[int]:
    """When each frame is due, in ns from the start: ``rate`` frames/s, the file's gaps divided by ``speedup``, or all at once."""
    if rate is not None:
        return [round(i * 1e9 / rate) for i in range(len(records))]
    if speedup is not None and records:
        first = records[0].t_ns
        # A capture's clock may step back (merged files): never schedule before the previous frame.
        due, last = [], 0
        for rec in records:
            last = max(last, round((rec.t_ns - first) / speedup))
            due.append(last)
        return due
    return [0] * len(records)


def _poll(ports: Sequence[BenchPort], meter: LatencyMeter | None, recorder: Recorder | None, counts: list[int]) -> int:
    got = 0
    for i, port in enumerate(ports):
        frames = port.recv_raw(None, latency=meter)
        if frames:
            counts[i] += len(frames)
            got += len(frames)
            if recorder is not None:
                recorder.received(i, frames)
    return got


def replay(
    records: Sequence[Record],
    ports: Sequence[BenchPort],
    *,
    rate: float | None = None,
    speedup: float | None = None,
    batch: int = 64,
    recorder: Recorder | None = None,
    wait: float = 0.5,
) -> ReplayResult:
    """Play ``records`` into ``ports[0]``; take what every port receives until ``wait`` s pass with nothing new.

    Pacing: ``rate`` frames per second, or the file's own gaps divided by
    ``speedup`` (1 for the original timing), or (neither) as fast as the
    ports go, ``batch`` frames at a time.
    """
    frames = [rec.data for rec in records]
    due = schedule(records, rate, speedup)
    meter = LatencyMeter()
    counts = [0] * len(ports)
    sender = ports[0]
    start = monotonic_ns()
    i = 0
    while i < len(frames):
        now = monotonic_ns() - start
        j = i
        while j < len(frames) and j - i < batch and due[j] <= now:
            j += 1
        if j == i:
            gap = (due[i] - now) / 1e9
            if gap > 0.001:
                time.sleep(min(gap, 0.01) - 0.0005)  # coarse sleep, then poll and spin to the due time
        else:
            t_ns = monotonic_ns()
            sender.send_raw(frames[i:j], latency=meter)
            if recorder is not None:
                recorder.sent(0, frames[i:j], t_ns)
            i = j
        _poll(ports, meter, recorder, counts)
    sent_s = (monotonic_ns() - start) / 1e9
    idle_until = time.monotonic() + wait
    while time.monotonic() < idle_until:
        if _poll(ports, meter, recorder, counts):
            idle_until = time.monotonic() + wait
        elif meter.outstanding == 0:
            break  # everything sent came out somewhere
        else:
            time.sleep(0.001)
    return ReplayResult(len(frames), counts, sent_s, meter.histogram, meter.unmatched, meter.outstanding)


def capture(ports: Sequence[BenchPort], recorder: Recorder, seconds: float | None = None, count: int | None = None) -> list[int]:
    """Record what arrives on ``ports`` for ``seconds``, or until ``count`` frames came (whichever is first)."""
    counts = [0] * len(ports)
    deadline = None if seconds is None else time.monotonic() + seconds
    while (deadline is None or time.monotonic() < deadline) and (count is None or sum(counts) < count):
        if not _poll(ports, None, recorder, counts):
            time.sleep(0.001)
    return counts
