"""VIRTIO_F_IN_ORDER over vhost-user (virtio 1.2 2.7.9 split, 2.8.8 packed), through the real ``VhostUserServer``.

Offered by the device types that complete in pop order (net, rng, input),
not by the others (blk, scsi, vsock).  A net port that negotiated it
returns a transmit batch through one used entry and writes one entry per
receive chain; iovirt's driver takes both.  Inflight tracking stays right
when a batch goes back through one entry.
"""

from __future__ import annotations

import struct

import pytest

from iovirt.memory import BumpAllocator, GuestMemory
from iovirt.vhost_user.devices import vhost_user_device
from iovirt.vhost_user.driver import VhostUserDriver
from iovirt.vhost_user.inflight import InflightQueue, PackedQueueRegion, PackedInflightQueue, QueueRegion
from iovirt.vhost_user.inflight import packed_queue_region_size, queue_region_size
from iovirt.virtio.blk.device import VirtioBlk
from iovirt.virtio.defs import VIRTIO_F_IN_ORDER, VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED, VIRTQ_DESC_SIZE
from iovirt.virtio.driver import DriverQueue
from iovirt.virtio.input.device import VirtioInput
from iovirt.virtio.net.defs import NetHdr
from iovirt.virtio.net.device import VirtioNet
from iovirt.virtio.packed_driver import PackedDriverQueue
from iovirt.virtio.queue import packed_implementations, ring_of
from iovirt.virtio.rng.device import VirtioRng
from iovirt.virtio.scsi.device import VirtioScsi
from iovirt.virtio.vsock.device import VirtioVsock

from backend_helpers import wait_until

MAC = [bytes([0x52, 0x54, 0, 0, 0, i]) for i in range(2)]


def test_in_order_is_offered_by_the_types_that_complete_in_pop_order(tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 16))
    offers = {
        "net": VirtioNet(MAC[0]), "rng": VirtioRng(), "input": VirtioInput(),
        "blk": VirtioBlk(str(image), size=1 << 16), "scsi": VirtioScsi([str(image)]),
        "vsock": VirtioVsock(3, str(tmp_path / "vsock")),
    }
    try:
        bits = {name: vhost_user_device(dev).features() >> VIRTIO_F_IN_ORDER & 1 for name, dev in offers.items()}
    finally:
        offers["blk"].close()
    assert bits == {"net": 1, "rng": 1, "input": 1, "blk": 0, "scsi": 0, "vsock": 0}


def _connect(path: str, packed: bool) -> VhostUserDriver:
    drv = VhostUserDriver(path, memory_size=8 << 20, packed=packed)
    drv.start_queues([0, 1], size=16)
    return drv


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_net_transmit_batch_goes_back_through_one_used_entry(backend, packed):
    for path in backend.net_paths:
        assert wait_until(lambda: next(e for e in backend.server.endpoints if e.path == path).connection is None)
    a, b = _connect(backend.net_paths[0], packed), _connect(backend.net_paths[1], packed)
    try:
        for drv in (a, b):
            assert drv.features >> VIRTIO_F_IN_ORDER & 1
            for _ in range(8):
                drv.queues[0].add_data([], [2048])
            drv.kick(0)
        for dev in backend.net:
            assert wait_until(lambda: dev.queues[1] is not None and ring_of(dev.queues[1]).in_order)
        # b's MAC learned first, so a's frames are not flooded back.
        b.queues[1].add_data([NetHdr().pack() + b"\xff" * 6 + MAC[1] + b"\x88\xb5" + bytes(46)])
        b.kick(1)
        assert b.frontend.wait_call(1, timeout=5)
        b.queues[1].get_used()
        tx = a.queues[1]
        frames = [MAC[1] + MAC[0] + b"\x88\xb5" + bytes([i]) * 60 for i in range(5)]
        ids = [tx.add_data([NetHdr().pack() + f]) for f in frames]
        a.kick(1)  # one kick, one batch
        assert a.frontend.wait_call(1, timeout=5)
        if packed:
            assert isinstance(tx, PackedDriverQueue)
            first = a.memory.read(tx.desc_addr + 8, 8)
            length, buf_id, flags = struct.unpack("<IHH", first)
            assert (length, buf_id) == (0, ids[-1])  # 2.8.8: one used descriptor, the batch's last id
            second = struct.unpack("<H", a.memory.read(tx.desc_addr + VIRTQ_DESC_SIZE + 14, 2))[0]
            assert second & (VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED) != flags & (VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED)
        else:
            assert isinstance(tx, DriverQueue)
            assert tx.used_idx() == 5
            assert struct.unpack("<II", a.memory.read(tx.used_addr + 4, 8)) == (ids[-1], 0)  # 2.7.9
            assert struct.unpack("<II", a.memory.read(tx.used_addr + 12, 8)) == (0, 0)  # never written
        assert [u.head for u in tx.get_used()] == ids
        got = []
        assert wait_until(lambda: got.extend(b.queues[0].get_used()) or len(got) >= 5)
        assert [u.data[12:] for u in got] == frames
        assert [u.len for u in got] == [12 + len(f) for f in frames]  # receive: one entry per chain, its own len
    finally:
        a.close()
        b.close()


def _inflight_ring(layout: str):
    memory = GuestMemory.from_ranges([(0, 1 << 20)])
    alloc = BumpAllocator(0x1000, (1 << 20) - 0x1000)
    if layout == "split":
        driver = DriverQueue(memory, alloc, 16, in_order=True)
        area = bytearray(queue_region_size(16))
        region = QueueRegion(memoryview(area), 16, fresh=True)
        return memory, driver, region
    driver = PackedDriverQueue(memory, alloc, 16, in_order=True)
    area = bytearray(packed_queue_region_size(16))
    return memory, driver, QueueRegion(memoryview(area), 16, fresh=True).packed()


def test_split_inflight_region_follows_a_batched_used_entry(queue_cls):
    memory, driver, region = _inflight_ring("split")
    device = queue_cls.from_state(memory, driver.state())
    heads = [driver.add_data([b"x"]) for _ in range(4)]
    driver.publish()
    queue = InflightQueue(device, region, [])
    queue.push_batch(queue.pop_batch(8), True)
    assert device.used_idx == 4 and driver.used_idx() == 4
    assert region.recover(4) == []  # nothing in flight, nothing to repair
    assert [u.head for u in driver.get_used()] == heads


def test_split_inflight_region_repairs_a_batch_published_through_one_entry(queue_cls):
    """The back-end died after the batched entry and its idx were published, before clearing the region."""
    memory, driver, region = _inflight_ring("split")
    device = queue_cls.from_state(memory, driver.state())
    heads = [driver.add_data([b"x"]) for _ in range(4)]
    driver.publish()
    queue = InflightQueue(device, region, [])
    batch = queue.pop_batch(3)
    region.completing([batch.head(i) for i in range(len(batch))])
    device.push_batch(batch, True)  # and no completed(): the back-end is gone
    assert region.recover(device.used_idx) == []  # the last batch is committed, not served again
    assert queue.pop_batch(8).head(0) == heads[3]


@pytest.mark.parametrize("impl", sorted(packed_implementations()))
def test_packed_inflight_region_follows_a_batched_used_descriptor(impl):
    memory, driver, region = _inflight_ring("packed")
    device = packed_implementations()[impl].from_state(memory, driver.state())
    assert isinstance(region, PackedQueueRegion)
    ids = [driver.add_data([b"x", b"y"]) for _ in range(3)]
    driver.publish()
    queue = PackedInflightQueue(device, region, [])
    queue.push_batch(queue.pop_batch(8), True)
    header = region.header()
    assert (header["used_idx"], header["used_wrap"]) == (6, 1)  # past every slot of the batch
    used_pos, lists = region.recover(lambda slot: memory.read_u16(driver.desc_addr + VIRTQ_DESC_SIZE * slot + 14))
    assert (used_pos, lists) == (6 | 1 << 15, [])
    assert [u.head for u in driver.get_used()] == ids
