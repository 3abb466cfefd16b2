"""A front-end's day against a separate ``iovirt serve`` process: what a sandboxed process must survive.

Imported by name (pytest puts this folder on ``sys.path``).  Every step runs
through :class:`~iovirt.vhost_user.driver.VhostUserDriver`, iovirt's own
VMM + guest driver: net bring-up and switching between two ports, the same
behind a vIOMMU (IOTLB misses answered on the back-end channel), blk
requests of every type the device serves, the inflight region
(``memfd_create`` in the back-end), and reconnects.
"""

from __future__ import annotations

import os
import struct
import time

from iovirt.vhost_user.driver import VhostUserDriver
from iovirt.virtio.blk.defs import (
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
)
from iovirt.virtio.net.defs import NetHdr

HDR = 12  # virtio_net_hdr with num_buffers (virtio 1.2 5.1.6)
PAGE = 4096
MACS = [bytes([0x02, 0, 0, 0, 0x5A, i]) for i in range(2)]


def frame(src: int, dst: int | None, fill: int) -> bytes:
    """An Ethernet frame from port ``src`` to port ``dst`` (None: broadcast)."""
    return (b"\xff" * 6 if dst is None else MACS[dst]) + MACS[src] + b"\x88\xb5" + bytes([fill]) * 60


def _serve_misses(drivers: list[VhostUserDriver]) -> None:
    for drv in drivers:
        if drv.iommu is not None:
            drv.iommu.serve(0.005)


def _until(done, drivers: list[VhostUserDriver], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "the back-end did not answer in time"
        _serve_misses(drivers)
        if all(d.iommu is None for d in drivers):
            time.sleep(0.002)


def transfer(tx: VhostUserDriver, rx: VhostUserDriver, data: bytes) -> bytes:
    """Post a receive buffer on ``rx``, transmit ``data`` from ``tx``; the frame ``rx`` got."""
    rx.queues[0].add_data([], [2048])
    rx.kick(0)
    buf = tx.alloc.alloc(PAGE, PAGE)  # a page of its own: behind a vIOMMU, its translation is a miss
    tx.memory.write(buf, NetHdr().pack() + data)
    tx.queues[1].add_chain([(buf, HDR + len(data))])
    tx.kick(1)
    got: list[bytes] = []

    def arrived() -> bool:
        got.extend(u.data[HDR:] for u in rx.queues[0].get_used())
        return bool(got)

    _until(arrived, [tx, rx])
    _until(lambda: bool(tx.queues[1].get_used()), [tx, rx])
    return got[0]


def net_ports(paths: list[str], iommu: bool = False) -> list[VhostUserDriver]:
    """Both net ports brought up with receive and transmit rings."""
    drivers = []
    for path in paths:
        drv = VhostUserDriver(path, memory_size=4 << 20, iommu=iommu)
        drivers.append(drv)
        drv.start_queues([0, 1], size=32)
    return drivers


def exercise_net(paths: list[str], iommu: bool = False) -> None:
    """Broadcast, then learned unicast both ways, between two ports."""
    a, b = net_ports(paths, iommu)
    try:
        assert transfer(a, b, frame(0, None, 1)) == frame(0, None, 1)
        assert transfer(b, a, frame(1, 0, 2)) == frame(1, 0, 2)
        assert transfer(a, b, frame(0, 1, 3)) == frame(0, 1, 3)
    finally:
        a.close()
        b.close()


def blk_request(drv: VhostUserDriver, rtype: int, sector: int, out: bytes = b"", in_len: int = 0) -> tuple[bytes, int]:
    """One virtio-blk request (virtio 1.2 5.2.6): (data read, status)."""
    queue = drv.queues[0]
    queue.add_data([struct.pack("<IIQ", rtype, 0, sector)] + ([out] if out else []), ([in_len] if in_len else []) + [1])
    drv.kick(0)
    _until(lambda: queue.used_idx() != queue.last_used_idx, [drv])
    (used,) = queue.get_used()
    return used.data[:-1], used.data[-1]


def exercise_blk(path: str, iommu: bool = False, inflight: bool = False) -> None:
    """Write, read back, flush, GET_ID, discard and write-zeroes on one connection."""
    with VhostUserDriver(path, iommu=iommu) as drv:
        fd = -1
        if inflight:
            info, fd = drv.frontend.get_inflight_fd(1, 64)
            drv.frontend.set_inflight_fd(info, fd)
        try:
            drv.start_queues([0], size=64)
            data = os.urandom(4096)
            assert blk_request(drv, VIRTIO_BLK_T_OUT, 8, out=data) == (b"", VIRTIO_BLK_S_OK)
            assert blk_request(drv, VIRTIO_BLK_T_IN, 8, in_len=4096) == (data, VIRTIO_BLK_S_OK)
            assert blk_request(drv, VIRTIO_BLK_T_FLUSH, 0)[1] == VIRTIO_BLK_S_OK
            assert blk_request(drv, VIRTIO_BLK_T_GET_ID, 0, in_len=20)[1] == VIRTIO_BLK_S_OK
            segment = struct.pack("<QII", 8, 8, 0)
            assert blk_request(drv, VIRTIO_BLK_T_DISCARD, 0, out=segment)[1] == VIRTIO_BLK_S_OK
            assert blk_request(drv, VIRTIO_BLK_T_WRITE_ZEROES, 0, out=segment)[1] == VIRTIO_BLK_S_OK
            assert blk_request(drv, VIRTIO_BLK_T_IN, 8, in_len=4096) == (bytes(4096), VIRTIO_BLK_S_OK)
        finally:
            if fd >= 0:
                os.close(fd)


def exercise_all(net_paths: list[str], blk_path: str) -> None:
    """Everything above, with reconnects: every device is connected to more than once."""
    exercise_net(net_paths)
    exercise_net(net_paths, iommu=True)
    exercise_blk(blk_path, inflight=True)
    exercise_blk(blk_path, iommu=True)
    for _ in range(2):
        exercise_blk(blk_path)
    exercise_net(net_paths)
