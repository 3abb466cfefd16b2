"""What a correct device would produce, computed with scapy (never with iovirt's own device code).

* :func:`partial_checksum` builds the frame a driver that negotiated
  VIRTIO_NET_F_CSUM transmits with ``VIRTIO_NET_HDR_F_NEEDS_CSUM`` (5.1.6.2):
  the L4 checksum field holds the pseudo-header sum and ``csum_start`` /
  ``csum_offset`` say where the device must finish it, as Linux's
  CHECKSUM_PARTIAL does.
* :func:`completed` is the frame with every checksum computed by scapy: what
  must come out once the device completed a partial checksum.
* :func:`l4_checksum_ok` checks a received frame's L4 checksum.
* :func:`tso_segments` / :func:`ufo_fragments` are the segments a device
  offering HOST_TSO4/6 or HOST_UFO must make of a GSO frame (5.1.6.2).

Give frames explicit Ethernet addresses: building an ``Ether()`` without
``dst`` over IP makes scapy resolve one over ARP, which waits for seconds.
"""

from __future__ import annotations

from scapy.layers.inet import IP, TCP, UDP, fragment, in4_pseudoheader
from scapy.layers.inet6 import IPv6, in6_pseudoheader
from scapy.layers.l2 import Ether
from scapy.packet import Packet
from scapy.utils import checksum

CSUM_OFFSET = {TCP: 16, UDP: 6}
"""Offset of the checksum field in each L4 header (RFC 793, RFC 768)."""


def _l4(pkt: Packet) -> Packet:
    for layer in (TCP, UDP):
        if layer in pkt:
            return pkt[layer]
    raise ValueError(f"{pkt.summary()} has no TCP or UDP layer")


def _pseudo_header(l4: Packet, length: int) -> bytes:
    proto = 6 if isinstance(l4, TCP) else 17
    ip = l4.underlayer
    if isinstance(ip, IPv6):
        # scapy annotates the argument as IP, but it builds the pseudo header from an IPv6 (RFC 8200 8.1)
        return bytes(in6_pseudoheader(proto, ip, length))  # type: ignore[arg-type]
    if isinstance(ip, IP):
        return in4_pseudoheader(proto, ip, length)
    raise ValueError(f"{l4.summary()} is not carried in IPv4 or IPv6")


def completed(pkt: Packet) -> bytes:
    """``pkt`` as bytes with every IP/TCP/UDP checksum and length computed by scapy."""
    fresh = Ether(bytes(pkt))
    for layer in (IP, TCP, UDP):
        if layer in fresh:
            del fresh[layer].chksum
    return bytes(Ether(bytes(fresh)))


def partial_checksum(pkt: Packet) -> tuple[bytes, int, int]:
    """``(frame, csum_start, csum_offset)`` for a NEEDS_CSUM transmit of ``pkt`` (5.1.6.2).

    The L4 checksum field holds the one's-complement sum of the pseudo
    header (not inverted); the device adds the sum from ``csum_start`` on and
    stores the complement at ``csum_start + csum_offset``.
    """
    frame = bytearray(completed(pkt))
    fresh = Ether(bytes(frame))
    l4 = _l4(fresh)
    start = len(fresh) - len(l4)
    partial = ~checksum(_pseudo_header(l4, len(l4))) & 0xFFFF
    offset = CSUM_OFFSET[type(l4)]
    frame[start + offset : start + offset + 2] = partial.to_bytes(2, "big")
    return bytes(frame), start, offset


def l4_checksum_ok(pkt: Packet) -> bool:
    """Whether the TCP/UDP checksum of ``pkt`` (an Ethernet frame) is right.

    A UDP-over-IPv4 checksum of 0 means "none" (RFC 768) and is accepted.
    """
    frame = Ether(bytes(pkt))
    l4 = _l4(frame)
    if isinstance(l4, UDP) and l4.chksum == 0 and not isinstance(l4.underlayer, IPv6):
        return True
    return checksum(_pseudo_header(l4, len(l4)) + bytes(l4)) == 0


def tso_segments(pkt: Packet, mss: int) -> list[Packet]:
    """The TCP segments of at most ``mss`` payload bytes a HOST_TSO device makes of ``pkt``.

    Sequence numbers advance by the payload sent; FIN and PSH stay on the
    last segment, CWR on the first (as Linux's tcp_gso_segment); IPv4 ids
    increase by one per segment; every length and checksum is recomputed.
    """
    frame = Ether(bytes(pkt))
    tcp = frame[TCP]
    payload = bytes(tcp.payload)
    segments: list[Packet] = []
    for k, off in enumerate(range(0, len(payload), mss)):
        seg = frame.copy()
        seg[TCP].remove_payload()
        seg[TCP].seq = (tcp.seq + off) & 0xFFFFFFFF
        last = off + mss >= len(payload)
        flags = int(tcp.flags)
        if not last:
            flags &= ~0x09  # FIN, PSH
        if k:
            flags &= ~0x80  # CWR
        seg[TCP].flags = flags
        del seg[TCP].chksum
        if IP in seg:
            seg[IP].id = (frame[IP].id + k) & 0xFFFF
            del seg[IP].len, seg[IP].chksum
        else:
            del seg[IPv6].plen
        segments.append(Ether(bytes(seg / payload[off : off + mss])))
    return segments


def ufo_fragments(pkt: Packet, gso_size: int) -> list[Packet]:
    """The IPv4 fragments a HOST_UFO device makes of a UDP datagram (``gso_size`` bytes of IP payload each)."""
    frame = Ether(completed(pkt))
    return [Ether(bytes(f)) for f in fragment(frame, fragsize=gso_size)]
