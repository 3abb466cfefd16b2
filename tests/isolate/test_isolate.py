"""``iovirt serve --isolate``: each device in its own worker process, restarted by the supervisor.

Real processes, real sockets: two net workers joined by the supervisor's
switch and one blk worker, driven by iovirt's vhost-user front-end.  A worker
that is SIGKILLed, or SIGSTOPped (hung: no heartbeat), is replaced on the
same socket while the others keep serving; SIGTERM stops everything within
2 s with status 0.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from isolate_helpers import (
    BROADCAST, Supervised, alive, blk_port, blk_roundtrip, eth, net_port, receive, send, wait_until,
)

MAC = [bytes([0x02, 0, 0, 0, 0, 0xA0 + i]) for i in range(2)]


def cross_switch(a, b) -> None:
    """A broadcast from ``a`` reaches ``b``; the unicast answer, switched on the learned MAC, reaches ``a``."""
    hello = eth(BROADCAST, MAC[0])
    send(a, hello)
    assert receive(b) == hello
    reply = eth(MAC[0], MAC[1], b"reply".ljust(50, b"\0"))
    send(b, reply)
    assert receive(a) == reply


def test_frames_cross_the_switch_between_workers_and_blk_works(served):
    pids = served.pids()
    assert len(set(pids.values())) == 3 and os.getpid() not in pids.values()
    with net_port(served.net_paths[0]) as a, net_port(served.net_paths[1]) as b:
        cross_switch(a, b)
    with blk_port(served.blk_path) as drv:
        data = os.urandom(4096)
        blk_roundtrip(drv, 8, data)
    assert served.image.read_bytes()[8 * 512 : 8 * 512 + 4096] == data
    assert "Traceback" not in served.log()


def test_a_killed_worker_is_restarted_while_the_others_serve(served):
    old = served.pids()["net0"]
    with blk_port(served.blk_path) as disk, net_port(served.net_paths[1]) as b:
        blk_roundtrip(disk, 1, b"before".ljust(512, b"\0"))
        os.kill(old, signal.SIGKILL)
        # Meanwhile the blk worker and the other net worker go on serving their connections.
        blk_roundtrip(disk, 2, b"during".ljust(512, b"\0"))
        new = served.wait_new_worker("net0", old)
        blk_roundtrip(disk, 3, b"after".ljust(512, b"\0"))
        assert "net0" in served.log() and f"worker pid {old} killed by signal 9" in served.log()
        # The restarted worker serves its socket again and its port joined the switch again.
        with net_port(served.net_paths[0]) as a:
            cross_switch(a, b)
    assert not alive(old) and alive(new)
    assert "Traceback" not in served.log()


def test_a_hung_worker_is_detected_and_restarted(served):
    old = served.pids()["blk0"]
    start = time.monotonic()
    os.kill(old, signal.SIGSTOP)
    try:
        new = served.wait_new_worker("blk0", old, timeout=20)
    finally:
        if alive(old):
            os.kill(old, signal.SIGCONT)
    assert time.monotonic() - start < 10
    assert f"worker pid {old} missed its heartbeat" in served.log()
    with blk_port(served.blk_path) as drv:
        blk_roundtrip(drv, 4, os.urandom(1024))
    assert alive(new) and wait_until(lambda: not alive(old))
    with net_port(served.net_paths[0]) as a, net_port(served.net_paths[1]) as b:
        cross_switch(a, b)


def test_sigterm_stops_every_worker_within_2_s(served):
    pids = list(served.pids().values())
    with net_port(served.net_paths[0]):
        os.kill(served.pids()["blk0"], signal.SIGSTOP)  # even a hung worker does not hold the shutdown up
        code, took = served.stop()
    assert code == 0, served.log()
    assert took < 2.0, took
    assert not any(alive(pid) for pid in pids)
    assert not any(os.path.exists(p) for p in [*served.net_paths, served.blk_path])
    assert "Traceback" not in served.log()


def test_a_device_that_cannot_start_fails_the_command(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "iovirt", "serve", "--isolate", "--net", str(tmp_path / "n.sock"),
         "--blk", f"{tmp_path / 'b.sock'},/nonexistent/dir/disk.img"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 1
    assert "No such file" in out.stderr and "blk0" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "n.sock").exists()


def test_workers_do_not_outlive_a_killed_supervisor(served):
    pids = list(served.pids().values())
    served.proc.kill()
    served.proc.wait()
    # Their heartbeat sockets reach end of file: each worker stops by itself and removes its socket.
    assert wait_until(lambda: not any(alive(pid) for pid in pids), 10)
    assert not any(os.path.exists(p) for p in [*served.net_paths, served.blk_path])


def test_workers_keep_the_commands_access_policy(tmp_path):
    """Isolation adds to the access rules, never replaces them: each worker's socket has the command's mode."""
    served = Supervised(tmp_path, ("--socket-mode", "0640"))
    try:
        for path in served.net_paths + [served.blk_path]:
            assert os.stat(path).st_mode & 0o777 == 0o640, path
    finally:
        assert served.stop()[0] == 0


def test_sandboxed_workers_serve(tmp_path):
    """``--isolate --sandbox``: the filter goes into each worker (the supervisor must start processes)."""
    served = Supervised(tmp_path, ("--sandbox",))
    try:
        with net_port(served.net_paths[0]) as a, net_port(served.net_paths[1]) as b:
            cross_switch(a, b)
        with blk_port(served.blk_path) as drv:
            blk_roundtrip(drv, 8, os.urandom(4096))
        assert "restart" not in served.log() and "Traceback" not in served.log(), served.log()
    finally:
        assert served.stop()[0] == 0
