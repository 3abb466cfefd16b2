"""Data-plane workers (issue 15): devices on several threads, frames crossing through hand-off rings.

``VhostUserServer(workers=N)`` (``iovirt serve --workers N``) gives each
device socket one data-plane thread, round robin.  What is checked here, over
real vhost-user connections driven by iovirt's bench front-end:

- each device is served by its own worker's thread, and keeps it;
- a frame between ports of two workers arrives, in order, through the
  hand-off ring (the switch counts it), not under a shared lock;
- a worker stuck in one device's handler stalls no other worker;
- a device that misbehaves is reset by its worker while the other workers
  go on switching frames.
"""

from __future__ import annotations

import threading
import time

import pytest

from iovirt.bench.pair import DEFAULT_FEATURES, NetPair, ServedNet
from iovirt.vhost_user.driver import VhostUserDriver

from backend_helpers import log_line, wait_until
from test_bad_input_guest import break_ring

SRC = bytes.fromhex("02000000000a")
DST = bytes.fromhex("02000000000b")


def frames(n: int, dst: bytes = DST, src: bytes = SRC) -> list[bytes]:
    """``n`` distinct 64-byte frames (their sequence number in the payload)."""
    return [dst + src + b"\x08\x00" + i.to_bytes(4, "big") + bytes(46) for i in range(n)]


def pair(net: ServedNet, a: int, b: int) -> NetPair:
    return NetPair.vhost_user(net.paths[a], net.paths[b], DEFAULT_FEATURES, switch=net.switch, lock=net.lock)


def exchange(p: NetPair, n: int, timeout: float = 5.0) -> list[bytes]:
    """Send ``n`` frames a -> b in bursts the rings hold; what b received."""
    got: list[bytes] = []
    sent = frames(n)
    for start in range(0, n, 64):
        p.a.send_raw(sent[start : start + 64])
        got += [f.data for f in p.b.recv_raw(min(64, n - start), timeout=timeout)]
    return got


def from_mac(port, src: bytes, n: int, timeout: float = 5.0) -> list[bytes]:
    """The next ``n`` frames from MAC ``src`` that ``port`` receives; frames of other MACs are passed over."""
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        left = deadline - time.monotonic()
        assert left > 0, f"{len(got)} of {n} frames from {src.hex()} arrived"
        got += [f.data for f in port.recv_raw(1, timeout=left) if f.data[6:12] == src]
    return got


def test_devices_get_workers_round_robin_and_keep_them(tmp_path):
    with ServedNet(tmp_path, ports=4, workers=2) as net:
        names = [e.worker.name for e in net.server.endpoints]
        assert names == ["iovirt-worker-0", "iovirt-worker-1", "iovirt-worker-0", "iovirt-worker-1"]
        assert wait_until(lambda: {"iovirt-worker-0", "iovirt-worker-1"} <= {t.name for t in threading.enumerate()})
        # A front-end that reconnects finds its device on the same worker.
        for _ in range(2):
            with pair(net, 0, 1) as p:
                assert exchange(p, 8)
            assert [e.worker.name for e in net.server.endpoints] == names


def test_one_worker_is_the_single_dataplane_thread(tmp_path):
    with ServedNet(tmp_path, ports=2) as net:
        assert [e.worker.name for e in net.server.endpoints] == ["iovirt-dataplane"] * 2
        with pair(net, 0, 1) as p:
            assert exchange(p, 64) == frames(64)
        assert net.switch.handed_off == 0  # one thread: the switch delivers in place


def test_frames_between_two_workers_cross_the_hand_off_ring_in_order(tmp_path):
    with ServedNet(tmp_path, ports=2, workers=2) as net:
        with pair(net, 0, 1) as p:
            assert exchange(p, 1024) == frames(1024)
            # And back: b's worker hands off to a's.
            p.b.send_raw(frames(64, dst=SRC, src=DST))
            assert [f.data for f in p.a.recv_raw(64, timeout=5)] == frames(64, dst=SRC, src=DST)
        assert net.switch.handed_off >= 2
        assert net.switch.handoff_dropped == 0


def test_a_worker_stuck_in_one_device_stalls_no_other_worker(tmp_path, monkeypatch):
    """net0 (worker 0) blocks in its handler for 3 s; net1 -> net3 (both worker 1) flow meanwhile."""
    with ServedNet(tmp_path, ports=4, workers=2) as net:
        armed, stuck = threading.Event(), threading.Event()
        slow = net.devices[0]
        original = slow.process_queue

        def hang_once(index, queue):
            if index == 1 and armed.is_set() and not stuck.is_set():
                stuck.set()
                time.sleep(3.0)  # a handler blocked in a system call (a hung disk, a full socket)
            return original(index, queue)

        monkeypatch.setattr(slow, "process_queue", hang_once)
        with pair(net, 0, 2) as blocked, pair(net, 1, 3) as free:
            armed.set()
            blocked.a.send_raw(frames(4, dst=bytes.fromhex("0200000000cc")))
            assert wait_until(stuck.is_set, 5)
            start = time.monotonic()
            assert exchange(free, 256) == frames(256)
            took = time.monotonic() - start
            assert took < 2.0, f"worker 1 waited {took:.2f} s for worker 0"
            # Worker 0 comes back and serves what it holds.
            assert len(blocked.b.recv_raw(4, timeout=10)) == 4


@pytest.mark.parametrize("how", ["desc-loop", "buffer-outside-memory"])
def test_a_misbehaving_device_is_reset_by_its_worker_while_the_others_go_on(tmp_path, logs, how):
    """net0 (worker 0) breaks its ring; net1 -> net3 (worker 1) and net2 (worker 0) -> net5 (worker 1) go on."""
    with ServedNet(tmp_path, ports=6, workers=2) as net:
        with pair(net, 1, 3) as same, pair(net, 2, 5) as cross:
            with VhostUserDriver(net.paths[0], memory_size=4 << 20) as bad:
                bad.start_queues([0, 1], size=16)
                bad.frontend.set_vring_err(1)
                break_ring(bad, 1, how)
                assert wait_until(lambda: net.devices[0].needs_reset, 5)
                assert "device needs reset" in log_line(logs, "net0: queue 1")
                assert exchange(same, 256) == frames(256)
                assert exchange(cross, 256) == frames(256)
                assert not any(d.needs_reset for d in net.devices[1:])
        # A new front-end on net0 gets a reset device, on the same worker.  (net3's new front-end may first get
        # frames of the floods above that were still on their way when its old one left: the switch holds
        # frames for a port between front-ends.  They are of other MACs, passed over here.)
        mac_a, mac_b = bytes.fromhex("0200000000a0"), bytes.fromhex("0200000000b0")
        with pair(net, 0, 3) as again:
            again.a.send_raw(frames(64, dst=mac_b, src=mac_a))
            assert from_mac(again.b, mac_a, 64) == frames(64, dst=mac_b, src=mac_a)
        assert not net.devices[0].needs_reset
        assert net.server.endpoints[0].worker.name == "iovirt-worker-0"
