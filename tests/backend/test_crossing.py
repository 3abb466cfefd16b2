"""Flows crossing between data-plane workers, served in C on both sides (``iovirt/virtio/net/crossing.py``).

Over real vhost-user connections driven by iovirt's bench front-end, with
two workers: ports 0 and 2 on worker 0, ports 1 and 3 on worker 1, so a flow
from port 0 to port 1 crosses.  With the C twin a sending kick job publishes
its batches into the crossing's channel and a receiving kick job writes them
into the port's ring; without it (the workers' Python loop) the switch
pushes and drains the same channel in Python.  Each scenario runs both ways:
what the guests see and what the devices count must be the same.
"""

from __future__ import annotations

import threading

import pytest

from iovirt.bench.pair import DEFAULT_FEATURES, ServedNet
from iovirt.vhost_user import kickloop
from iovirt.vhost_user.driver import VhostUserDriver
from iovirt.virtio.net import crossing as crossing_module

from backend_helpers import wait_until
from test_bad_input_guest import break_ring
from test_kick_jobs import HDR, counters, learn, pair, runs, send
from test_workers import frames

pytestmark = pytest.mark.skipif(kickloop.accel is None, reason="a crossing's channel is the C twin's")


@pytest.fixture(params=["c", "python"])
def loop(request, monkeypatch):
    """Which loop serves the kicks: the workers' C loops, or (without them) their Python loops."""
    if request.param == "python":
        monkeypatch.setattr(kickloop, "accel", None)
    return request.param


def crossings(net: ServedNet) -> list:
    return list(net.switch._crossings.values())


def test_a_flow_crossing_workers_arrives_in_order_and_counted_either_way(tmp_path, loop):
    with ServedNet(tmp_path, ports=2, workers=2) as net:
        with pair(net, 0, 1) as p:
            learn(p)
            assert send(p, frames(8192)) == frames(8192)
        stats = counters(net)
        assert stats[0]["device"]["tx_packets"] == stats[1]["device"]["rx_packets"] == 8192
        assert stats[0]["device"]["tx_bytes"] == stats[1]["device"]["rx_bytes"] == 8192 * 64
        assert stats[1]["queues"][0]["frames"] == 8192
        assert len(crossings(net)) == 2  # one each way (b's hello crossed too)
        assert net.switch.handed_off >= 8192 // 64 and net.switch.handoff_dropped == 0
        workers = net.server.dataplane.workers
        if loop == "c":  # both sides of the flow ran in C
            assert all(w._lanes.loop.runs > 0 for w in workers)
        else:
            assert runs(net) == 0


def test_frames_a_crossing_job_leaves_to_python_keep_their_order(tmp_path, loop):
    """A broadcast in the middle of the flow (switched by Python, through the same channel), and a receiver with
    fewer buffers than a burst (the receiving job waits, then its port's backlog holds the rest)."""
    broadcast = b"\xff" * 6 + frames(1)[0][6:12] + b"\x08\x00" + b"broadcast" + bytes(41)
    with ServedNet(tmp_path, ports=2, workers=2) as net:
        with pair(net, 0, 1, b={"rx_buffers": 16}) as p:
            learn(p)
            sent = frames(32) + [broadcast] + frames(200)[32:]
            got = send(p, sent, burst=100)
            # The switch delivers a batch per destination: the broadcast may come after the flow's frames.
            assert [f for f in got if f != broadcast] == frames(200) and got.count(broadcast) == 1
            assert send(p, frames(1024), burst=128) == frames(1024)
        stats = counters(net)
        assert stats[0]["device"]["tx_packets"] == stats[1]["device"]["rx_packets"] == 201 + 1024
        assert stats[1]["device"].get("rx_dropped", 0) == 0


def test_two_flows_cross_each_way_at_once(tmp_path, loop):
    """0 -> 1 and 3 -> 2 at once: each worker sends one flow and receives the other."""
    with ServedNet(tmp_path, ports=4, workers=2) as net:
        results: dict[int, list[bytes]] = {}
        with pair(net, 0, 1) as p, pair(net, 3, 2) as q:
            mac_p = (bytes.fromhex("020000000a01"), bytes.fromhex("020000000a02"))
            mac_q = (bytes.fromhex("020000000b01"), bytes.fromhex("020000000b02"))
            learn(p, *mac_p)
            for port in (q.a, q.b):  # p's hello was flooded to ports 2 and 3 as well
                assert len(port.recv_raw(1, timeout=5)) == 1
            learn(q, *mac_q)
            for port in (p.a, p.b):  # and q's to ports 0 and 1
                assert len(port.recv_raw(1, timeout=5)) == 1
            flows = {0: frames(4096, dst=mac_p[1], src=mac_p[0]), 1: frames(4096, dst=mac_q[1], src=mac_q[0])}

            def run(index: int, link) -> None:
                results[index] = send(link, flows[index])

            threads = [threading.Thread(target=run, args=(i, link)) for i, link in ((0, p), (1, q))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=60)
        for i in (0, 1):
            assert results.get(i) == flows[i], i
        stats = counters(net)
        assert [s["device"]["tx_packets"] for s in stats] == [4096, 1, 1, 4096]
        assert net.switch.handoff_dropped == 0


def test_the_control_thread_reads_whole_counters_while_a_flow_crosses(tmp_path, loop):
    with ServedNet(tmp_path, ports=2, workers=2) as net:
        with pair(net, 0, 1) as p:
            learn(p)
            done = threading.Event()
            seen: list[tuple[int, int]] = []

            def watch() -> None:
                while not done.is_set():
                    with net.lock:
                        seen.append((net.devices[0].stats["tx_packets"], net.devices[1].stats["rx_packets"]))

            watcher = threading.Thread(target=watch)
            watcher.start()
            try:
                assert send(p, frames(8192)) == frames(8192)
            finally:
                done.set()
                watcher.join(timeout=10)
        assert seen == sorted(seen) and len(seen) > 1
        # Under every worker's lock no frame is between the counts: what was received was sent.
        assert all(rx - 1 <= tx for tx, rx in seen)
        assert counters(net)[1]["device"]["rx_packets"] == 8192


def test_a_receiver_that_stops_reading_holds_up_no_one(tmp_path, monkeypatch, loop):
    """Port 1 posts 8 buffers and reads no more: its channel fills, the sending job waits a moment, then the
    switch holds or drops (counted); the flow from port 2 to port 3, crossing the same way, goes on; port 0
    is not reset; when port 1 reads again it gets frames."""
    monkeypatch.setattr(crossing_module, "CHANNEL_SLOTS", 4)
    mac = [bytes.fromhex(f"020000000d{i:02x}") for i in range(4)]
    with ServedNet(tmp_path, ports=4, workers=2) as net:
        with pair(net, 0, 1, b={"queue_size": 256, "rx_buffers": 8}) as p, pair(net, 2, 3) as q:
            learn(p, mac[0], mac[1])
            for port in (q.a, q.b):
                assert len(port.recv_raw(1, timeout=5)) == 1
            learn(q, mac[2], mac[3])
            for port in (p.a, p.b):
                assert len(port.recv_raw(1, timeout=5)) == 1
            for _ in range(8):
                p.a.send_raw(frames(256, dst=mac[1], src=mac[0]))
            assert wait_until(lambda: counters(net)[0]["device"]["tx_packets"] == 8 * 256, 10)
            assert send(q, frames(512, dst=mac[3], src=mac[2])) == frames(512, dst=mac[3], src=mac[2])
            stats = counters(net)[1]["device"]
            assert stats.get("rx_dropped", 0) + net.switch.handoff_dropped > 0  # what did not fit: dropped, counted
            assert len(p.b.recv_raw(8, timeout=5)) == 8
        assert not any(d.needs_reset for d in net.devices)


@pytest.mark.parametrize("broken, how", [("sender", "avail-idx-jump"), ("sender", "desc-loop"),
                                         ("receiver", "avail-idx-jump")])
def test_a_ring_broken_under_a_crossing_job_fails_its_device_only(tmp_path, logs, loop, broken, how):
    """Port 0 (worker 0) sends to port 1 (worker 1), then one of those rings breaks: that device needs a reset;
    the other keeps working, and so does the flow from port 2 (worker 0) to port 3 (worker 1)."""
    a_mac, b_mac = bytes.fromhex("020000000301"), bytes.fromhex("020000000302")
    with ServedNet(tmp_path, ports=4, workers=2) as net:
        with VhostUserDriver(net.paths[0], features=DEFAULT_FEATURES, memory_size=4 << 20) as a, \
                VhostUserDriver(net.paths[1], features=DEFAULT_FEATURES, memory_size=4 << 20) as b, \
                pair(net, 2, 3) as other:
            a.start_queues([0, 1], size=64)
            b.start_queues([0, 1], size=64)
            for drv in (a, b):
                drv.frontend.set_vring_err(0)
                drv.frontend.set_vring_err(1)
            for _ in range(64):
                b.queues[0].add_data([], [2048])
            b.kick(0)
            hello = frames(1, dst=a_mac, src=b_mac)
            b.queues[1].add_data([HDR + hello[0]])  # b's MAC learned; flooded to the other ports too
            b.kick(1)
            for port in (other.a, other.b):
                assert [f.data for f in port.recv_raw(1, timeout=5)] == hello
            learn(other)
            received = []
            for round_ in range(8):  # the flow, in rounds: crossing jobs carry it from the second on
                for frame in frames(4, dst=b_mac, src=a_mac):
                    a.queues[1].add_data([HDR + frame])
                a.kick(1)
                assert wait_until(lambda: received.extend(b.queues[0].get_used()) or len(received) >= 4 * (round_ + 1) + 1, 5)
                a.queues[1].get_used()
            if loop == "c":
                assert all(w._lanes.loop.runs > 0 for w in net.server.dataplane.workers)
            bad, index = (a, 1) if broken == "sender" else (b, 0)
            if how == "avail-idx-jump":
                queue = bad.queues[index]
                queue.set_avail_idx(queue.avail_idx + queue.size + 5)
                bad.frontend.kick(index)
            else:
                break_ring(bad, index, how)
            if broken == "receiver":  # a frame for it makes its ring be looked at
                a.queues[1].add_data([HDR + frames(1, dst=b_mac, src=a_mac)[0]])
                a.kick(1)
            failed = net.devices[0 if broken == "sender" else 1]
            assert wait_until(lambda: failed.needs_reset, 5)
            assert "device needs reset" in logs.text
            assert send(other, frames(1024)) == frames(1024)
            assert [d.needs_reset for d in net.devices] == [broken == "sender", broken == "receiver", False, False]


def test_a_port_detached_takes_its_crossings_with_it(tmp_path, loop):
    """Removing a port (under every worker's lock, as ``iovirt ctl remove`` does) closes the crossings to it and
    stops both workers watching their bells; the other ports go on crossing."""
    mac = [bytes.fromhex(f"020000000e{i:02x}") for i in range(4)]
    with ServedNet(tmp_path, ports=4, workers=2) as net:
        with pair(net, 0, 1) as p, pair(net, 2, 3) as q:
            learn(p, mac[0], mac[1])
            for port in (q.a, q.b):
                assert len(port.recv_raw(1, timeout=5)) == 1
            learn(q, mac[2], mac[3])
            for port in (p.a, p.b):
                assert len(port.recv_raw(1, timeout=5)) == 1
            assert send(p, frames(256, dst=mac[1], src=mac[0])) == frames(256, dst=mac[1], src=mac[0])
            gone = net.devices[1]
            bells = [(c.doorbell.eventfd, c.space.eventfd) for c in crossings(net) if c.port is gone]
            assert bells
            with net.server.dataplane.lock:
                net.switch.detach(gone)
            assert all(c.port is not gone for c in crossings(net))
            for worker in net.server.dataplane.workers:
                for doorbell, space in bells:
                    assert doorbell not in worker._handlers and space not in worker._handlers
            assert send(q, frames(512, dst=mac[3], src=mac[2])) == frames(512, dst=mac[3], src=mac[2])
            p.a.send_raw(frames(64, dst=mac[1], src=mac[0]))  # to a port no longer on the switch: flooded to 2, 3
            for port in (q.a, q.b):
                assert len(port.recv_raw(64, timeout=5)) == 64
