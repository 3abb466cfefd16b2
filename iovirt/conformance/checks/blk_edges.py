"""virtio-blk at its edges (virtio 1.4 section 5.2, cited as 1.2's 5.2): every request type, the first
and last sector, the segment limit, unaligned lengths, GET_ID buffer sizes, unknown segment flags,
zoned requests without VIRTIO_BLK_F_ZONED, and the padding of the configuration space.
"""

from __future__ import annotations

import struct

from iovirt.conformance.checks.blk import BLK, _capacity, _port, _writable
from iovirt.conformance.checks.common import blk_pattern, expect_ok
from iovirt.conformance.devices import STATUS_NAMES, BlkPort
from iovirt.conformance.registry import NotApplicable, check, expect
from iovirt.conformance.target import Context, needs_protocol
from iovirt.vhost_user.messages import ProtocolFeature as PF
from iovirt.virtio.defs import VIRTIO_CONFIG_S_FEATURES_OK
from iovirt.virtio.blk.defs import (
    DISCARD_SEG,
    REQ_HDR,
    SECTOR_SIZE,
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
)

# 5.2.6: the zoned request types (VIRTIO_BLK_T_ZONE_APPEND .. ZONE_RESET_ALL)
ZONE_TYPES = {"ZONE_APPEND": 15, "ZONE_REPORT": 16, "ZONE_OPEN": 18, "ZONE_CLOSE": 20, "ZONE_FINISH": 22,
              "ZONE_RESET": 24, "ZONE_RESET_ALL": 26}
VIRTIO_BLK_F_CONFIG_WCE = 11
VIRTIO_BLK_F_ZONED = 17
UNKNOWN_SEG_FLAG = 1 << 1  # 5.2.6: only bit 0 (unmap) is defined in struct virtio_blk_discard_write_zeroes
# struct virtio_blk_config (5.2.4): offsets of the padding and the fields around it
CONFIG_SEG_MAX = 12
CONFIG_WRITEBACK = 32
CONFIG_UNUSED0 = 33
CONFIG_UNUSED1 = slice(57, 60)
CONFIG_THROUGH_UNUSED1 = 60
UNALIGNED = 100  # a data length that is no multiple of 512
EDGE_QUEUE = 128
SEGMENTS_CAP = EDGE_QUEUE - 2  # data descriptors at most: with header and status a chain fits the ring (2.7.5.2)


@check(
    "virtio-1.2:5.2.6#zoned-unsupp",
    "blk: without VIRTIO_BLK_F_ZONED negotiated every zoned request type completes with UNSUPP",
    devices=BLK,
)
def zoned_unsupported(ctx: Context) -> None:
    port = BlkPort(ctx.open(features=~(1 << VIRTIO_BLK_F_ZONED)))
    for name, rtype in ZONE_TYPES.items():
        status = port.request(rtype, 0, out=bytes(16) if name == "ZONE_APPEND" else b"", in_len=64).status
        expect(status == VIRTIO_BLK_S_UNSUPP, f"VIRTIO_BLK_T_{name} without ZONED: {STATUS_NAMES[status]}, expected UNSUPP")


def _needs_discard_or_zeroes(caps) -> str | None:
    if caps.has(VIRTIO_BLK_F_DISCARD) or caps.has(VIRTIO_BLK_F_WRITE_ZEROES):
        return None
    return "neither VIRTIO_BLK_F_DISCARD nor VIRTIO_BLK_F_WRITE_ZEROES offered"


@check(
    "virtio-1.2:5.2.6.2#unknown-flags",
    "blk: DISCARD and WRITE_ZEROES with an unknown segment flag complete with UNSUPP and change nothing",
    devices=BLK,
    applies=_needs_discard_or_zeroes,
)
def unknown_flags(ctx: Context) -> None:
    port = _port(ctx)
    before = port.request(VIRTIO_BLK_T_IN, 24, in_len=SECTOR_SIZE)
    expect_ok(before.status, "IN of sector 24")
    for feature, rtype, name, flags in (
        (VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_T_DISCARD, "DISCARD", UNKNOWN_SEG_FLAG),
        (VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_T_WRITE_ZEROES, "WRITE_ZEROES", UNKNOWN_SEG_FLAG | VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP),
    ):
        if not ctx.caps.has(feature):
            continue
        status = port.request(rtype, 0, out=DISCARD_SEG.pack(24, 1, flags)).status
        expect(status == VIRTIO_BLK_S_UNSUPP, f"{name} with segment flags {flags:#x}: {STATUS_NAMES[status]}, expected UNSUPP")
    after = port.request(VIRTIO_BLK_T_IN, 24, in_len=SECTOR_SIZE)
    expect(after.data == before.data, "a request answered UNSUPP changed the sector it named")


@check(
    "virtio-1.2:5.2.5#config",
    "blk: FLUSH offered (SHOULD; MUST with CONFIG_WCE), writeback 0 without FLUSH, padding unused0/unused1 zero",
    devices=BLK,
    applies=needs_protocol(PF.VHOST_USER_PROTOCOL_F_CONFIG),
)
def config_init(ctx: Context) -> None:
    caps = ctx.caps
    expect(caps.has(VIRTIO_BLK_F_FLUSH), f"features {caps.features:#x} lack VIRTIO_BLK_F_FLUSH (SHOULD always be offered)")
    link = ctx.open(features=~(1 << VIRTIO_BLK_F_FLUSH))
    config = link.frontend.get_config(0, CONFIG_THROUGH_UNUSED1)
    if link.negotiated.has(VIRTIO_BLK_F_CONFIG_WCE):
        expect(config[CONFIG_WRITEBACK] == 0, f"writeback {config[CONFIG_WRITEBACK]} with CONFIG_WCE but not FLUSH negotiated")
    expect(config[CONFIG_UNUSED0] == 0, f"unused0 is {config[CONFIG_UNUSED0]:#x}, expected 0")
    expect(config[CONFIG_UNUSED1] == bytes(3), f"unused1 is {config[CONFIG_UNUSED1].hex()}, expected 000000")


@check(
    "virtio-1.2:5.2.6#edges",
    "blk: sector 0 and the last sector read back what was written; a request over seg_max segments; "
    "an unaligned length gets a status and the ring goes on; GET_ID in a larger buffer",
    devices=BLK,
    applies=_writable,
)
def edges(ctx: Context) -> None:
    cap = _capacity(ctx.caps)
    port = BlkPort(ctx.open(), 0, EDGE_QUEUE)
    for sector in (0, cap - 1):
        data = blk_pattern(SECTOR_SIZE)
        expect_ok(port.request(VIRTIO_BLK_T_OUT, sector, out=data).status, f"OUT of sector {sector}")
        got = port.request(VIRTIO_BLK_T_IN, sector, in_len=SECTOR_SIZE)
        expect(got.status == VIRTIO_BLK_S_OK and got.data == data, f"sector {sector} does not read back what was written")
    segments = 8
    if ctx.caps.has(VIRTIO_BLK_F_SEG_MAX) and ctx.caps.config is not None:
        segments = max(1, min(struct.unpack_from("<I", ctx.caps.config, CONFIG_SEG_MAX)[0], SEGMENTS_CAP))
    _segmented_read(port, segments)
    port.request(VIRTIO_BLK_T_IN, 0, in_len=UNALIGNED)  # any of OK/IOERR/UNSUPP (BlkPort checks the byte)
    expect_ok(port.request(VIRTIO_BLK_T_IN, 0, in_len=SECTOR_SIZE).status, "IN after the unaligned request")
    short = port.request(VIRTIO_BLK_T_GET_ID, 0, in_len=VIRTIO_BLK_ID_BYTES)
    if short.status == VIRTIO_BLK_S_UNSUPP:
        return
    long = port.request(VIRTIO_BLK_T_GET_ID, 0, in_len=3 * VIRTIO_BLK_ID_BYTES)
    expect_ok(long.status, "GET_ID in a 60-byte buffer")
    expect(long.data[:VIRTIO_BLK_ID_BYTES] == short.data, "GET_ID in a larger buffer gives a different ID string")


def _segmented_read(port: BlkPort, segments: int) -> None:
    """Write ``segments`` sectors at sector 32, read them back into one data descriptor per sector."""
    link, mem = port.link, port.link.memory
    data = blk_pattern(segments * SECTOR_SIZE)
    expect_ok(port.request(VIRTIO_BLK_T_OUT, 32, out=data).status, f"OUT of {segments} sectors")
    hdr = link.alloc.alloc(REQ_HDR.size)
    mem.write(hdr, REQ_HDR.pack(VIRTIO_BLK_T_IN, 0, 32))
    bufs = [link.alloc.alloc(SECTOR_SIZE) for _ in range(segments)]
    status = link.alloc.alloc(1)
    mem.write(status, b"\xff")
    link.add_buffers(port.index, [(hdr, REQ_HDR.size)], [(b, SECTOR_SIZE) for b in bufs] + [(status, 1)])
    link.submit(port.index)
    link.wait_used(port.index, 1)
    code = mem.read(status, 1)[0]
    expect(code == VIRTIO_BLK_S_OK, f"IN over {segments} data descriptors: status {code:#x}, expected OK")
    got = b"".join(mem.read(b, SECTOR_SIZE) for b in bufs)
    expect(got == data, f"IN over {segments} data descriptors read back different data")


# struct virtio_blk_zoned_characteristics (5.2.4) and its models
CONFIG_SIZE_MAX = 8
CONFIG_ZONED = 72  # zone_sectors, max_open_zones, max_active_zones, max_append_sectors, write_granularity
ZONED_FIELDS = struct.Struct("<IIIIIB3s")
CONFIG_THROUGH_ZONED = CONFIG_ZONED + ZONED_FIELDS.size
VIRTIO_BLK_Z_NONE, VIRTIO_BLK_Z_HM, VIRTIO_BLK_Z_HA = 0, 1, 2


def _zoned_applies(caps) -> str | None:
    if not caps.has(VIRTIO_BLK_F_ZONED):
        return "VIRTIO_BLK_F_ZONED not offered"
    return needs_protocol(PF.VHOST_USER_PROTOCOL_F_CONFIG)(caps)


@check(
    "virtio-1.2:5.2.5#zoned",
    "blk: with ZONED a valid model, zone_sectors for HM/HA, max_append_sectors within seg_max*size_max, unused2 0; "
    "without it HM refuses FEATURES_OK and HA/NONE zero the zoned fields",
    devices=BLK,
    applies=_zoned_applies,
)
def zoned_config(ctx: Context) -> None:
    link = ctx.open()
    config = link.frontend.get_config(0, CONFIG_THROUGH_ZONED)
    zone_sectors, _open, _active, append, _gran, model, unused2 = ZONED_FIELDS.unpack_from(config, CONFIG_ZONED)
    expect(model in (VIRTIO_BLK_Z_NONE, VIRTIO_BLK_Z_HM, VIRTIO_BLK_Z_HA), f"zoned model {model}, expected 0, 1 or 2")
    expect(unused2 == bytes(3), f"unused2 is {unused2.hex()}, expected 000000")
    if model != VIRTIO_BLK_Z_NONE:
        expect(zone_sectors > 0, f"zone_sectors 0 for zoned model {model}")
    size_max, seg_max = struct.unpack_from("<II", config, CONFIG_SIZE_MAX)
    if ctx.caps.has(VIRTIO_BLK_F_SEG_MAX) and ctx.caps.has(VIRTIO_BLK_F_SIZE_MAX):
        expect(append <= seg_max * size_max, f"max_append_sectors {append} exceeds seg_max {seg_max} * size_max {size_max}")
    ctx.close_link(link)
    plain = ctx.open(features=~(1 << VIRTIO_BLK_F_ZONED))
    if model == VIRTIO_BLK_Z_HM:
        if not plain.has_status:
            raise NotApplicable("host-managed: FEATURES_OK is only observable with VHOST_USER_PROTOCOL_F_STATUS")
        status = plain.frontend.get_status()
        expect(not status & VIRTIO_CONFIG_S_FEATURES_OK, f"host-managed device accepted FEATURES_OK without ZONED (status {status:#x})")
        return
    fields = plain.frontend.get_config(CONFIG_ZONED, ZONED_FIELDS.size - 4)
    expect(fields == bytes(len(fields)), f"zoned fields {fields.hex()} not zero with ZONED not accepted (model {model})")
