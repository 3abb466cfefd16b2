"""Flows crossing between data-plane workers, served in C on both sides (``iovirt/virtio/net/crossing.py``).

Over real vhost-user connections driven by iovirt's bench front-end, with
two workers: ports 0 and 2 on worker 0, ports 1 and 3 on worker 1, so a flow
from port 0 to port 1 crosses.  With the C twin a sending kick job publishes
its batches into the crossing's channel and a receiving kick job writes them
into the port's ring; without it (the workers' Python loop) the switch
pushes and drains the same channel in Python.  Each scenario runs both ways:
what the guests see and what the devices count must be the same.  Rings
broken under crossing jobs, frames the jobs leave to Python, and the
control thread reading counters under traffic: ``test_kick_jobs.py`` (with
two workers).
"""

from __future__ import annotations

import pytest

from iovirt.bench.pair import NetPair, ServedNet
from iovirt.vhost_user import kickloop
from iovirt.virtio.net import crossing as crossing_module

from backend_helpers import wait_until
from test_kick_jobs import counters, learn, pair, runs, send, send_at_once
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


def hellos(p: NetPair, q: NetPair, mac: list[bytes]) -> None:
    """Both pairs' ports say hello (``learn``: p with MACs 0 and 1, q with 2 and 3); the floods are taken."""
    learn(p, mac[0], mac[1])
    for port in (q.a, q.b):  # p's hello was flooded to q's ports as well
        assert len(port.recv_raw(1, timeout=5)) == 1
    learn(q, mac[2], mac[3])
    for port in (p.a, p.b):
        assert len(port.recv_raw(1, timeout=5)) == 1


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


def test_two_flows_cross_each_way_at_once(tmp_path, loop):
    """0 -> 1 and 3 -> 2 at once: each worker sends one flow and receives the other."""
    with ServedNet(tmp_path, ports=4, workers=2) as net:
        with pair(net, 0, 1) as p, pair(net, 3, 2) as q:
            mac = [bytes.fromhex(f"020000000a{i:02x}") for i in range(4)]
            hellos(p, q, mac)
            flows = {0: frames(4096, dst=mac[1], src=mac[0]), 1: frames(4096, dst=mac[3], src=mac[2])}
            results = send_at_once({0: (p, flows[0]), 1: (q, flows[1])})
        for i in (0, 1):
            assert results.get(i) == flows[i], i
        stats = counters(net)
        assert [s["device"]["tx_packets"] for s in stats] == [4096, 1, 1, 4096]
        assert net.switch.handoff_dropped == 0


def test_a_receiver_that_stops_reading_holds_up_no_one(tmp_path, monkeypatch, loop):
    """Port 1 posts 8 buffers and reads no more: its channel fills, the sending job waits a moment, then the
    switch holds or drops (counted); the flow from port 2 to port 3, crossing the same way, goes on; port 0
    is not reset; when port 1 reads again it gets frames."""
    monkeypatch.setattr(crossing_module, "CHANNEL_SLOTS", 4)
    mac = [bytes.fromhex(f"020000000d{i:02x}") for i in range(4)]
    with ServedNet(tmp_path, ports=4, workers=2) as net:
        with pair(net, 0, 1, b={"queue_size": 256, "rx_buffers": 8}) as p, pair(net, 2, 3) as q:
            hellos(p, q, mac)
            for _ in range(8):
                p.a.send_raw(frames(256, dst=mac[1], src=mac[0]))
            assert wait_until(lambda: counters(net)[0]["device"]["tx_packets"] == 8 * 256, 10)
            assert send(q, frames(512, dst=mac[3], src=mac[2])) == frames(512, dst=mac[3], src=mac[2])
            stats = counters(net)[1]["device"]
            assert stats.get("rx_dropped", 0) + net.switch.handoff_dropped > 0  # what did not fit: dropped, counted
            assert len(p.b.recv_raw(8, timeout=5)) == 8
        assert not any(d.needs_reset for d in net.devices)


def test_a_port_detached_takes_its_crossings_with_it(tmp_path, loop):
    """Removing a port (under every worker's lock, as ``iovirt ctl remove`` does) closes the crossings to it and
    stops both workers watching their bells; the other ports go on crossing."""
    mac = [bytes.fromhex(f"020000000e{i:02x}") for i in range(4)]
    with ServedNet(tmp_path, ports=4, workers=2) as net:
        with pair(net, 0, 1) as p, pair(net, 2, 3) as q:
            hellos(p, q, mac)
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
