#!/usr/bin/env python3
"""Control-socket latency under load: ``stats`` request round trips while a 64 B sink runs at full rate.

``iovirt serve --net SOCK --control CTL`` on core 0; an iovirt front-end
process on core 1 transmits 64-byte frames into the switch as fast as the
back-end takes them (the sink of ``benchmarks/vhost_user.py``); this
process sends ``stats`` requests one after another on one connection (and
a new connection every 100th) and records each round trip.  The same is
measured with the data plane idle, for reference.  The last output line is
one JSON object of the figures (milliseconds).

    python benchmarks/control.py [--seconds S]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import signal
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from vhost_common import serve_iovirt, stop_process, wait_socket  # noqa: E402
from vhost_user import _net_tx_frontend  # noqa: E402


def _latencies(control: Path, seconds: float) -> list[float]:
    """Round trips of ``stats`` requests (seconds) for ``seconds``."""
    samples: list[float] = []
    end = time.monotonic() + seconds
    sock = None
    while time.monotonic() < end:
        if sock is None or len(samples) % 100 == 0:
            if sock is not None:
                sock.close()
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(str(control))
            stream = sock.makefile("rb")
        start = time.perf_counter()
        sock.sendall(b'{"command": "stats"}\n')
        reply = stream.readline()
        samples.append(time.perf_counter() - start)
        if b'"return"' not in reply:
            raise RuntimeError(f"bad reply {reply[:200]!r}")
        time.sleep(0.002)  # a client polling hard, not a flood
    if sock is not None:
        sock.close()
    return samples


def _percentiles(samples: list[float]) -> tuple[float, float, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return statistics.median(ordered) * 1e3, p99 * 1e3, ordered[-1] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measuring time per figure (default 5)")
    args = parser.parse_args()
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="iovirt-bench-ctl-") as tmp_name:
        tmp = Path(tmp_name)
        sock, control = tmp / "net.sock", tmp / "control.sock"
        backend = serve_iovirt(["--net", str(sock), "--control", str(control)], tmp / "iovirt.log")
        wait_socket(sock, backend)
        wait_socket(control, backend)
        try:
            idle = _percentiles(_latencies(control, min(args.seconds, 2.0)))
            ctx = mp.get_context("spawn")
            out = ctx.Queue()
            load = ctx.Process(target=_net_tx_frontend, args=(str(sock), args.seconds + 2, out, False))
            load.start()
            time.sleep(1.5)  # the front-end is connected and transmitting
            busy_samples = _latencies(control, args.seconds)
            rate = out.get(timeout=args.seconds + 60)
            load.join(10)
        finally:
            stop_process(backend, signal.SIGTERM)
    busy = _percentiles(busy_samples)
    print(f"control 'stats' round trip, data plane idle: p50 {idle[0]:.2f} ms, p99 {idle[1]:.2f} ms")
    print(f"control 'stats' round trip under a 64 B sink at {rate:,.0f} frames/s: p50 {busy[0]:.2f} ms, "
          f"p99 {busy[1]:.2f} ms, max {busy[2]:.2f} ms ({len(busy_samples)} requests)")
    figures.update({
        "control_stats_p50_ms_idle": idle[0], "control_stats_p99_ms_idle": idle[1],
        "control_stats_p50_ms_loaded": busy[0], "control_stats_p99_ms_loaded": busy[1],
        "control_stats_max_ms_loaded": busy[2], "load_net_64B_frames_per_s": rate,
    })
    print(json.dumps({k: round(v, 3) for k, v in figures.items()}))


if __name__ == "__main__":
    main()
