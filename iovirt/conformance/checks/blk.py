"""virtio-blk device requirements of virtio 1.2 section 5.2."""

from __future__ import annotations

import struct

from iovirt.conformance.checks.common import blk_pattern, expect_ok
from iovirt.conformance.devices import STATUS_NAMES, BlkPort
from iovirt.conformance.registry import NotApplicable, check, expect
from iovirt.conformance.target import Capabilities, Context, needs_feature
from iovirt.virtio.blk.defs import (
    DISCARD_SEG,
    SECTOR_SIZE,
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
)

BLK = {"blk"}
UNKNOWN_TYPE = 0x5A  # no request type of virtio 1.2 (5.2.6) or later drafts


def _port(ctx: Context) -> BlkPort:
    return BlkPort(ctx.open())


def _capacity(caps: Capabilities) -> int:
    if caps.config is None:
        raise NotApplicable("no config space: VHOST_USER_PROTOCOL_F_CONFIG not offered or GET_CONFIG failed")
    return struct.unpack_from("<Q", caps.config)[0]


def _writable(caps: Capabilities) -> str | None:
    return "VIRTIO_BLK_F_RO offered: the device is read-only" if caps.has(VIRTIO_BLK_F_RO) else None


@check("virtio-1.2:5.2.6#in-out", "blk: data written with OUT reads back with IN, both OK", devices=BLK, applies=_writable)
def write_read(ctx: Context) -> None:
    port = _port(ctx)
    data = blk_pattern(8 * SECTOR_SIZE)
    expect_ok(port.request(VIRTIO_BLK_T_OUT, 8, out=data).status, "OUT of 8 sectors at sector 8")
    got = port.request(VIRTIO_BLK_T_IN, 8, in_len=len(data))
    expect_ok(got.status, "IN of 8 sectors at sector 8")
    expect(got.data == data, "data read back differs from the data written")
    split = port.request(VIRTIO_BLK_T_IN, 8, in_len=len(data), split=True)
    expect(split.status == VIRTIO_BLK_S_OK and split.data == data, "IN split over odd-sized descriptors differs")


@check(
    "virtio-1.2:5.2.6#flush",
    "blk: FLUSH completes with OK",
    devices=BLK,
    applies=needs_feature(VIRTIO_BLK_F_FLUSH, "VIRTIO_BLK_F_FLUSH"),
)
def flush(ctx: Context) -> None:
    expect_ok(_port(ctx).request(VIRTIO_BLK_T_FLUSH, 0).status, "FLUSH")


@check("virtio-1.2:5.2.6#get-id", "blk: GET_ID returns a NUL-padded ASCII string of up to 20 bytes", devices=BLK)
def get_id(ctx: Context) -> None:
    got = _port(ctx).request(VIRTIO_BLK_T_GET_ID, 0, in_len=VIRTIO_BLK_ID_BYTES)
    if got.status == VIRTIO_BLK_S_UNSUPP:
        raise NotApplicable("the device answers GET_ID with UNSUPP (it keeps no ID string)")
    expect_ok(got.status, "GET_ID")
    text, _, pad = got.data.partition(b"\0")
    expect(all(0x20 <= c < 0x7F for c in text), f"ID string {text!r} is not printable ASCII")
    expect(pad.strip(b"\0") == b"", f"ID string not NUL-padded after {text!r}: {got.data!r}")


@check("virtio-1.2:5.2.6#unsupp", "blk: an unknown request type completes with UNSUPP", devices=BLK)
def unsupported(ctx: Context) -> None:
    status = _port(ctx).request(UNKNOWN_TYPE, 0).status
    expect(status == VIRTIO_BLK_S_UNSUPP, f"type {UNKNOWN_TYPE:#x}: status {STATUS_NAMES[status]}, expected UNSUPP")


@check("virtio-1.2:5.2.4", "blk: capacity in config space; its last sector is readable", devices=BLK)
def capacity(ctx: Context) -> None:
    cap = _capacity(ctx.caps)
    expect(cap > 0, "capacity is 0")
    expect_ok(_port(ctx).request(VIRTIO_BLK_T_IN, cap - 1, in_len=SECTOR_SIZE).status, f"IN of the last sector {cap - 1}")


@check("virtio-1.2:5.2.6#beyond-capacity", "blk: reads beyond capacity complete with IOERR", devices=BLK)
def beyond_capacity(ctx: Context) -> None:
    cap = _capacity(ctx.caps)
    port = _port(ctx)
    for sector, count in ((cap, 1), (cap - 1, 2)):
        status = port.request(VIRTIO_BLK_T_IN, sector, in_len=count * SECTOR_SIZE).status
        expect(
            status == VIRTIO_BLK_S_IOERR,
            f"IN of sectors [{sector}, +{count}) with capacity {cap}: {STATUS_NAMES[status]}, expected IOERR",
        )


@check(
    "virtio-1.2:5.2.6.2#ro",
    "blk: with VIRTIO_BLK_F_RO offered a write fails with IOERR and writes nothing",
    devices=BLK,
    applies=needs_feature(VIRTIO_BLK_F_RO, "VIRTIO_BLK_F_RO"),
)
def read_only(ctx: Context) -> None:
    port = _port(ctx)
    before = port.request(VIRTIO_BLK_T_IN, 0, in_len=SECTOR_SIZE)
    expect_ok(before.status, "IN of sector 0")
    status = port.request(VIRTIO_BLK_T_OUT, 0, out=bytes(~b & 0xFF for b in before.data)).status
    expect(status == VIRTIO_BLK_S_IOERR, f"OUT on a read-only device: {STATUS_NAMES[status]}, expected IOERR")
    after = port.request(VIRTIO_BLK_T_IN, 0, in_len=SECTOR_SIZE)
    expect(after.data == before.data, "the write to a read-only device changed the data")


@check(
    "virtio-1.2:5.2.6.2#write-zeroes",
    "blk: after WRITE_ZEROES completes the range reads as zeroes",
    devices=BLK,
    applies=needs_feature(VIRTIO_BLK_F_WRITE_ZEROES, "VIRTIO_BLK_F_WRITE_ZEROES"),
)
def write_zeroes(ctx: Context) -> None:
    port = _port(ctx)
    expect_ok(port.request(VIRTIO_BLK_T_OUT, 16, out=b"\xab" * (4 * SECTOR_SIZE)).status, "OUT before WRITE_ZEROES")
    seg = DISCARD_SEG.pack(16, 4, 0)
    expect_ok(port.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, out=seg).status, "WRITE_ZEROES of 4 sectors")
    got = port.request(VIRTIO_BLK_T_IN, 16, in_len=4 * SECTOR_SIZE)
    expect(got.status == VIRTIO_BLK_S_OK and got.data == bytes(4 * SECTOR_SIZE), "the zeroed range does not read as zeroes")


@check(
    "virtio-1.2:5.2.6.2#discard-unmap",
    "blk: DISCARD with the unmap flag set completes with UNSUPP",
    devices=BLK,
    applies=needs_feature(VIRTIO_BLK_F_DISCARD, "VIRTIO_BLK_F_DISCARD"),
)
def discard_unmap(ctx: Context) -> None:
    seg = DISCARD_SEG.pack(0, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)
    status = _port(ctx).request(VIRTIO_BLK_T_DISCARD, 0, out=seg).status
    expect(status == VIRTIO_BLK_S_UNSUPP, f"DISCARD with unmap: {STATUS_NAMES[status]}, expected UNSUPP")
