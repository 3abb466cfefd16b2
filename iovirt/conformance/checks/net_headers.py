"""virtio-net header variants (virtio 1.4 section 5.1, cited as 1.2's 5.1): flags, checksum offload
and segmentation offload with and without the features negotiated, the MTU, and VLAN-tagged frames.

Frames are built here (IPv4/IPv6 + TCP, checksums computed here) so that a check does not trust the
device's own checksum code.
"""

from __future__ import annotations

import struct

from iovirt.conformance.devices import NetPort, Received, new_tag
from iovirt.conformance.registry import CheckFailed, check, expect
from iovirt.conformance.target import Context, needs_feature, needs_frame_path, needs_protocol
from iovirt.vhost_user.messages import ProtocolFeature as PF
from iovirt.virtio.net.defs import (
    ETH_HLEN,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_CTRL_VLAN,
    VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_UFO,
    VIRTIO_NET_F_HASH_REPORT,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_RSC_EXT,
    VIRTIO_NET_F_RSS,
    VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_F_RSC_INFO,
    VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    NetHdr,
)

NET = {"net"}
SRC_MAC = bytes.fromhex("525400c0ffee")
BROADCAST = b"\xff" * 6
IP4 = (bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
IP6 = (bytes.fromhex("fd00" + "00" * 13 + "01"), bytes.fromhex("fd00" + "00" * 13 + "02"))
TCP_HLEN = 20
TCP_CSUM_OFFSET = 16  # the checksum field within the TCP header
UNKNOWN_HDR_FLAGS = 0x70  # virtio_net_hdr flags bits no feature of virtio 1.4 defines
MIN_MTU_SHOULD = 1280  # 5.1.4.1: SHOULD be at least this with VIRTIO_NET_F_MTU
CONFIG_MTU = 10  # struct virtio_net_config: mtu at offset 10
TSO_MSS = 1000
TSO_PAYLOAD = 3000
TAG_EVERY = 100  # the tag is repeated in the payload, so that each TSO segment carries it
GUEST_GSO = (VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_GUEST_ECN)


def _fold(total: int) -> int:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _sum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    return _fold(sum(struct.unpack(f"!{len(data) // 2}H", data)))


def _pseudo(version: int, length: int) -> bytes:
    src, dst = IP4 if version == 4 else IP6
    if version == 4:
        return src + dst + struct.pack("!BBH", 0, 6, length)
    return src + dst + struct.pack("!I3xB", length, 6)


def tcp_frame(payload: bytes, *, version: int = 4, csum: str = "full") -> bytes:
    """An Ethernet/IPv4-or-IPv6/TCP frame; ``csum``: ``"full"``, ``"partial"`` (pseudo-header sum only) or ``"bad"``."""
    tcp_len = TCP_HLEN + len(payload)
    tcp = bytearray(struct.pack("!HHIIBBHHH", 4000, 5000, 1, 0, 5 << 4, 0x18, 65535, 0, 0) + payload)
    pseudo = _sum16(_pseudo(version, tcp_len))
    if csum == "partial":
        value = pseudo
    else:
        value = ~_fold(pseudo + _sum16(bytes(tcp))) & 0xFFFF
        if csum == "bad":
            value ^= 0x5A5A
    struct.pack_into("!H", tcp, TCP_CSUM_OFFSET, value)
    if version == 4:
        ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + tcp_len, 1, 0, 64, 6, 0, *IP4))
        struct.pack_into("!H", ip, 10, ~_sum16(bytes(ip)) & 0xFFFF)
        ethertype = b"\x08\x00"
    else:
        ip = bytearray(struct.pack("!IHBB16s16s", 6 << 28, tcp_len, 6, 64, *IP6))
        ethertype = b"\x86\xdd"
    return BROADCAST + SRC_MAC + ethertype + bytes(ip) + bytes(tcp)


def tcp_checksum_ok(frame: bytes) -> bool:
    """Whether the TCP checksum of a frame built by :func:`tcp_frame` (or a segment of one) is complete and right."""
    version = 4 if frame[12:14] == b"\x08\x00" else 6
    l3 = 20 if version == 4 else 40
    tcp = frame[ETH_HLEN + l3 :]
    if version == 4:
        tcp = tcp[: struct.unpack_from("!H", frame, ETH_HLEN + 2)[0] - 20]
    return _fold(_sum16(_pseudo(version, len(tcp))) + _sum16(tcp)) == 0xFFFF


def _payload(tag: bytes, size: int) -> bytes:
    return (tag + b"." * (TAG_EVERY - len(tag))) * (size // TAG_EVERY)


def _send(port: NetPort, hdr: NetHdr, frame: bytes) -> None:
    port.link.add(NetPort.TX, [hdr.pack(port.hdr_len) + frame])
    port.link.submit(NetPort.TX)


def _receive(port: NetPort, tag: bytes, ctx: Context, what: str) -> Received:
    got = port.receive(tag, ctx.timeout)
    if got is None:
        raise CheckFailed(f"{what} was not received")
    return got


def _ends(ctx: Context, dut_features: int) -> tuple[NetPort, NetPort]:
    dut = ctx.net_port(ctx.open(features=dut_features))
    injector, _sink = ctx.net_ends(dut)
    return dut, injector


@check(
    "virtio-1.2:5.1.6.2#flags",
    "net: unknown header flags are ignored; without NEEDS_CSUM, csum_start/csum_offset and a wrong checksum "
    "leave the frame unchanged",
    devices=NET,
    applies=needs_frame_path,
)
def tx_flags(ctx: Context) -> None:
    dut = ctx.net_port(ctx.open())
    _injector, sink = ctx.net_ends(dut)
    tag = new_tag()
    frame = tcp_frame(_payload(tag, 200), csum="bad")
    hdr = NetHdr(flags=UNKNOWN_HDR_FLAGS, csum_start=ETH_HLEN + 20, csum_offset=TCP_CSUM_OFFSET - 4)
    _send(dut, hdr, frame)
    got = _receive(sink, tag, ctx, "a frame sent with unknown header flags and no NEEDS_CSUM")
    expect(
        got.frame[: len(frame)] == frame,
        "the frame changed in transit: header flags other than NEEDS_CSUM (or csum_start/csum_offset) were acted on",
    )
    expect(
        not got.hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM,
        "the frame arrived marked NEEDS_CSUM: csum_start/csum_offset were used though NEEDS_CSUM was not set",
    )


@check(
    "virtio-1.2:5.1.6.4#csum",
    "net: without GUEST_CSUM a partially checksummed frame arrives complete with flags 0; "
    "with it, DATA_VALID never marks a wrong checksum",
    devices=NET,
    applies=lambda caps: needs_feature(VIRTIO_NET_F_CSUM, "VIRTIO_NET_F_CSUM")(caps) or needs_frame_path(caps),
)
def rx_csum(ctx: Context) -> None:
    dut, injector = _ends(ctx, ~(1 << VIRTIO_NET_F_GUEST_CSUM) & ~sum(1 << b for b in GUEST_GSO))
    if not injector.link.negotiated.has(VIRTIO_NET_F_CSUM):
        raise CheckFailed("VIRTIO_NET_F_CSUM offered but not negotiated by the sending port")
    tag = new_tag()
    frame = tcp_frame(_payload(tag, 300), csum="partial")
    _send(injector, NetHdr(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=ETH_HLEN + 20, csum_offset=TCP_CSUM_OFFSET), frame)
    got = _receive(dut, tag, ctx, "a frame sent with NEEDS_CSUM")
    expect(got.hdr.flags == 0, f"header flags {got.hdr.flags:#x} without GUEST_CSUM, expected 0")
    expect(tcp_checksum_ok(got.frame[: len(frame)]), "the TCP checksum is not complete (SHOULD be without GUEST_CSUM)")
    if not ctx.caps.has(VIRTIO_NET_F_GUEST_CSUM):
        return
    ctx.close()  # one front-end per socket at a time: reconnect with GUEST_CSUM
    dut, injector = _ends(ctx, (1 << 64) - 1)
    tag = new_tag()
    frame = tcp_frame(_payload(tag, 300), csum="bad")
    _send(injector, NetHdr(), frame)
    got = _receive(dut, tag, ctx, "a frame with a wrong TCP checksum")
    expect(
        not got.hdr.flags & VIRTIO_NET_HDR_F_DATA_VALID,
        "DATA_VALID set on a frame whose TCP checksum is wrong (the device MUST have validated it)",
    )


def _tso_applies(caps) -> str | None:
    if not (caps.has(VIRTIO_NET_F_HOST_TSO4) or caps.has(VIRTIO_NET_F_HOST_TSO6)):
        return "neither VIRTIO_NET_F_HOST_TSO4 nor HOST_TSO6 offered: no GSO frame can be sent towards the device"
    return needs_frame_path(caps)


@check(
    "virtio-1.2:5.1.6.4#gso",
    "net: without GUEST_TSO4/6 a TSO frame arrives as segments with gso_type NONE, no RSC_INFO, full checksums",
    devices=NET,
    applies=_tso_applies,
)
def rx_gso(ctx: Context) -> None:
    no_guest_gso = ~sum(1 << b for b in GUEST_GSO) & ~(1 << VIRTIO_NET_F_RSC_EXT) & ~(1 << VIRTIO_NET_F_GUEST_CSUM)
    for version, host_bit, gso_type in ((4, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_HDR_GSO_TCPV4),
                                        (6, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_HDR_GSO_TCPV6)):
        if not ctx.caps.has(host_bit):
            continue
        ctx.close()  # one front-end per socket at a time
        dut, injector = _ends(ctx, no_guest_gso)
        tag = new_tag()
        payload = _payload(tag, TSO_PAYLOAD)
        frame = tcp_frame(payload, version=version, csum="partial")
        l4 = ETH_HLEN + (20 if version == 4 else 40)
        hdr = NetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type, l4 + TCP_HLEN, TSO_MSS, l4, TCP_CSUM_OFFSET)
        _send(injector, hdr, frame)
        got_payload = b""
        while len(got_payload) < len(payload):
            got = _receive(dut, tag, ctx, f"segment at byte {len(got_payload)} of an IPv{version} TSO frame")
            expect(got.hdr.gso_type == VIRTIO_NET_HDR_GSO_NONE,
                   f"IPv{version}: gso_type {got.hdr.gso_type} without GUEST_TSO{version} negotiated, expected NONE")
            expect(not got.hdr.flags & VIRTIO_NET_HDR_F_RSC_INFO, "RSC_INFO set without VIRTIO_NET_F_RSC_EXT")
            segment = got.frame[l4 + TCP_HLEN :]
            if version == 4:
                segment = got.frame[l4 + TCP_HLEN : ETH_HLEN + struct.unpack_from("!H", got.frame, ETH_HLEN + 2)[0]]
            else:
                segment = got.frame[l4 + TCP_HLEN : l4 + struct.unpack_from("!H", got.frame, ETH_HLEN + 4)[0]]
            expect(len(segment) <= TSO_MSS, f"IPv{version}: a {len(segment)}-byte segment exceeds gso_size {TSO_MSS}")
            expect(tcp_checksum_ok(got.frame[: l4 + TCP_HLEN + len(segment)]), f"IPv{version}: a segment's TCP checksum is not complete")
            got_payload += segment
        expect(got_payload == payload, f"IPv{version}: the segments do not add up to the payload sent")


@check(
    "virtio-1.2:5.1.4.1#mtu",
    "net: with MTU, mtu is at least 1280 (SHOULD), stays put, and a frame of mtu bytes (plus Ethernet) is forwarded whole",
    devices=NET,
    applies=lambda caps: needs_feature(VIRTIO_NET_F_MTU, "VIRTIO_NET_F_MTU")(caps)
    or needs_protocol(PF.VHOST_USER_PROTOCOL_F_CONFIG)(caps) or needs_frame_path(caps),
)
def mtu(ctx: Context) -> None:
    link = ctx.open()
    (mtu,) = struct.unpack_from("<H", link.frontend.get_config(CONFIG_MTU, 2))
    expect(mtu >= MIN_MTU_SHOULD, f"mtu {mtu}, SHOULD be at least {MIN_MTU_SHOULD}")
    dut = ctx.net_port(link)
    _injector, sink = ctx.net_ends(dut)
    tag = new_tag()
    room = mtu - 20 - TCP_HLEN  # IPv4 + TCP + payload = mtu bytes exactly
    frame = tcp_frame(_payload(tag, room + TAG_EVERY)[:room])
    _send(dut, NetHdr(), frame)
    got = _receive(sink, tag, ctx, f"a frame of mtu {mtu} bytes (gso NONE)")
    expect(got.frame[: len(frame)] == frame, f"the {len(frame)}-byte frame arrived changed")
    (again,) = struct.unpack_from("<H", link.frontend.get_config(CONFIG_MTU, 2))
    expect(again == mtu, f"mtu changed from {mtu} to {again} (MUST NOT be modified once set)")


@check(
    "virtio-1.2:5.1.6.5.3#untagged-filter",
    "net: without CTRL_VLAN negotiated, VLAN-tagged frames are received",
    devices=NET,
    applies=needs_frame_path,
)
def vlan_accepted(ctx: Context) -> None:
    dut, injector = _ends(ctx, ~(1 << VIRTIO_NET_F_CTRL_VLAN))
    tag = new_tag()
    inner = tcp_frame(_payload(tag, 200))
    frame = inner[:12] + b"\x81\x00" + struct.pack("!H", 42) + inner[12:]
    _send(injector, NetHdr(), frame)
    got = _receive(dut, tag, ctx, "a frame tagged VLAN 42 without CTRL_VLAN negotiated")
    expect(got.frame[: len(frame)] == frame, "the VLAN-tagged frame arrived changed")


@check(
    "virtio-1.2:5.1.4.1#mtu-rx",
    "net: with MTU negotiated, a received frame longer than mtu (plus its Ethernet header) is not passed",
    devices=NET,
    applies=lambda caps: needs_feature(VIRTIO_NET_F_MTU, "VIRTIO_NET_F_MTU")(caps)
    or needs_protocol(PF.VHOST_USER_PROTOCOL_F_CONFIG)(caps) or needs_frame_path(caps),
)
def mtu_rx(ctx: Context) -> None:
    link = ctx.open()
    expect(link.negotiated.has(VIRTIO_NET_F_MTU), "VIRTIO_NET_F_MTU offered but not negotiated")
    (mtu,) = struct.unpack_from("<H", link.frontend.get_config(CONFIG_MTU, 2))
    dut = ctx.net_port(link)
    injector, _sink = ctx.net_ends(dut)
    for extra in (1, 100):
        tag = new_tag()
        room = mtu + extra - 20 - TCP_HLEN
        _send(injector, NetHdr(), tcp_frame(_payload(tag, room + TAG_EVERY)[:room]))
        got = dut.receive(tag, ctx.quiet)
        expect(got is None, f"a received frame of {ETH_HLEN + mtu + extra} bytes (mtu {mtu}, gso_type NONE) was passed to the driver")
    tag = new_tag()
    room = mtu - 20 - TCP_HLEN
    _send(injector, NetHdr(), tcp_frame(_payload(tag, room + TAG_EVERY)[:room]))
    _receive(dut, tag, ctx, f"a frame of exactly mtu {mtu} bytes after the longer ones")


@check(
    "virtio-1.2:5.1.6.2#hdr_len",
    "net: a TSO frame whose hdr_len is wrong (0) is still segmented right (the device must not rely on hdr_len)",
    devices=NET,
    applies=lambda caps: needs_feature(VIRTIO_NET_F_HOST_TSO4, "VIRTIO_NET_F_HOST_TSO4")(caps) or needs_frame_path(caps),
)
def tx_hdr_len(ctx: Context) -> None:
    dut = ctx.net_port(ctx.open())
    _injector, sink = ctx.net_ends(dut)
    tag = new_tag()
    payload = _payload(tag, TSO_PAYLOAD)
    frame = tcp_frame(payload, csum="partial")
    l4 = ETH_HLEN + 20
    _send(dut, NetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 0, TSO_MSS, l4, TCP_CSUM_OFFSET), frame)
    got_payload = b""
    while len(got_payload) < len(payload):
        got = _receive(sink, tag, ctx, f"data at byte {len(got_payload)} of a TSO frame sent with hdr_len 0")
        end = ETH_HLEN + struct.unpack_from("!H", got.frame, ETH_HLEN + 2)[0]
        got_payload += got.frame[l4 + TCP_HLEN : end]
    expect(got_payload == payload, "the data of a TSO frame sent with hdr_len 0 arrived different")


# 5.1.4.1: SHOULD NOT be offered without VIRTIO_NET_F_CTRL_VQ
VIRTIO_NET_F_CTRL_RX_EXTRA = 20
NEED_CTRL_VQ = {VIRTIO_NET_F_HASH_REPORT: "HASH_REPORT", VIRTIO_NET_F_CTRL_RX_EXTRA: "CTRL_RX_EXTRA"}


@check(
    "virtio-1.2:5.1.4.1#ctrl_vq",
    "net: HASH_REPORT and CTRL_RX_EXTRA are not offered without CTRL_VQ (SHOULD NOT)",
    devices=NET,
)
def needs_ctrl_vq(ctx: Context) -> None:
    if ctx.caps.has(VIRTIO_NET_F_CTRL_VQ):
        return
    offered = [name for bit, name in NEED_CTRL_VQ.items() if ctx.caps.has(bit)]
    expect(not offered, f"offered {', '.join(offered)} without VIRTIO_NET_F_CTRL_VQ (features {ctx.caps.features:#x})")


# struct virtio_net_config (5.1.4) beyond mtu
CONFIG_SPEED, CONFIG_DUPLEX, CONFIG_RSS_KEY, CONFIG_RSS_TABLE = 12, 16, 17, 18
CONFIG_THROUGH_RSS_TABLE = 20
VIRTIO_NET_F_SPEED_DUPLEX = 63
SPEED_UNKNOWN = 0xFFFFFFFF
SPEED_MAX = 0x7FFFFFFF
DUPLEX_VALUES = (0x00, 0x01, 0xFF)  # full, half, unknown
RSS_MIN_KEY, RSS_MIN_TABLE = 40, 128


def _fields_apply(caps) -> str | None:
    if not any(caps.has(b) for b in (VIRTIO_NET_F_RSS, VIRTIO_NET_F_HASH_REPORT, VIRTIO_NET_F_SPEED_DUPLEX)):
        return "none of VIRTIO_NET_F_RSS, HASH_REPORT, SPEED_DUPLEX offered"
    return needs_protocol(PF.VHOST_USER_PROTOCOL_F_CONFIG)(caps)


@check(
    "virtio-1.2:5.1.4.1#feature-fields",
    "net: with RSS/HASH_REPORT the RSS limits reach 40 and 128; with SPEED_DUPLEX, speed and duplex are valid and stay",
    devices=NET,
    applies=_fields_apply,
)
def feature_fields(ctx: Context) -> None:
    caps = ctx.caps
    fe = ctx.open().frontend
    config = fe.get_config(0, CONFIG_THROUGH_RSS_TABLE)
    if caps.has(VIRTIO_NET_F_RSS) or caps.has(VIRTIO_NET_F_HASH_REPORT):
        key = config[CONFIG_RSS_KEY]
        expect(key >= RSS_MIN_KEY, f"rss_max_key_size {key} with RSS or HASH_REPORT offered, expected >= {RSS_MIN_KEY}")
    if caps.has(VIRTIO_NET_F_RSS):
        (table,) = struct.unpack_from("<H", config, CONFIG_RSS_TABLE)
        expect(table >= RSS_MIN_TABLE, f"rss_max_indirection_table_length {table}, expected >= {RSS_MIN_TABLE}")
    if caps.has(VIRTIO_NET_F_SPEED_DUPLEX):
        (speed,) = struct.unpack_from("<I", config, CONFIG_SPEED)
        duplex = config[CONFIG_DUPLEX]
        expect(speed <= SPEED_MAX or speed == SPEED_UNKNOWN, f"speed {speed:#x}, expected 0..0x7fffffff or 0xffffffff")
        expect(duplex in DUPLEX_VALUES, f"duplex {duplex:#x}, expected 0x00, 0x01 or 0xff")
        again = fe.get_config(0, CONFIG_THROUGH_RSS_TABLE)
        expect(again[CONFIG_SPEED : CONFIG_DUPLEX + 1] == config[CONFIG_SPEED : CONFIG_DUPLEX + 1],
               "speed/duplex changed while the link stayed up (SHOULD NOT)")
