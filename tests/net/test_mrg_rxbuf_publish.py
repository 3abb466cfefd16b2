"""MRG_RXBUF: a frame spanning several receive buffers is published whole (virtio 1.2 5.1.6.4).

The driver reads ``num_buffers`` from a frame's first buffer and then takes
that many used entries; Linux drops the frame when fewer are visible.  So
every used idx the device publishes must cover whole frames only.  The
driver side here (:class:`RingObserver`, on :class:`DriverQueue`) checks the
ring after every publish: exactly at each used idx store for the reference
queue, after each push call for either queue, and from a polling thread for
the Cython queue and the C data path.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

from iovirt.memory import BumpAllocator, GuestMemory
from iovirt.virtio import _queue_py
from iovirt.virtio.defs import VIRTIO_F_VERSION_1
from iovirt.virtio.driver import DriverQueue
from iovirt.virtio.net import datapath
from iovirt.virtio.net.defs import NET_HDR, NET_HDR_SIZE, VIRTIO_NET_F_MRG_RXBUF
from iovirt.virtio.net.device import VirtioNet
from iovirt.virtio.queue import implementations, is_accelerated

MEM = 4 << 20
QUEUE_SIZE = 256
BUF = 64  # small receive buffers: a 200-byte frame takes 4 of them
MAC = bytes.fromhex("525400000001")
PEER = bytes.fromhex("020000000002")


def frame(n: int, size: int) -> bytes:
    return (MAC + PEER + b"\x08\x00" + bytes([n]) * size)[: max(size, 14)]


class RingObserver:
    """The driver's side of the receive ring: checks that every visible used idx ends on a frame boundary."""

    def __init__(self, memory: GuestMemory, drv: DriverQueue, buffers: dict[int, int]) -> None:
        self.memory = memory
        self.drv = drv
        self.buffers = buffers  # head -> buffer address
        self.frame_start = 0  # used ring position of the first frame not yet wholly seen
        self.frames: list[bytes] = []
        self.checks = 0
        self.violations: list[str] = []

    def _elem(self, pos: int) -> tuple[int, int]:
        slot = self.drv.used_addr + 4 + 8 * (pos % self.drv.size)
        raw = self.memory.read(slot, 8)
        return int.from_bytes(raw[:4], "little"), int.from_bytes(raw[4:], "little")

    def check(self) -> None:
        """Read the used idx as a driver does; every frame before it must have all its buffers visible."""
        self.checks += 1
        idx = self.drv.used_idx()
        pos = self.frame_start
        while pos != idx:
            head, _ = self._elem(pos)
            num_buffers = NET_HDR.unpack(self.memory.read(self.buffers[head], NET_HDR_SIZE))[6]
            visible = (idx - pos) & 0xFFFF
            if num_buffers < 1 or num_buffers > visible:
                self.violations.append(f"used idx {idx}: frame at {pos} has num_buffers {num_buffers}, {visible} visible")
                return
            data = b"".join(
                self.memory.read(self.buffers[h], n) for h, n in (self._elem(pos + k) for k in range(num_buffers))
            )
            self.frames.append(data[NET_HDR_SIZE:])
            pos = (pos + num_buffers) & 0xFFFF
        self.frame_start = pos


def setup(queue_factory: Any = None) -> tuple[VirtioNet, GuestMemory, RingObserver]:
    """A net device with MRG_RXBUF whose receive queue has ``QUEUE_SIZE`` posted buffers of ``BUF`` bytes."""
    memory = GuestMemory.from_ranges([(0, MEM)])
    drv = DriverQueue(memory, BumpAllocator(0x1000, MEM - 0x1000), QUEUE_SIZE)
    buffers = {}
    for _ in range(QUEUE_SIZE):
        addr = drv.alloc.alloc(BUF)
        buffers[drv.add_chain(writable=[(addr, BUF)])] = addr
    drv.publish()
    dev = VirtioNet(MAC)
    dev.set_features(1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MRG_RXBUF)
    if queue_factory is None:
        dev.start_queue(0, memory, drv.state(), notify=lambda: None)
    else:
        dev.queues[0] = queue_factory(memory, drv.state())
    dev.set_queue_enabled(0, True)
    return dev, memory, RingObserver(memory, drv, buffers)


SIZES = [200, 40, 500, 30, 30, 120, 52, 1000]  # 4, 1, 9, 1, 1, 3, 1 (exactly one buffer), 17 buffers


def deliver_all(dev: VirtioNet) -> list[bytes]:
    """Frames one at a time, then the same sizes again as one switch batch."""
    sent = [frame(n, size) for n, size in enumerate(SIZES)]
    for f in sent:
        assert dev.deliver(f, None)
    batch = datapath.Frames()
    for n, size in enumerate(SIZES):
        batch.append(frame(100 + n, size))
    assert dev.deliver_batch(batch, list(range(len(SIZES)))) == len(SIZES)
    return sent + [batch.frame(i) for i in range(len(SIZES))]


def test_reference_queue_publishes_each_frame_whole():
    # Deterministic: the check runs at every store of the used idx the reference queue makes.
    observers: list[RingObserver] = []

    class ObservedQueue(_queue_py.SplitQueue):
        def _publish_used_idx(self) -> None:
            super()._publish_used_idx()
            observers[0].check()

    dev, _, observer = setup(ObservedQueue.from_state)
    observers.append(observer)
    sent = deliver_all(dev)
    assert not observer.violations, observer.violations
    assert observer.frames == sent
    assert observer.checks < sum(len(f) + NET_HDR_SIZE for f in sent) // BUF  # fewer publishes than buffers


class PushObserver:
    """Any queue implementation, with the driver's check after each push call."""

    def __init__(self, queue: Any, observer: list[RingObserver]) -> None:
        self._queue = queue
        self._observer = observer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._queue, name)

    def push(self, head: int, length: int) -> None:
        self._queue.push(head, length)
        self._observer[0].check()

    def push_batch(self, batch: Any, coalesce: bool = False) -> None:
        self._queue.push_batch(batch, coalesce)
        self._observer[0].check()


@pytest.mark.parametrize("impl", sorted(implementations()))
def test_every_push_leaves_whole_frames_visible(impl):
    # The device's multi-buffer path on either queue implementation (the proxy makes it the Python twin's path).
    queue_type = implementations()[impl]
    observers: list[RingObserver] = []
    dev, _, observer = setup(lambda memory, state: PushObserver(queue_type.from_state(memory, state), observers))
    observers.append(observer)
    sent = deliver_all(dev)
    assert not observer.violations, observer.violations
    assert observer.frames == sent


def test_c_data_path_observed_by_a_polling_driver():
    # The real Cython queue and C data path: a driver thread checks the ring while frames arrive.
    dev, _, observer = setup()
    queue = dev.queues[0]
    if not is_accelerated(queue) or datapath.accel is None:
        pytest.skip("the Cython queue or the _datapath_c extension is not loaded")
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            observer.check()
        observer.check()

    thread = threading.Thread(target=poll)
    thread.start()
    try:
        sent = deliver_all(dev)
    finally:
        done.set()
        thread.join()
    assert not observer.violations, observer.violations
    assert observer.frames == sent
