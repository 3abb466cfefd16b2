#!/usr/bin/env python3
"""Frames per second and per-frame latency through the packet bench API (iovirt.bench), one run.

Port ``a`` sends batches of frames and port ``b`` takes them back through a
virtio-net device pair on one switch, for 64- and 1500-byte Ethernet frames
(without FCS), against:

* the in-process devices (everything in this thread), and
* ``iovirt serve --net A --net B`` started as a separate process, driven over
  its vhost-user sockets (memfd memory, eventfd kicks and calls).

Two paths of the bench, in the same run:

* scapy (``BenchPort.send`` / ``recv``): every received frame dissected by
  scapy, which dominates - keys ``in_process_<size>B_frames_per_s``,
  ``vhost_user_<size>B_frames_per_s``;
* raw (``BenchPort.send_raw`` / ``recv_raw``, iovirt.bench.rawpath; bytes,
  no scapy) - keys ``raw_in_process_<size>B_frames_per_s``,
  ``raw_vhost_user_<size>B_frames_per_s``, and ``raw_vs_scapy_64B_in_process``
  (the ratio of the two in-process 64-byte figures above); in-process also
  per second of this process's CPU time (``raw_in_process_<size>B_frames_per_cpu_s``:
  the devices run in this thread, so this is the rate on a core of its own
  whatever else loads the machine).

Then the latency of 64-byte frames on the raw path, sent one at a time by
default (``--latency-batch``; ingress: the frame made available to the
device; egress: taken from the receiving used ring), as
percentiles in microseconds: ``latency_p50_us``, ``latency_p99_us``,
``latency_p999_us`` (in-process) and ``vhost_user_latency_p50_us`` ... .
The last line is a JSON object of the figures.

    python benchmarks/bench.py [--seconds S] [--batch N] [--latency-batch N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

from scapy.layers.l2 import Ether
from scapy.packet import Raw

from iovirt.bench import rawpath
from iovirt.bench.pair import NetPair
from iovirt.bench.traffic import measure as measure_raw

SIZES = (64, 1500)


def measure(pair: NetPair, size: int, seconds: float, batch: int) -> float:
    """Frames per second sent on ``a`` and received on ``b``."""
    frame = bytes(Ether(src="02:00:00:00:00:0a", dst="02:00:00:00:00:0b", type=0x88B5) / Raw(bytes(size - 14)))
    frames = [frame] * batch
    pair.send(frames)  # warm up: the switch learns, buffers are touched
    pair.recv(batch)
    done = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        pair.send(frames)
        pair.recv(batch)
        done += batch
    return done / (time.perf_counter() - start)


def served(directory: str) -> tuple[subprocess.Popen, list[str]]:
    """``iovirt serve`` with two net sockets, as its own process."""
    paths = [os.path.join(directory, f"net{i}.sock") for i in range(2)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "iovirt", "serve", "--net", paths[0], "--net", paths[1]],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while not all(os.path.exists(p) for p in paths):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("iovirt serve did not come up")
        time.sleep(0.05)
    return proc, paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="measuring time per figure (default 2)")
    parser.add_argument("--batch", type=int, default=256, help="frames per send/recv round (default 256: a full ring)")
    parser.add_argument("--latency-batch", type=int, default=1,
                        help="frames per round while measuring latency (default 1: each frame alone through the device)")
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.python_implementation()} {platform.python_version()}")
    print(f"batches of {args.batch} frames, queue size 256, 2048-byte mergeable receive buffers, "
          f"raw path {rawpath.IMPLEMENTATION}")
    figures: dict[str, float] = {}
    with NetPair.in_process() as pair:
        run_all(pair, "in_process", "in-process  ", args, figures)
    figures["raw_vs_scapy_64B_in_process"] = round(
        figures["raw_in_process_64B_frames_per_s"] / figures["in_process_64B_frames_per_s"], 1
    )
    print(f"raw / scapy, in-process 64-byte frames: {figures['raw_vs_scapy_64B_in_process']:.1f}x")
    with tempfile.TemporaryDirectory() as directory:
        proc, paths = served(directory)
        try:
            with NetPair.vhost_user(paths[0], paths[1]) as pair:
                run_all(pair, "vhost_user", "iovirt serve", args, figures)
        finally:
            proc.terminate()
            proc.wait(10)
    print(json.dumps(figures))


def run_all(pair: NetPair, key: str, label: str, args: argparse.Namespace, figures: dict[str, float]) -> None:
    """The scapy and raw figures of one pair, then the raw path's latency percentiles."""
    for size in SIZES:
        rate = measure(pair, size, args.seconds, args.batch)
        print(f"{label} scapy {size:5d}-byte frames: {rate:12,.0f} frames/s")
        figures[f"{key}_{size}B_frames_per_s"] = round(rate)
    for size in SIZES:
        result = measure_raw(pair.a, pair.b, size, args.seconds, args.batch)
        rate = result.frames_per_s
        print(f"{label} raw   {size:5d}-byte frames: {rate:12,.0f} frames/s", end="")
        figures[f"raw_{key}_{size}B_frames_per_s"] = round(rate)
        if key == "in_process":  # the devices run in this process: its CPU time is all the work
            print(f" ({result.frames_per_cpu_s:,.0f} per CPU-second)", end="")
            figures[f"raw_{key}_{size}B_frames_per_cpu_s"] = round(result.frames_per_cpu_s)
        print()
    timed = measure_raw(pair.a, pair.b, 64, args.seconds, args.latency_batch, latency=True)
    assert timed.latency is not None
    summary = timed.latency.summary_us()
    print(f"{label} raw   latency, 64-byte frames in batches of {args.latency_batch}:")
    print(timed.latency.format())
    prefix = "" if key == "in_process" else f"{key}_"
    for pct in ("p50", "p99", "p999"):
        figures[f"{prefix}latency_{pct}_us"] = round(summary[pct], 1)


if __name__ == "__main__":
    main()
