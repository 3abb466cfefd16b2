"""TCP segmentation of a driver's GSO frame (``VIRTIO_NET_F_HOST_TSO4/6``, virtio 1.2 5.1.6.2).

A driver that negotiated host TSO may transmit one large TCP frame with
``gso_type`` TCPV4 or TCPV6, ``gso_size`` (the MSS) and a partial checksum
(``NEEDS_CSUM``, ``csum_start`` at the TCP header).  The device cuts it into
frames of at most ``gso_size`` payload bytes, as a NIC would: headers copied,
IPv4 total length, identification and header checksum, or IPv6 payload
length, rewritten per segment; the TCP sequence number advanced; FIN and PSH
kept on the last segment only, CWR on the first only; every TCP checksum
computed in full.  This is the readable reference; ``_datapath_c.pyx`` has the
C twin the accelerated path runs.
"""

from __future__ import annotations

import struct

from iovirt.errors import IovirtError
from iovirt.virtio.net.csum import internet_checksum, l3_start, pseudo_header
from iovirt.virtio.net.defs import ETH_P_IP, ETH_P_IPV6, IPPROTO_TCP

TCP_FIN, TCP_PSH, TCP_CWR = 0x01, 0x08, 0x80
MAX_SEGMENTS = 1024


class GsoError(IovirtError):
    """A GSO frame that cannot be segmented (headers inconsistent with gso_type/csum_start)."""


def tso_segments(frame: bytes, csum_start: int, gso_size: int, ipv6: bool) -> list[bytes]:
    """Cut a TCP GSO ``frame`` whose TCP header starts at ``csum_start`` into MSS-sized frames."""
    start = l3_start(frame)
    if start is None:
        raise GsoError(f"GSO frame of {len(frame)} bytes is shorter than its Ethernet header")
    ethertype, l3 = start
    if ethertype != (ETH_P_IPV6 if ipv6 else ETH_P_IP):
        raise GsoError(f"ethertype {ethertype:#06x} does not match gso_type {'TCPV6' if ipv6 else 'TCPV4'}")
    l4 = csum_start
    if l4 + 20 > len(frame) or l3 + (40 if ipv6 else 20) > len(frame):
        raise GsoError("GSO frame ends inside its IP or TCP header")
    if ipv6:
        if l4 != l3 + 40 or frame[l3 + 6] != IPPROTO_TCP:
            raise GsoError("IPv6 GSO frame: TCP must follow the 40-byte IPv6 header")
    else:
        ihl = (frame[l3] & 0x0F) * 4
        if frame[l3] >> 4 != 4 or ihl < 20 or l4 != l3 + ihl or frame[l3 + 9] != IPPROTO_TCP:
            raise GsoError("IPv4 GSO frame: csum_start must point at a TCP header after the IP header")
    payload_at = l4 + (frame[l4 + 12] >> 4) * 4
    if payload_at < l4 + 20 or payload_at > len(frame):
        raise GsoError("bad TCP data offset in GSO frame")
    if gso_size == 0:
        raise GsoError("gso_size is 0")
    payload = frame[payload_at:]
    count = max(1, -(-len(payload) // gso_size))
    if count > MAX_SEGMENTS:
        raise GsoError(f"{count} segments of {gso_size} bytes")
    headers = frame[:payload_at]
    seq0 = struct.unpack_from("!I", frame, l4 + 4)[0]
    ip_id0 = 0 if ipv6 else struct.unpack_from("!H", frame, l3 + 4)[0]
    flags0 = frame[l4 + 13]
    out = []
    for k in range(count):
        chunk = payload[k * gso_size : (k + 1) * gso_size]
        seg = bytearray(headers + chunk)
        tcp_len = len(seg) - l4
        if ipv6:
            struct.pack_into("!H", seg, l3 + 4, len(seg) - l3 - 40)
            pseudo = pseudo_header(bytes(seg[l3 + 8 : l3 + 40]), IPPROTO_TCP, tcp_len)
        else:
            struct.pack_into("!HH", seg, l3 + 2, len(seg) - l3, (ip_id0 + k) & 0xFFFF)
            struct.pack_into("!H", seg, l3 + 10, 0)
            struct.pack_into("!H", seg, l3 + 10, ~internet_checksum(seg[l3:l4]) & 0xFFFF)
            pseudo = pseudo_header(bytes(seg[l3 + 12 : l3 + 20]), IPPROTO_TCP, tcp_len)
        struct.pack_into("!I", seg, l4 + 4, (seq0 + k * gso_size) & 0xFFFFFFFF)
        flags = flags0
        if k != count - 1:
            flags &= ~(TCP_FIN | TCP_PSH)
        if k != 0:
            flags &= ~TCP_CWR
        seg[l4 + 13] = flags
        struct.pack_into("!H", seg, l4 + 16, 0)
        total = internet_checksum(pseudo + bytes(seg[l4:]))
        struct.pack_into("!H", seg, l4 + 16, (~total & 0xFFFF) or 0xFFFF)
        out.append(bytes(seg))
    return out
