"""virtio-scsi device requirements of virtio 1.2 section 5.6, checked from the driver's side.

A :class:`ScsiPort` builds ``struct virtio_scsi_req_cmd`` requests on the
first request queue and control requests on the control queue (5.6.6), with
the sense_size and cdb_size the config space gives (96 and 32 after reset).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from iovirt.conformance.link import Link
from iovirt.conformance.registry import NotApplicable, check, expect
from iovirt.conformance.target import Capabilities, Context
from iovirt.virtio.scsi import defs as d

SCSI = {"scsi"}
UNKNOWN_OPCODE = 0xC7  # vendor-specific (SPC-4 4.2.5.1): no device is expected to implement it
UNKNOWN_TMF = 0x77  # no task management function of 5.6.6.2
REQUEST_RESPONSES = {d.VIRTIO_SCSI_S_OK, d.VIRTIO_SCSI_S_OVERRUN, d.VIRTIO_SCSI_S_ABORTED, d.VIRTIO_SCSI_S_BAD_TARGET,
                     d.VIRTIO_SCSI_S_RESET, d.VIRTIO_SCSI_S_BUSY, d.VIRTIO_SCSI_S_TRANSPORT_FAILURE,
                     d.VIRTIO_SCSI_S_TARGET_FAILURE, d.VIRTIO_SCSI_S_NEXUS_FAILURE, d.VIRTIO_SCSI_S_FAILURE}


def lun_field(lun: int = 0, target: int = 0) -> bytes:
    """The single-level lun field of 5.6.6.1."""
    return bytes([d.LUN_FIRST_BYTE, target, d.LUN_FLAT_ADDRESSING | lun >> 8, lun & 0xFF, 0, 0, 0, 0])


@dataclass
class ScsiResponse:
    """A request queue response (5.6.6.1) and the data-in bytes after it."""

    sense_len: int
    residual: int
    status: int
    response: int
    sense: bytes
    data: bytes


class ScsiPort:
    """The control queue and the first request queue of a virtio-scsi link."""

    def __init__(self, link: Link, caps: Capabilities) -> None:
        self.link = link
        self.sense_size, self.cdb_size = _sizes(caps)
        for index in (d.CONTROLQ, d.EVENTQ, d.REQUESTQ_BASE):
            link.queue(index, 64)
        link.driver_ok()

    def command(self, cdb: bytes, *, field: bytes | None = None, out: bytes = b"", in_len: int = 0) -> ScsiResponse:
        """One command; the response code must be one of 5.6.6.1's."""
        header = (field if field is not None else lun_field()) + struct.pack("<QBBB", 1, d.VIRTIO_SCSI_S_SIMPLE, 0, 0)
        resp = d.RESP_CMD_HDR.size + self.sense_size
        index = d.REQUESTQ_BASE
        self.link.add(index, [header + cdb.ljust(self.cdb_size, b"\0")] + ([out] if out else []),
                      [resp] + ([in_len] if in_len else []))
        self.link.submit(index)
        (elem,) = self.link.wait_used(index, 1)
        expect(elem.len >= d.RESP_CMD_HDR.size,
               f"virtio-1.2 5.6.6.1: used length {elem.len} does not cover the {d.RESP_CMD_HDR.size}-byte response")
        sense_len, residual, _qualifier, status, response = d.RESP_CMD_HDR.unpack_from(elem.data)
        expect(response in REQUEST_RESPONSES, f"virtio-1.2 5.6.6.1: response {response} is no VIRTIO_SCSI_S_* code")
        sense = elem.data[d.RESP_CMD_HDR.size : d.RESP_CMD_HDR.size + min(sense_len, self.sense_size)]
        return ScsiResponse(sense_len, residual, status, response, sense, elem.data[resp:])

    def control(self, request: bytes, resp_len: int) -> bytes:
        """One control queue request; the response bytes."""
        self.link.add(d.CONTROLQ, [request], [resp_len])
        self.link.submit(d.CONTROLQ)
        (elem,) = self.link.wait_used(d.CONTROLQ, 1)
        expect(elem.len >= resp_len, f"virtio-1.2 5.6.6.2: used length {elem.len}, the response takes {resp_len}")
        return elem.data[:resp_len]

    def tmf(self, subtype: int, field: bytes | None = None) -> int:
        """A task management function's response byte."""
        req = d.CTRL_TMF_REQ.pack(d.VIRTIO_SCSI_T_TMF, subtype, field if field is not None else lun_field(), 1)
        return self.control(req, 1)[0]


def _sizes(caps: Capabilities) -> tuple[int, int]:
    if caps.config is None or len(caps.config) < d.CONFIG.size:
        return d.VIRTIO_SCSI_SENSE_DEFAULT_SIZE, d.VIRTIO_SCSI_CDB_DEFAULT_SIZE
    fields = d.CONFIG.unpack(caps.config[: d.CONFIG.size])
    return fields[5], fields[6]


def _port(ctx: Context) -> ScsiPort:
    return ScsiPort(ctx.open(), ctx.caps)


def _config(caps: Capabilities) -> tuple[int, ...]:
    if caps.config is None:
        raise NotApplicable("no config space: VHOST_USER_PROTOCOL_F_CONFIG not offered or GET_CONFIG failed")
    return d.CONFIG.unpack(caps.config[: d.CONFIG.size])


@check("virtio-1.2:5.6.4", "scsi: after reset sense_size is 96 and cdb_size 32; num_queues >= 1", devices=SCSI)
def config_defaults(ctx: Context) -> None:
    num_queues, *_rest = fields = _config(ctx.caps)
    expect(fields[5:7] == (96, 32), f"sense_size {fields[5]}, cdb_size {fields[6]}: expected 96 and 32 after reset")
    expect(num_queues >= 1, "num_queues is 0: a device has at least one request queue")
    if ctx.caps.queue_num is not None:
        expect(ctx.caps.queue_num >= num_queues + 2,
               f"GET_QUEUE_NUM {ctx.caps.queue_num} < controlq + eventq + num_queues {num_queues}")


@check("virtio-1.2:5.6.6.1#ok", "scsi: TEST UNIT READY to LUN 0 completes with VIRTIO_SCSI_S_OK, status GOOD",
       devices=SCSI)
def test_unit_ready(ctx: Context) -> None:
    resp = _port(ctx).command(bytes(6))
    expect((resp.response, resp.status) == (d.VIRTIO_SCSI_S_OK, d.GOOD),
           f"response {resp.response}, status {resp.status:#x}: expected OK and GOOD")


@check("virtio-1.2:5.6.6.1#sense-len", "scsi: a CHECK CONDITION carries sense_len bytes, at most sense_size",
       devices=SCSI)
def sense_len(ctx: Context) -> None:
    port = _port(ctx)
    resp = port.command(bytes([UNKNOWN_OPCODE]) + bytes(11))
    expect((resp.response, resp.status) == (d.VIRTIO_SCSI_S_OK, d.CHECK_CONDITION),
           f"unsupported opcode {UNKNOWN_OPCODE:#x}: response {resp.response}, status {resp.status:#x}; "
           "expected OK with CHECK CONDITION")
    expect(0 < resp.sense_len <= port.sense_size, f"sense_len {resp.sense_len} not in 1..sense_size {port.sense_size}")
    key = resp.sense[2] & 0xF if len(resp.sense) > 2 else None
    expect(key == d.ILLEGAL_REQUEST, f"sense key {key} for an unsupported opcode, expected ILLEGAL REQUEST (5)")


@check("virtio-1.2:5.6.6.1#residual", "scsi: the residual is the data-in bytes not transferred", devices=SCSI)
def residual(ctx: Context) -> None:
    resp = _port(ctx).command(bytes([d.INQUIRY, 0, 0, 0, 36, 0]), in_len=96)
    expect(resp.status == d.GOOD, f"INQUIRY status {resp.status:#x}")
    expect(resp.residual == 96 - 36, f"INQUIRY of 36 bytes into 96: residual {resp.residual}, expected 60")


@check("virtio-1.2:5.6.6.1#overrun",
       "scsi: a READ needing more data-in than the buffers hold completes with VIRTIO_SCSI_S_OVERRUN", devices=SCSI)
def overrun(ctx: Context) -> None:
    resp = _port(ctx).command(struct.pack(">BBIBHB", d.READ_10, 0, 0, 0, 8, 0), in_len=512)
    expect(resp.response == d.VIRTIO_SCSI_S_OVERRUN, f"READ(10) of 8 blocks into 512 bytes: response {resp.response}, "
           "expected VIRTIO_SCSI_S_OVERRUN (1)")


@check("virtio-1.2:5.6.6.1#bad-target", "scsi: a lun field naming no target gets VIRTIO_SCSI_S_BAD_TARGET",
       devices=SCSI)
def bad_target(ctx: Context) -> None:
    port = _port(ctx)
    for field in (bytes(8), lun_field(0, target=0xFE)):
        resp = port.command(bytes(6), field=field)
        expect(resp.response == d.VIRTIO_SCSI_S_BAD_TARGET,
               f"lun field {field.hex()}: response {resp.response}, expected VIRTIO_SCSI_S_BAD_TARGET (3)")


@check("virtio-1.2:5.6.6.1#inout",
       "scsi: without VIRTIO_SCSI_F_INOUT a request with data-out and data-in fails with VIRTIO_SCSI_S_FAILURE",
       devices=SCSI,
       applies=lambda caps: "VIRTIO_SCSI_F_INOUT offered" if caps.has(d.VIRTIO_SCSI_F_INOUT) else None)
def inout(ctx: Context) -> None:
    resp = _port(ctx).command(bytes(6), out=bytes(512), in_len=512)
    expect(resp.response == d.VIRTIO_SCSI_S_FAILURE, f"response {resp.response}, expected VIRTIO_SCSI_S_FAILURE (9)")


@check("virtio-1.2:5.6.6.2#tmf", "scsi: ABORT TASK and LOGICAL UNIT RESET on LUN 0 complete", devices=SCSI)
def tmf(ctx: Context) -> None:
    port = _port(ctx)
    for subtype, name in ((d.VIRTIO_SCSI_T_TMF_ABORT_TASK, "ABORT TASK"),
                          (d.VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET, "LOGICAL UNIT RESET")):
        response = port.tmf(subtype)
        expect(response in (d.VIRTIO_SCSI_S_FUNCTION_COMPLETE, d.VIRTIO_SCSI_S_FUNCTION_SUCCEEDED),
               f"{name}: response {response}, expected FUNCTION COMPLETE (0) or SUCCEEDED (10)")
    expect(port.command(bytes(6)).status == d.GOOD, "TEST UNIT READY after the reset did not complete GOOD")


@check("virtio-1.2:5.6.6.2#tmf-rejected", "scsi: an unknown task management function is rejected", devices=SCSI)
def tmf_rejected(ctx: Context) -> None:
    response = _port(ctx).tmf(UNKNOWN_TMF)
    expect(response == d.VIRTIO_SCSI_S_FUNCTION_REJECTED,
           f"TMF subtype {UNKNOWN_TMF:#x}: response {response}, expected VIRTIO_SCSI_S_FUNCTION_REJECTED (11)")


@check("virtio-1.2:5.6.6.2#tmf-bad-target", "scsi: a TMF whose lun field names no target gets BAD_TARGET",
       devices=SCSI)
def tmf_bad_target(ctx: Context) -> None:
    response = _port(ctx).tmf(d.VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET, bytes(8))
    expect(response == d.VIRTIO_SCSI_S_BAD_TARGET, f"response {response}, expected VIRTIO_SCSI_S_BAD_TARGET (3)")


@check("virtio-1.2:5.6.6.2#an-query", "scsi: an AN query reports only events that were asked about", devices=SCSI)
def an_query(ctx: Context) -> None:
    requested = 0x7E
    resp = _port(ctx).control(d.CTRL_AN_REQ.pack(d.VIRTIO_SCSI_T_AN_QUERY, lun_field(), requested),
                              d.CTRL_AN_RESP.size)
    event_actual, response = d.CTRL_AN_RESP.unpack(resp)
    expect(response == d.VIRTIO_SCSI_S_OK, f"AN query: response {response}, expected OK")
    expect(not event_actual & ~requested, f"event_actual {event_actual:#x} holds events not requested ({requested:#x})")
