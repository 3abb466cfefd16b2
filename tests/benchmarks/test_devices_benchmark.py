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
