"""``benchmarks/devices.py`` runs and ends with its JSON figures (a smoke test: no timings asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def figures(only: str, seconds: str, timeout: int) -> dict:
    """The JSON last line of ``benchmarks/devices.py --only ONLY``, which must exit 0."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "benchmarks/devices.py", "--seconds", seconds, "--only", only],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_vsock_figures_come_out_as_json():
    got = figures("vsock", "0.2", 120)
    assert set(got) == {"vsock_stream_bytes_per_s", "unix_socket_stream_bytes_per_s", "ratio_vsock_vs_unix_socket"}
    assert got["vsock_stream_bytes_per_s"] > 0 and got["unix_socket_stream_bytes_per_s"] > 0
    assert got["ratio_vsock_vs_unix_socket"] > 0


def test_scsi_and_blk_read_figures_come_out_as_json():
    """The read front-end's C polling loop (benchmarks/read_poll.c) checks every block it reads, in both formats."""
    got = figures("scsi", "0.3", 180)
    assert got["scsi_4k_randread_iops"] > 0 and got["blk_4k_randread_iops"] > 0
