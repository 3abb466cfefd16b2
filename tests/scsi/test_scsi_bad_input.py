"""Bad requests from a virtio-scsi driver: each gets the spec's answer and one log line, and nothing else breaks.

After every bad request the device still serves a good one and has not
asked for a reset.
"""

from __future__ import annotations

import logging
import struct

import pytest

from iovirt.virtio.scsi import defs as d

from scsi_guest import lun_field

READ_10_8 = struct.pack(">BBIBHB", d.READ_10, 0, 0, 0, 8, 0)


@pytest.fixture
def logs(caplog):
    caplog.set_level(logging.INFO, logger="iovirt.virtio-scsi")
    return caplog


def still_serves(guest):
    assert not guest.dev.needs_reset
    resp = guest.command(READ_10_8, in_len=8 * 512)
    assert (resp.response, resp.status, resp.residual) == (d.VIRTIO_SCSI_S_OK, d.GOOD, 0)


def one_line(logs, text):
    lines = [r.getMessage() for r in logs.records if r.name == "iovirt.virtio-scsi"]
    assert len(lines) == 1 and text in lines[0], lines
    assert not any(r.exc_info for r in logs.records)


def test_cdb_too_short_for_its_opcode(guest, logs):
    # READ(16) needs 16 CDB bytes; the header stops after 10 of them.
    resp = guest.command(struct.pack(">BBQIBB", d.READ_16, 0, 0, 1, 0, 0), in_len=512, header_len=19 + 10)
    assert (resp.response, resp.status) == (d.VIRTIO_SCSI_S_OK, d.CHECK_CONDITION)
    assert resp.key_asc == (d.ILLEGAL_REQUEST, *d.ASC_INVALID_FIELD_IN_CDB)
    assert resp.residual == 512
    one_line(logs, "CDB of 10 bytes, operation code 0x88 needs 16")
    still_serves(guest)


def test_header_without_cdb(guest, logs):
    resp = guest.command(bytes(6), header_len=19)
    assert resp.response == d.VIRTIO_SCSI_S_FAILURE
    one_line(logs, "holds no CDB")
    still_serves(guest)


def test_short_cdb_that_holds_its_opcode_is_served(guest, logs):
    # A 6-byte CDB in a header cut after it: everything the command needs is there.
    resp = guest.command(bytes(6), header_len=19 + 6)
    assert (resp.response, resp.status) == (d.VIRTIO_SCSI_S_OK, d.GOOD)


def test_unknown_lun(guest, logs):
    resp = guest.command(READ_10_8, lun=9, in_len=8 * 512)
    assert (resp.response, resp.status) == (d.VIRTIO_SCSI_S_OK, d.CHECK_CONDITION)
    assert resp.key_asc == (d.ILLEGAL_REQUEST, *d.ASC_LOGICAL_UNIT_NOT_SUPPORTED)
    assert resp.residual == 8 * 512
    one_line(logs, "LUN 9 does not exist")
    inquiry = guest.command(bytes([d.INQUIRY, 0, 0, 0, 36, 0]), lun=9, in_len=36)
    assert inquiry.status == d.GOOD and inquiry.data[0] == d.PERIPHERAL_NOT_CONNECTED
    still_serves(guest)


@pytest.mark.parametrize("field", [bytes(8), bytes([2, 0, 0x40, 0, 0, 0, 0, 0]), bytes([1, 0, 0x80, 0, 0, 0, 0, 0]),
                                   bytes([1, 0, 0x40, 0, 0, 0, 0, 1])])
def test_bad_lun_address_format(guest, logs, field):
    resp = guest.command(READ_10_8, field=field, in_len=8 * 512)
    assert resp.response == d.VIRTIO_SCSI_S_BAD_TARGET
    one_line(logs, "is not a single-level LUN address")
    still_serves(guest)


def test_other_target(guest, logs):
    resp = guest.command(bytes([d.INQUIRY, 0, 0, 0, 36, 0]), field=lun_field(0, target=3), in_len=36)
    assert resp.response == d.VIRTIO_SCSI_S_BAD_TARGET
    still_serves(guest)


@pytest.mark.parametrize("split", [False, True])
def test_scatter_list_smaller_than_the_read(guest, logs, split):
    resp = guest.command(READ_10_8, in_len=8 * 512 - 1, split=split)
    assert resp.response == d.VIRTIO_SCSI_S_OVERRUN
    assert resp.residual == 8 * 512 - 1 and resp.used_len == 12 + 96  # nothing moved
    one_line(logs, "data-in buffers hold 4095")
    still_serves(guest)


def test_scatter_list_smaller_than_the_write(guest, images, logs):
    with open(images[0], "rb") as f:
        before = f.read(8 * 512)
    resp = guest.command(struct.pack(">BBIBHB", d.WRITE_10, 0, 0, 0, 8, 0), out=b"\xee" * (7 * 512))
    assert resp.response == d.VIRTIO_SCSI_S_OVERRUN and resp.residual == 7 * 512
    with open(images[0], "rb") as f:
        assert f.read(8 * 512) == before
    one_line(logs, "data-out buffers hold 3584")
    still_serves(guest)


def test_request_without_response_buffer(guest, logs):
    elem = guest.submit(2, [lun_field() + bytes(11) + READ_10_8.ljust(32, b"\0")], [])
    assert elem.len == 0
    one_line(logs, "has 0 device-writable bytes, the response takes 108; returned unused")
    elem = guest.submit(2, [lun_field() + bytes(11) + READ_10_8.ljust(32, b"\0")], [100])
    assert elem.len == 0
    still_serves(guest)


def test_data_out_and_data_in_without_inout(guest, logs):
    resp = guest.command(READ_10_8, out=b"x" * 512, in_len=8 * 512)
    assert resp.response == d.VIRTIO_SCSI_S_FAILURE
    one_line(logs, "without VIRTIO_SCSI_F_INOUT")
    still_serves(guest)


def test_unknown_tmf(guest, logs):
    assert guest.tmf(0x77) == (1, d.VIRTIO_SCSI_S_FUNCTION_REJECTED)
    one_line(logs, "task management function 119 not supported")
    assert guest.tmf(d.VIRTIO_SCSI_T_TMF_CLEAR_ACA) == (1, d.VIRTIO_SCSI_S_FUNCTION_REJECTED)
    still_serves(guest)


def test_tmf_bad_address(guest, logs):
    assert guest.tmf(d.VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET, bytes(8)) == (1, d.VIRTIO_SCSI_S_BAD_TARGET)
    assert guest.tmf(d.VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET, lun_field(7)) == (1, d.VIRTIO_SCSI_S_INCORRECT_LUN)
    _used, data = guest.an(d.VIRTIO_SCSI_T_AN_QUERY, lun_field(0, target=2))
    assert data[4] == d.VIRTIO_SCSI_S_BAD_TARGET
    still_serves(guest)


@pytest.mark.parametrize("request_bytes, writable", [
    (struct.pack("<I", 9) + bytes(20), [8]),  # unknown control request type
    (struct.pack("<II", d.VIRTIO_SCSI_T_TMF, 0), [1]),  # a TMF request cut short
    (struct.pack("<II", d.VIRTIO_SCSI_T_TMF, 0) + bytes(16), []),  # no response byte
])
def test_malformed_control_request(guest, logs, request_bytes, writable):
    elem = guest.submit(0, [request_bytes], writable)
    assert elem.len == 0
    one_line(logs, "is not a request of 5.6.6.2; returned unused")
    assert guest.tmf(d.VIRTIO_SCSI_T_TMF_ABORT_TASK) == (1, d.VIRTIO_SCSI_S_FUNCTION_COMPLETE)
    still_serves(guest)
