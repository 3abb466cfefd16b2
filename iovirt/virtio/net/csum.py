"""Completing a partial checksum (``VIRTIO_NET_HDR_F_NEEDS_CSUM``, virtio 1.2 5.1.6.2).

A driver that negotiated ``VIRTIO_NET_F_CSUM`` may send a frame whose L4
checksum field holds only the pseudo-header sum: the device must add the
one's-complement sum of everything from ``csum_start`` and store it at
``csum_start + csum_offset`` before the frame reaches a port that cannot take
partial checksums.
"""

from __future__ import annotations

from iovirt.errors import IovirtError


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

