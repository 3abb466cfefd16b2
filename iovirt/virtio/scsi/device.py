"""The virtio-scsi device (virtio 1.2 section 5.6): one target, its LUNs on raw images.

Queues (5.6.2): the control queue (task management and asynchronous
notification queries, 5.6.6.2), the event queue (5.6.6.3; iovirt has no
events to report, so its buffers wait there) and ``num_queues`` request
queues (5.6.6.1).  A request is ``struct virtio_scsi_req_cmd``: the header
(lun, id, task attributes, CDB of ``cdb_size`` bytes) and the data-out
buffers device-readable, then the response (sense_len, residual,
status_qualifier, status, response, sense of ``sense_size`` bytes) and the
data-in buffers device-writable.  READ/WRITE(10/16) that end GOOD go
through ``datapath.py`` (the Cython twin, or the Python reference with the
reference queue), which moves data between the image and guest memory with
``preadv``/``pwritev`` straight on guest memory; every other request, and
every error, is served here.  The SCSI command itself is the target's
(``target.py``); this module reads the request, checks what virtio-scsi
says about it, and writes the response.

Bad requests get the spec's answer and one log line:

- a lun field not in the single-level format of 5.6.6.1, or naming a target
  other than 0: VIRTIO_SCSI_S_BAD_TARGET;
- a LUN that does not exist: CHECK CONDITION, LOGICAL UNIT NOT SUPPORTED
  (INQUIRY answers "no logical unit here", SPC-4 6.6.2);
- a header too short to hold the opcode's CDB (SPC-4 4.2.5.1): CHECK
  CONDITION, INVALID FIELD IN CDB; too short to hold an opcode: VIRTIO_SCSI_S_FAILURE;
- buffers smaller than the CDB's transfer: VIRTIO_SCSI_S_OVERRUN, nothing
  moved, the residual is the whole buffer;
- data-out and data-in in one request (VIRTIO_SCSI_F_INOUT is not offered):
  VIRTIO_SCSI_S_FAILURE (5.6.6.1);
- no room for the response: the chain is returned with used length 0;
- an unknown task management function: VIRTIO_SCSI_S_FUNCTION_REJECTED.
"""

from __future__ import annotations

import collections
import struct
from typing import Any

from iovirt.memory import GuestMemory, GuestMemoryError
from iovirt.virtio.chain import DescChain
from iovirt.virtio.device import COMMON_FEATURES, VirtioDevice
from iovirt.virtio.queue import IMPLEMENTATION as QUEUE_IMPLEMENTATION
from iovirt.virtio.queue import ChainBatch, SplitQueue, is_accelerated, ring_of
from iovirt.virtio.scsi import datapath
from iovirt.virtio.scsi.defs import (
    ASC_INVALID_FIELD_IN_CDB,
    CDB_GROUP_LENGTH,
    CHECK_CONDITION,
    CONFIG,
    CONFIG_CDB_SIZE_OFFSET,
    CONFIG_SENSE_SIZE_OFFSET,
    CONTROLQ,
    CTRL_AN_REQ,
    CTRL_AN_RESP,
    CTRL_TMF_REQ,
    CTRL_TYPE,
    EVENT,
    EVENTQ,
    GOOD,
    ILLEGAL_REQUEST,
    REQ_CMD_HDR,
    RESP_CMD_HDR,
    VIRTIO_ID_SCSI,
    VIRTIO_SCSI_CDB_DEFAULT_SIZE,
    VIRTIO_SCSI_CDB_MAX_SIZE,
    VIRTIO_SCSI_F_INOUT,
    VIRTIO_SCSI_S_BAD_TARGET,
    VIRTIO_SCSI_S_FAILURE,
    VIRTIO_SCSI_S_FUNCTION_COMPLETE,
    VIRTIO_SCSI_S_FUNCTION_REJECTED,
    VIRTIO_SCSI_S_INCORRECT_LUN,
    VIRTIO_SCSI_S_OK,
    VIRTIO_SCSI_S_OVERRUN,
    VIRTIO_SCSI_SENSE_DEFAULT_SIZE,
    VIRTIO_SCSI_SENSE_MAX_SIZE,
    VIRTIO_SCSI_T_AN_QUERY,
    VIRTIO_SCSI_T_AN_SUBSCRIBE,
    VIRTIO_SCSI_T_TMF,
    VIRTIO_SCSI_T_TMF_ABORT_TASK,
    VIRTIO_SCSI_T_TMF_ABORT_TASK_SET,
    VIRTIO_SCSI_T_TMF_CLEAR_TASK_SET,
    VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET,
    VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET,
    VIRTIO_SCSI_T_TMF_QUERY_TASK,
    VIRTIO_SCSI_T_TMF_QUERY_TASK_SET,
)
from iovirt.virtio.scsi._datapath_py import gather as _gather
from iovirt.virtio.scsi._datapath_py import parse_lun
from iovirt.virtio.scsi._datapath_py import scatter as _scatter
from iovirt.virtio.scsi._datapath_py import skip as _skip
from iovirt.virtio.scsi.datapath import LunInfo
from iovirt.virtio.scsi.target import MAX_TRANSFER_BLOCKS, Lun, Outcome, ScsiTarget, Transfer, fixed_sense

BATCH = 64
Buffers = list[tuple[int, int]]

TMF_COMPLETE = frozenset({
    # Every command completes before the next request is read, so no task is ever in flight: aborting or
    # querying finds nothing, and a reset has nothing to cancel (SAM-5 7: FUNCTION COMPLETE).
    VIRTIO_SCSI_T_TMF_ABORT_TASK, VIRTIO_SCSI_T_TMF_ABORT_TASK_SET, VIRTIO_SCSI_T_TMF_CLEAR_TASK_SET,
    VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET, VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET, VIRTIO_SCSI_T_TMF_QUERY_TASK,
    VIRTIO_SCSI_T_TMF_QUERY_TASK_SET,
})
"""Task management functions answered FUNCTION COMPLETE; others (CLEAR ACA: no ACA; unknown) are rejected."""


class VirtioScsi(VirtioDevice):
    """A virtio-scsi host adapter with target 0 and one LUN per raw image (LUN ``i`` is ``images[i]``)."""

    device_id = VIRTIO_ID_SCSI
    name = "virtio-scsi"

    def __init__(
        self,
        images: list[str],
        *,
        read_only: bool = False,
        num_queues: int = 1,
        seg_max: int = 126,
        cmd_per_lun: int = 128,
        queue_max_size: int = 1024,
        label: str = "",
    ) -> None:
        if not images:
            raise ValueError("virtio-scsi needs at least one image (LUN 0)")
        super().__init__(2 + num_queues, queue_max_size, label or "scsi")
        luns: list[Lun] = []
        try:
            for i, path in enumerate(images):
                luns.append(Lun(path, read_only=read_only, serial=f"iovirt-lun{i}"))
        except OSError:
            for lun in luns:
                lun.close()
            raise
        self.target = ScsiTarget(luns)
        # What the batch data path needs of each LUN, LUN i at i (the LUNs never change).
        self._lun_table = tuple(LunInfo(lun.fd, lun.blocks, lun.read_only) for lun in luns)
        self.read_only = read_only
        self.request_queues = num_queues
        self.seg_max = seg_max
        self.cmd_per_lun = cmd_per_lun
        self.sense_size = VIRTIO_SCSI_SENSE_DEFAULT_SIZE
        self.cdb_size = VIRTIO_SCSI_CDB_DEFAULT_SIZE
        self.stats: collections.Counter[str] = collections.Counter()
        batch_type: Any = ChainBatch
        self._batches = [batch_type() if QUEUE_IMPLEMENTATION == "cython" else None for _ in range(self.num_queues)]

    def close(self) -> None:
        """Close the images."""
        self.target.close()

    # -- features and config (5.6.3, 5.6.4) -------------------------------------------
    def device_features(self) -> int:
        """The common bits only: no INOUT, HOTPLUG, CHANGE or T10_PI."""
        return COMMON_FEATURES

    def config_space(self) -> bytes:
        """``struct virtio_scsi_config``."""
        return CONFIG.pack(
            self.request_queues,
            self.seg_max,
            MAX_TRANSFER_BLOCKS,  # max_sectors: the largest transfer the target takes (VPD B0h)
            self.cmd_per_lun,
            EVENT.size,  # event_info_size
            self.sense_size,
            self.cdb_size,
            0,  # max_channel
            0,  # max_target: one target
            len(self.target.luns) - 1,  # max_lun
        )

    def write_config(self, offset: int, data: bytes) -> bool:
        """5.6.4: the driver may set sense_size and cdb_size (whole 32-bit writes, up to 256)."""
        fields = {CONFIG_SENSE_SIZE_OFFSET: "sense_size", CONFIG_CDB_SIZE_OFFSET: "cdb_size"}
        limit = {"sense_size": VIRTIO_SCSI_SENSE_MAX_SIZE, "cdb_size": VIRTIO_SCSI_CDB_MAX_SIZE}
        name = fields.get(offset)
        if name is None or len(data) != 4:
            return super().write_config(offset, data)
        value = struct.unpack("<I", data)[0]
        if value > limit[name]:
            self.log.warning("%s: %s %d refused: at most %d", self.label, name, value, limit[name])
            return False
        setattr(self, name, value)
        return True

    def _reset(self) -> None:
        self.sense_size = VIRTIO_SCSI_SENSE_DEFAULT_SIZE
        self.cdb_size = VIRTIO_SCSI_CDB_DEFAULT_SIZE

    # -- queues (5.6.6) -----------------------------------------------------------------
    def process_queue(self, index: int, queue: SplitQueue) -> None:
        """Serve the control or a request queue; event queue buffers wait for events (there are none)."""
        if not self.enabled[index] or index == EVENTQ:
            # vhost-user "Ring states": a disabled ring has no side effects.
            return
        memory = queue.memory
        control = index == CONTROLQ
        reuse = self._batches[index] if is_accelerated(ring_of(queue)) else None
        while True:
            batch = queue.pop_batch(BATCH, reuse)
            if not len(batch):
                break
            if control:
                for i in range(len(batch)):
                    batch.set_used_len(i, self._serve_ctrl(memory, batch[i]))
            else:
                # READ/WRITE(10/16) that end GOOD in the data path; the rest, and every error, here.
                left, reads, writes, _read_bytes, _written_bytes = datapath.serve_batch(
                    batch, queue, self._lun_table, self.sense_size, self.cdb_size
                )
                self.stats["commands"] += reads + writes
                for i in left:
                    batch.set_used_len(i, self._serve_cmd(memory, batch[i]))
            queue.push_batch(batch)
            self.signal(index)

    # -- request queues (5.6.6.1) ---------------------------------------------------------
    def _serve_cmd(self, memory: GuestMemory, chain: DescChain) -> int:
        """Execute one SCSI command; returns the used length (response plus data-in written)."""
        resp_size = RESP_CMD_HDR.size + self.sense_size
        writable = chain.writable
        if chain.writable_len < resp_size:
            self.stats["malformed"] += 1
            self.log.warning("%s: request %d has %d device-writable bytes, the response takes %d; returned unused",
                             self.label, chain.head, chain.writable_len, resp_size)
            return 0
        hdr_size = REQ_CMD_HDR.size + self.cdb_size
        readable = chain.readable
        datain, dataout = _skip(writable, resp_size), _skip(readable, hdr_size)
        out_len, in_len = sum(n for _, n in dataout), sum(n for _, n in datain)
        try:
            header = _gather(memory, readable, hdr_size)
            response, outcome, buf_len = self._command(memory, chain, header, dataout, datain, out_len, in_len)
            sense = outcome.sense[: self.sense_size]
            residual = buf_len - outcome.transferred
            _scatter(memory, writable, RESP_CMD_HDR.pack(len(sense), residual, 0, outcome.status, response) + sense)
        except GuestMemoryError as exc:
            self.stats["errors"] += 1
            self.log.warning("%s: request %d: %s", self.label, chain.head, exc)
            _scatter(memory, writable, RESP_CMD_HDR.pack(0, 0, 0, GOOD, VIRTIO_SCSI_S_FAILURE))
            return resp_size
        return resp_size + (outcome.transferred if in_len else 0)

    def _command(
        self, memory: GuestMemory, chain: DescChain, header: bytes, dataout: Buffers, datain: Buffers,
        out_len: int, in_len: int,
    ) -> tuple[int, Outcome, int]:
        """(virtio-scsi response, the command's outcome, the data buffer's length for the residual)."""
        buf_len = in_len or out_len
        if len(header) <= REQ_CMD_HDR.size:
            return self._refuse(chain, VIRTIO_SCSI_S_FAILURE, buf_len,
                                f"request header of {len(header)} bytes holds no CDB")
        lun_field = header[:8]
        address = parse_lun(lun_field)
        if address is None:
            return self._refuse(chain, VIRTIO_SCSI_S_BAD_TARGET, buf_len,
                                f"lun field {lun_field.hex()} is not a single-level LUN address (5.6.6.1)")
        target, lun = address
        if target != 0:
            # Linux scans every target up to max_target: not worth a warning.
            self.stats["bad_target"] += 1
            return VIRTIO_SCSI_S_BAD_TARGET, Outcome(), buf_len
        if out_len and in_len and not self.has_feature(VIRTIO_SCSI_F_INOUT):
            return self._refuse(chain, VIRTIO_SCSI_S_FAILURE, buf_len,
                                "data-out and data-in in one request without VIRTIO_SCSI_F_INOUT")
        cdb = header[REQ_CMD_HDR.size :]
        want = CDB_GROUP_LENGTH[cdb[0] >> 5]
        if len(cdb) < want:
            self.stats["check_condition"] += 1
            self.log.warning("%s: request %d: CDB of %d bytes, operation code %#04x needs %d; CHECK CONDITION",
                             self.label, chain.head, len(cdb), cdb[0], want)
            return VIRTIO_SCSI_S_OK, Outcome(CHECK_CONDITION, fixed_sense(ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_CDB)), \
                buf_len
        outcome = self.target.execute(lun, cdb, Transfer(memory, dataout, datain))
        if outcome.overrun:
            return self._refuse(chain, VIRTIO_SCSI_S_OVERRUN, buf_len, f"LUN {lun} CDB {cdb[:want].hex()}: "
                                f"{outcome.message}")
        if outcome.status != GOOD:
            self.stats["check_condition"] += 1
            # Drivers probe what a device supports this way: an info line, not a warning.
            self.log.info("%s: LUN %d CDB %s: CHECK CONDITION: %s", self.label, lun, cdb[: want or 1].hex(),
                          outcome.message)
        self.stats["commands"] += 1
        return VIRTIO_SCSI_S_OK, outcome, buf_len

    def _refuse(self, chain: DescChain, response: int, buf_len: int, why: str) -> tuple[int, Outcome, int]:
        self.stats["refused"] += 1
        self.log.warning("%s: request %d: %s; response %d", self.label, chain.head, why, response)
        return response, Outcome(), buf_len

    # -- control queue (5.6.6.2) ------------------------------------------------------------
    def _serve_ctrl(self, memory: GuestMemory, chain: DescChain) -> int:
        """One task management function or asynchronous notification request; returns the used length."""
        readable, writable = chain.readable, chain.writable
        try:
            request = _gather(memory, readable, CTRL_TMF_REQ.size)
            rtype = CTRL_TYPE.unpack_from(request)[0] if len(request) >= CTRL_TYPE.size else None
            if rtype == VIRTIO_SCSI_T_TMF and len(request) >= CTRL_TMF_REQ.size and chain.writable_len >= 1:
                _type, subtype, lun, _tag = CTRL_TMF_REQ.unpack_from(request)
                response = self._address_response(lun)
                if response is None:
                    response = VIRTIO_SCSI_S_FUNCTION_COMPLETE
                    if subtype not in TMF_COMPLETE:
                        response = VIRTIO_SCSI_S_FUNCTION_REJECTED
                        self.log.warning("%s: task management function %d not supported; rejected",
                                         self.label, subtype)
                self.stats["tmf"] += 1
                _scatter(memory, writable, bytes([response]))
                return 1
            if (rtype in (VIRTIO_SCSI_T_AN_QUERY, VIRTIO_SCSI_T_AN_SUBSCRIBE) and len(request) >= CTRL_AN_REQ.size
                    and chain.writable_len >= CTRL_AN_RESP.size):
                _type, lun, _requested = CTRL_AN_REQ.unpack_from(request)
                response = self._address_response(lun)
                # No asynchronous events are reported: event_actual is 0 (5.6.6.2.1).
                _scatter(memory, writable, CTRL_AN_RESP.pack(0, VIRTIO_SCSI_S_OK if response is None else response))
                self.stats["an"] += 1
                return CTRL_AN_RESP.size
        except GuestMemoryError as exc:
            self.log.warning("%s: control request %d: %s; returned unused", self.label, chain.head, exc)
            return 0
        self.stats["malformed"] += 1
        self.log.warning("%s: control request %d: type %s with %d readable and %d writable bytes is not a request "
                         "of 5.6.6.2; returned unused", self.label, chain.head, rtype, chain.readable_len,
                         chain.writable_len)
        return 0

    def _address_response(self, lun: bytes) -> int | None:
        """BAD_TARGET or INCORRECT_LUN for a control request's lun field, ``None`` when it names a LUN."""
        address = parse_lun(lun)
        if address is None or address[0] != 0:
            return VIRTIO_SCSI_S_BAD_TARGET
        return None if self.target.lun(address[1]) is not None else VIRTIO_SCSI_S_INCORRECT_LUN
