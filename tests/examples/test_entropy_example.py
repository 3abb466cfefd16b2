"""docs/devices.md's example device, served over vhost-user to iovirt's own front-end."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from iovirt.vhost_user.driver import VhostUserDriver
from iovirt.vhost_user.messages import ProtocolFeature
from iovirt.vhost_user.server import VhostUserServer

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "entropy_device.py"


def load_example():
    spec = importlib.util.spec_from_file_location("entropy_device", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def counting(n: int) -> bytes:
    """A predictable 'entropy' source, so the test can check every byte."""
    return bytes(i & 0xFF for i in range(n))


@pytest.fixture
def served(tmp_path):
    example = load_example()
    server = VhostUserServer()
    path = str(tmp_path / "rng.sock")
    server.add_socket(path, example.EntropyDevice(source=counting))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield path
    server.stop()
    thread.join(timeout=10)


def test_example_is_under_100_lines():
    assert len(EXAMPLE.read_text().splitlines()) < 100


def test_buffers_come_back_full_of_source_bytes(served):
    with VhostUserDriver(served) as drv:
        assert not drv.protocol_features >> ProtocolFeature.VHOST_USER_PROTOCOL_F_CONFIG & 1  # the adapter's choice
        assert drv.frontend.get_queue_num() == 1
        (queue,) = drv.start_queues([0], size=16).values()
        heads = [queue.add_data([], [16]), queue.add_data([], [40, 24])]
        drv.kick(0)
        assert drv.frontend.wait_call(0, timeout=5)
        used = queue.get_used()
        assert [u.head for u in used] == heads
        assert [(u.len, u.data) for u in used] == [(16, counting(16)), (64, counting(64))]


def test_the_example_runs_as_a_program(tmp_path):
    path = str(tmp_path / "rng.sock")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(EXAMPLE), path], env=env, stderr=subprocess.PIPE)
    try:
        with VhostUserDriver(path, timeout=10) as drv:
            (queue,) = drv.start_queues([0], size=8).values()
            queue.add_data([], [32])
            drv.kick(0)
            assert drv.frontend.wait_call(0, timeout=5)
            (used,) = queue.get_used()
            assert used.len == 32
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err.decode()
