"""Bad input over vhost-user for packed rings (issue 15, "Bad input"), through the real ``VhostUserServer``.

A front-end that negotiated VIRTIO_F_RING_PACKED and then gives a ring
base whose slot is not below the ring size (vhost-user.rst "Vring
descriptor indices for packed virtqueues"), ring addresses the memory table
does not cover, or a Descriptor Ring running past the end of guest memory,
gets the request refused with a log line naming the problem; a driver that
makes a broken list available gets the device reset (its err eventfd
signalled).  The process keeps serving: a fresh packed front-end on the
same socket gets its I/O done.
"""

from __future__ import annotations

import os
import select
import struct

import pytest

from iovirt.vhost_user.driver import PACKED_START_BASE, VhostUserDriver
from iovirt.vhost_user.errors import NackError
from iovirt.vhost_user.messages import FrontendRequest as R, VringAddr, VringState
from iovirt.virtio.blk.defs import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from iovirt.virtio.packed_driver import PackedDriverQueue

from backend_helpers import log_line, wait_until

MEMORY = 4 << 20
SIZE = 16


def endpoint(backend, path: str):
    return next(e for e in backend.server.endpoints if e.path == path)


def packed_driver(backend) -> VhostUserDriver:
    assert wait_until(lambda: endpoint(backend, backend.blk_path).connection is None)
    return VhostUserDriver(backend.blk_path, memory_size=MEMORY, packed=True)


def nacked(drv: VhostUserDriver, request: int, payload) -> None:
    with pytest.raises(NackError):
        drv.frontend.call(request, payload, [], need_reply=True)


def blk_serves(backend) -> None:
    """A fresh packed front-end on the blk socket writes and reads back a sector."""
    with packed_driver(backend) as drv:
        drv.start_queues([0], size=SIZE)
        queue = drv.queues[0]
        data = os.urandom(512)
        for rtype, out, in_len in ((VIRTIO_BLK_T_OUT, [data], []), (VIRTIO_BLK_T_IN, [], [512])):
            queue.add_data([struct.pack("<IIQ", rtype, 0, 3)] + out, in_len + [1])
            drv.kick(0)
            assert drv.frontend.wait_call(0, timeout=5)
            (used,) = queue.get_used()
            assert used.data[-1] == VIRTIO_BLK_S_OK
        assert used.data[:-1] == data


@pytest.mark.parametrize(
    "base, part, slot",
    [
        (SIZE | 1 << 15 | PACKED_START_BASE & 0xFFFF0000, "avail", SIZE),  # avail slot = ring size
        (PACKED_START_BASE & 0xFFFF | 0x7FFF << 16, "used", 0x7FFF),  # used slot far beyond it
    ],
)
def test_a_packed_base_beyond_the_ring_is_refused(backend, logs, base, part, slot):
    with packed_driver(backend) as drv:
        drv.frontend.set_vring_num(0, SIZE)
        nacked(drv, R.VHOST_USER_SET_VRING_BASE, VringState(0, base))
        line = log_line(logs, "VHOST_USER_SET_VRING_BASE")
        assert f"{part} index {slot} is not below the ring size {SIZE}" in line
    blk_serves(backend)


def test_a_packed_base_set_before_a_smaller_ring_size_is_refused_at_start(backend, logs):
    """BASE before NUM (no size to check it against yet), then NUM 16: the ring does not start."""
    with packed_driver(backend) as drv:
        queue = PackedDriverQueue(drv.memory, drv.alloc, SIZE)
        drv.frontend.set_vring_base(0, 20 | 1 << 15 | PACKED_START_BASE & 0xFFFF0000)
        drv.frontend.set_vring_num(0, SIZE)
        drv.frontend.set_vring_addr(0, queue.desc_addr, queue.driver_addr, queue.device_addr)
        drv.frontend.set_vring_call(0)
        with pytest.raises(NackError):
            drv.frontend.set_vring_kick(0)
        assert "avail index 20 is not below the ring size 16" in log_line(logs, "VHOST_USER_SET_VRING_KICK")
        assert backend.blk.queues[0] is None
    blk_serves(backend)


@pytest.mark.parametrize("part", ["desc", "driver", "device"])
def test_packed_ring_addresses_outside_the_memory_table_are_refused(backend, logs, part):
    with packed_driver(backend) as drv:
        queue = PackedDriverQueue(drv.memory, drv.alloc, SIZE)
        addrs = {"desc": queue.desc_addr, "driver": queue.driver_addr, "device": queue.device_addr}
        drv.frontend.set_vring_num(0, SIZE)
        drv.frontend.set_vring_base(0, PACKED_START_BASE)
        user = {name: drv.frontend.user_addr(addr) for name, addr in addrs.items()}
        user[part] += 1 << 40  # a user address no region maps
        drv.frontend.call(R.VHOST_USER_SET_VRING_ADDR,
                          VringAddr(0, 0, user["desc"], user["device"], user["driver"], 0))
        drv.frontend.set_vring_call(0)
        with pytest.raises(NackError):
            drv.frontend.set_vring_kick(0)
        assert "vring 0 cannot start" in log_line(logs, "VHOST_USER_SET_VRING_KICK")
        assert backend.blk.queues[0] is None
    blk_serves(backend)


def test_a_descriptor_ring_running_past_guest_memory_is_refused(backend, logs):
    """The Descriptor Ring's first slots are guest memory, its last are not (16 x 16 bytes from 64 before the end)."""
    with packed_driver(backend) as drv:
        queue = PackedDriverQueue(drv.memory, drv.alloc, SIZE)
        drv.frontend.set_vring_num(0, SIZE)
        drv.frontend.set_vring_base(0, PACKED_START_BASE)
        drv.frontend.set_vring_addr(0, MEMORY - 64, queue.driver_addr, queue.device_addr)
        drv.frontend.set_vring_call(0)
        with pytest.raises(NackError):
            drv.frontend.set_vring_kick(0)
        assert "descriptor ring" in log_line(logs, "VHOST_USER_SET_VRING_KICK")
    blk_serves(backend)


def test_a_broken_list_on_a_packed_ring_resets_the_device(backend, logs):
    """A Buffer ID beyond the ring size: logged once, err eventfd signalled, nothing served; the socket serves on."""
    with packed_driver(backend) as drv:
        drv.start_queues([0], size=SIZE)
        drv.frontend.set_vring_err(0)
        queue = drv.queues[0]
        hdr = drv.alloc.alloc(16)
        drv.memory.write(hdr, struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, 9))
        queue.post_raw([(hdr, 16, SIZE, 0)])  # Buffer ID 16 in a ring of 16
        drv.frontend.kick(0)
        readable, _, _ = select.select([drv.frontend.err_fds[0]], [], [], 5.0)
        assert readable, "the err eventfd was not signalled"
        assert f"buffer id {SIZE} >= Queue Size {SIZE}" in log_line(logs, "needs reset")
        assert not drv.frontend.wait_call(0, timeout=0.2)
    blk_serves(backend)
