"""``iovirt serve --workers N`` as a program (issue 15): the option, its errors, and devices on their workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from iovirt.bench.pair import DEFAULT_FEATURES, NetPair
from iovirt.serve_process import ServeProcess
from iovirt.vhost_user import kickloop
from iovirt.vhost_user.workers import DEFAULT_WORKERS

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "control"))
from control_helpers import ok  # noqa: E402

IOVIRT = [sys.executable, "-m", "iovirt"]


def test_help_explains_workers():
    out = subprocess.run([*IOVIRT, "serve", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    text = " ".join(out.stdout.split()).replace("lock- free", "lock-free")  # argparse wraps at the hyphen
    assert "--workers N" in text and f"(default: one per core, here {DEFAULT_WORKERS}; 1 without the C extensions)" \
        in text and "lock-free channel" in text


@pytest.mark.parametrize("value,why", [
    ("0", "--workers wants 1 to 64 threads, got '0'"),
    ("-2", "--workers wants 1 to 64 threads, got '-2'"),
    ("65", "--workers wants 1 to 64 threads, got '65'"),
    ("two", "--workers wants a whole number of threads, got 'two'"),
])
def test_bad_worker_counts_exit_2(tmp_path, value, why):
    out = subprocess.run([*IOVIRT, "serve", "--workers", value, "--net", str(tmp_path / "n.sock")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert why in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "n.sock").exists()


def test_isolate_refuses_workers(tmp_path):
    out = subprocess.run([*IOVIRT, "serve", "--isolate", "--workers", "2", "--net", str(tmp_path / "n.sock")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "--isolate does not take --workers" in out.stderr


def test_default_is_one_worker_per_core(tmp_path):
    cores = len(os.sched_getaffinity(0))
    assert DEFAULT_WORKERS == (min(cores, 64) if kickloop.accel is not None else 1)
    nets = [tmp_path / f"n{i}.sock" for i in range(3)]
    control = tmp_path / "ctl.sock"
    args = [*[a for n in nets for a in ("--net", str(n))], "--control", str(control)]
    proc = ServeProcess(args, tmp_path / "serve.log", [*nets, control]).start()
    try:
        workers = [d["worker"] for d in ok(str(control), "devices")]
        if DEFAULT_WORKERS == 1:
            assert "data plane: 1 worker thread" in proc.log()
            assert workers == ["iovirt-dataplane"] * 3
        else:
            assert f"data plane: {DEFAULT_WORKERS} worker threads" in proc.log()
            assert workers == [f"iovirt-worker-{i % DEFAULT_WORKERS}" for i in range(3)]
    finally:
        assert proc.stop(signal.SIGTERM) == 0, proc.log()


def test_ports_on_two_workers_switch_frames_and_say_where_they_run(tmp_path):
    nets = [tmp_path / f"n{i}.sock" for i in range(3)]
    control = tmp_path / "ctl.sock"
    args = ["--workers", "2", *[a for n in nets for a in ("--net", str(n))], "--control", str(control)]
    proc = ServeProcess(args, tmp_path / "serve.log", [*nets, control]).start()
    try:
        devices = ok(str(control), "devices")
        assert [(d["name"], d["worker"]) for d in devices] == [
            ("net0", "iovirt-worker-0"), ("net1", "iovirt-worker-1"), ("net2", "iovirt-worker-0")]
        sent = [bytes.fromhex("02000000000b02000000000a0800") + i.to_bytes(4, "big") + bytes(46) for i in range(200)]
        with NetPair.vhost_user(str(nets[0]), str(nets[1]), DEFAULT_FEATURES) as pair:
            got = []
            for start in range(0, len(sent), 50):
                pair.a.send_raw(sent[start : start + 50])
                got += [f.data for f in pair.b.recv_raw(50, timeout=10)]
        assert got == sent
        switch = ok(str(control), "stats")["switch"]
        assert switch["handed_off"] > 0 and switch["handoff_dropped"] == 0
    finally:
        assert proc.stop(signal.SIGTERM) == 0, proc.log()
    assert "Traceback" not in proc.log()
