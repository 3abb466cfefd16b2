"""Packed virtqueues (virtio 1.2 section 2.8) over vhost-user, through the real ``VhostUserServer``.

The back-end offers VIRTIO_F_RING_PACKED for every device type; a front-end
that accepts it lays its rings out packed
(:class:`~iovirt.vhost_user.driver.VhostUserDriver` with ``packed=True``),
and SET/GET_VRING_BASE carry both ring positions with their wrap counters
(vhost-user.rst "Vring descriptor indices for packed virtqueues").
"""

from __future__ import annotations

import os
import struct


from iovirt.control.snapshot import describe
from iovirt.vhost_user.driver import PACKED_START_BASE, VhostUserDriver
from iovirt.virtio.blk.defs import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from iovirt.virtio.defs import VIRTIO_F_RING_PACKED
from iovirt.virtio.net.defs import NetHdr
from iovirt.virtio.packed_driver import PackedDriverQueue
from iovirt.virtio.queue import IMPLEMENTATION, is_accelerated, ring_of

from backend_helpers import log_line, wait_until

MAC = [bytes([0x02, 0, 0, 0, 0, 0xB0 + i]) for i in range(2)]


def endpoint(backend, path: str):
    return next(e for e in backend.server.endpoints if e.path == path)


def connect(backend, path: str, queues, size: int = 64, **kwargs) -> VhostUserDriver:
    assert wait_until(lambda: endpoint(backend, path).connection is None)
    drv = VhostUserDriver(path, memory_size=8 << 20, packed=True, **kwargs)
    drv.start_queues(list(queues), size=size)
    return drv


def blk_request(drv: VhostUserDriver, rtype: int, sector: int, out: bytes = b"", in_len: int = 0) -> tuple[bytes, int]:
    queue = drv.queues[0]
    queue.add_data([struct.pack("<IIQ", rtype, 0, sector)] + ([out] if out else []), ([in_len] if in_len else []) + [1])
    drv.kick(0)
    assert drv.frontend.wait_call(0, timeout=5)
    (used,) = queue.get_used()
    return used.data[:-1], used.data[-1]


def test_every_device_type_offers_ring_packed(backend):
    for path in [*backend.net_paths, backend.blk_path]:
        with VhostUserDriver(path, memory_size=1 << 20) as drv:
            assert drv.offered >> VIRTIO_F_RING_PACKED & 1
            assert not drv.features >> VIRTIO_F_RING_PACKED & 1  # acked only by a packed front-end


def test_blk_on_a_packed_ring_round_trips_and_wraps(backend):
    """Three laps of an 8-slot ring: both wrap counters flip, data survives."""
    with connect(backend, backend.blk_path, [0], size=8) as drv:
        assert drv.features >> VIRTIO_F_RING_PACKED & 1
        assert isinstance(drv.queues[0], PackedDriverQueue)
        queue = backend.blk.queues[0]
        assert type(ring_of(queue)).__name__ == "PackedQueue"
        for sector in range(12):  # each write and read takes 2-3 slots
            data = os.urandom(512)
            assert blk_request(drv, VIRTIO_BLK_T_OUT, sector, out=data) == (b"", VIRTIO_BLK_S_OK)
            assert blk_request(drv, VIRTIO_BLK_T_IN, sector, in_len=512) == (data, VIRTIO_BLK_S_OK)
        with open(backend.image, "rb") as f:
            f.seek(11 * 512)
            assert f.read(512) == data


def test_packed_queue_is_the_accelerated_one_when_built(backend):
    """The C data paths take the packed queue: no fall-back to the Python twin."""
    with connect(backend, backend.blk_path, [0]) as drv:
        blk_request(drv, VIRTIO_BLK_T_OUT, 1, out=bytes(512))
        assert is_accelerated(ring_of(backend.blk.queues[0])) == (IMPLEMENTATION == "cython")


def test_get_vring_base_returns_both_positions_and_a_restart_resumes(backend, logs):
    with connect(backend, backend.blk_path, [0], size=8) as drv:
        for sector in range(5):  # 5 writes of 3 descriptors: 15 slots, one lap and 7
            blk_request(drv, VIRTIO_BLK_T_OUT, sector, out=bytes([sector]) * 512)
        base = drv.frontend.get_vring_base(0)
        # avail and used at slot 7 of the second lap: wrap counters 0.
        assert base == 7 | 7 << 16
        assert "avail index 7 wrap 0, used index 7 wrap 0" in log_line(logs, "vring 0 stopped")
        # Resume where it stopped, as QEMU does after GET_VRING_BASE.
        queue = drv.queues[0]
        drv.frontend.set_vring_base(0, base)
        drv.frontend.set_vring_kick(0)
        assert blk_request(drv, VIRTIO_BLK_T_IN, 4, in_len=512) == (bytes([4]) * 512, VIRTIO_BLK_S_OK)
        assert (queue.next_avail, queue.avail_wrap) == (2, True)  # 7 + 3 slots: a third lap


def test_net_ports_on_packed_rings_switch_frames(backend):
    a = connect(backend, backend.net_paths[0], [0, 1])
    b = connect(backend, backend.net_paths[1], [0, 1])
    try:
        for drv in (a, b):
            for _ in range(4):
                drv.queues[0].add_data([], [2048])
            drv.kick(0)
        frame = b"\xff" * 6 + MAC[0] + b"\x88\xb5" + bytes(range(50))
        a.queues[1].add_data([NetHdr().pack() + frame])
        a.kick(1)
        assert a.frontend.wait_call(1, timeout=5)
        assert len(a.queues[1].get_used()) == 1
        assert b.frontend.wait_call(0, timeout=5)
        (used,) = b.queues[0].get_used()
        assert used.data[12:] == frame
    finally:
        a.close()
        b.close()


def test_packed_start_base_is_both_wrap_counters_set():
    assert PACKED_START_BASE == 0x80008000


def test_the_control_snapshot_describes_a_packed_ring(backend):
    with connect(backend, backend.blk_path, [0], size=8) as drv:
        blk_request(drv, VIRTIO_BLK_T_OUT, 1, out=bytes(512))
        endpoint_ = endpoint(backend, backend.blk_path)
        with backend.server.dataplane.lock:
            (ring, *_) = describe(endpoint_)["queues"]
        # One request of 3 descriptors: both positions at slot 3, wrap counters 1.
        assert ring["packed"] and (ring["last_avail_idx"], ring["used_idx"]) == (3 | 1 << 15, 3 | 1 << 15)
        assert "avail_idx" not in ring
        drv.frontend.get_vring_base(0)
        with backend.server.dataplane.lock:
            (ring, *_) = describe(endpoint_)["queues"]
        assert ring["state"] == "stopped" and (ring["last_avail_idx"], ring["used_idx"]) == (3 | 1 << 15, 3 | 1 << 15)


def test_a_packed_ring_logs_its_buffers_descriptor_ring_and_device_area(backend):
    """Migration (vhost-user.rst "Migration") on a packed ring: no used ring, the device writes the Descriptor Ring."""
    page = 4096
    with connect(backend, backend.blk_path, [0], size=256) as drv:  # the ring fills a page, the areas follow
        log = drv.start_logging()
        log[:] = bytes(len(log))
        queue = drv.queues[0]
        buf = drv.alloc.alloc(page, page)
        hdr_addr = drv.alloc.alloc(16)
        drv.memory.write(hdr_addr, struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0))
        queue.add_chain([(hdr_addr, 16)], [(buf, 512), (drv.alloc.alloc(1), 1)])
        drv.kick(0)
        assert drv.frontend.wait_call(0, timeout=5)
        dirty = {((i << 3) + b) * page for i, byte in enumerate(bytes(log)) if byte for b in range(8) if byte >> b & 1}
        assert buf in dirty  # the device wrote the read's data there
        assert queue.device_addr // page != queue.desc_addr // page
        assert queue.desc_addr // page * page in dirty  # and a used descriptor into the ring
        assert queue.device_addr // page * page in dirty
        drv.stop_logging()
