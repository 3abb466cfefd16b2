"""Kick jobs: a worker's kicks served in C, without the interpreter (``iovirt/vhost_user/kickloop.py``).

Over real vhost-user connections driven by iovirt's bench front-end: a flow
between two ports of one worker is forwarded by the worker's C loop, and
what the guests see (frames, their order) and what the devices count are
the same as with the worker's Python loop, which serves every kick when
the C twin is absent.  Each scenario runs both ways and compares.
"""

from __future__ import annotations

import threading

import pytest

from iovirt.bench.pair import DEFAULT_FEATURES, NetPair, ServedNet
from iovirt.vhost_user import kickloop
from iovirt.vhost_user.driver import VhostUserDriver

from backend_helpers import wait_until
from test_bad_input_guest import break_ring
from test_workers import DST, SRC, frames

pytestmark = pytest.mark.skipif(kickloop.accel is None, reason="the kick loop is the C twin's")

# Counters that depend on when the threads ran (how many kicks and notifications a burst took), not on what moved.
TIMING = {"kicks", "calls", "notifications", "interrupts"}


@pytest.fixture(params=["c", "python"])
def loop(request, monkeypatch):
    """Which loop serves the kicks: the C one, or (without it) the worker's Python loop."""
    if request.param == "python":
        monkeypatch.setattr(kickloop, "accel", None)
    return request.param


def pair(net: ServedNet, first: int, second: int, **options) -> NetPair:
    return NetPair.vhost_user(net.paths[first], net.paths[second], DEFAULT_FEATURES, switch=net.switch,
                              lock=net.lock, **options)


def learn(p: NetPair, src: bytes = SRC, dst: bytes = DST) -> None:
    """b says hello to a: the switch learns b's MAC, so a's frames to it are one flow to one port."""
    p.b.send_raw(frames(1, dst=src, src=dst))
    assert [f.data for f in p.a.recv_raw(1, timeout=5)] == frames(1, dst=src, src=dst)


def send(p: NetPair, sent: list[bytes], burst: int = 64) -> list[bytes]:
    got: list[bytes] = []
    for start in range(0, len(sent), burst):
        p.a.send_raw(sent[start : start + burst])
        got += [f.data for f in p.b.recv_raw(min(burst, len(sent) - start), timeout=5)]
    return got


def send_at_once(flows: dict[int, tuple[NetPair, list[bytes]]]) -> dict[int, list[bytes]]:
    """Each flow sent over its link (:func:`send`), all at once, a thread each; what each receiver got, by key."""
    results: dict[int, list[bytes]] = {}

    def run(key: int, link: NetPair, sent: list[bytes]) -> None:
        results[key] = send(link, sent)

    threads = [threading.Thread(target=run, args=(key, link, sent)) for key, (link, sent) in flows.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def runs(net: ServedNet) -> int:
    """Job runs the C loops of the server's workers did."""
    return sum(w._lanes.loop.runs for w in net.server.dataplane.workers if w._lanes is not None)


def counters(net: ServedNet) -> list[dict]:
    """Every device's counters and per-queue counters, read as the control thread does (under the lock)."""
    with net.lock:
        return [
            {"device": dict(d.stats), "queues": [{k: v for k, v in q.items() if k not in TIMING} for q in d.queue_stats]}
            for d in net.devices
        ]


def test_a_flow_between_two_ports_arrives_in_order_and_counted_either_way(tmp_path, loop):
    with ServedNet(tmp_path, ports=2) as net:
        with pair(net, 0, 1) as p:
            learn(p)
            assert send(p, frames(4096)) == frames(4096)
        stats = counters(net)
        assert stats[0]["device"]["tx_packets"] == 4096 and stats[1]["device"]["rx_packets"] == 4096
        assert stats[0]["device"]["tx_bytes"] == stats[1]["device"]["rx_bytes"] == 4096 * 64
        assert stats[0]["queues"][1]["frames"] == 4096 and stats[1]["queues"][0]["frames"] == 4096
        # Every kick of a's transmit ring is counted, whoever served it.
        with net.lock:
            assert net.devices[0].queue_stats[1]["kicks"] >= 1
        assert (runs(net) > 0) == (loop == "c")
        assert net.switch.forwarded >= 4096 // 64


@pytest.mark.parametrize("workers", [1, 2])
def test_frames_the_job_leaves_to_python_keep_their_order(tmp_path, loop, workers):
    """A broadcast in the middle of the flow (another flow: switched by Python), and a receiver with fewer
    buffers than a burst (its backlog holds the rest): every frame arrives once, in order.  With two workers
    the flow crosses (``iovirt/virtio/net/crossing.py``): the broadcast goes through the same channel, and
    the receiving job waits for buffers, then leaves the rest to its port's backlog."""
    broadcast = b"\xff" * 6 + SRC + b"\x08\x00" + b"broadcast" + bytes(41)
    with ServedNet(tmp_path, ports=2, workers=workers) as net:
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


def test_two_workers_forward_their_own_flows_side_by_side(tmp_path, loop):
    """Ports 0 and 2 on worker 0, 1 and 3 on worker 1: each flow stays on its worker (no hand-off)."""
    with ServedNet(tmp_path, ports=4, workers=2) as net:
        mac = [bytes.fromhex(f"0200000001{i:02x}") for i in range(4)]
        with pair(net, 0, 2) as p, pair(net, 1, 3) as q:
            # Every port says hello: the first of each pair to an unknown MAC (flooded to every other port),
            # the second back to it (known by then); every port takes what reached it.
            ports = {0: p.a, 2: p.b, 1: q.a, 3: q.b}
            for sender, dst, receivers in ((0, 2, (1, 2, 3)), (2, 0, (0,)), (1, 3, (0, 2, 3)), (3, 1, (1,))):
                ports[sender].send_raw(frames(1, dst=mac[dst], src=mac[sender]))
                for r in receivers:
                    assert [f.data for f in ports[r].recv_raw(1, timeout=5)] == frames(1, dst=mac[dst], src=mac[sender])
            handed_off = net.switch.handed_off
            flows = {0: frames(4096, dst=mac[2], src=mac[0]), 1: frames(4096, dst=mac[3], src=mac[1])}
            results = send_at_once({0: (p, flows[0]), 1: (q, flows[1])})
        for i in (0, 1):
            assert len(results[i]) == len(flows[i]) and results[i] == flows[i], i
        assert net.switch.handed_off == handed_off
        workers = net.server.dataplane.workers
        if loop == "c":
            assert all(w._lanes.loop.runs > 0 for w in workers)
        stats = counters(net)
        assert [s["device"]["tx_packets"] for s in stats] == [4097, 4097, 1, 1]
        assert [s["device"]["rx_packets"] for s in stats] == [2, 2, 4098, 4098]


@pytest.mark.parametrize("workers", [1, 2])
def test_the_control_thread_waits_for_the_c_loop_and_reads_whole_counters(tmp_path, loop, workers):
    """While a flow runs, the control thread takes the lock again and again: counters only grow, and at the
    end they are whole; no frame is lost or reordered.  With two workers the flow crosses from one to the
    other (``iovirt/virtio/net/crossing.py``) and the lock is every worker's: no frame is received that the
    sender's counters do not show sent."""
    with ServedNet(tmp_path, ports=2, workers=workers) as net:
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
        sent, received = [tx for tx, _ in seen], [rx for _, rx in seen]
        assert sent == sorted(sent) and received == sorted(received) and len(seen) > 1
        assert all(rx <= tx for tx, rx in seen)
        assert counters(net)[1]["device"]["rx_packets"] == 8192


HDR = bytes(12)  # virtio_net_hdr with num_buffers (VERSION_1), no offloads


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("broken, how", [("sender", "avail-idx-jump"), ("sender", "desc-loop"),
                                         ("receiver", "avail-idx-jump")])
def test_a_ring_broken_under_a_kick_job_fails_its_device_only(tmp_path, logs, loop, broken, how, workers):
    """Port 0 sends to port 1 (a job armed on both rings), then one of those rings breaks: that device needs a
    reset (the queue's own path raises, as without the job); the other keeps working, and so does the flow
    from port 2 to port 3, on the same worker or, with two workers, crossing the same way as the first
    (ports 0 and 2 on worker 0, 1 and 3 on worker 1: jobs on both sides of each crossing,
    ``iovirt/virtio/net/crossing.py``)."""
    a_mac, b_mac = bytes.fromhex("020000000301"), bytes.fromhex("020000000302")
    with ServedNet(tmp_path, ports=4, workers=workers) as net:
        with VhostUserDriver(net.paths[0], features=DEFAULT_FEATURES, memory_size=4 << 20) as a, \
                VhostUserDriver(net.paths[1], features=DEFAULT_FEATURES, memory_size=4 << 20) as b, pair(net, 2, 3) as other:
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
            received = []  # b's frames, the flood from port 3 among them
            for round_ in range(8):  # the flow, in rounds: a kick job carries it from the second on
                for frame in frames(4, dst=b_mac, src=a_mac):
                    a.queues[1].add_data([HDR + frame])
                a.kick(1)
                assert wait_until(lambda: received.extend(b.queues[0].get_used()) or len(received) >= 4 * (round_ + 1) + 1, 5)
                a.queues[1].get_used()
            if loop == "c":
                assert all(w._lanes.loop.runs > 0 for w in net.server.dataplane.workers)
            bad, index = (a, 1) if broken == "sender" else (b, 0)
            if how == "avail-idx-jump":  # more chains announced than the ring holds, past what it used
                queue = bad.queues[index]
                queue.set_avail_idx(queue.avail_idx + queue.size + 5)
                bad.frontend.kick(index)
            else:  # every transmit chain came back: descriptors 0 and 1 are free for the loop
                break_ring(bad, index, how)
            if broken == "receiver":  # a frame for it makes its ring be looked at
                a.queues[1].add_data([HDR + frames(1, dst=b_mac, src=a_mac)[0]])
                a.kick(1)
            failed = net.devices[0 if broken == "sender" else 1]
            assert wait_until(lambda: failed.needs_reset, 5)
            assert "device needs reset" in logs.text
            assert send(other, frames(1024)) == frames(1024)
            assert [d.needs_reset for d in net.devices] == [broken == "sender", broken == "receiver", False, False]


def test_an_idle_worker_sleeps_once_its_flows_stop(tmp_path):
    """With jobs armed the C loop comes back to Python every MAX_STINT_S; once nothing moves, the jobs are not
    armed again and the worker waits for a kick without a time limit (an idle device costs no CPU)."""
    import time

    with ServedNet(tmp_path, ports=2) as net:
        worker = net.server.dataplane.workers[0]
        turns = []
        real_run = worker._lanes.run

        def counted(timeout):
            turns.append(timeout)
            return real_run(timeout)

        worker._lanes.run = counted
        with pair(net, 0, 1) as p:
            learn(p)
            assert send(p, frames(1024)) == frames(1024)
            time.sleep(4 * kickloop.MAX_STINT_S)
            before = len(turns)
            time.sleep(10 * kickloop.MAX_STINT_S)
            assert len(turns) - before <= 1, turns[before:]
            assert send(p, frames(256)) == frames(256)  # and the flow starts again
        assert runs(net) > 0


def test_a_ring_yielded_with_work_left_is_served_again(tmp_path, monkeypatch, loop):
    """A transmit ring the device gives up at its budget (``_yield_tx``) is requeued on its worker and served on
    the next turn: by its kick job where one is armed, else by the Python loop (here a flood, which has none)."""
    from iovirt.virtio.net import device as net_device

    monkeypatch.setattr(net_device, "TX_BUDGET", 1)  # one batch per turn: every burst yields
    with ServedNet(tmp_path, ports=2) as net:
        small = {"queue_size": 1024, "rx_buffer_size": 2048, "tx_buffer_size": 2048}
        with pair(net, 0, 1, a=small, b=small) as p:
            flood = frames(1000, dst=b"\x02\x00\x00\x00\x09\x09")  # nobody has this MAC: flooded to b
            assert send(p, flood, burst=1000) == flood
            learn(p)
            assert send(p, frames(1000), burst=1000) == frames(1000)
