"""Zoned block devices in operation (virtio 1.4 section 5.2.6, cited as 1.2's 5.2.6; VIRTIO_BLK_F_ZONED).

With ZONED negotiated the driver reports the zones, then drives them through the state machine the
spec gives: zone management on conventional zones, writes at and off the write pointer, appends and
their returned sector, reads and writes across a zone boundary or beyond a zone's capacity, reads of
unwritten data, the open and active zone limits, read-only and offline zones.  The check applies when
the device offers ZONED with a host-managed or host-aware model and is writable.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from iovirt.conformance.checks.blk import BLK
from iovirt.conformance.checks.blk_edges import CONFIG_ZONED, VIRTIO_BLK_F_ZONED, VIRTIO_BLK_Z_NONE, ZONED_FIELDS
from iovirt.conformance.devices import BlkPort
from iovirt.conformance.link import Link
from iovirt.conformance.registry import check, expect
from iovirt.conformance.target import Context, needs_protocol
from iovirt.vhost_user.messages import ProtocolFeature as PF
from iovirt.virtio.blk.defs import (
    DISCARD_SEG,
    SECTOR_SIZE,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
)

# 5.2.6 zoned request types and statuses
VIRTIO_BLK_T_ZONE_APPEND, VIRTIO_BLK_T_ZONE_REPORT = 15, 16
VIRTIO_BLK_T_ZONE_OPEN, VIRTIO_BLK_T_ZONE_CLOSE, VIRTIO_BLK_T_ZONE_FINISH = 18, 20, 22
VIRTIO_BLK_T_ZONE_RESET, VIRTIO_BLK_T_ZONE_RESET_ALL = 24, 26
VIRTIO_BLK_S_ZONE_INVALID_CMD, VIRTIO_BLK_S_ZONE_UNALIGNED_WP = 3, 4
VIRTIO_BLK_S_ZONE_OPEN_RESOURCE, VIRTIO_BLK_S_ZONE_ACTIVE_RESOURCE = 5, 6
RESOURCE = (VIRTIO_BLK_S_ZONE_OPEN_RESOURCE, VIRTIO_BLK_S_ZONE_ACTIVE_RESOURCE)
# zone types and states (struct virtio_blk_zone_descriptor)
VIRTIO_BLK_ZT_CONV, VIRTIO_BLK_ZT_SWR = 1, 2
VIRTIO_BLK_ZS_NOT_WP, VIRTIO_BLK_ZS_EMPTY, VIRTIO_BLK_ZS_IOPEN, VIRTIO_BLK_ZS_EOPEN = 0, 1, 2, 3
VIRTIO_BLK_ZS_CLOSED, VIRTIO_BLK_ZS_RDONLY, VIRTIO_BLK_ZS_FULL, VIRTIO_BLK_ZS_OFFLINE = 4, 13, 14, 15
VIRTIO_BLK_F_SECURE_ERASE, VIRTIO_BLK_T_SECURE_ERASE = 16, 14
CONFIG_SECURE_ERASE_ALIGNMENT = 68  # struct virtio_blk_config: le32 secure_erase_sector_alignment
REPORT_HDR = struct.Struct("<Q56x")  # nr_zones, reserved
ZONE_DESC = struct.Struct("<QQQBB38x")  # z_cap, z_start, z_wp, z_type, z_state, reserved
APPEND_SECTOR = struct.Struct("<Q")
MAX_REPORTED = 64
CAPACITY_AT = 0  # struct virtio_blk_config: le64 capacity


@dataclass(frozen=True)
class Zone:
    """One zone descriptor of a report."""

    cap: int
    start: int
    wp: int
    type: int
    state: int


class Zoned:
    """Zoned requests on requestq1 of a link that negotiated ZONED."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.port = BlkPort(link)
        config = link.frontend.get_config(0, CONFIG_ZONED + ZONED_FIELDS.size)
        (self.capacity,) = struct.unpack_from("<Q", config, CAPACITY_AT)
        (self.zone_sectors, self.max_open, self.max_active, self.max_append, self.granularity,
         self.model, _unused) = ZONED_FIELDS.unpack_from(config, CONFIG_ZONED)

    def request(self, rtype: int, sector: int, out: bytes = b"", in_len: int = 0) -> tuple[int, bytes]:
        """Any request; returns (status, the device-writable bytes before the status)."""
        head, data_addr, status_addr = self.port.post(rtype, sector, out, in_len)
        self.link.submit(self.port.index)
        self.link.wait_used(self.port.index, 1)
        return self.link.memory.read(status_addr, 1)[0], self.link.memory.read(data_addr, in_len)

    def status(self, rtype: int, sector: int, out: bytes = b"", in_len: int = 0) -> int:
        """The status of one request."""
        return self.request(rtype, sector, out, in_len)[0]

    def report(self, sector: int = 0) -> list[Zone]:
        """VIRTIO_BLK_T_ZONE_REPORT from the zone holding ``sector`` on (at most :data:`MAX_REPORTED` zones)."""
        status, data = self.request(VIRTIO_BLK_T_ZONE_REPORT, sector, in_len=REPORT_HDR.size + ZONE_DESC.size * MAX_REPORTED)
        expect(status == VIRTIO_BLK_S_OK, f"ZONE_REPORT at sector {sector}: status {status}")
        (count,) = REPORT_HDR.unpack_from(data)
        count = min(count, MAX_REPORTED)
        return [Zone(*ZONE_DESC.unpack_from(data, REPORT_HDR.size + ZONE_DESC.size * i)) for i in range(count)]

    def zone(self, start: int) -> Zone:
        """The descriptor of the zone at ``start`` now."""
        return self.report(start)[0]

    def append(self, start: int, sectors: int) -> tuple[int, int]:
        """ZONE_APPEND of ``sectors`` sectors to the zone at ``start``; returns (status, append_sector)."""
        status, data = self.request(VIRTIO_BLK_T_ZONE_APPEND, start, os.urandom(sectors * SECTOR_SIZE), APPEND_SECTOR.size)
        return status, APPEND_SECTOR.unpack(data)[0]


def _applies(caps) -> str | None:
    if not caps.has(VIRTIO_BLK_F_ZONED):
        return "VIRTIO_BLK_F_ZONED not offered"
    if caps.has(VIRTIO_BLK_F_RO):
        return "VIRTIO_BLK_F_RO offered: zones cannot be written"
    return needs_protocol(PF.VHOST_USER_PROTOCOL_F_CONFIG)(caps)


def _is(status: int, want: int, what: str) -> None:
    expect(status == want, f"{what}: status {status}, expected {want}")


@check(
    "virtio-1.2:5.2.6#zoned-ops",
    "blk, ZONED: zone management on conventional zones and appends outside SWR zones fail INVALID_CMD; writes off "
    "the write pointer fail UNALIGNED_WP; append_sector names the data; cross-zone and over-capacity requests fail; "
    "unwritten data is never old data; the open/active limits hold; read-only and offline zones refuse",
    devices=BLK,
    applies=_applies,
)
def zoned_ops(ctx: Context) -> str:
    z = Zoned(ctx.open())
    if z.model == VIRTIO_BLK_Z_NONE:
        return "zoned model NONE: no zone requests to check"
    zs = z.zone_sectors
    _is(z.status(VIRTIO_BLK_T_ZONE_RESET_ALL, 0), VIRTIO_BLK_S_OK, "ZONE_RESET_ALL")
    zones = z.report()
    expect(zones, "ZONE_REPORT returned no zone")
    notes = []
    appends = z.max_append > 0  # 5.2.6: with max_append_sectors 0 every ZONE_APPEND completes UNSUPP
    conv = [zone for zone in zones if zone.type == VIRTIO_BLK_ZT_CONV]
    if conv:
        c = conv[0].start
        for name, rtype in (("OPEN", VIRTIO_BLK_T_ZONE_OPEN), ("CLOSE", VIRTIO_BLK_T_ZONE_CLOSE),
                            ("FINISH", VIRTIO_BLK_T_ZONE_FINISH), ("RESET", VIRTIO_BLK_T_ZONE_RESET)):
            _is(z.status(rtype, c), VIRTIO_BLK_S_ZONE_INVALID_CMD, f"ZONE_{name} of the conventional zone at {c}")
        if appends:
            _is(z.append(c, 1)[0], VIRTIO_BLK_S_ZONE_INVALID_CMD, f"ZONE_APPEND to the conventional zone at {c}")
    else:
        notes.append("no conventional zone")
    swr = [zone for zone in zones if zone.type == VIRTIO_BLK_ZT_SWR and zone.state == VIRTIO_BLK_ZS_EMPTY
           and zone.cap >= 4]
    expect(len(swr) >= 3, f"fewer than three empty SWR zones reported after ZONE_RESET_ALL ({len(swr)})")
    a, b = swr[0], swr[1]
    if a.start + zs == b.start:
        _is(z.status(VIRTIO_BLK_T_IN, a.start + zs - 1, in_len=2 * SECTOR_SIZE), VIRTIO_BLK_S_ZONE_INVALID_CMD,
            f"a read of sectors {a.start + zs - 1}..{a.start + zs} across two SWR zones")

    # write_granularity is the alignment writes to a sequential zone need: one write of that size is accepted.
    granularity = max(1, -(-z.granularity // SECTOR_SIZE))
    _is(z.status(VIRTIO_BLK_T_OUT, b.start, os.urandom(granularity * SECTOR_SIZE)), VIRTIO_BLK_S_OK,
        f"a write of write_granularity ({z.granularity} bytes) at the write pointer")

    # Writes and appends on zone a.
    if appends:
        _is(z.append(a.start + 1, 1)[0], VIRTIO_BLK_S_ZONE_INVALID_CMD, "ZONE_APPEND whose sector is not the zone start")
    _is(z.status(VIRTIO_BLK_T_OUT, a.start + 1, os.urandom(SECTOR_SIZE)), VIRTIO_BLK_S_ZONE_UNALIGNED_WP,
        f"a write at {a.start + 1}, off the write pointer {a.start}")
    old = os.urandom(SECTOR_SIZE)
    _is(z.status(VIRTIO_BLK_T_OUT, a.start, old), VIRTIO_BLK_S_OK, "a write at the write pointer")
    if not appends:
        _is(z.append(a.start, 1)[0], VIRTIO_BLK_S_UNSUPP, "ZONE_APPEND with max_append_sectors 0")
    else:
        status, sector = z.append(a.start, 1)
        _is(status, VIRTIO_BLK_S_OK, "ZONE_APPEND of one sector")
        expect(sector == a.start + 1, f"append_sector {sector}, the data went to {a.start + 1} (after one written sector)")
    if appends and z.max_append + 2 < a.cap:
        _is(z.append(a.start, z.max_append + 1)[0], VIRTIO_BLK_S_ZONE_INVALID_CMD,
            f"ZONE_APPEND of max_append_sectors {z.max_append} + 1 sectors")
        status, sector = z.append(a.start, z.max_append)
        _is(status, VIRTIO_BLK_S_OK, f"ZONE_APPEND of max_append_sectors {z.max_append} sectors")
        expect(sector == a.start + 2, f"append_sector {sector}, expected {a.start + 2}")
    wp = z.zone(a.start).wp
    left = a.start + a.cap - wp
    _is(z.status(VIRTIO_BLK_T_OUT, wp, os.urandom((left + 1) * SECTOR_SIZE)), VIRTIO_BLK_S_ZONE_INVALID_CMD,
        f"a write of {left + 1} sectors at the write pointer with {left} left in the zone")
    status, data = z.request(VIRTIO_BLK_T_IN, wp, in_len=SECTOR_SIZE)
    expect(status != VIRTIO_BLK_S_OK or data != old, "a read of unwritten data returned data written before")
    # Unwritten after a reset: the old data must not come back.
    _is(z.status(VIRTIO_BLK_T_ZONE_RESET, a.start), VIRTIO_BLK_S_OK, "ZONE_RESET of a written zone")
    status, data = z.request(VIRTIO_BLK_T_IN, a.start, in_len=SECTOR_SIZE)
    expect(status in (VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_ZONE_INVALID_CMD),
           f"a read of unwritten data: status {status}")
    expect(status != VIRTIO_BLK_S_OK or data != old, "after ZONE_RESET the zone's old data reads back (unwritten data)")

    # FINISH, then transitions a full zone cannot make.
    _is(z.status(VIRTIO_BLK_T_ZONE_FINISH, a.start), VIRTIO_BLK_S_OK, "ZONE_FINISH of an empty zone")
    expect(z.zone(a.start).state == VIRTIO_BLK_ZS_FULL, "the zone is not FULL after ZONE_FINISH")
    _is(z.status(VIRTIO_BLK_T_ZONE_OPEN, a.start), VIRTIO_BLK_S_ZONE_INVALID_CMD, "ZONE_OPEN of a FULL zone")
    _is(z.status(VIRTIO_BLK_T_ZONE_CLOSE, a.start), VIRTIO_BLK_S_ZONE_INVALID_CMD, "ZONE_CLOSE of a FULL zone")
    _is(z.status(VIRTIO_BLK_T_ZONE_RESET_ALL, 0), VIRTIO_BLK_S_OK, "ZONE_RESET_ALL")

    notes += _limits(z, swr)
    notes += _read_only_offline(z, zones, appends)
    notes += _secure_erase(z, swr[2])
    _is(z.status(VIRTIO_BLK_T_ZONE_RESET_ALL, 0), VIRTIO_BLK_S_OK, "ZONE_RESET_ALL")
    return "; ".join(notes)


def _limits(z: Zoned, swr: list[Zone]) -> list[str]:
    """max_open_zones and max_active_zones: explicit opens up to the limit succeed, one more fails with a
    resource status, and so does a write that would open a zone implicitly."""
    notes = []
    if z.max_open and len(swr) > z.max_open + 1:
        for zone in swr[: z.max_open]:
            _is(z.status(VIRTIO_BLK_T_ZONE_OPEN, zone.start), VIRTIO_BLK_S_OK, f"ZONE_OPEN within max_open_zones {z.max_open}")
        extra = swr[z.max_open]
        expect(z.status(VIRTIO_BLK_T_ZONE_OPEN, extra.start) in RESOURCE,
               f"ZONE_OPEN beyond max_open_zones {z.max_open} did not fail with OPEN_RESOURCE or ACTIVE_RESOURCE")
        expect(z.zone(extra.start).state == VIRTIO_BLK_ZS_EMPTY, "a zone refused for resources changed state")
        expect(z.status(VIRTIO_BLK_T_OUT, extra.start, os.urandom(SECTOR_SIZE)) in RESOURCE,
               f"a write opening a zone beyond max_open_zones {z.max_open} (every open zone explicitly open) did not "
               "fail with a resource status")
        for zone in swr[: z.max_open]:
            _is(z.status(VIRTIO_BLK_T_ZONE_CLOSE, zone.start), VIRTIO_BLK_S_OK, "ZONE_CLOSE of an open zone")
    else:
        notes.append("max_open_zones not exercised")
    if z.max_active and len(swr) > z.max_active + 1:
        _is(z.status(VIRTIO_BLK_T_ZONE_RESET_ALL, 0), VIRTIO_BLK_S_OK, "ZONE_RESET_ALL")
        for zone in swr[: z.max_active]:
            # an active zone: written (implicitly open), then closed, so the open limit does not interfere
            _is(z.status(VIRTIO_BLK_T_OUT, zone.start, os.urandom(SECTOR_SIZE)), VIRTIO_BLK_S_OK, "a write within max_active_zones")
            _is(z.status(VIRTIO_BLK_T_ZONE_CLOSE, zone.start), VIRTIO_BLK_S_OK, "ZONE_CLOSE of a written zone")
        extra = swr[z.max_active]
        expect(z.status(VIRTIO_BLK_T_ZONE_OPEN, extra.start) in RESOURCE,
               f"ZONE_OPEN beyond max_active_zones {z.max_active} did not fail with a resource status")
    else:
        notes.append("max_active_zones not exercised")
    return notes


def _secure_erase(z: Zoned, zone: Zone) -> list[str]:
    """With SECURE_ERASE too: its alignment is a multiple of zone_sectors, and erasing a zone resets it."""
    if not z.link.negotiated.has(VIRTIO_BLK_F_SECURE_ERASE):
        return ["SECURE_ERASE not negotiated"]
    (alignment,) = struct.unpack("<I", z.link.frontend.get_config(CONFIG_SECURE_ERASE_ALIGNMENT, 4))
    expect(alignment and alignment % z.zone_sectors == 0,
           f"secure_erase_sector_alignment {alignment} is not a multiple of zone_sectors {z.zone_sectors}")
    _is(z.status(VIRTIO_BLK_T_ZONE_RESET_ALL, 0), VIRTIO_BLK_S_OK, "ZONE_RESET_ALL")
    _is(z.status(VIRTIO_BLK_T_OUT, zone.start, os.urandom(SECTOR_SIZE)), VIRTIO_BLK_S_OK, "a write at the write pointer")
    _is(z.status(VIRTIO_BLK_T_SECURE_ERASE, 0, DISCARD_SEG.pack(zone.start, z.zone_sectors, 0)), VIRTIO_BLK_S_OK,
        f"SECURE_ERASE of the zone at {zone.start}")
    after = z.zone(zone.start)
    expect(after.state == VIRTIO_BLK_ZS_EMPTY and after.wp == zone.start,
           f"after SECURE_ERASE the zone is in state {after.state} with wp {after.wp}, as ZONE_RESET leaves it: EMPTY at {zone.start}")
    return []


def _read_only_offline(z: Zoned, zones: list[Zone], appends: bool) -> list[str]:
    notes = []
    for state, name in ((VIRTIO_BLK_ZS_RDONLY, "read-only"), (VIRTIO_BLK_ZS_OFFLINE, "offline")):
        found = [zone for zone in zones if zone.state == state]
        if not found:
            notes.append(f"no {name} zone")
            continue
        zone = found[0]
        _is(z.status(VIRTIO_BLK_T_OUT, zone.start, os.urandom(SECTOR_SIZE)), VIRTIO_BLK_S_ZONE_INVALID_CMD,
            f"a write to the {name} zone at {zone.start}")
        if appends:
            _is(z.append(zone.start, 1)[0], VIRTIO_BLK_S_ZONE_INVALID_CMD, f"ZONE_APPEND to the {name} zone at {zone.start}")
        for rname, rtype in (("FINISH", VIRTIO_BLK_T_ZONE_FINISH), ("RESET", VIRTIO_BLK_T_ZONE_RESET)):
            _is(z.status(rtype, zone.start), VIRTIO_BLK_S_ZONE_INVALID_CMD, f"ZONE_{rname} of the {name} zone")
        if state == VIRTIO_BLK_ZS_OFFLINE:
            _is(z.status(VIRTIO_BLK_T_IN, zone.start, in_len=SECTOR_SIZE), VIRTIO_BLK_S_ZONE_INVALID_CMD,
                "a read of the offline zone")
    return notes

