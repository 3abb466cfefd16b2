"""virtio-blk over iovirt's vhost-user back-end, driven by iovirt's Python front-end."""

from __future__ import annotations

import os
import struct

import pytest

from iovirt.vhost_user.driver import VhostUserDriver
from iovirt.virtio.blk.defs import (
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
)


def request(drv, q, rtype, sector, out=b"", in_len=0):
    hdr = struct.pack("<IIQ", rtype, 0, sector)
    queue = drv.queues[q]
    queue.add_data([hdr] + ([out] if out else []), ([in_len] if in_len else []) + [1])
    drv.kick(q)
    assert drv.frontend.wait_call(q, timeout=5)
    (used,) = queue.get_used()
    return used.data[:-1], used.data[-1]


@pytest.fixture
def blk(backend):
    with VhostUserDriver(backend.blk_path) as drv:
        drv.start_queues([0, 1], size=64)
        yield drv


def test_write_read_flush(backend, blk):
    data = os.urandom(4096)
    assert request(blk, 0, VIRTIO_BLK_T_OUT, 8, out=data) == (b"", VIRTIO_BLK_S_OK)
    assert request(blk, 1, VIRTIO_BLK_T_IN, 8, in_len=4096) == (data, VIRTIO_BLK_S_OK)
    assert request(blk, 0, VIRTIO_BLK_T_FLUSH, 0)[1] == VIRTIO_BLK_S_OK
    assert backend.image.read_bytes()[8 * 512 : 8 * 512 + 4096] == data


def test_get_id_and_config(backend, blk):
    ident, status = request(blk, 0, VIRTIO_BLK_T_GET_ID, 0, in_len=20)
    assert status == VIRTIO_BLK_S_OK and ident.rstrip(b"\0") == b"iovirt"
    config = blk.frontend.get_config(0, 60)
    capacity, size_max, seg_max = struct.unpack_from("<QII", config)
    assert capacity == (1 << 20) // 512
    assert struct.unpack_from("<H", config, 34)[0] == 2  # num_queues
    assert blk.frontend.get_queue_num() == 2


def test_out_of_range_and_unsupported(blk):
    assert request(blk, 0, VIRTIO_BLK_T_IN, 2047, in_len=1024)[1] == VIRTIO_BLK_S_IOERR
    assert request(blk, 0, 99, 0)[1] == VIRTIO_BLK_S_UNSUPP


def test_discard_and_write_zeroes(backend, blk):
    request(blk, 0, VIRTIO_BLK_T_OUT, 0, out=b"\xab" * 8192)
    seg = struct.pack("<QII", 0, 8, 0)
    assert request(blk, 0, VIRTIO_BLK_T_DISCARD, 0, out=seg)[1] == VIRTIO_BLK_S_OK
    seg = struct.pack("<QII", 8, 8, 0)
    assert request(blk, 0, VIRTIO_BLK_T_WRITE_ZEROES, 0, out=seg)[1] == VIRTIO_BLK_S_OK
    assert backend.image.read_bytes()[:8192] == bytes(8192)


def test_reconnect_keeps_serving(backend):
    for round_ in range(3):
        with VhostUserDriver(backend.blk_path) as drv:
            drv.start_queues([0], size=16)
            payload = bytes([round_]) * 512
            assert request(drv, 0, VIRTIO_BLK_T_OUT, round_, out=payload)[1] == VIRTIO_BLK_S_OK
            assert request(drv, 0, VIRTIO_BLK_T_IN, round_, in_len=512) == (payload, VIRTIO_BLK_S_OK)


def test_inflight_fd_roundtrip(backend):
    with VhostUserDriver(backend.blk_path) as drv:
        info, fd = drv.frontend.get_inflight_fd(2, 64)
        try:
            drv.frontend.set_inflight_fd(info, fd)
            drv.start_queues([0], size=64)
            assert request(drv, 0, VIRTIO_BLK_T_OUT, 1, out=b"x" * 512)[1] == VIRTIO_BLK_S_OK
            # the completed request is no longer marked inflight
            region = os.pread(fd, 16 + 16 * 64, 0)
            assert all(region[16 + 16 * i] == 0 for i in range(64))
            assert struct.unpack_from("=H", region, 14)[0] == 1  # used_idx
        finally:
            os.close(fd)
