"""The SCSI commands of the virtio-scsi target (SPC-4, SBC-3), through a guest driving the device in-process."""

from __future__ import annotations

import os
import struct

import pytest

from iovirt.virtio.scsi import defs as d
from iovirt.virtio.scsi.target import MAX_UNMAP_BLOCKS, OPTIMAL_TRANSFER_BLOCKS, PRODUCT, REVISION, VENDOR

from scsi_guest import IMAGE_SIZE

BLOCKS = IMAGE_SIZE // 512


def good(resp):
    assert (resp.response, resp.status) == (d.VIRTIO_SCSI_S_OK, d.GOOD), resp
    return resp


def check(resp, key, asc):
    assert resp.response == d.VIRTIO_SCSI_S_OK and resp.status == d.CHECK_CONDITION, resp
    assert resp.sense[0] == d.SENSE_FIXED_CURRENT and resp.sense_len == d.SENSE_FIXED_LEN
    assert resp.key_asc == (key, *asc)


def test_config_space(dev):
    fields = d.CONFIG.unpack(dev.read_config(0, d.CONFIG.size))
    num_queues, seg_max, max_sectors, cmd_per_lun, event_info_size, sense_size, cdb_size, channel, target, lun = fields
    assert (num_queues, event_info_size, sense_size, cdb_size, channel, target, lun) == (1, 16, 96, 32, 0, 0, 1)
    assert seg_max > 0 and max_sectors > 0 and cmd_per_lun > 0
    assert dev.write_config(d.CONFIG_SENSE_SIZE_OFFSET, struct.pack("<I", 64))
    assert dev.sense_size == 64
    assert not dev.write_config(d.CONFIG_CDB_SIZE_OFFSET, struct.pack("<I", 4096))
    assert not dev.write_config(0, struct.pack("<I", 4))  # num_queues is read-only
    dev.reset()
    assert dev.sense_size == 96


def test_test_unit_ready(guest):
    resp = good(guest.command(bytes(6)))
    assert resp.residual == 0 and resp.sense_len == 0


def test_standard_inquiry(guest):
    resp = good(guest.command(bytes([d.INQUIRY, 0, 0, 0, 96, 0]), in_len=96))
    data = resp.data
    assert data[0] == 0 and data[2] >= 5 and data[3] & 0xF == 2
    assert data[8:16] == VENDOR.ljust(8).encode() and data[16:32] == PRODUCT.ljust(16).encode()
    assert data[32:36] == REVISION.encode()
    assert resp.residual == 96 - 36  # underrun: the residual counts what was not written


@pytest.mark.parametrize("page", [0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2])
def test_vpd_pages(guest, page):
    resp = good(guest.command(bytes([d.INQUIRY, 1, page, 0, 255, 0]), in_len=255))
    data = resp.data
    length = struct.unpack_from(">H", data, 2)[0]
    assert data[1] == page and resp.residual == 255 - 4 - length
    if page == 0x00:
        assert list(data[4 : 4 + length]) == [0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]
    if page == 0x80:
        assert data[4 : 4 + length] == b"iovirt-lun0"
    if page == 0xB0:
        assert length == 0x3C
        assert struct.unpack_from(">I", data, 12)[0] == OPTIMAL_TRANSFER_BLOCKS
        assert struct.unpack_from(">I", data, 20)[0] == MAX_UNMAP_BLOCKS
    if page == 0xB2:
        assert data[5] & 0xC0 == 0xC0  # LBPU, LBPWS


def test_inquiry_bad_fields(guest):
    check(guest.command(bytes([d.INQUIRY, 1, 0x99, 0, 255, 0]), in_len=255), d.ILLEGAL_REQUEST, d.ASC_INVALID_FIELD_IN_CDB)
    check(guest.command(bytes([d.INQUIRY, 0, 0x80, 0, 255, 0]), in_len=255), d.ILLEGAL_REQUEST, d.ASC_INVALID_FIELD_IN_CDB)


def test_read_capacity(guest):
    resp = good(guest.command(bytes([d.READ_CAPACITY_10]) + bytes(9), in_len=8))
    assert struct.unpack(">II", resp.data) == (BLOCKS - 1, 512)
    cdb = bytes([d.SERVICE_ACTION_IN_16, d.SAI_READ_CAPACITY_16]) + bytes(8) + struct.pack(">I", 32) + bytes(2)
    resp = good(guest.command(cdb, in_len=32))
    assert struct.unpack_from(">QI", resp.data) == (BLOCKS - 1, 512)
    assert resp.data[14] & 0x80  # LBPME


def _rw(op, lba, count):
    if op in (d.READ_6, d.WRITE_6):
        return bytes([op, lba >> 16 & 0x1F, lba >> 8 & 0xFF, lba & 0xFF, count & 0xFF, 0])
    if op in (d.READ_10, d.WRITE_10):
        return struct.pack(">BBIBHB", op, 0, lba, 0, count, 0)
    if op in (d.READ_12, d.WRITE_12):
        return struct.pack(">BBIIBB", op, 0, lba, count, 0, 0)
    return struct.pack(">BBQIBB", op, 0, lba, count, 0, 0)


@pytest.mark.parametrize("read, write", [(d.READ_6, d.WRITE_6), (d.READ_10, d.WRITE_10), (d.READ_12, d.WRITE_12),
                                         (d.READ_16, d.WRITE_16)])
def test_write_then_read(guest, images, read, write):
    data = os.urandom(8 * 512)
    good(guest.command(_rw(write, 100, 8), out=data))
    resp = good(guest.command(_rw(read, 100, 8), in_len=len(data), split=True))
    assert resp.data == data and resp.residual == 0
    with open(images[0], "rb") as f:
        f.seek(100 * 512)
        assert f.read(len(data)) == data


def test_read_matches_image(guest, images):
    with open(images[0], "rb") as f:
        want = f.read(64 * 512)
    assert good(guest.command(_rw(d.READ_10, 0, 64), in_len=len(want))).data == want


def test_lba_out_of_range(guest):
    check(guest.command(_rw(d.READ_10, BLOCKS - 1, 2), in_len=1024), d.ILLEGAL_REQUEST, d.ASC_LBA_OUT_OF_RANGE)
    check(guest.command(_rw(d.WRITE_16, BLOCKS, 1), out=bytes(512)), d.ILLEGAL_REQUEST, d.ASC_LBA_OUT_OF_RANGE)
    good(guest.command(_rw(d.READ_16, BLOCKS - 1, 1), in_len=512))


def test_unknown_opcode(guest):
    check(guest.command(bytes([0xC7]) + bytes(11)), d.ILLEGAL_REQUEST, d.ASC_INVALID_COMMAND_OPERATION_CODE)
    check(guest.command(bytes([d.WRITE_SAME_10 + 1 + 0x50]) + bytes(15)), d.ILLEGAL_REQUEST,
          d.ASC_INVALID_COMMAND_OPERATION_CODE)


def test_read_only_lun(ro_guest):
    check(ro_guest.command(_rw(d.WRITE_10, 0, 1), out=bytes(512)), d.DATA_PROTECT, d.ASC_WRITE_PROTECTED)
    check(ro_guest.command(bytes([d.UNMAP]) + bytes(9)), d.DATA_PROTECT, d.ASC_WRITE_PROTECTED)
    resp = good(ro_guest.command(bytes([d.MODE_SENSE_6, 0, 0x3F, 0, 255, 0]), in_len=255))
    assert resp.data[2] & d.MODE_WP
    good(ro_guest.command(_rw(d.READ_10, 0, 1), in_len=512))


@pytest.mark.parametrize("six", [True, False])
def test_mode_sense(guest, six):
    def sense(page, dbd=0, pc=0, subpage=0):
        if six:
            cdb = bytes([d.MODE_SENSE_6, dbd << 3, pc << 6 | page, subpage, 255, 0])
        else:
            cdb = bytes([d.MODE_SENSE_10, dbd << 3, pc << 6 | page, subpage, 0, 0, 0, 1, 0, 0])
        return guest.command(cdb, in_len=255 if six else 256)

    hdr = 4 if six else 8
    resp = good(sense(d.MODE_PAGE_CACHING, dbd=1))
    length = resp.data[0] + 1 if six else struct.unpack_from(">H", resp.data)[0] + 2
    assert length == hdr + 20 and resp.data[hdr] == 0x08 and resp.data[hdr + 2] & 0x04  # WCE
    assert not resp.data[2] & d.MODE_WP
    resp = good(sense(d.MODE_PAGE_CONTROL))
    assert resp.data[hdr + 8] == 0x0A  # after the 8-byte block descriptor
    assert int.from_bytes(resp.data[hdr:hdr + 4], "big") == BLOCKS
    resp = good(sense(d.MODE_PAGE_ALL, dbd=1))
    assert [resp.data[hdr], resp.data[hdr + 20]] == [0x08, 0x0A]
    good(sense(d.MODE_PAGE_ALL, dbd=1, subpage=0xFF))
    check(sense(0x1C), d.ILLEGAL_REQUEST, d.ASC_INVALID_FIELD_IN_CDB)
    check(sense(d.MODE_PAGE_CACHING, pc=3), d.ILLEGAL_REQUEST, d.ASC_SAVING_PARAMETERS_NOT_SUPPORTED)


def test_synchronize_cache(guest):
    good(guest.command(bytes([d.SYNCHRONIZE_CACHE_10]) + bytes(9)))
    good(guest.command(bytes([d.SYNCHRONIZE_CACHE_16]) + bytes(15)))


def test_unmap_and_write_same(guest):
    good(guest.command(_rw(d.WRITE_10, 200, 16), out=b"\xab" * (16 * 512)))
    params = struct.pack(">HH4x", 6 + 16, 16) + struct.pack(">QI4x", 200, 4)
    good(guest.command(bytes([d.UNMAP, 0, 0, 0, 0, 0, 0]) + struct.pack(">H", len(params)) + b"\0", out=params))
    assert good(guest.command(_rw(d.READ_10, 200, 4), in_len=2048)).data == bytes(2048)
    # WRITE SAME(16) with UNMAP and a zero block: deallocated, reads as zeroes
    ws = struct.pack(">BBQIBB", d.WRITE_SAME_16, 0x08, 204, 4, 0, 0)
    good(guest.command(ws, out=bytes(512)))
    assert good(guest.command(_rw(d.READ_10, 204, 4), in_len=2048)).data == bytes(2048)
    # without UNMAP: the block is written to every LBA of the range
    block = os.urandom(512)
    good(guest.command(struct.pack(">BBQIBB", d.WRITE_SAME_16, 0, 208, 3, 0, 0), out=block))
    assert good(guest.command(_rw(d.READ_10, 208, 3), in_len=1536)).data == block * 3
    check(guest.command(struct.pack(">BBQIBB", d.WRITE_SAME_16, 0, 0, 0, 0, 0), out=block), d.ILLEGAL_REQUEST,
          d.ASC_INVALID_FIELD_IN_CDB)
    bad = struct.pack(">HH4x", 6 + 16, 16) + struct.pack(">QI4x", BLOCKS, 1)
    check(guest.command(bytes([d.UNMAP]) + bytes(6) + struct.pack(">H", len(bad)) + b"\0", out=bad),
          d.ILLEGAL_REQUEST, d.ASC_LBA_OUT_OF_RANGE)


def test_report_luns_and_second_lun(guest):
    resp = good(guest.command(bytes([d.REPORT_LUNS, 0, 0, 0, 0, 0]) + struct.pack(">I", 64) + bytes(2), in_len=64))
    length = struct.unpack_from(">I", resp.data)[0]
    assert length == 16 and resp.data[8:10] == b"\0\0" and resp.data[16:18] == b"\0\x01"
    resp = good(guest.command(bytes([d.READ_CAPACITY_10]) + bytes(9), lun=1, in_len=8))
    assert struct.unpack(">II", resp.data) == ((1 << 20) // 512 - 1, 512)


def test_request_sense(guest):
    resp = good(guest.command(bytes([d.REQUEST_SENSE, 0, 0, 0, 18, 0]), in_len=18))
    assert resp.data[0] == 0x70 and resp.data[2] == d.NO_SENSE
    resp = good(guest.command(bytes([d.REQUEST_SENSE, 0, 0, 0, 18, 0]), lun=5, in_len=18))
    assert (resp.data[2], resp.data[12]) == (d.ILLEGAL_REQUEST, 0x25)


def test_task_management(guest):
    for subtype in (d.VIRTIO_SCSI_T_TMF_ABORT_TASK, d.VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET,
                    d.VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET, d.VIRTIO_SCSI_T_TMF_ABORT_TASK_SET):
        assert guest.tmf(subtype) == (1, d.VIRTIO_SCSI_S_FUNCTION_COMPLETE)
    good(guest.command(bytes(6)))


def test_an_query(guest):
    used, data = guest.an(d.VIRTIO_SCSI_T_AN_QUERY)
    assert used == 5 and d.CTRL_AN_RESP.unpack(data) == (0, d.VIRTIO_SCSI_S_OK)
    used, data = guest.an(d.VIRTIO_SCSI_T_AN_SUBSCRIBE)
    assert d.CTRL_AN_RESP.unpack(data) == (0, d.VIRTIO_SCSI_S_OK)


def test_event_queue_buffers_wait(guest):
    queue = guest.queues[d.EVENTQ]
    queue.add_data([], [16])
    queue.publish()
    guest.dev.kick(d.EVENTQ)
    assert queue.get_used() == []
