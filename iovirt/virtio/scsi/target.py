"""A SCSI target: logical units on raw images, the commands Linux's sd driver sends, and their sense data.

The target knows nothing of virtio: :meth:`ScsiTarget.execute` takes a LUN
number, a CDB and the command's data buffers (:class:`Transfer`) and returns
an :class:`Outcome` (SAM-5 status, sense data, bytes moved, or an overrun).
The virtio-scsi device (``device.py``) turns that into a response.

Commands (SPC-4, SBC-3): TEST UNIT READY, REQUEST SENSE, INQUIRY (standard
data and VPD pages 00h, 80h, 83h, B0h, B1h, B2h), MODE SENSE(6/10) (caching
08h, control 0Ah, all 3Fh), READ CAPACITY(10/16), READ and WRITE(6/10/12/16),
SYNCHRONIZE CACHE(10/16), WRITE SAME(10/16) (with UNMAP), UNMAP, REPORT LUNS.
Blocks are 512 bytes.  Errors are CHECK CONDITION with fixed-format sense
data (SPC-4 4.5.3).  Data moves with ``preadv``/``pwritev`` straight on views
of guest memory.  Commands complete before the next one starts, so nothing
is ever in flight for a task management function to abort.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
from dataclasses import dataclass
from typing import Callable

from iovirt.memory import Access, GuestMemory
from iovirt.virtio.scsi.defs import (
    ASC_INVALID_COMMAND_OPERATION_CODE,
    ASC_INVALID_FIELD_IN_CDB,
    ASC_INVALID_FIELD_IN_PARAMETER_LIST,
    ASC_LBA_OUT_OF_RANGE,
    ASC_LOGICAL_UNIT_NOT_SUPPORTED,
    ASC_NO_ADDITIONAL_SENSE,
    ASC_SAVING_PARAMETERS_NOT_SUPPORTED,
    ASC_UNRECOVERED_READ_ERROR,
    ASC_WRITE_ERROR,
    ASC_WRITE_PROTECTED,
    BLOCK_SIZE,
    CDB_GROUP_LENGTH,
    CHECK_CONDITION,
    DATA_PROTECT,
    GOOD,
    ILLEGAL_REQUEST,
    INQUIRY,
    MEDIUM_ERROR,
    MODE_PAGE_ALL,
    MODE_PAGE_CACHING,
    MODE_PAGE_CONTROL,
    MODE_PC_CHANGEABLE,
    MODE_PC_SAVED,
    MODE_SENSE_6,
    MODE_SENSE_10,
    MODE_SUBPAGE_ALL,
    MODE_WP,
    NO_SENSE,
    PERIPHERAL_DEVICE_TYPE_DISK,
    PERIPHERAL_NOT_CONNECTED,
    READ_6,
    READ_10,
    READ_12,
    READ_16,
    READ_CAPACITY_10,
    REPORT_LUNS,
    REQUEST_SENSE,
    SAI_READ_CAPACITY_16,
    SENSE_FIXED_CURRENT,
    SENSE_FIXED_LEN,
    SERVICE_ACTION_IN_16,
    SYNCHRONIZE_CACHE_10,
    SYNCHRONIZE_CACHE_16,
    TEST_UNIT_READY,
    UNMAP,
    UNMAP_DESC,
    UNMAP_HDR_LEN,
    VPD_BLOCK_DEVICE_CHARACTERISTICS,
    VPD_BLOCK_LIMITS,
    VPD_DEVICE_IDENTIFICATION,
    VPD_LOGICAL_BLOCK_PROVISIONING,
    VPD_SUPPORTED_PAGES,
    VPD_UNIT_SERIAL_NUMBER,
    WRITE_6,
    WRITE_10,
    WRITE_12,
    WRITE_16,
    WRITE_SAME_10,
    WRITE_SAME_16,
)

VENDOR = "IOVIRT"
PRODUCT = "iovirt disk"
REVISION = "0001"
SPC_VERSION = 6  # INQUIRY VERSION: SPC-4

MAX_TRANSFER_BLOCKS = 2048
"""VPD B0h MAXIMUM TRANSFER LENGTH: 1 MiB per READ/WRITE."""
OPTIMAL_TRANSFER_BLOCKS = 256
"""VPD B0h OPTIMAL TRANSFER LENGTH: 128 KiB; Linux's sd sizes its requests (``max_sectors_kb``) by it."""
MAX_UNMAP_BLOCKS = 8192
"""VPD B0h MAXIMUM UNMAP LBA COUNT (and the WRITE SAME length limit): 4 MiB; Linux's ``discard_max_bytes``."""
MAX_UNMAP_DESCRIPTORS = 64

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)

Buffers = list[tuple[int, int]]


class CheckCondition(Exception):
    """A command that ends in CHECK CONDITION with this sense key and (ASC, ASCQ)."""

    def __init__(self, key: int, asc: tuple[int, int], message: str) -> None:
        super().__init__(message)
        self.key = key
        self.asc = asc


class Overrun(Exception):
    """The CDB asks for more data than the command's buffers hold (virtio 1.2 5.6.6.1: VIRTIO_SCSI_S_OVERRUN)."""


def fixed_sense(key: int, asc: tuple[int, int]) -> bytes:
    """Fixed-format sense data, current error (SPC-4 4.5.3): 18 bytes."""
    sense = bytearray(SENSE_FIXED_LEN)
    sense[0] = SENSE_FIXED_CURRENT
    sense[2] = key
    sense[7] = SENSE_FIXED_LEN - 8  # additional sense length
    sense[12], sense[13] = asc
    return bytes(sense)


def _illegal(asc: tuple[int, int], message: str) -> CheckCondition:
    return CheckCondition(ILLEGAL_REQUEST, asc, message)


def _invalid_field(message: str) -> CheckCondition:
    return _illegal(ASC_INVALID_FIELD_IN_CDB, message)


@dataclass(frozen=True)
class Outcome:
    """What a command ended with: SAM-5 status, sense data (empty for GOOD), bytes moved, or an overrun."""

    status: int = GOOD
    sense: bytes = b""
    transferred: int = 0
    overrun: bool = False
    message: str = ""
    """Why it did not end GOOD, for the device's log line."""


class Transfer:
    """The data buffers of one command: ``dataout`` (device-readable) and ``datain`` (device-writable)."""

    def __init__(self, memory: GuestMemory, dataout: Buffers, datain: Buffers) -> None:
        self.memory = memory
        self.dataout = dataout
        self.datain = datain
        self.out_len = sum(n for _, n in dataout)
        self.in_len = sum(n for _, n in datain)

    def read_out(self, nbytes: int) -> bytes:
        """The first ``nbytes`` of the data-out buffers (:class:`Overrun` if they hold fewer)."""
        if nbytes > self.out_len:
            raise Overrun(f"the CDB wants {nbytes} data-out bytes, the buffers hold {self.out_len}")
        out = bytearray()
        for addr, n in self.dataout:
            if len(out) >= nbytes:
                break
            out += self.memory.read(addr, min(n, nbytes - len(out)))
        return bytes(out)

    def write_in(self, data: bytes) -> int:
        """Scatter ``data`` over the data-in buffers (:class:`Overrun` if it does not fit); bytes written."""
        if len(data) > self.in_len:
            raise Overrun(f"the CDB wants {len(data)} data-in bytes, the buffers hold {self.in_len}")
        pos = 0
        for addr, n in self.datain:
            if pos >= len(data):
                break
            k = min(n, len(data) - pos)
            self.memory.write(addr, data[pos : pos + k])
            pos += k
        return pos

    def views(self, nbytes: int, data_in: bool) -> list[memoryview]:
        """Views of the first ``nbytes`` of the data-in (device writes) or data-out buffers."""
        bufs, have = (self.datain, self.in_len) if data_in else (self.dataout, self.out_len)
        if nbytes > have:
            raise Overrun(f"the CDB moves {nbytes} bytes, the data-{'in' if data_in else 'out'} buffers hold {have}")
        access = Access.WRITE if data_in else Access.READ
        views: list[memoryview] = []
        left = nbytes
        for addr, n in bufs:
            if left <= 0:
                break
            k = min(n, left)
            if k:
                views += self.memory.views(addr, k, access)
            left -= k
        return views


class Lun:
    """A logical unit on a raw image: 512-byte blocks, optionally read-only."""

    def __init__(self, path: str, *, read_only: bool = False, serial: str = "") -> None:
        self.fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        self.path = path
        self.read_only = read_only
        self.blocks = os.fstat(self.fd).st_size // BLOCK_SIZE
        self.serial = (serial or os.path.basename(path))[:20]

    def close(self) -> None:
        """Close the image."""
        os.close(self.fd)


def _cdb_length(opcode: int) -> int:
    return CDB_GROUP_LENGTH[opcode >> 5]


class ScsiTarget:
    """Target 0 with LUNs 0..n-1, one per image."""

    def __init__(self, luns: list[Lun]) -> None:
        self.luns = luns
        self._commands: dict[int, Callable[[Lun, bytes, Transfer], int]] = {
            TEST_UNIT_READY: lambda lun, cdb, t: 0,
            READ_CAPACITY_10: self._read_capacity_10,
            SERVICE_ACTION_IN_16: self._service_action_in,
            MODE_SENSE_6: self._mode_sense,
            MODE_SENSE_10: self._mode_sense,
            READ_6: self._read_write, READ_10: self._read_write, READ_12: self._read_write, READ_16: self._read_write,
            WRITE_6: self._read_write, WRITE_10: self._read_write, WRITE_12: self._read_write,
            WRITE_16: self._read_write,
            SYNCHRONIZE_CACHE_10: self._synchronize_cache,
            SYNCHRONIZE_CACHE_16: self._synchronize_cache,
            WRITE_SAME_10: self._write_same,
            WRITE_SAME_16: self._write_same,
            UNMAP: self._unmap,
        }

    def close(self) -> None:
        """Close every LUN's image."""
        for lun in self.luns:
            lun.close()

    def lun(self, number: int | None) -> Lun | None:
        """LUN ``number`` (``None``: not one of this target's)."""
        return self.luns[number] if number is not None and 0 <= number < len(self.luns) else None

    def execute(self, number: int | None, cdb: bytes, transfer: Transfer) -> Outcome:
        """Run one command for LUN ``number`` (``None`` or unknown: a LUN that does not exist).

        ``cdb`` holds at least the opcode's CDB length (the device checks);
        CHECK CONDITION and overruns come back in the :class:`Outcome`.
        """
        try:
            opcode = cdb[0]
            lun = self.lun(number)
            # SPC-4 4.5.4 / 6.6: INQUIRY, REPORT LUNS and REQUEST SENSE answer for any LUN.
            if opcode == INQUIRY:
                moved = self._inquiry(lun, cdb, transfer)
            elif opcode == REPORT_LUNS:
                moved = self._report_luns(cdb, transfer)
            elif opcode == REQUEST_SENSE:
                moved = self._request_sense(lun, cdb, transfer)
            elif lun is None:
                raise _illegal(ASC_LOGICAL_UNIT_NOT_SUPPORTED, f"LUN {number} does not exist")
            elif opcode in self._commands:
                moved = self._commands[opcode](lun, cdb, transfer)
            else:
                raise _illegal(ASC_INVALID_COMMAND_OPERATION_CODE, f"operation code {opcode:#04x} not supported")
        except CheckCondition as exc:
            return Outcome(CHECK_CONDITION, fixed_sense(exc.key, exc.asc), message=str(exc))
        except Overrun as exc:
            return Outcome(overrun=True, message=str(exc))
        return Outcome(transferred=moved)

    # -- data-in commands -------------------------------------------------------------
    @staticmethod
    def _reply(transfer: Transfer, data: bytes, allocation_length: int) -> int:
        """Return ``data`` cut to the allocation length (SPC-4 4.2.5.6: not an error when shorter)."""
        return transfer.write_in(data[:allocation_length])

    def _inquiry(self, lun: Lun | None, cdb: bytes, transfer: Transfer) -> int:
        evpd, page = cdb[1] & 1, cdb[2]
        alloc = struct.unpack_from(">H", cdb, 3)[0]
        if cdb[1] & 0xFE or (not evpd and page):
            raise _invalid_field(f"INQUIRY byte 1 {cdb[1]:#x}, page code {page:#x} without EVPD")
        if lun is None:
            # SPC-4 6.6.2: qualifier 011b / type 1Fh, no logical unit at this LUN.
            return self._reply(transfer, self._standard_inquiry(PERIPHERAL_NOT_CONNECTED), alloc)
        if not evpd:
            return self._reply(transfer, self._standard_inquiry(PERIPHERAL_DEVICE_TYPE_DISK), alloc)
        body = self._vpd(lun, page)
        return self._reply(transfer, bytes([PERIPHERAL_DEVICE_TYPE_DISK, page]) + struct.pack(">H", len(body)) + body,
                           alloc)

    @staticmethod
    def _standard_inquiry(peripheral: int) -> bytes:
        data = bytearray(36)
        data[0] = peripheral
        data[2] = SPC_VERSION
        data[3] = 0x02  # RESPONSE DATA FORMAT 2
        data[4] = len(data) - 5  # ADDITIONAL LENGTH
        data[7] = 0x02  # CMDQUE: a task set with more than one command
        data[8:16] = VENDOR.ljust(8).encode()
        data[16:32] = PRODUCT.ljust(16).encode()
        data[32:36] = REVISION.ljust(4).encode()
        return bytes(data)

    def _vpd(self, lun: Lun, page: int) -> bytes:
        """The body of VPD ``page`` (after its 4-byte header), SPC-4 7.8 and SBC-3 6.6."""
        if page == VPD_SUPPORTED_PAGES:
            return bytes([VPD_SUPPORTED_PAGES, VPD_UNIT_SERIAL_NUMBER, VPD_DEVICE_IDENTIFICATION, VPD_BLOCK_LIMITS,
                          VPD_BLOCK_DEVICE_CHARACTERISTICS, VPD_LOGICAL_BLOCK_PROVISIONING])
        if page == VPD_UNIT_SERIAL_NUMBER:
            return lun.serial.encode()
        if page == VPD_DEVICE_IDENTIFICATION:
            # One designator: T10 vendor ID based (type 1), ASCII (code set 2), associated with the LU.
            ident = VENDOR.ljust(8).encode() + lun.serial.encode()
            return bytes([0x02, 0x01, 0x00, len(ident)]) + ident
        if page == VPD_BLOCK_LIMITS:
            body = bytearray(60)
            body[0] = 0x01  # WSNZ: a WRITE SAME of 0 blocks is refused, not "to the end"
            struct.pack_into(">HII", body, 2, 1, MAX_TRANSFER_BLOCKS, OPTIMAL_TRANSFER_BLOCKS)
            if not lun.read_only:
                # MAXIMUM UNMAP LBA COUNT, ... BLOCK DESCRIPTOR COUNT, OPTIMAL UNMAP GRANULARITY
                struct.pack_into(">III", body, 16, MAX_UNMAP_BLOCKS, MAX_UNMAP_DESCRIPTORS, 1)
                struct.pack_into(">Q", body, 32, MAX_UNMAP_BLOCKS)  # MAXIMUM WRITE SAME LENGTH
            return bytes(body)
        if page == VPD_BLOCK_DEVICE_CHARACTERISTICS:
            body = bytearray(60)
            struct.pack_into(">H", body, 0, 1)  # MEDIUM ROTATION RATE 1: non-rotating
            return bytes(body)
        if page == VPD_LOGICAL_BLOCK_PROVISIONING:
            # LBPU (UNMAP), LBPWS (WRITE SAME(16) with UNMAP), LBPWS10; provisioning type 2: thin.
            return bytes([0, 0xE0, 0x02, 0]) if not lun.read_only else bytes(4)
        raise _invalid_field(f"VPD page {page:#04x} not supported")

    def _report_luns(self, cdb: bytes, transfer: Transfer) -> int:
        select = cdb[2]
        alloc = struct.unpack_from(">I", cdb, 6)[0]
        if select not in (0x00, 0x02) or alloc < 16:
            # SPC-4 6.33: allocation length under 16 is an invalid field.
            raise _invalid_field(f"REPORT LUNS select report {select:#x}, allocation length {alloc}")
        # Single-level LUNs: peripheral addressing below 256, flat addressing above (SAM-5 4.7).
        entries = b"".join(
            (struct.pack(">H", n) if n < 256 else struct.pack(">H", 0x4000 | n)) + bytes(6)
            for n in range(len(self.luns))
        )
        return self._reply(transfer, struct.pack(">I4x", len(entries)) + entries, alloc)

    def _request_sense(self, lun: Lun | None, cdb: bytes, transfer: Transfer) -> int:
        if cdb[1] & 1:
            raise _invalid_field("REQUEST SENSE with DESC: only fixed-format sense data")
        # Sense goes with every CHECK CONDITION (autosense), so none is pending (SPC-4 6.39).
        if lun is None:
            sense = fixed_sense(ILLEGAL_REQUEST, ASC_LOGICAL_UNIT_NOT_SUPPORTED)
        else:
            sense = fixed_sense(NO_SENSE, ASC_NO_ADDITIONAL_SENSE)
        return self._reply(transfer, sense, cdb[4])

    def _read_capacity_10(self, lun: Lun, cdb: bytes, transfer: Transfer) -> int:
        last = min(lun.blocks - 1, 0xFFFFFFFF)  # 0xFFFFFFFF: use READ CAPACITY(16) (SBC-3 5.15)
        return transfer.write_in(struct.pack(">II", last, BLOCK_SIZE))

    def _service_action_in(self, lun: Lun, cdb: bytes, transfer: Transfer) -> int:
        if cdb[1] & 0x1F != SAI_READ_CAPACITY_16:
            raise _invalid_field(f"SERVICE ACTION IN(16) service action {cdb[1] & 0x1F:#x} not supported")
        alloc = struct.unpack_from(">I", cdb, 10)[0]
        data = bytearray(32)
        struct.pack_into(">QI", data, 0, lun.blocks - 1, BLOCK_SIZE)
        if not lun.read_only:
            data[14] = 0xC0  # LBPME (UNMAP works), LBPRZ (unmapped blocks read as zero: punched holes)
        return self._reply(transfer, bytes(data), alloc)

    def _mode_sense(self, lun: Lun, cdb: bytes, transfer: Transfer) -> int:
        six = cdb[0] == MODE_SENSE_6
        dbd = cdb[1] & 0x08
        pc, page, subpage = cdb[2] >> 6, cdb[2] & 0x3F, cdb[3]
        alloc = cdb[4] if six else struct.unpack_from(">H", cdb, 7)[0]
        if pc == MODE_PC_SAVED:
            raise _illegal(ASC_SAVING_PARAMETERS_NOT_SUPPORTED, "MODE SENSE of saved values")
        if subpage and not (page == MODE_PAGE_ALL and subpage == MODE_SUBPAGE_ALL):
            raise _invalid_field(f"MODE SENSE page {page:#x} subpage {subpage:#x} not supported")
        changeable = pc == MODE_PC_CHANGEABLE
        pages = {MODE_PAGE_CACHING: self._caching_page(changeable), MODE_PAGE_CONTROL: self._control_page(changeable)}
        if page == MODE_PAGE_ALL:
            body = b"".join(pages.values())
        elif page in pages:
            body = pages[page]
        else:
            raise _invalid_field(f"MODE SENSE page {page:#x} not supported")
        blocks = b""
        if not dbd:
            # Short LBA mode parameter block descriptor (SBC-3 6.4.2): number of blocks (capped), block length.
            blocks = min(lun.blocks, 0xFFFFFFFF).to_bytes(4, "big") + bytes([0]) + BLOCK_SIZE.to_bytes(3, "big")
        specific = MODE_WP if lun.read_only else 0
        if six:
            header = bytes([3 + len(blocks) + len(body), 0, specific, len(blocks)])
        else:
            header = struct.pack(">HBBxxH", 6 + len(blocks) + len(body), 0, specific, len(blocks))
        return self._reply(transfer, header + blocks + body, alloc)

    @staticmethod
    def _caching_page(changeable: bool) -> bytes:
        page = bytearray(20)
        page[0], page[1] = MODE_PAGE_CACHING, len(page) - 2
        if not changeable:
            page[2] = 0x04  # WCE: writes complete in the host's page cache; SYNCHRONIZE CACHE makes them stable
        return bytes(page)

    @staticmethod
    def _control_page(changeable: bool) -> bytes:
        page = bytearray(12)
        page[0], page[1] = MODE_PAGE_CONTROL, len(page) - 2
        if not changeable:
            page[3] = 0x10  # QUEUE ALGORITHM MODIFIER 1: unrestricted reordering
        return bytes(page)

    # -- block commands ------------------------------------------------------------------
    @staticmethod
    def _lba_count(cdb: bytes) -> tuple[int, int]:
        """The LBA and transfer length of a READ/WRITE CDB (SBC-3 5.8-5.11, 5.34-5.37)."""
        size = _cdb_length(cdb[0])
        if size == 6:
            lba = int.from_bytes(cdb[1:4], "big") & 0x1FFFFF
            return lba, cdb[4] or 256  # READ(6)/WRITE(6): 0 means 256 blocks
        if size == 10:
            return struct.unpack_from(">I", cdb, 2)[0], struct.unpack_from(">H", cdb, 7)[0]
        if size == 12:
            return struct.unpack_from(">II", cdb, 2)  # type: ignore[return-value]
        return struct.unpack_from(">QI", cdb, 2)  # type: ignore[return-value]

    @staticmethod
    def _check_range(lun: Lun, lba: int, count: int) -> None:
        if lba > lun.blocks or count > lun.blocks - lba:
            raise _illegal(ASC_LBA_OUT_OF_RANGE, f"blocks [{lba}, +{count}) beyond the last block {lun.blocks - 1}")

    @staticmethod
    def _check_writable(lun: Lun) -> None:
        if lun.read_only:
            raise CheckCondition(DATA_PROTECT, ASC_WRITE_PROTECTED, "write to a read-only LUN")

    def _read_write(self, lun: Lun, cdb: bytes, transfer: Transfer) -> int:
        write = cdb[0] in (WRITE_6, WRITE_10, WRITE_12, WRITE_16)
        if _cdb_length(cdb[0]) != 6 and cdb[1] & 0xE0:
            raise _invalid_field(f"RDPROTECT/WRPROTECT {cdb[1] >> 5} without protection information")
        lba, count = self._lba_count(cdb)
        if write:
            self._check_writable(lun)
        self._check_range(lun, lba, count)
        if count > MAX_TRANSFER_BLOCKS:
            raise _invalid_field(f"transfer of {count} blocks beyond the maximum {MAX_TRANSFER_BLOCKS}")
        nbytes = count * BLOCK_SIZE
        if not nbytes:
            return 0
        views = transfer.views(nbytes, data_in=not write)
        offset = lba * BLOCK_SIZE
        try:
            done = os.pwritev(lun.fd, views, offset) if write else os.preadv(lun.fd, views, offset)
        except OSError as exc:
            raise CheckCondition(MEDIUM_ERROR, ASC_WRITE_ERROR if write else ASC_UNRECOVERED_READ_ERROR,
                                 f"image {'write' if write else 'read'} failed: {exc}") from exc
        finally:
            for view in views:
                view.release()
        if done != nbytes:
            raise CheckCondition(MEDIUM_ERROR, ASC_WRITE_ERROR if write else ASC_UNRECOVERED_READ_ERROR,
                                 f"image {'write' if write else 'read'} moved {done} of {nbytes} bytes")
        return nbytes

    def _synchronize_cache(self, lun: Lun, cdb: bytes, transfer: Transfer) -> int:
        if not lun.read_only:
            try:
                os.fdatasync(lun.fd)  # SBC-3 5.22: the cached data is on the medium when GOOD comes back
            except OSError as exc:
                raise CheckCondition(MEDIUM_ERROR, ASC_WRITE_ERROR, f"fdatasync failed: {exc}") from exc
        return 0

    def _write_same(self, lun: Lun, cdb: bytes, transfer: Transfer) -> int:
        sixteen = cdb[0] == WRITE_SAME_16
        unmap, ndob = cdb[1] & 0x08, sixteen and cdb[1] & 0x01
        if sixteen:
            lba, count = struct.unpack_from(">QI", cdb, 2)
        else:
            lba, count = struct.unpack_from(">I", cdb, 2)[0], struct.unpack_from(">H", cdb, 7)[0]
        if cdb[1] & 0xE6 or not count or count > MAX_UNMAP_BLOCKS:
            # Protection, ANCHOR, LBDATA/PBDATA; WSNZ (VPD B0h) forbids 0 blocks.
            raise _invalid_field(f"WRITE SAME byte 1 {cdb[1]:#x}, {count} blocks (1..{MAX_UNMAP_BLOCKS})")
        self._check_writable(lun)
        self._check_range(lun, lba, count)
        block = bytes(BLOCK_SIZE) if ndob else transfer.read_out(BLOCK_SIZE)
        offset, length = lba * BLOCK_SIZE, count * BLOCK_SIZE
        try:
            if unmap and block == bytes(BLOCK_SIZE):
                _punch_hole(lun.fd, offset, length)  # LBPRZ: unmapped blocks read as zero
            else:
                for start in range(offset, offset + length, 64 * BLOCK_SIZE):
                    n = min(64 * BLOCK_SIZE, offset + length - start)
                    os.pwrite(lun.fd, block * (n // BLOCK_SIZE), start)
        except OSError as exc:
            raise CheckCondition(MEDIUM_ERROR, ASC_WRITE_ERROR, f"WRITE SAME failed: {exc}") from exc
        return 0 if ndob else BLOCK_SIZE

    def _unmap(self, lun: Lun, cdb: bytes, transfer: Transfer) -> int:
        if cdb[1] & 0x01:
            raise _invalid_field("UNMAP with ANCHOR")
        length = struct.unpack_from(">H", cdb, 7)[0]
        self._check_writable(lun)
        if not length:
            return 0  # SBC-3 5.28: no parameter list, nothing to do
        data = transfer.read_out(length)
        bad = _illegal(ASC_INVALID_FIELD_IN_PARAMETER_LIST, f"UNMAP parameter list of {length} bytes malformed")
        if length < UNMAP_HDR_LEN:
            raise bad
        desc_len = struct.unpack_from(">H", data, 2)[0]
        if desc_len % UNMAP_DESC.size or UNMAP_HDR_LEN + desc_len > length:
            raise bad
        if desc_len // UNMAP_DESC.size > MAX_UNMAP_DESCRIPTORS:
            raise bad
        ranges = [UNMAP_DESC.unpack_from(data, off) for off in range(UNMAP_HDR_LEN, UNMAP_HDR_LEN + desc_len,
                                                                        UNMAP_DESC.size)]
        for lba, count in ranges:
            self._check_range(lun, lba, count)
            if count > MAX_UNMAP_BLOCKS:
                raise bad
        for lba, count in ranges:
            if count:
                try:
                    _punch_hole(lun.fd, lba * BLOCK_SIZE, count * BLOCK_SIZE)
                except OSError as exc:
                    raise CheckCondition(MEDIUM_ERROR, ASC_WRITE_ERROR, f"UNMAP failed: {exc}") from exc
        return length


def _punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate a range; where the file system cannot, write zeroes (same contents: LBPRZ)."""
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, ctypes.c_long(offset), ctypes.c_long(length)):
        err = ctypes.get_errno()
        if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise OSError(err, os.strerror(err))
        os.pwrite(fd, bytes(length), offset)


__all__ = ["CheckCondition", "Lun", "Outcome", "Overrun", "ScsiTarget", "Transfer", "fixed_sense"]
