"""Helpers of the isolation tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import os
import select
import time

from iovirt.vhost_user.driver import VhostUserDriver
from iovirt.virtio.blk.defs import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from iovirt.virtio.net.defs import NetHdr
from blk_client import blk_request

HDR = 12  # virtio_net_hdr with num_buffers (VERSION_1, virtio 1.2 5.1.6)
BROADCAST = b"\xff" * 6


def wait_until(predicate, timeout: float = 5.0) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes; return the last answer."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def alive(pid: int) -> bool:
    """True while ``pid`` runs (the supervisor reaps its workers, so a dead one leaves no zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def net_port(path: str) -> VhostUserDriver:
    """A front-end on a net socket with its first queue pair started and receive buffers posted."""
    drv = VhostUserDriver(path, memory_size=8 << 20)
    drv.start_queues([0, 1], size=64)
    for _ in range(16):
        drv.queues[0].add_data([], [2048])
    drv.kick(0)
    return drv


def eth(dst: bytes, src: bytes, payload: bytes = bytes(range(50))) -> bytes:
    return dst + src + b"\x88\xb5" + payload


def send(drv: VhostUserDriver, frame: bytes) -> None:
    """Transmit one frame on queue 1 and wait until the device returned its buffer."""
    drv.queues[1].add_data([NetHdr().pack() + frame])
    drv.kick(1)
    assert drv.frontend.wait_call(1, timeout=5)
    assert len(drv.queues[1].get_used()) == 1


def receive(drv: VhostUserDriver, timeout: float = 5.0) -> bytes:
    """The next frame on receive queue 0 (one buffer each: 2048 bytes hold any test frame)."""
    deadline = time.monotonic() + timeout
    while True:
        used = drv.queues[0].get_used()
        if used:
            (chain,) = used
            drv.queues[0].add_data([], [2048])
            drv.kick(0)
            return chain.data[HDR:]
        remaining = deadline - time.monotonic()
        assert remaining > 0, "no frame arrived"
        select.select([drv.frontend.call_fds[0]], [], [], min(remaining, 0.1))
        drv.frontend.wait_call(0, timeout=0)


def blk_roundtrip(drv: VhostUserDriver, sector: int, data: bytes) -> None:
    """Write ``data`` at ``sector``, read it back."""
    assert blk_request(drv, VIRTIO_BLK_T_OUT, sector, out=data) == (b"", VIRTIO_BLK_S_OK)
    assert blk_request(drv, VIRTIO_BLK_T_IN, sector, in_len=len(data)) == (data, VIRTIO_BLK_S_OK)


def blk_port(path: str) -> VhostUserDriver:
    drv = VhostUserDriver(path)
    drv.start_queues([0], size=16)
    return drv
