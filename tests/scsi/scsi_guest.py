"""A guest driver for a VirtioScsi driven in-process: builds virtio-scsi requests, reads responses (5.6.6)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from iovirt.memory import BumpAllocator, GuestMemory
from iovirt.virtio.defs import VIRTIO_F_VERSION_1
from iovirt.virtio.driver import DriverQueue, UsedElem
from iovirt.virtio.scsi.defs import CTRL_AN_REQ, CTRL_TMF_REQ, RESP_CMD_HDR, VIRTIO_SCSI_T_TMF
from iovirt.virtio.scsi.device import VirtioScsi

MEM = 8 << 20
IMAGE_SIZE = 4 << 20


def make_image(path, size: int = IMAGE_SIZE, fill: bytes = b"") -> str:
    """A raw image of ``size`` bytes starting with ``fill``."""
    with open(path, "wb") as f:
        f.truncate(size)
        if fill:
            f.write(fill)
    return str(path)


def lun_field(lun: int = 0, target: int = 0) -> bytes:
    """The single-level lun field Linux's virtio_scsi writes (5.6.6.1)."""
    return bytes([1, target, 0x40 | lun >> 8, lun & 0xFF, 0, 0, 0, 0])


@dataclass
class Response:
    """A virtio-scsi response, and the data-in bytes after it."""

    used_len: int
    sense_len: int = 0
    residual: int = 0
    status_qualifier: int = 0
    status: int = 0
    response: int = 0
    sense: bytes = b""
    data: bytes = b""

    @property
    def key_asc(self) -> tuple[int, int, int]:
        """(sense key, ASC, ASCQ) of fixed-format sense data."""
        return self.sense[2] & 0xF, self.sense[12], self.sense[13]


class ScsiGuest:
    """The control queue and the first request queue of ``dev``, driven as a guest driver would."""

    def __init__(self, dev: VirtioScsi, size: int = 64) -> None:
        self.dev = dev
        self.memory = GuestMemory.from_ranges([(0, MEM)])
        self.alloc = BumpAllocator(0x1000, MEM - 0x1000)
        dev.set_features(1 << VIRTIO_F_VERSION_1)
        self.queues = {}
        for index in range(dev.num_queues):
            queue = DriverQueue(self.memory, self.alloc, size, index=index)
            dev.start_queue(index, self.memory, queue.state(), notify=lambda: None)
            dev.set_queue_enabled(index, True)
            self.queues[index] = queue

    def submit(self, index: int, out: list[bytes], in_sizes: list[int]) -> UsedElem:
        """One chain on queue ``index``; the device must give it back."""
        queue = self.queues[index]
        queue.add_data(out, in_sizes)
        queue.publish()
        self.dev.kick(index)
        (elem,) = queue.get_used()
        return elem

    def command(
        self,
        cdb: bytes,
        *,
        lun: int = 0,
        out: bytes = b"",
        in_len: int = 0,
        field: bytes | None = None,
        header_len: int | None = None,
        sense_size: int = 96,
        split: bool = False,
    ) -> Response:
        """One SCSI command on request queue 0; ``header_len`` cuts the device-readable header short."""
        header = (field if field is not None else lun_field(lun)) + struct.pack("<QBBB", 7, 0, 0, 0)
        header += cdb.ljust(32, b"\0")
        if header_len is not None:
            header = header[:header_len]
        resp = RESP_CMD_HDR.size + sense_size
        readable = [header] + ([out] if out else [])
        if split:
            writable = [resp] + ([in_len // 2, in_len - in_len // 2] if in_len else [])
        else:
            writable = [resp] + ([in_len] if in_len else [])
        elem = self.submit(2, readable, writable)
        if elem.len < RESP_CMD_HDR.size:
            return Response(elem.len)
        sense_len, residual, qualifier, status, response = RESP_CMD_HDR.unpack_from(elem.data)
        sense = elem.data[RESP_CMD_HDR.size : RESP_CMD_HDR.size + sense_len]
        return Response(elem.len, sense_len, residual, qualifier, status, response, sense, elem.data[resp:])

    def tmf(self, subtype: int, field: bytes | None = None) -> tuple[int, int]:
        """A task management function: (used length, response byte)."""
        req = CTRL_TMF_REQ.pack(VIRTIO_SCSI_T_TMF, subtype, field if field is not None else lun_field(0), 7)
        elem = self.submit(0, [req], [1])
        return elem.len, elem.data[0] if elem.data else -1

    def an(self, rtype: int, field: bytes | None = None, events: int = 0xFF) -> tuple[int, bytes]:
        """An asynchronous notification query/subscribe: (used length, the 5 response bytes)."""
        req = CTRL_AN_REQ.pack(rtype, field if field is not None else lun_field(0), events)
        elem = self.submit(0, [req], [5])
        return elem.len, elem.data
