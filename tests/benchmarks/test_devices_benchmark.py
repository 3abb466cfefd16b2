"""``benchmarks/devices.py`` runs and ends with its JSON figures (a smoke test: no timings asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_vsock_figures_come_out_as_json():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "benchmarks/devices.py", "--seconds", "0.2", "--only", "vsock"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(figures) == {"vsock_stream_bytes_per_s", "unix_socket_stream_bytes_per_s", "ratio_vsock_vs_unix_socket"}
    assert figures["vsock_stream_bytes_per_s"] > 0 and figures["unix_socket_stream_bytes_per_s"] > 0
    assert figures["ratio_vsock_vs_unix_socket"] > 0


def test_scsi_and_blk_read_figures_come_out_as_json():
    """The read front-end's C polling loop (benchmarks/read_poll.c) checks every block it reads, in both formats."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "benchmarks/devices.py", "--seconds", "0.3", "--only", "scsi"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["scsi_4k_randread_iops"] > 0 and figures["blk_4k_randread_iops"] > 0
