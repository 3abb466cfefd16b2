"""``iovirt dump`` from a back-end driven by iovirt's front-end, read back by ``iovirt inspect``."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time

import pytest

from iovirt.cli import main
from iovirt.inspect.dump import DumpOnSignal, dump_session
from iovirt.inspect.elfcore import read_core
from iovirt.vhost_user.driver import VhostUserDriver
from iovirt.vhost_user.server import VhostUserServer
from iovirt.virtio.blk.defs import VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from iovirt.virtio.blk.device import VirtioBlk

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def traffic(drv):
    """Three completed requests on queue 0 and one on queue 1, then two published and not kicked on queue 0."""
    for q, sector in ((0, 0), (0, 8), (0, 16), (1, 0)):
        drv.queues[q].add_data([struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, sector), b"x" * 512], [1])
        drv.kick(q)
        assert drv.frontend.wait_call(q, timeout=5)
        assert drv.queues[q].get_used()
    for sector in (24, 32):  # in flight: the back-end is never told of them
        drv.queues[0].add_data([struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, sector)], [512, 1])
    drv.queues[0].publish()


@pytest.fixture
def served(tmp_path):
    server = VhostUserServer()
    disk = VirtioBlk(str(tmp_path / "disk.img"), size=1 << 20, num_queues=2, label="blk0")
    endpoint = server.add_socket(str(tmp_path / "blk.sock"), disk, name="blk0")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, endpoint, str(tmp_path / "blk.sock")
    server.stop()
    thread.join(timeout=10)
    disk.close()


def test_dump_matches_the_sessions_queues(tmp_path, served, capsys):
    server, endpoint, path = served
    with VhostUserDriver(path, memory_size=4 << 20) as drv:
        drv.start_queues([0, 1], size=32)
        traffic(drv)
        session = endpoint.connection.session
        with session.dataplane.lock:
            states = {i: session.device.queue(i).state() for i in (0, 1)}
        core = dump_session(session, str(tmp_path))
        assert main(["inspect", core, "--json"]) == 0
        rings = {r["index"]: r for r in json.loads(capsys.readouterr().out)["rings"]}
        assert sorted(rings) == [0, 1]
        for i, state in states.items():
            ring = rings[i]
            assert ring["warnings"] == []
            assert (ring["desc_addr"], ring["avail_addr"], ring["used_addr"]) == (
                state.desc_addr, state.avail_addr, state.used_addr)
            assert ring["last_avail_idx"] == state.last_avail_idx
            assert ring["used_idx"] == state.used_idx
            assert ring["avail_idx"] == drv.queues[i].avail_idx
        assert (rings[0]["avail_idx"], rings[0]["used_idx"], rings[0]["last_avail_idx"]) == (5, 3, 3)
        assert [c["popped"] for c in rings[0]["in_flight"]] == [False, False]
        assert [[b[1:] for b in c["buffers"]] for c in rings[0]["in_flight"]] == [[[16, False], [512, True], [1, True]]] * 2
        assert rings[1]["in_flight"] == []
        note = read_core(core)
        try:
            assert note.iovirt_note["device"] == "blk0"
            assert [r["queue"] for r in note.iovirt_note["rings"]] == [0, 1]
        finally:
            note.memory.close()


def test_dump_describes_a_stopped_ring_where_it_stopped(tmp_path, served, capsys):
    """QEMU stops every ring (GET_VRING_BASE) when the VM stops: the note still says where each is."""
    server, endpoint, path = served
    with VhostUserDriver(path, memory_size=4 << 20) as drv:
        drv.start_queues([0, 1], size=32)
        traffic(drv)
        base = drv.frontend.get_vring_base(0)
        session = endpoint.connection.session
        core = dump_session(session, str(tmp_path))
        note = read_core(core)
        try:
            stopped = {r["queue"]: r for r in note.iovirt_note["rings"]}
        finally:
            note.memory.close()
        assert stopped[0]["stopped"] and not stopped[1]["stopped"]
        assert (stopped[0]["last_avail_idx"], stopped[0]["used_idx"]) == (base, 3)
        assert main(["inspect", core, "--json"]) == 0
        ring = {r["index"]: r for r in json.loads(capsys.readouterr().out)["rings"]}[0]
        assert (ring["avail_idx"], ring["used_idx"], ring["last_avail_idx"]) == (5, 3, base)
        assert ring["used_addr"] == drv.queues[0].used_addr


def test_sigusr2_dumps_every_connected_device(tmp_path, served):
    server, _endpoint, path = served
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    hook = DumpOnSignal(server, str(dumps))
    try:
        with VhostUserDriver(path, memory_size=4 << 20) as drv:
            drv.start_queues([0, 1], size=32)
            traffic(drv)
            os.kill(os.getpid(), signal.SIGUSR2)
            wait_until(lambda: any(n.endswith(".json") for n in os.listdir(dumps)))
            (index,) = [n for n in os.listdir(dumps) if n.endswith(".json")]
            cores = json.loads((dumps / index).read_text())["cores"]
            assert len(cores) == 1 and os.path.basename(cores[0]).startswith("blk0-")
            # The device keeps serving after the dump.
            drv.frontend.kick(0)
            wait_until(lambda: drv.queues[0].used_idx() == 5)
    finally:
        hook.close()


def iovirt(*args, **kw):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "iovirt", *args], env=env, capture_output=True, text=True, **kw)


def test_iovirt_dump_a_serving_process(tmp_path):
    sock, dumps = str(tmp_path / "blk.sock"), tmp_path / "dumps"
    dumps.mkdir()
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen(
        [sys.executable, "-m", "iovirt", "serve", "--blk", f"{sock},{tmp_path / 'disk.img'},size=1M,queues=2",
         "--dump-dir", str(dumps)], env=env, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_until(lambda: os.path.exists(sock))
        with VhostUserDriver(sock, memory_size=4 << 20) as drv:
            drv.start_queues([0, 1], size=32)
            traffic(drv)
            done = iovirt("dump", str(proc.pid), "--timeout", "20", timeout=60)
            assert done.returncode == 0, done.stderr
            (core,) = done.stdout.split()
            shown = iovirt("inspect", core, "--json", timeout=60)
            assert shown.returncode == 0, shown.stderr
            rings = {r["index"]: r for r in json.loads(shown.stdout)["rings"]}
            for i in (0, 1):
                queue = drv.queues[i]
                assert rings[i]["avail_idx"] == queue.avail_idx
                assert rings[i]["used_idx"] == queue.used_idx()
                assert (rings[i]["desc_addr"], rings[i]["avail_addr"], rings[i]["used_addr"]) == (
                    queue.desc_addr, queue.avail_addr, queue.used_addr)
                assert rings[i]["warnings"] == []
            assert (rings[0]["last_avail_idx"], len(rings[0]["in_flight"])) == (3, 2)
            text = iovirt("inspect", core, timeout=60).stdout
            assert "blk0 queue 0" in text and "in flight: 2" in text
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert "Traceback" not in proc.stderr.read()


def test_dump_refuses_a_process_without_dump_dir(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        done = iovirt("dump", str(sleeper.pid), "--timeout", "1", timeout=60)
        assert done.returncode == 1 and "--dump-dir" in done.stderr
        assert sleeper.poll() is None  # not signalled: SIGUSR2 would have killed it
    finally:
        sleeper.kill()
        sleeper.wait()


def test_dump_dir_refused_with_isolate(tmp_path):
    done = iovirt("serve", "--blk", f"{tmp_path}/s,{tmp_path}/i", "--isolate", "--dump-dir", str(tmp_path), timeout=60)
    assert done.returncode == 2 and "--dump-dir" in done.stderr
