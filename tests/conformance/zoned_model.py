"""A host-managed zoned virtio-blk device (virtio 1.4 5.2.6) for the zoned conformance check to run against.

iovirt's own block device is not zoned; this model keeps the zone state machine of the spec in
memory over iovirt's image file: zone 0 conventional, the last two read-only and offline, the rest
sequential-write-required.  Only its zoned operation is modelled: iovirt's vhost-user back-end has no
way to refuse FEATURES_OK, so a driver that does not accept ZONED is not refused (5.2.5 is checked
with the device classes of test_conformance_mutants.py).
"""

from __future__ import annotations

import os
import struct

from iovirt.conformance.checks.blk_edges import CONFIG_ZONED, VIRTIO_BLK_F_ZONED, VIRTIO_BLK_Z_HM, ZONED_FIELDS
from iovirt.conformance.checks.blk_zoned import (
    APPEND_SECTOR,
    REPORT_HDR,
    VIRTIO_BLK_S_ZONE_ACTIVE_RESOURCE,
    VIRTIO_BLK_S_ZONE_INVALID_CMD,
    VIRTIO_BLK_S_ZONE_OPEN_RESOURCE,
    VIRTIO_BLK_F_SECURE_ERASE,
    VIRTIO_BLK_S_ZONE_UNALIGNED_WP,
    VIRTIO_BLK_T_SECURE_ERASE,
    VIRTIO_BLK_T_ZONE_APPEND,
    VIRTIO_BLK_T_ZONE_CLOSE,
    VIRTIO_BLK_T_ZONE_FINISH,
    VIRTIO_BLK_T_ZONE_OPEN,
    VIRTIO_BLK_T_ZONE_REPORT,
    VIRTIO_BLK_T_ZONE_RESET,
    VIRTIO_BLK_T_ZONE_RESET_ALL,
    VIRTIO_BLK_ZS_CLOSED,
    VIRTIO_BLK_ZS_EMPTY,
    VIRTIO_BLK_ZS_EOPEN,
    VIRTIO_BLK_ZS_FULL,
    VIRTIO_BLK_ZS_IOPEN,
    VIRTIO_BLK_ZS_NOT_WP,
    VIRTIO_BLK_ZS_OFFLINE,
    VIRTIO_BLK_ZS_RDONLY,
    VIRTIO_BLK_ZT_CONV,
    VIRTIO_BLK_ZT_SWR,
    ZONE_DESC,
)
from iovirt.virtio.blk._datapath_py import parse_request
from iovirt.virtio.blk.defs import DISCARD_SEG, SECTOR_SIZE, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from iovirt.virtio.blk.device import VirtioBlk

ZONE_SECTORS, MAX_OPEN, MAX_ACTIVE, MAX_APPEND = 64, 2, 3, 8
OPEN = (VIRTIO_BLK_ZS_IOPEN, VIRTIO_BLK_ZS_EOPEN)
ACTIVE = OPEN + (VIRTIO_BLK_ZS_CLOSED,)
GONE = (VIRTIO_BLK_ZS_RDONLY, VIRTIO_BLK_ZS_OFFLINE)


class Refused(Exception):
    """A request completes with ``status``."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class ZonedOpsBlk(VirtioBlk):
    """Host-managed zones over the image; every request is served here, one at a time."""

    check_wp = True
    max_append = MAX_APPEND

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.nzones = self.capacity // ZONE_SECTORS
        self.types = [VIRTIO_BLK_ZT_CONV] + [VIRTIO_BLK_ZT_SWR] * (self.nzones - 1)
        self.states = [VIRTIO_BLK_ZS_NOT_WP] + [VIRTIO_BLK_ZS_EMPTY] * (self.nzones - 3) + list(GONE)
        self.wps = [z * ZONE_SECTORS for z in range(self.nzones)]

    def device_features(self):
        return super().device_features() | 1 << VIRTIO_BLK_F_ZONED

    def config_space(self):
        zoned = ZONED_FIELDS.pack(ZONE_SECTORS, MAX_OPEN, MAX_ACTIVE, self.max_append, SECTOR_SIZE, VIRTIO_BLK_Z_HM, bytes(3))
        return super().config_space()[:60] + self.secure_erase_fields() + zoned

    def secure_erase_fields(self) -> bytes:
        """max_secure_erase_sectors, max_secure_erase_seg, secure_erase_sector_alignment (none here)."""
        return bytes(CONFIG_ZONED - 60)

    def process_queue(self, index, queue):
        """Every request is served here, synchronously and in ring order: the zones live in this model, not the image."""
        if not self.enabled[index]:
            return
        while True:
            batch = queue.pop_batch(64, None)
            if not len(batch):
                return
            self._serve_left(index, queue, batch, list(range(len(batch))), False)

    # -- requests ------------------------------------------------------------------------------
    def _serve(self, memory, chain):
        request = parse_request(memory, chain)
        handlers = {VIRTIO_BLK_T_IN: self._read, VIRTIO_BLK_T_OUT: self._write, VIRTIO_BLK_T_ZONE_APPEND: self._append,
                    VIRTIO_BLK_T_ZONE_REPORT: self._report}
        if request is None or (request.type not in handlers and request.type not in MANAGE):
            return super()._serve(memory, chain)
        try:
            if request.type in MANAGE:
                getattr(self, MANAGE[request.type])(request.sector)
            else:
                handlers[request.type](memory, request)
            status = VIRTIO_BLK_S_OK
        except Refused as exc:
            status = exc.status
        memory.write(request.status_addr, bytes([status]))
        return chain.writable_len

    def _zone(self, sector: int, sectors: int = 1) -> int:
        z = sector // ZONE_SECTORS
        if z >= self.nzones or (sector + sectors - 1) // ZONE_SECTORS != z and self.types[z] == VIRTIO_BLK_ZT_SWR:
            raise Refused(VIRTIO_BLK_S_ZONE_INVALID_CMD)
        return z

    def _count(self, states) -> int:
        return sum(s in states for s in self.states)

    def _open(self, z: int, explicit: bool) -> None:
        state = self.states[z]
        if state in GONE or state == VIRTIO_BLK_ZS_FULL:
            raise Refused(VIRTIO_BLK_S_ZONE_INVALID_CMD)
        if state == VIRTIO_BLK_ZS_EMPTY and self._count(ACTIVE) >= MAX_ACTIVE:
            raise Refused(VIRTIO_BLK_S_ZONE_ACTIVE_RESOURCE)
        if state not in OPEN and self._count(OPEN) >= MAX_OPEN:
            implicit = [i for i, s in enumerate(self.states) if s == VIRTIO_BLK_ZS_IOPEN]
            if not implicit:
                raise Refused(VIRTIO_BLK_S_ZONE_OPEN_RESOURCE)
            self.states[implicit[0]] = VIRTIO_BLK_ZS_CLOSED  # 5.2.6: MAY close an implicitly open zone
        if explicit or state != VIRTIO_BLK_ZS_EOPEN:
            self.states[z] = VIRTIO_BLK_ZS_EOPEN if explicit else VIRTIO_BLK_ZS_IOPEN

    def _data(self, memory, bufs) -> bytes:
        return b"".join(memory.read(addr, n) for addr, n in bufs)

    def _put(self, z: int, sector: int, data: bytes) -> None:
        n = len(data) // SECTOR_SIZE
        if self.types[z] == VIRTIO_BLK_ZT_SWR:
            if self.states[z] in GONE or self.states[z] == VIRTIO_BLK_ZS_FULL:
                raise Refused(VIRTIO_BLK_S_ZONE_INVALID_CMD)
            if self.check_wp and sector != self.wps[z]:
                raise Refused(VIRTIO_BLK_S_ZONE_UNALIGNED_WP)
            if sector + n > (z + 1) * ZONE_SECTORS:
                raise Refused(VIRTIO_BLK_S_ZONE_INVALID_CMD)
            self._open(z, explicit=False)
            self.wps[z] = sector + n
            if self.wps[z] == (z + 1) * ZONE_SECTORS:
                self.states[z] = VIRTIO_BLK_ZS_FULL
        os.pwrite(self.fd, data, sector * SECTOR_SIZE)

    def _write(self, memory, request) -> None:
        data = self._data(memory, request.dout)
        self._put(self._zone(request.sector, len(data) // SECTOR_SIZE), request.sector, data)

    def _append(self, memory, request) -> None:
        data = self._data(memory, request.dout)
        if len(data) > self.max_append * SECTOR_SIZE and not self.max_append:
            raise Refused(VIRTIO_BLK_S_UNSUPP)
        z = request.sector // ZONE_SECTORS
        if (z >= self.nzones or self.types[z] != VIRTIO_BLK_ZT_SWR or request.sector != z * ZONE_SECTORS
                or len(data) > self.max_append * SECTOR_SIZE):
            raise Refused(VIRTIO_BLK_S_ZONE_INVALID_CMD)
        at = self.wps[z]
        self._put(z, at, data)
        addr, _n = request.din[0]
        memory.write(addr, APPEND_SECTOR.pack(at))

    def _read(self, memory, request) -> None:
        length = sum(n for _a, n in request.din)
        z = self._zone(request.sector, length // SECTOR_SIZE)
        if self.states[z] == VIRTIO_BLK_ZS_OFFLINE:
            raise Refused(VIRTIO_BLK_S_ZONE_INVALID_CMD)
        data = bytearray(os.pread(self.fd, length, request.sector * SECTOR_SIZE))
        if self.types[z] == VIRTIO_BLK_ZT_SWR:  # unwritten data reads as zeroes
            written = max(0, (self.wps[z] - request.sector) * SECTOR_SIZE)
            data[written:] = bytes(len(data) - min(written, len(data)))
        for addr, n in request.din:
            memory.write(addr, bytes(data[:n]))
            del data[:n]

    def _report(self, memory, request) -> None:
        first = request.sector // ZONE_SECTORS
        out = REPORT_HDR.pack(self.nzones - first)
        for z in range(first, self.nzones):
            wp = self.wps[z] if self.types[z] == VIRTIO_BLK_ZT_SWR else 0
            out += ZONE_DESC.pack(ZONE_SECTORS, z * ZONE_SECTORS, wp, self.types[z], self.states[z])
        for addr, n in request.din:
            memory.write(addr, out[:n])
            out = out[n:]

    # -- zone management (5.2.6) -----------------------------------------------------------------
    def _managed(self, sector: int) -> int:
        z = sector // ZONE_SECTORS
        if z >= self.nzones or self.types[z] != VIRTIO_BLK_ZT_SWR or sector != z * ZONE_SECTORS:
            raise Refused(VIRTIO_BLK_S_ZONE_INVALID_CMD)
        return z

    def zone_open(self, sector: int) -> None:
        self._open(self._managed(sector), explicit=True)

    def zone_close(self, sector: int) -> None:
        z = self._managed(sector)
        if self.states[z] in OPEN:
            self.states[z] = VIRTIO_BLK_ZS_CLOSED if self.wps[z] > z * ZONE_SECTORS else VIRTIO_BLK_ZS_EMPTY
        elif self.states[z] != VIRTIO_BLK_ZS_CLOSED:
            raise Refused(VIRTIO_BLK_S_ZONE_INVALID_CMD)

    def zone_finish(self, sector: int) -> None:
        z = self._managed(sector)
        if self.states[z] in GONE:
            raise Refused(VIRTIO_BLK_S_ZONE_INVALID_CMD)
        self.states[z], self.wps[z] = VIRTIO_BLK_ZS_FULL, (z + 1) * ZONE_SECTORS

    def zone_reset(self, sector: int) -> None:
        z = self._managed(sector)
        if self.states[z] in GONE:
            raise Refused(VIRTIO_BLK_S_ZONE_INVALID_CMD)
        self.states[z], self.wps[z] = VIRTIO_BLK_ZS_EMPTY, z * ZONE_SECTORS

    def zone_reset_all(self, sector: int) -> None:
        for z, state in enumerate(self.states):
            if state in ACTIVE + (VIRTIO_BLK_ZS_FULL,):
                self.states[z], self.wps[z] = VIRTIO_BLK_ZS_EMPTY, z * ZONE_SECTORS


MANAGE = {VIRTIO_BLK_T_ZONE_OPEN: "zone_open", VIRTIO_BLK_T_ZONE_CLOSE: "zone_close",
          VIRTIO_BLK_T_ZONE_FINISH: "zone_finish", VIRTIO_BLK_T_ZONE_RESET: "zone_reset",
          VIRTIO_BLK_T_ZONE_RESET_ALL: "zone_reset_all"}


class SecureEraseZonedBlk(ZonedOpsBlk):
    """Also offers SECURE_ERASE, which resets the zones of its range (5.2.6)."""

    resets = True

    def device_features(self):
        return super().device_features() | 1 << VIRTIO_BLK_F_SECURE_ERASE

    def secure_erase_fields(self) -> bytes:
        return struct.pack("<III", 4 * ZONE_SECTORS, 1, ZONE_SECTORS)

    def _serve(self, memory, chain):
        request = parse_request(memory, chain)
        if request is None or request.type != VIRTIO_BLK_T_SECURE_ERASE:
            return super()._serve(memory, chain)
        sector, count, _flags = DISCARD_SEG.unpack(self._data(memory, request.dout)[: DISCARD_SEG.size])
        for z in range(sector // ZONE_SECTORS, (sector + count) // ZONE_SECTORS):
            os.pwrite(self.fd, bytes(ZONE_SECTORS * SECTOR_SIZE), z * ZONE_SECTORS * SECTOR_SIZE)
            if self.resets and self.types[z] == VIRTIO_BLK_ZT_SWR:
                self.zone_reset(z * ZONE_SECTORS)
        memory.write(request.status_addr, bytes([VIRTIO_BLK_S_OK]))
        return chain.writable_len


class EraseKeepsZoneStateBlk(SecureEraseZonedBlk):
    """Erases the data but leaves the zones' state and write pointers as they were."""

    resets = False


class NoAppendZonedBlk(ZonedOpsBlk):
    """Reports max_append_sectors 0: no ZONE_APPEND."""

    max_append = 0


class UnalignedWriteOkBlk(ZonedOpsBlk):
    """Writes wherever the driver asks in a sequential zone (no write-pointer check)."""

    check_wp = False


class StaleAfterResetBlk(ZonedOpsBlk):
    """Reads the old data of a reset zone back instead of treating it as unwritten."""

    def _read(self, memory, request) -> None:
        length = sum(n for _a, n in request.din)
        if self.states[self._zone(request.sector, length // SECTOR_SIZE)] == VIRTIO_BLK_ZS_OFFLINE:
            raise Refused(VIRTIO_BLK_S_ZONE_INVALID_CMD)
        data = os.pread(self.fd, length, request.sector * SECTOR_SIZE)
        for addr, n in request.din:
            memory.write(addr, data[:n])
            data = data[n:]


class CoarseWritesBlk(ZonedOpsBlk):
    """Reports write_granularity 512 but refuses sequential writes of less than 4 KiB."""

    def _put(self, z: int, sector: int, data: bytes) -> None:
        if self.types[z] == VIRTIO_BLK_ZT_SWR and len(data) % 4096:
            raise Refused(VIRTIO_BLK_S_ZONE_INVALID_CMD)
        super()._put(z, sector, data)


class NoOpenLimitBlk(ZonedOpsBlk):
    """Opens any number of zones (max_open_zones not enforced)."""

    def _count(self, states) -> int:
        return 0 if states == OPEN else super()._count(states)
