"""``iovirt vhost-user-input`` (with --inject-fifo) and ``iovirt serve --input``/``--rng``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from iovirt.vhost_user.driver import VhostUserDriver
from iovirt.vhost_user.specs import SpecError, load_config, parse_input
from iovirt.virtio.input.commands import run_command
from iovirt.virtio.input.defs import EV_KEY, EV_REL, EV_SYN, EVENT, KEYS, REL_X, REL_Y
from iovirt.virtio.input.device import VirtioInput

ROOT = Path(__file__).resolve().parents[2]


def _start(tmp_path, *args, sockets):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = open(tmp_path / "backend.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "iovirt", *args], env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 15
    while not all(Path(s).exists() for s in sockets):
        assert proc.poll() is None, (tmp_path / "backend.log").read_text()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return proc


def _stop(proc, tmp_path):
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0, (tmp_path / "backend.log").read_text()
    return (tmp_path / "backend.log").read_text()


@pytest.mark.parametrize("program, kind", [("vhost-user-input", "input"), ("vhost-user-rng", "rng")])
def test_print_capabilities(program, kind):
    out = subprocess.run([sys.executable, "-m", "iovirt", program, "--print-capabilities"], check=True,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    assert json.loads(out)["type"] == kind  # vhost-user.json VHostUserBackendType


def test_inject_fifo_commands_reach_the_event_queue(tmp_path):
    sock, fifo = tmp_path / "in.sock", tmp_path / "in.fifo"
    proc = _start(tmp_path, "vhost-user-input", f"--socket-path={sock}", "--kind=mouse", f"--inject-fifo={fifo}",
                  sockets=[sock])
    try:
        with VhostUserDriver(str(sock)) as drv:
            (queue, _status) = drv.start_queues([0, 1], size=64).values()
            for _ in range(8):
                queue.add_data([], [EVENT.size])
            drv.kick(0)
            with open(fifo, "w") as f:
                f.write("press a\nbogus line\nmove 10 -5\n")
            got = []
            deadline = time.monotonic() + 5
            while len(got) < 3 and time.monotonic() < deadline:
                drv.frontend.wait_call(0, timeout=0.1)
                got += queue.get_used()
            assert [EVENT.unpack(u.data) for u in got] == [(EV_REL, REL_X, 10), (EV_REL, REL_Y, -5), (EV_SYN, 0, 0)]
    finally:
        log = _stop(proc, tmp_path)
    assert "'press a'" in log and "'bogus line'" in log and "Traceback" not in log


def test_run_command():
    dev = VirtioInput("keyboard")
    run_command(dev, "press enter")
    run_command(dev, "key 30 1")
    run_command(dev, "# a comment")
    assert dev.pending == 6
    for bad in ("press nosuchkey", "move 1", "touch 1 2", "jump"):
        with pytest.raises(ValueError):
            run_command(dev, bad)


def test_serve_rng_and_input(tmp_path):
    rng_sock, in_sock = tmp_path / "r.sock", tmp_path / "i.sock"
    proc = _start(tmp_path, "serve", "--rng", f"{rng_sock},rate=100000", "--input", f"{in_sock},kind=keyboard",
                  sockets=[rng_sock, in_sock])
    try:
        with VhostUserDriver(str(rng_sock)) as drv:
            (queue,) = drv.start_queues([0], size=16).values()
            queue.add_data([], [64])
            drv.kick(0)
            assert drv.frontend.wait_call(0, timeout=5)
            assert queue.get_used()[0].len == 64
        with VhostUserDriver(str(in_sock)) as drv:
            drv.frontend.set_config(0, bytes([0x11, EV_KEY]))  # EV_BITS of EV_KEY
            cfg = drv.frontend.get_config(0, 136)
            assert cfg[2] > 0 and cfg[8 + KEYS["a"] // 8] >> KEYS["a"] % 8 & 1
    finally:
        _stop(proc, tmp_path)


def test_toml_tables(tmp_path):
    path = tmp_path / "serve.toml"
    path.write_text('[[rng]]\nsocket = "/tmp/r.sock"\nsource = "/dev/hwrng"\nrate = 1000\n'
                    '[[input]]\nsocket = "/tmp/i.sock"\nkind = "tablet"\n')
    settings = load_config(str(path))
    (rng,), (inp,) = settings["rng"], settings["input"]
    assert rng.options == {"source": "/dev/hwrng", "rate": 1000.0}
    assert inp == parse_input("/tmp/i.sock,kind=tablet")
    path.write_text('[[input]]\nsocket = "/tmp/i.sock"\n')
    with pytest.raises(SpecError, match="kind"):
        load_config(str(path))
