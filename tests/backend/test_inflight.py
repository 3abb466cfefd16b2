"""Inflight I/O tracking (vhost-user.rst "Inflight I/O tracking", split virtqueues).

The region is kept by a wrapper the back-end installs around the device's
queue.  Checked here: the spec's order around the used idx update, and
recovery from a region a previous back-end left, including requests that
completed out of order (they must not be served again).  The region is read
and written with its own struct layout, not with iovirt's helper.
"""

from __future__ import annotations

import mmap
import os
import struct

import pytest

from iovirt.memory import BumpAllocator, GuestMemory, MemoryRegion
from iovirt.vhost_user.driver import VhostUserDriver
from iovirt.vhost_user.errors import BackendClosedError
from iovirt.vhost_user.inflight import InflightQueue, QueueRegion, queue_region_size
from iovirt.vhost_user.messages import ProtocolFeature as PF
from iovirt.virtio.blk.defs import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_OUT
from iovirt.virtio.driver import DriverQueue

from backend_helpers import wait_until

HEADER = struct.Struct("=QHHHH")  # features, version, desc_num, last_batch_head, used_idx
DESC = struct.Struct("=B5xHQ")  # inflight, padding, next, counter
SIZE = 16


def header(view) -> tuple[int, int, int, int, int]:
    return HEADER.unpack_from(view, 0)


def desc(view, head: int) -> tuple[int, int, int]:
    return DESC.unpack_from(view, HEADER.size + DESC.size * head)


class PublishSpy:
    """The device's queue, with a look at the region at the moment the used idx is published."""

    def __init__(self, queue, view) -> None:
        self.queue = queue
        self.view = view
        self.seen: list[tuple] = []

    def __getattr__(self, name):
        return getattr(self.queue, name)

    def push_batch(self, batch, coalesce=False) -> None:
        heads = [batch.head(i) for i in range(len(batch))]
        self.seen.append((header(self.view), [desc(self.view, h) for h in heads], self.queue.used_idx))
        self.queue.push_batch(batch, coalesce)


@pytest.fixture
def ring(queue_cls):
    memory = GuestMemory([MemoryRegion(0, 1 << 20, bytearray(1 << 20))])
    driver = DriverQueue(memory, BumpAllocator(0x1000, (1 << 20) - 0x1000), SIZE)
    device = queue_cls.from_state(memory, driver.state())
    area = bytearray(queue_region_size(SIZE))
    return driver, device, QueueRegion(memoryview(area), SIZE, fresh=True), memoryview(area)


def test_the_last_batch_list_is_written_before_the_used_idx_moves(ring):
    driver, device, region, view = ring
    heads = [driver.add_data([b"x"]) for _ in range(3)]
    driver.publish()
    spy = PublishSpy(device, view)
    queue = InflightQueue(spy, region, [])
    batch = queue.pop_batch(8)
    assert [batch.head(i) for i in range(len(batch))] == heads
    assert [desc(view, h)[0] for h in heads] == [1, 1, 1]
    assert [desc(view, h)[2] for h in heads] == [1, 2, 3]  # counters in pop order
    queue.push_batch(batch)
    (before,) = spy.seen
    hdr, states, used_idx = before
    assert used_idx == 0  # the device had not published yet ...
    assert hdr[3] == heads[-1]  # ... and last_batch_head already named the batch
    assert [s[0] for s in states] == [1, 1, 1]  # still in flight
    assert [s[1] for s in states][1:] == heads[:-1]  # each entry links to the one before
    assert header(view)[4] == device.used_idx == 3  # afterwards: used_idx follows the ring
    assert [desc(view, h)[0] for h in heads] == [0, 0, 0]


def test_rewound_chains_are_no_longer_in_flight(ring):
    driver, device, region, view = ring
    heads = [driver.add_data([b"x"]) for _ in range(2)]
    driver.publish()
    queue = InflightQueue(device, region, [])
    queue.pop_batch(8)
    queue.rewind(1)
    assert [desc(view, h)[0] for h in heads] == [1, 0]


def write_request(drv: VhostUserDriver, queue: DriverQueue, sector: int, data: bytes) -> int:
    return queue.add_data([struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, sector), data], [1])


def test_a_restarted_backend_resubmits_exactly_what_was_in_flight(backend):
    """A, B, C were popped; B completed out of order; the back-end died.  A and C are served, B is not."""
    with VhostUserDriver(backend.blk_path) as drv:
        fe = drv.frontend
        assert drv.protocol_features >> PF.VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD & 1
        info, fd = fe.get_inflight_fd(1, SIZE)
        area = mmap.mmap(fd, info.mmap_size, mmap.MAP_SHARED)
        try:
            fe.set_inflight_fd(info, fd)
            queue = DriverQueue(drv.memory, drv.alloc, SIZE, index=0)
            # Started but not enabled: the back-end serves nothing yet.
            fe.set_vring_num(0, SIZE)
            fe.set_vring_base(0, 0)
            fe.set_vring_addr(0, queue.desc_addr, queue.avail_addr, queue.used_addr)
            fe.set_vring_call(0)
            fe.set_vring_kick(0)
            a, b, c = (write_request(drv, queue, s, bytes([0xA0 + s]) * 512) for s in range(3))
            queue.publish()
            assert fe.get_vring_base(0) == 0
            # What the dead back-end left: B in the used ring, A and C in flight (counters 1, 3).
            drv.memory.write(queue.used_addr + 4, struct.pack("<II", b, 1))
            drv.memory.write_u16(queue.used_addr + 2, 1)
            view = memoryview(area)
            HEADER.pack_into(view, 0, 0, 1, SIZE, b, 1)
            for head, inflight, counter in ((a, 1, 1), (b, 0, 2), (c, 1, 3)):
                DESC.pack_into(view, HEADER.size + DESC.size * head, inflight, 0, counter)
            # QEMU restores the base from the used idx; the back-end takes it from the region.
            fe.set_vring_base(0, 1)
            fe.set_vring_addr(0, queue.desc_addr, queue.avail_addr, queue.used_addr)
            fe.set_vring_kick(0)
            fe.set_vring_enable(0, True)
            assert fe.wait_call(0, timeout=5)
            used = queue.get_used()
            # Block I/O completes asynchronously: A and C may come back one after the other.
            assert wait_until(lambda: used.extend(queue.get_used()) or len(used) >= 3, 5)
            # Resubmitted in counter order (A, then C); they complete in either order (2.7.8).
            assert used[0].head == b and sorted(u.head for u in used[1:]) == sorted([a, c])
            assert [u.data[-1] for u in used[1:]] == [VIRTIO_BLK_S_OK] * 2
            image = backend.image.read_bytes()
            assert image[0:512] == bytes([0xA0]) * 512 and image[1024:1536] == bytes([0xA2]) * 512
            assert image[512:1024] == bytes(512)  # B had completed: not served again
            assert header(view)[4] == 3 and desc(view, a)[0] == desc(view, c)[0] == 0
            view.release()
        finally:
            area.close()
            os.close(fd)


def test_inflight_fd_needs_the_protocol_feature(backend):
    """GET_INFLIGHT_FD's reply cannot say "failed": the connection is closed, the device serves the next one."""
    without = ((1 << 64) - 1) & ~(1 << PF.VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD)
    with VhostUserDriver(backend.blk_path, protocol_features=without) as drv:
        with pytest.raises(BackendClosedError):
            drv.frontend.get_inflight_fd(1, SIZE)
    with VhostUserDriver(backend.blk_path) as drv:
        info, fd = drv.frontend.get_inflight_fd(1, SIZE)
        os.close(fd)
        assert info.queue_size == SIZE
