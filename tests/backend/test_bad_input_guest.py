"""Bad guest input through started rings of the real ``VhostUserServer`` (net and blk).

Issue 3, "Bad input", guest side: a driver that builds a descriptor loop,
points a buffer outside guest memory or jumps the avail idx must not crash
the process nor make the device touch memory outside the table.  The device
logs the problem once, marks itself as needing a reset (virtio 1.2 2.1.2),
and signals the vring's error eventfd (vhost-user SET_VRING_ERR); every
other device keeps working, and a new front-end on the same socket gets a
reset device.
"""

from __future__ import annotations

import os
import select
import struct

import pytest

from iovirt.vhost_user.driver import VhostUserDriver
from iovirt.virtio.blk.defs import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from iovirt.virtio.defs import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from iovirt.virtio.net.defs import NetHdr
from blk_client import blk_request

from backend_helpers import wait_until, log_line

MEMORY = 4 << 20
OUTSIDE = MEMORY + 0x100000  # a guest-physical address no region backs
BROADCAST = b"\xff" * 6
MAC = [bytes([0x02, 0, 0, 0, 0, i]) for i in range(2)]


def endpoint(backend, path: str):
    return next(e for e in backend.server.endpoints if e.path == path)


def driver(backend, path: str, queues: list[int]) -> VhostUserDriver:
    """A driver with ``queues`` started and an error eventfd on each."""
    assert wait_until(lambda: endpoint(backend, path).connection is None)
    drv = VhostUserDriver(path, memory_size=MEMORY)
    drv.start_queues(queues, size=16)
    for index in queues:
        drv.frontend.set_vring_err(index)
    return drv


def err_signalled(drv: VhostUserDriver, index: int) -> bool:
    readable, _, _ = select.select([drv.frontend.err_fds[index]], [], [], 5.0)
    return bool(readable)


def blk_serves(backend) -> None:
    with driver(backend, backend.blk_path, [0]) as drv:
        data = os.urandom(512)
        assert blk_request(drv, VIRTIO_BLK_T_OUT, 5, out=data) == (b"", VIRTIO_BLK_S_OK)
        assert blk_request(drv, VIRTIO_BLK_T_IN, 5, in_len=512) == (data, VIRTIO_BLK_S_OK)


def frame(dst: bytes, src: bytes) -> bytes:
    return dst + src + b"\x08\x00" + bytes(range(46))


def transmit(drv: VhostUserDriver, data: bytes, queue: int = 1) -> None:
    drv.queues[queue].add_data([NetHdr().pack() + data])
    drv.kick(queue)
    assert drv.frontend.wait_call(queue, timeout=5)
    assert len(drv.queues[queue].get_used()) == 1


def receive(drv: VhostUserDriver, queue: int = 0) -> bytes:
    assert drv.frontend.wait_call(queue, timeout=5)
    (used,) = drv.queues[queue].get_used()
    return used.data[12:]


def net_pair_serves(backend) -> None:
    """Port 0 and port 1, fresh front-ends on both: a broadcast from 1 reaches 0."""
    with driver(backend, backend.net_paths[0], [0, 1]) as a, driver(backend, backend.net_paths[1], [0, 1]) as b:
        a.queues[0].add_data([], [2048])
        a.kick(0)
        data = frame(BROADCAST, MAC[1])
        transmit(b, data)
        assert receive(a) == data


# -- broken rings ------------------------------------------------------------------------

BAD_RINGS = ["desc-loop", "indirect-loop", "buffer-outside-memory", "head-beyond-size", "avail-idx-jump"]


def break_ring(drv: VhostUserDriver, index: int, how: str, writable: bool = False) -> None:
    """Make one broken chain (or avail idx) visible on ring ``index`` and kick."""
    queue = drv.queues[index]
    buf = drv.alloc.alloc(64)
    flag = VIRTQ_DESC_F_WRITE if writable else 0
    if how == "desc-loop":
        queue.write_desc(0, buf, 32, flag | VIRTQ_DESC_F_NEXT, next=1)
        queue.write_desc(1, buf + 32, 32, flag | VIRTQ_DESC_F_NEXT, next=0)
        queue.post_head(0)
    elif how == "indirect-loop":
        table = drv.alloc.alloc(32, 16)
        queue.write_desc(0, buf, 32, flag | VIRTQ_DESC_F_NEXT, next=1, table=table)
        queue.write_desc(1, buf + 32, 32, flag | VIRTQ_DESC_F_NEXT, next=0, table=table)
        queue.write_desc(0, table, 32, VIRTQ_DESC_F_INDIRECT)
        queue.post_head(0)
    elif how == "buffer-outside-memory":
        queue.write_desc(0, OUTSIDE, 64, flag)
        queue.post_head(0)
    elif how == "head-beyond-size":
        queue.post_head(queue.size + 3)
    else:  # avail-idx-jump: more chains announced than the ring can hold
        queue.set_avail_idx(queue.size + 5)
    queue.publish()
    drv.frontend.kick(index)


def used_idx_untouched(drv: VhostUserDriver, index: int) -> None:
    assert drv.queues[index].used_idx() == 0


@pytest.mark.parametrize("how", BAD_RINGS)
def test_broken_net_tx_ring(backend, logs, how):
    with driver(backend, backend.net_paths[0], [0, 1]) as bad:
        break_ring(bad, 1, how)
        assert "device needs reset" in log_line(logs, "net0: queue 1")
        assert err_signalled(bad, 1)
        used_idx_untouched(bad, 1)
        assert backend.net[0].needs_reset and not backend.net[1].needs_reset
        blk_serves(backend)
    net_pair_serves(backend)  # a new front-end on port 0 gets a reset device
    assert not backend.net[0].needs_reset


@pytest.mark.parametrize("how", BAD_RINGS)
def test_broken_blk_ring(backend, logs, how):
    with driver(backend, backend.blk_path, [0, 1]) as bad:
        break_ring(bad, 0, how)
        assert "device needs reset" in log_line(logs, "blk0: queue 0")
        assert err_signalled(bad, 0)
        used_idx_untouched(bad, 0)
        assert backend.blk.needs_reset
        # The device stopped: a good request on its other queue is not served.
        bad.queues[1].add_data([struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0)], [512, 1])
        bad.kick(1)
        assert not bad.frontend.wait_call(1, timeout=0.2)
        net_pair_serves(backend)
    blk_serves(backend)
    assert not backend.blk.needs_reset


@pytest.mark.parametrize("how", BAD_RINGS)
def test_broken_net_rx_ring_fails_the_receiver_only(backend, logs, how):
    # The RX ring is read only when a frame arrives from the switch, on the
    # data-plane run of the *sending* port's TX queue.
    with driver(backend, backend.net_paths[0], [0, 1]) as bad, driver(backend, backend.net_paths[1], [0, 1]) as sender:
        break_ring(bad, 0, how, writable=True)
        sender.queues[1].add_data([NetHdr().pack() + frame(BROADCAST, MAC[1])])
        sender.kick(1)
        assert wait_until(lambda: backend.net[0].needs_reset or backend.net[1].needs_reset)
        assert not backend.net[1].needs_reset, "a bad RX ring on port 0 failed port 1"
        assert "device needs reset" in log_line(logs, "net0: queue 0")
        assert err_signalled(bad, 0)
        used_idx_untouched(bad, 0)
        # The sender's frame was transmitted and its buffer returned.
        assert sender.frontend.wait_call(1, timeout=5)
        assert len(sender.queues[1].get_used()) == 1
        blk_serves(backend)
    net_pair_serves(backend)


def test_short_net_tx_chain_is_dropped_not_fatal(backend, logs):
    # A chain shorter than header + Ethernet is a bad frame, not a broken ring: dropped, counted.
    with driver(backend, backend.net_paths[0], [0, 1]) as drv:
        drv.queues[1].add_data([b"\0" * 8])
        drv.kick(1)
        assert drv.frontend.wait_call(1, timeout=5)
        assert len(drv.queues[1].get_used()) == 1
        log_line(logs, "net0:", "short")
        assert backend.net[0].stats["tx_errors"] == 1 and not backend.net[0].needs_reset
    net_pair_serves(backend)


def test_blk_request_without_status_byte_is_dropped_not_fatal(backend, logs):
    with driver(backend, backend.blk_path, [0]) as drv:
        drv.queues[0].add_data([struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0)])
        drv.kick(0)
        assert drv.frontend.wait_call(0, timeout=5)
        (used,) = drv.queues[0].get_used()
        assert used.len == 0
        log_line(logs, "blk0: request chain", "no status byte")
        assert not backend.blk.needs_reset
        assert blk_request(drv, VIRTIO_BLK_T_IN, 0, in_len=512)[1] == VIRTIO_BLK_S_OK
