"""Completing a partial checksum (``VIRTIO_NET_HDR_F_NEEDS_CSUM``, virtio 1.2 5.1.6.2).

A driver that negotiated ``VIRTIO_NET_F_CSUM`` may send a frame whose L4
checksum field holds only the pseudo-header sum: the device must add the
one's-complement sum of everything from ``csum_start`` and store it at
``csum_start + csum_offset`` before the frame reaches a port that cannot take
partial checksums.
"""

from __future__ import annotations

import struct

from iovirt.errors import IovirtError
from iovirt.virtio.net.defs import (
    ETH_HLEN,
    ETH_P_8021Q,
    ETH_P_IP,
    ETH_P_IPV6,
    IPPROTO_TCP,
    IPPROTO_UDP,
)


class ChecksumOffsetError(IovirtError):
    """``csum_start``/``csum_offset`` point outside the frame."""


def internet_checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """RFC 1071 one's-complement sum of ``data`` (big-endian 16-bit words), not inverted.

    The end-around-carry sum of 16-bit words is the value of the whole byte
    string modulo 0xFFFF (as 2^16 = 1 mod 0xFFFF), with 0xFFFF standing for a
    non-zero multiple; one big-integer modulo does it in linear time.
    """
    raw = bytes(data)
    if len(raw) & 1:
        raw += b"\0"
    value = int.from_bytes(raw, "big") + initial
    total = value % 0xFFFF
    return 0xFFFF if total == 0 and value else total


def complete_checksum(frame: bytearray, csum_start: int, csum_offset: int) -> None:
    """Fill in the checksum at ``csum_start + csum_offset`` over ``frame[csum_start:]``."""
    field = csum_start + csum_offset
    if csum_start >= len(frame) or field + 2 > len(frame):
        raise ChecksumOffsetError(
            f"csum_start {csum_start} + csum_offset {csum_offset} outside a {len(frame)}-byte frame"
        )
    total = internet_checksum(memoryview(frame)[csum_start:])
    # A result of 0 is sent as 0xFFFF (Linux skb_checksum_help's CSUM_MANGLED_0):
    # for UDP a 0 means "no checksum" (RFC 768) and is invalid over IPv6.
    value = (~total) & 0xFFFF or 0xFFFF
    frame[field : field + 2] = value.to_bytes(2, "big")


def l3_start(frame: bytes | bytearray) -> tuple[int, int] | None:
    """``(ethertype, offset of the L3 header)``, past one 802.1Q tag at most; None if too short."""
    if len(frame) < ETH_HLEN:
        return None
    (ethertype,) = struct.unpack_from("!H", frame, 12)
    if ethertype != ETH_P_8021Q:
        return ethertype, ETH_HLEN
    if len(frame) < ETH_HLEN + 4:
        return None
    return struct.unpack_from("!H", frame, 16)[0], ETH_HLEN + 4


def pseudo_header(addrs: bytes, proto: int, l4_len: int) -> bytes:
    """The TCP/UDP pseudo-header's bytes for the checksum (RFC 793, 768; RFC 8200 8.1).

    ``addrs`` is source then destination.  The IPv6 form's 32-bit length and
    zero-padded next header sum the same as this 16-bit form for any L4
    length below 64 KiB.
    """
    return addrs + struct.pack("!HH", proto, l4_len)


def l4_checksum_valid(frame: bytes) -> bool:
    """Whether ``frame`` is Ethernet (one 802.1Q tag at most) / IPv4 or IPv6 / TCP or UDP with a right checksum.

    What virtio 1.2 5.1.6.4.1 asks before DATA_VALID ("the device MUST
    validate the packet checksum").  Anything not verified is not valid:
    other protocols, IPv4 fragments, IPv6 extension headers, lengths beyond
    the frame, a UDP length differing from the IP payload, and a UDP
    checksum of 0 (over IPv4 "no checksum", RFC 768: nothing to validate;
    over IPv6 invalid, RFC 8200 8.1).  The C data path has the same rules
    (``_datapath_c.l4_checksum_valid``).
    """
    n = len(frame)
    start = l3_start(frame)
    if start is None:
        return False
    etype, off = start
    if etype == ETH_P_IP:
        if n < off + 20 or frame[off] >> 4 != 4:
            return False
        ihl = (frame[off] & 0xF) * 4
        total, frag = struct.unpack_from("!H2xH", frame, off + 2)
        if ihl < 20 or total < ihl or off + total > n or frag & 0x3FFF:
            return False  # bad lengths, or a fragment: its L4 checksum spans other frames
        proto, l4, l4len = frame[off + 9], off + ihl, total - ihl
        addrs = frame[off + 12 : off + 20]
    elif etype == ETH_P_IPV6:
        if n < off + 40 or frame[off] >> 4 != 6:
            return False
        (l4len,) = struct.unpack_from("!H", frame, off + 4)
        proto, l4 = frame[off + 6], off + 40
        if l4 + l4len > n:
            return False
        addrs = frame[off + 8 : off + 40]
    else:
        return False
    if proto == IPPROTO_TCP:
        if l4len < 20:
            return False
    elif proto == IPPROTO_UDP:
        if l4len < 8 or struct.unpack_from("!H", frame, l4 + 4)[0] != l4len or frame[l4 + 6 : l4 + 8] == b"\0\0":
            return False
    else:
        return False
    # Pseudo-header (RFC 793, 768, 8200 8.1) + segment: a right checksum sums to 0xFFFF.
    return internet_checksum(pseudo_header(bytes(addrs), proto, l4len) + bytes(frame[l4 : l4 + l4len])) == 0xFFFF
