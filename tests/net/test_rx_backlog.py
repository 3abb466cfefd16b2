"""A port whose driver stopped posting receive buffers: its backlog fills, then whole batches are dropped at once.

Every port of a process shares the data-plane thread, so what a stalled
receiver costs, every sender pays.  Once the backlog (``RX_BACKLOG`` frames)
is full, a batch the switch hands over is counted as dropped (``no_buffers``)
in one step, with no per-frame work (``benchmarks/scale.py`` found 4 ports
flooded by one sender at 19 k frames/s, against 750 k with 1 port, when each
dropped frame went through the single-frame path), and the frames already
held keep their place (tail drop) and go out first once buffers arrive.
"""

from __future__ import annotations

import pytest

from iovirt.memory import BumpAllocator, GuestMemory
from iovirt.virtio.defs import VIRTIO_F_VERSION_1
from iovirt.virtio.driver import DriverQueue
from iovirt.virtio.net import datapath
from iovirt.virtio.net.backlog import RxBacklog
from iovirt.virtio.net.defs import NET_HDR_SIZE
from iovirt.virtio.net.device import RX_BACKLOG, VirtioNet

MEM = 4 << 20
MAC = bytes.fromhex("525400000001")
PEER = bytes.fromhex("020000000002")


def frame(n: int) -> bytes:
    return MAC + PEER + b"\x08\x00" + n.to_bytes(4, "big") + bytes(46)


def receiver(queue_pairs: int = 1) -> tuple[VirtioNet, DriverQueue]:
    """A started net device whose driver has posted no receive buffer yet (in its first receive queue)."""
    memory = GuestMemory.from_ranges([(0, MEM)])
    drv = DriverQueue(memory, BumpAllocator(0x1000, MEM - 0x1000), 256)
    drv.publish()
    dev = VirtioNet(MAC, queue_pairs=queue_pairs)
    dev.set_features(1 << VIRTIO_F_VERSION_1)
    dev.start_queue(0, memory, drv.state(), notify=lambda: None)
    dev.set_queue_enabled(0, True)
    return dev, drv


def batch_of(first: int, n: int):
    frames = datapath.Frames()
    for i in range(first, first + n):
        frames.append(frame(i))
    return frames


def test_full_backlog_drops_whole_batches_without_per_frame_work(monkeypatch):
    dev, drv = receiver()
    held = dev.deliver_batch(batch_of(0, RX_BACKLOG), list(range(RX_BACKLOG)))
    assert held == RX_BACKLOG and len(dev.backlog) == RX_BACKLOG
    calls = []
    monkeypatch.setattr(dev, "deliver", lambda *a: calls.append(a) or False)
    before = dev.stats.get("rx_dropped_no_buffers", 0)
    assert dev.deliver_batch(batch_of(1000, 32), list(range(32))) == 0
    assert calls == [], "a full backlog went frame by frame"
    assert dev.stats["rx_dropped_no_buffers"] - before == 32
    # Tail drop: the frames held are the first ones, in order, and go out first once buffers arrive.
    monkeypatch.undo()
    for _ in range(4):
        drv.add_chain(writable=[(drv.alloc.alloc(2048), 2048)])
    drv.publish()
    dev.process_queue(0, dev.queues[0])
    got = [u.data[NET_HDR_SIZE:] for u in drv.get_used()]
    assert got == [frame(i) for i in range(4)]
    assert len(dev.backlog) == RX_BACKLOG - 4


def test_single_frames_also_tail_drop():
    dev, _ = receiver()
    for i in range(RX_BACKLOG):
        assert dev.deliver(frame(i), None)
    assert not dev.deliver(frame(RX_BACKLOG), None)
    assert dev.backlog[0][0] == frame(0) and dev.backlog[-1][0] == frame(RX_BACKLOG - 1)


def test_the_backlog_goes_out_in_batches_once_buffers_arrive(monkeypatch):
    """Not frame by frame: a receiver behind for a moment must not cost every port of the thread (issue 15)."""
    dev, drv = receiver()
    assert dev.deliver_batch(batch_of(0, 100), list(range(100))) == 100
    assert len(dev.backlog) == 100
    for _ in range(150):
        drv.add_chain(writable=[(drv.alloc.alloc(2048), 2048)])
    drv.publish()
    calls = []
    monkeypatch.setattr(dev, "_receive", lambda *a: calls.append(a) or False)
    dev.process_queue(0, dev.queues[0])
    assert calls == [], "the backlog went frame by frame"
    got = [u.data[NET_HDR_SIZE:] for u in drv.get_used()]
    assert got == [frame(i) for i in range(100)]
    assert not dev.backlog
    assert dev.stats["rx_packets"] == 100


def test_a_batch_from_the_backlog_holds_only_frames_of_one_queue(monkeypatch):
    """With several receive queues (MQ, RSS) a run of the backlog stops where a frame is bound for another."""
    dev, drv = receiver(queue_pairs=2)
    assert dev.deliver_batch(batch_of(0, 100), list(range(100))) == 100
    for _ in range(150):
        drv.add_chain(writable=[(drv.alloc.alloc(2048), 2048)])
    drv.publish()
    # Frames 50.. are bound for another queue, which the driver has not started: they stay held.
    monkeypatch.setattr(dev, "_frame_queue", lambda f: 0 if int.from_bytes(f[14:18], "big") < 50 else 1)
    dev.process_queue(0, dev.queues[0])
    assert [u.data[NET_HDR_SIZE:] for u in drv.get_used()] == [frame(i) for i in range(50)]
    assert [f for f, _ in dev.backlog] == [frame(i) for i in range(50, 100)]


class _Identity:
    """An IOMMU that maps every address to itself."""

    def translate(self, addr, length, access):
        return [(addr, length)]


def test_behind_an_iommu_the_backlog_goes_frame_by_frame(monkeypatch):
    """A completion makes an IOTLB forget its translations: batches there livelocked (test_viommu_guests.py)."""
    memory = GuestMemory.from_ranges([(0, MEM)])
    drv = DriverQueue(memory, BumpAllocator(0x1000, MEM - 0x1000), 256)
    drv.publish()
    dev = VirtioNet(MAC)
    dev.set_features(1 << VIRTIO_F_VERSION_1)
    dev.start_queue(0, memory.with_translator(_Identity()), drv.state(), notify=lambda: None)
    dev.set_queue_enabled(0, True)
    assert dev.deliver_batch(batch_of(0, 10), list(range(10))) == 10
    for _ in range(20):
        drv.add_chain(writable=[(drv.alloc.alloc(2048), 2048)])
    drv.publish()
    receive, calls = dev._receive, []
    monkeypatch.setattr(dev, "_receive", lambda *a: calls.append(a) or receive(*a))
    dev.process_queue(0, dev.queues[0])
    assert len(calls) == 10
    assert [u.data[NET_HDR_SIZE:] for u in drv.get_used()] == [frame(i) for i in range(10)]


def test_frames_beyond_the_buffers_join_the_backlog_at_once(monkeypatch):
    """Out of receive buffers mid-batch: one per-frame try, then the rest held without one failed write each."""
    dev, drv = receiver()
    for _ in range(10):
        drv.add_chain(writable=[(drv.alloc.alloc(2048), 2048)])
    drv.publish()
    receive = dev._receive
    calls = []
    monkeypatch.setattr(dev, "_receive", lambda *a: calls.append(a) or receive(*a))
    assert dev.deliver_batch(batch_of(0, 100), list(range(100))) == 100
    assert len(calls) == 1
    assert [u.data[NET_HDR_SIZE:] for u in drv.get_used()] == [frame(i) for i in range(10)]
    assert [f for f, _ in dev.backlog] == [frame(i) for i in range(10, 100)]
    # The backlog full: the frames beyond it are dropped, counted, the held ones keep their place.
    calls.clear()
    assert dev.deliver_batch(batch_of(100, RX_BACKLOG), list(range(RX_BACKLOG))) == RX_BACKLOG - 90
    assert len(dev.backlog) == RX_BACKLOG and dev.backlog[0][0] == frame(10)
    assert dev.stats["rx_dropped_no_buffers"] == 90
    assert calls == []


def test_a_receiver_that_posts_buffers_meanwhile_gets_the_rest_in_batches(monkeypatch):
    """Chains ran out mid-batch, and the first frame left found a buffer posted since: the rest go in one batch.

    Frame by frame, a receiver that keeps just up with its sender cost a
    Python step per frame: 64 B port to port ran at a third of its rate.
    """
    dev, drv = receiver()
    for _ in range(10):
        drv.add_chain(writable=[(drv.alloc.alloc(2048), 2048)])
    drv.publish()
    receive, calls = dev._receive, []

    def posting_receive(*args):  # the driver posts 100 more buffers just before the first frame left is tried
        if not calls:
            for _ in range(100):
                drv.add_chain(writable=[(drv.alloc.alloc(2048), 2048)])
            drv.publish()
        calls.append(args)
        return receive(*args)

    monkeypatch.setattr(dev, "_receive", posting_receive)
    assert dev.deliver_batch(batch_of(0, 100), list(range(100))) == 100
    assert len(calls) == 1, "the frames after the first one left went frame by frame"
    assert [u.data[NET_HDR_SIZE:] for u in drv.get_used()] == [frame(i) for i in range(100)]
    assert not dev.backlog and dev.stats["rx_packets"] == 100


def test_the_backlog_stays_bounded_while_it_never_empties():
    """A receiver always a little behind: frames go out from the front and join at the back, for ever."""
    backlog = RxBacklog(8)
    batch = batch_of(0, 1000)
    nxt = 0
    for _ in range(200):
        took = backlog.extend(batch, list(range(nxt, nxt + 3)))
        nxt += took
        backlog.popleft(2)
        assert len(backlog._frames) <= 2 * backlog.maxlen
    nxt += backlog.extend(batch, list(range(nxt, nxt + 3)))
    assert len(backlog) == 8 and backlog.room == 0
    assert [f for f, _ in backlog] == [frame(i) for i in range(nxt - 8, nxt)]
    assert backlog[-1][0] == frame(nxt - 1) and not backlog.append(frame(0), None)
    with pytest.raises(ValueError):
        backlog.popleft(9)
    with pytest.raises(IndexError):
        backlog[8]
