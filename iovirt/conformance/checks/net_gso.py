"""virtio-net GSO types and checksum offload on the receive side, and UDP-tunnel bits on transmit
(virtio 1.4 sections 5.1.9.2.2 and 5.1.9.4.1, cited as 1.2's 5.1.6.2 and 5.1.6.4).

Frames are built here (see :mod:`iovirt.conformance.checks.net_headers`) so that a check does not
trust the device's own checksum code.
"""

from __future__ import annotations

import struct

from iovirt.conformance.checks.net_headers import (
    BROADCAST,
    IP4,
    SRC_MAC,
    TCP_CSUM_OFFSET,
    TCP_HLEN,
    TSO_MSS,
    TSO_PAYLOAD,
    _ends,
    _fold,
    _payload,
    _pseudo,
    _send,
    _sum16,
    _tso_applies,
    tcp_checksum_ok,
    tcp_frame,
)
from iovirt.conformance.devices import NetPort, Received, new_tag
from iovirt.conformance.registry import CheckFailed, check, expect
from iovirt.conformance.target import Context, needs_feature, needs_frame_path
from iovirt.virtio.net.defs import (
    ETH_HLEN,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_UFO,
    VIRTIO_NET_F_GUEST_USO4,
    VIRTIO_NET_F_GUEST_USO6,
    VIRTIO_NET_F_HOST_ECN,
    VIRTIO_NET_F_RSC_EXT,
    VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_F_RSC_INFO,
    VIRTIO_NET_HDR_F_UDP_TUNNEL_CSUM,
    VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_UDP,
    VIRTIO_NET_HDR_GSO_UDP_L4,
    VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV4,
    VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV6,
    NetHdr,
)

NET = {"net"}
TUNNEL_BITS = VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV4 | VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV6
TCP_CWR_ECE = 0xC0  # TCP flags CWR and ECE: a segment of a flow using Explicit Congestion Notification
TCP_FLAGS_AT = 13  # the flags byte within the TCP header
VXLAN_PORT = 4789  # IANA's VXLAN port (RFC 7348)
VXLAN_HDR = struct.Struct("!B3xI")  # flags (I bit), reserved, VNI << 8
UDP_HLEN = 8
FLOW_FRAMES = 4  # frames of one UDP flow: a device that coalesces would merge them


def udp_frame(payload: bytes, *, dport: int = 6000) -> bytes:
    """An Ethernet/IPv4/UDP frame with its checksums complete."""
    src, dst = IP4
    length = UDP_HLEN + len(payload)
    udp = bytearray(struct.pack("!HHHH", 6000, dport, length, 0) + payload)
    total = _sum16(src + dst + struct.pack("!BBH", 0, 17, length)) + _sum16(bytes(udp))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    struct.pack_into("!H", udp, 6, (~total & 0xFFFF) or 0xFFFF)
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + length, 1, 0, 64, 17, 0, src, dst))
    struct.pack_into("!H", ip, 10, ~_sum16(bytes(ip)) & 0xFFFF)
    return BROADCAST + SRC_MAC + b"\x08\x00" + bytes(ip) + bytes(udp)


def vxlan_frame(inner: bytes) -> bytes:
    """``inner`` (an Ethernet frame) inside IPv4/UDP/VXLAN; outer UDP checksum 0 (allowed over IPv4)."""
    src, dst = IP4
    udp_len = UDP_HLEN + VXLAN_HDR.size + len(inner)
    udp = struct.pack("!HHHH", 50000, VXLAN_PORT, udp_len, 0) + VXLAN_HDR.pack(0x08, 42 << 8) + inner
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 2, 0, 64, 17, 0, src, dst))
    struct.pack_into("!H", ip, 10, ~_sum16(bytes(ip)) & 0xFFFF)
    return BROADCAST + SRC_MAC + b"\x08\x00" + bytes(ip) + udp


def _with_tcp_flags(frame: bytes, flags: int) -> bytes:
    """A :func:`tcp_frame` (IPv4, checksum ``"partial"``: the flags are outside the pseudo-header sum) with more TCP flags."""
    out = bytearray(frame)
    out[ETH_HLEN + 20 + TCP_FLAGS_AT] |= flags
    return bytes(out)


def _complete_tcp_csum(frame: bytes) -> bytes:
    """An IPv4 :func:`tcp_frame` with its TCP checksum computed over the whole segment (the driver did not offload it)."""
    out = bytearray(frame)
    l4 = ETH_HLEN + 20
    struct.pack_into("!H", out, l4 + TCP_CSUM_OFFSET, 0)
    tcp = bytes(out[l4:])
    struct.pack_into("!H", out, l4 + TCP_CSUM_OFFSET, ~_fold(_sum16(_pseudo(4, len(tcp))) + _sum16(tcp)) & 0xFFFF)
    return bytes(out)


# -- transmit: UDP-tunnel bits the device must not accept (1.4 5.1.9.2.2) ----------------------------------
@check(
    "virtio-1.2:5.1.6.2#tunnel",
    "net: frames whose gso_type has both UDP-tunnel bits, or a tunnel bit with no NEEDS_CSUM, with DATA_VALID "
    "or on GSO_NONE, are not transmitted; the ring goes on",
    devices=NET,
    applies=needs_frame_path,
)
def tx_tunnel_bits(ctx: Context) -> None:
    dut = ctx.net_port(ctx.open())
    _injector, sink = ctx.net_ends(dut)
    tag = new_tag()
    l4 = ETH_HLEN + 20
    tso = tcp_frame(_payload(tag, TSO_PAYLOAD), csum="partial")
    small = tcp_frame(_payload(tag, 300), csum="partial")
    csum = VIRTIO_NET_HDR_F_NEEDS_CSUM
    bad = [
        ("both tunnel bits", NetHdr(csum, VIRTIO_NET_HDR_GSO_TCPV4 | TUNNEL_BITS, l4 + TCP_HLEN, TSO_MSS, l4, TCP_CSUM_OFFSET), tso),
        ("a tunnel bit without NEEDS_CSUM",
         NetHdr(0, VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV4, l4 + TCP_HLEN, TSO_MSS, l4, TCP_CSUM_OFFSET), tso),
        ("a tunnel bit with DATA_VALID",
         NetHdr(csum | VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV4,
                l4 + TCP_HLEN, TSO_MSS, l4, TCP_CSUM_OFFSET), tso),
        ("a tunnel bit on GSO_NONE", NetHdr(csum, VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV6, 0, 0, l4, TCP_CSUM_OFFSET), small),
    ]
    for _what, hdr, frame in bad:
        _send(dut, hdr, frame)
    after = b"valid-after:" + tag
    _send(dut, NetHdr(), tcp_frame(after + _payload(tag, 200)))
    dut.tx_done(len(bad) + 1)
    # One path, in order: the first frame with the tag is the valid one unless a bad one got through.
    got = sink.receive(tag, ctx.timeout)
    if got is None:
        raise CheckFailed("the valid frame sent after the rejected ones was not transmitted")
    if after not in got.frame:
        kinds = ", ".join(what for what, _h, _f in bad)
        raise CheckFailed(f"a frame the device MUST NOT accept was transmitted (one of: {kinds})")


# -- receive: no GSO type, ECN or tunnel bit the driver did not negotiate (1.4 5.1.9.4.1) ----------------
NOT_NEGOTIATED = (VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_GUEST_USO4, VIRTIO_NET_F_GUEST_USO6)
"""Left out of the driver's features here.  GUEST_UDP_TUNNEL_GSO(_CSUM) are bits 65 and 66: a 64-bit
vhost-user feature word never negotiates them."""


def _header_ok(got: Received, what: str) -> None:
    gso = got.hdr.gso_type
    expect(gso & ~VIRTIO_NET_HDR_GSO_ECN & ~TUNNEL_BITS not in (VIRTIO_NET_HDR_GSO_UDP, VIRTIO_NET_HDR_GSO_UDP_L4),
           f"{what}: gso_type {gso:#x} is a UDP GSO type though GUEST_UFO/USO4/USO6 were not negotiated")
    expect(not gso & TUNNEL_BITS, f"{what}: gso_type {gso:#x} has a UDP-tunnel bit (GUEST_UDP_TUNNEL_GSO not negotiated)")
    expect(not gso & VIRTIO_NET_HDR_GSO_ECN, f"{what}: gso_type {gso:#x} has the ECN bit (GUEST_ECN not negotiated)")
    expect(not got.hdr.flags & VIRTIO_NET_HDR_F_UDP_TUNNEL_CSUM,
           f"{what}: flags {got.hdr.flags:#x} has UDP_TUNNEL_CSUM (GUEST_UDP_TUNNEL_GSO_CSUM not negotiated)")


def _receive_all(port: NetPort, tag: bytes, count: int, ctx: Context, what: str) -> list[Received]:
    out = []
    for i in range(count):
        got = port.receive(tag, ctx.timeout)
        if got is None:
            raise CheckFailed(f"{what}: frame {i + 1} of {count} was not received")
        out.append(got)
    return out


@check(
    "virtio-1.2:5.1.6.4#gso-types",
    "net: without GUEST_UFO/USO/ECN/UDP-tunnel features, received UDP, VXLAN and ECN TCP frames carry no UDP "
    "gso_type, no tunnel or ECN bit and no UDP_TUNNEL_CSUM; ECN and tunnelled TCP arrive as GSO_NONE",
    devices=NET,
    applies=needs_frame_path,
)
def rx_gso_types(ctx: Context) -> None:
    dut, injector = _ends(ctx, ~sum(1 << b for b in NOT_NEGOTIATED))
    tag = new_tag()
    for _ in range(FLOW_FRAMES):
        _send(injector, NetHdr(), udp_frame(_payload(tag, 1400)))
    for got in _receive_all(dut, tag, FLOW_FRAMES, ctx, "a UDP flow"):
        _header_ok(got, "a UDP frame")
    tag = new_tag()
    inner = tcp_frame(_payload(tag, 600))
    for _ in range(FLOW_FRAMES):
        _send(injector, NetHdr(), vxlan_frame(inner))
    for got in _receive_all(dut, tag, FLOW_FRAMES, ctx, "a VXLAN flow"):
        _header_ok(got, "a VXLAN frame")
        expect(got.hdr.gso_type == VIRTIO_NET_HDR_GSO_NONE,
               f"a VXLAN-encapsulated TCP frame arrived with gso_type {got.hdr.gso_type:#x}: a UDP-tunnel GSO packet "
               "sent without GUEST_UDP_TUNNEL_GSO negotiated")
    # TCP with CWR/ECE: as a TSO frame with the ECN bit when the sender may send one (HOST_ECN), else plain.
    tag = new_tag()
    tso = injector.link.negotiated.has(VIRTIO_NET_F_HOST_ECN) and _tso_applies(ctx.caps) is None
    payload = _payload(tag, TSO_PAYLOAD if tso else 600)
    frame = _with_tcp_flags(tcp_frame(payload, csum="partial"), TCP_CWR_ECE)
    l4 = ETH_HLEN + 20
    if tso:
        hdr = NetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_ECN,
                     l4 + TCP_HLEN, TSO_MSS, l4, TCP_CSUM_OFFSET)
    elif injector.link.negotiated.has(VIRTIO_NET_F_CSUM):
        hdr = NetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE, 0, 0, l4, TCP_CSUM_OFFSET)
    else:  # 5.1.6.2.1: without VIRTIO_NET_F_CSUM the driver sends flags 0 and a complete checksum
        frame, hdr = _complete_tcp_csum(frame), NetHdr()
    _send(injector, hdr, frame)
    got_payload = b""
    while len(got_payload) < len(payload):
        got = _receive_all(dut, tag, 1, ctx, f"data at byte {len(got_payload)} of a TCP frame with CWR/ECE")[0]
        _header_ok(got, "a TCP frame with CWR/ECE")
        expect(got.hdr.gso_type == VIRTIO_NET_HDR_GSO_NONE,
               f"a TCP frame with CWR set arrived as GSO ({got.hdr.gso_type:#x}) without GUEST_ECN (SHOULD NOT)")
        end = ETH_HLEN + struct.unpack_from("!H", got.frame, ETH_HLEN + 2)[0]
        got_payload += got.frame[l4 + TCP_HLEN : end]
    expect(got_payload == payload, "the data of the TCP frame with CWR/ECE arrived different")


# -- receive: NEEDS_CSUM handed to a driver that negotiated GUEST_CSUM (1.4 5.1.9.4.1) ------------------
def _csum_applies(caps) -> str | None:
    return (needs_feature(VIRTIO_NET_F_GUEST_CSUM, "VIRTIO_NET_F_GUEST_CSUM")(caps)
            or needs_feature(VIRTIO_NET_F_CSUM, "VIRTIO_NET_F_CSUM")(caps) or needs_frame_path(caps))


@check(
    "virtio-1.2:5.1.6.4#needs-csum",
    "net: with GUEST_CSUM, a frame passed with NEEDS_CSUM has a valid IPv4 header checksum, the pseudo-header sum "
    "at csum_start + csum_offset, and checksumming from csum_start completes it",
    devices=NET,
    applies=_csum_applies,
)
def rx_needs_csum(ctx: Context) -> str:
    dut, injector = _ends(ctx, (1 << 64) - 1)
    expect(dut.link.negotiated.has(VIRTIO_NET_F_GUEST_CSUM), "VIRTIO_NET_F_GUEST_CSUM offered but not negotiated")
    partial = 0
    for size in (100, 301, 1200):
        tag = new_tag()
        frame = tcp_frame(_payload(tag, size), csum="partial")
        l4 = ETH_HLEN + 20
        _send(injector, NetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=l4, csum_offset=TCP_CSUM_OFFSET), frame)
        got = _receive_all(dut, tag, 1, ctx, f"a {len(frame)}-byte frame sent with NEEDS_CSUM")[0]
        data = got.frame[: len(frame)]
        if not got.hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
            expect(tcp_checksum_ok(data), "a frame passed without NEEDS_CSUM has an incomplete TCP checksum")
            continue
        partial += 1
        h = got.hdr
        expect(_sum16(data[ETH_HLEN:l4]) == 0xFFFF, "NEEDS_CSUM frame: the IPv4 header checksum before csum_start is wrong")
        expect(ETH_HLEN < h.csum_start and h.csum_start + h.csum_offset + 2 <= len(data),
               f"csum_start {h.csum_start} + csum_offset {h.csum_offset} lies outside the {len(data)}-byte frame")
        at = h.csum_start + h.csum_offset
        expect(data[at : at + 2] == frame[at : at + 2],
               f"the checksum field at {at} does not hold the TCP pseudo-header sum")
        body = bytearray(data)  # what the driver does: sum from csum_start (pseudo-header sum in place), store
        value = ~_sum16(bytes(body[h.csum_start :])) & 0xFFFF
        body[at : at + 2] = struct.pack("!H", value)
        expect(tcp_checksum_ok(bytes(body)),
               "checksumming from csum_start to the end and storing at csum_offset does not complete the packet")
    return "" if partial else "the device completed every checksum (NEEDS_CSUM never passed): only completeness checked"


# -- receive: GSO frames handed to a driver that negotiated GUEST_TSO4 (1.4 5.1.9.4.1) --------------------
def _guest_gso_applies(caps) -> str | None:
    if not caps.has(VIRTIO_NET_F_GUEST_TSO4):
        return "VIRTIO_NET_F_GUEST_TSO4 not offered"
    return _tso_applies(caps)


def _completed(data: bytes, hdr: NetHdr) -> bytes:
    """``data`` with its checksum completed the way a driver does for NEEDS_CSUM (sum from csum_start, store)."""
    body = bytearray(data)
    at = hdr.csum_start + hdr.csum_offset
    expect(hdr.csum_start < at + 2 <= len(body), f"csum_start {hdr.csum_start} + csum_offset {hdr.csum_offset} outside the frame")
    body[at : at + 2] = struct.pack("!H", ~_sum16(bytes(body[hdr.csum_start :])) & 0xFFFF)
    return bytes(body)


@check(
    "virtio-1.2:5.1.6.4#guest-gso",
    "net: with GUEST_TSO4, a received GSO frame has NEEDS_CSUM, a gso_size, hdr_len covering its headers (SHOULD), "
    "the ECN bit for a CWR segment when GUEST_ECN is negotiated, and completes to the data sent; with RSC_EXT, "
    "RSC_INFO and a segment count in csum_start",
    devices=NET,
    applies=_guest_gso_applies,
)
def rx_guest_gso(ctx: Context) -> str:
    seen = _guest_gso_pass(ctx, rsc=False)
    if ctx.caps.has(VIRTIO_NET_F_RSC_EXT):
        ctx.close()  # one front-end per socket at a time: again with RSC_EXT
        seen += _guest_gso_pass(ctx, rsc=True)
    return "" if seen else "the device passed no GSO frame (only segments): the GSO header rules were not exercised"


def _guest_gso_pass(ctx: Context, *, rsc: bool) -> int:
    """A TSO frame and a CWR segment from the peer; returns how many GSO frames arrived (each checked)."""
    dut, injector = _ends(ctx, (1 << 64) - 1 if rsc else ~(1 << VIRTIO_NET_F_RSC_EXT))
    expect(dut.link.negotiated.has(VIRTIO_NET_F_GUEST_TSO4), "VIRTIO_NET_F_GUEST_TSO4 offered but not negotiated")
    expect(not rsc or dut.link.negotiated.has(VIRTIO_NET_F_RSC_EXT), "VIRTIO_NET_F_RSC_EXT offered but not negotiated")
    ecn = dut.link.negotiated.has(VIRTIO_NET_F_GUEST_ECN)
    l4 = ETH_HLEN + 20
    gso_seen = 0
    for cwr in (False, True):
        tag = new_tag()
        if cwr:  # one segment with CWR/ECE (the sender has no HOST_ECN: no TSO with ECN)
            payload = _payload(tag, 1000)
            frame = _with_tcp_flags(tcp_frame(payload, csum="partial"), TCP_CWR_ECE)
            hdr = NetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE, 0, 0, l4, TCP_CSUM_OFFSET)
        else:
            payload = _payload(tag, TSO_PAYLOAD)
            frame = tcp_frame(payload, csum="partial")
            hdr = NetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, l4 + TCP_HLEN, TSO_MSS, l4, TCP_CSUM_OFFSET)
        _send(injector, hdr, frame)
        got_payload = b""
        while len(got_payload) < len(payload):
            got = _receive_all(dut, tag, 1, ctx, f"data at byte {len(got_payload)} of a TCP frame")[0]
            h = got.hdr
            end = ETH_HLEN + struct.unpack_from("!H", got.frame, ETH_HLEN + 2)[0]
            data = got.frame[:end]
            if h.gso_type & ~VIRTIO_NET_HDR_GSO_ECN != VIRTIO_NET_HDR_GSO_NONE:
                gso_seen += 1
                expect(h.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM, f"a GSO frame (gso_type {h.gso_type:#x}) without NEEDS_CSUM")
                expect(h.gso_size > 0, f"a GSO frame (gso_type {h.gso_type:#x}) with gso_size 0")
                expect(h.hdr_len >= l4 + TCP_HLEN,
                       f"hdr_len {h.hdr_len} is shorter than the {l4 + TCP_HLEN} bytes of headers (SHOULD cover them)")
                if cwr and ecn:
                    expect(h.gso_type & VIRTIO_NET_HDR_GSO_ECN,
                           f"a GSO frame of a CWR segment without the ECN bit (gso_type {h.gso_type:#x}, GUEST_ECN negotiated)")
                if rsc:  # csum_start/csum_offset carry the coalescing counts instead
                    expect(h.flags & VIRTIO_NET_HDR_F_RSC_INFO, "a GSO frame without RSC_INFO though RSC_EXT was negotiated")
                    expect(h.csum_start >= 1, f"RSC_INFO with csum_start {h.csum_start}: no coalesced segment counted")
                else:
                    data = _completed(data, h)
                    expect(tcp_checksum_ok(data), "a GSO frame's checksum, completed from csum_start, is wrong")
            got_payload += data[l4 + TCP_HLEN :]
        expect(got_payload == payload, "the data of the GSO frames differs from what was sent")
    return gso_seen
