#!/usr/bin/env python3
"""Frames per second through the packet bench API (iovirt.bench), one run.

Port ``a`` sends batches of frames (``BenchPort.send``: header + frame into
transmit buffers, kick) and port ``b`` takes them back (``BenchPort.recv``:
used buffers joined, reposted, dissected by scapy) through a virtio-net
device pair on one switch, for 64- and 1500-byte Ethernet frames (without
FCS), against:

* the in-process device (everything in this thread), and
* ``iovirt serve --net A --net B`` started as a separate process, driven over
  its vhost-user sockets (memfd memory, eventfd kicks and calls).

The figures are for the bench as a whole: scapy dissection of every received
frame dominates.  The last line is a JSON object of the figures.

    python benchmarks/bench.py [--seconds S] [--batch N]
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

from iovirt.bench.pair import NetPair

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
    parser.add_argument("--batch", type=int, default=32, help="frames per send/recv round (default 32)")
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.python_implementation()} {platform.python_version()}")
    print(f"batches of {args.batch} frames, queue size 256, 2048-byte mergeable receive buffers")
    figures: dict[str, float] = {}
    with NetPair.in_process() as pair:
        for size in SIZES:
            rate = measure(pair, size, args.seconds, args.batch)
            print(f"in-process   {size:5d}-byte frames: {rate:10,.0f} frames/s")
            figures[f"in_process_{size}B_frames_per_s"] = round(rate)
    with tempfile.TemporaryDirectory() as directory:
        proc, paths = served(directory)
        try:
            with NetPair.vhost_user(paths[0], paths[1]) as pair:
                for size in SIZES:
                    rate = measure(pair, size, args.seconds, args.batch)
                    print(f"iovirt serve {size:5d}-byte frames: {rate:10,.0f} frames/s")
                    figures[f"vhost_user_{size}B_frames_per_s"] = round(rate)
        finally:
            proc.terminate()
            proc.wait(10)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
