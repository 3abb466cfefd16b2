"""VirtioNetHdr layers: byte layout (virtio 1.2 5.1.6), the three forms, dissection, scapy-reference helpers."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from iovirt.bench.layers import (
    VIRTIO_NET_F_HASH_REPORT,
    VirtioNetHdr,
    VirtioNetHdrHashReport,
    VirtioNetHdrLegacy,
    hdr_class,
)
from iovirt.bench.reference import completed, l4_checksum_ok, partial_checksum, tso_segments, ufo_fragments
from iovirt.virtio.defs import VIRTIO_F_VERSION_1
from iovirt.virtio.net.defs import VIRTIO_NET_F_MRG_RXBUF, NetHdr

# Explicit addresses: an Ether() without dst makes scapy resolve one over ARP.
ETH = Ether(src="02:00:00:00:00:0a", dst="02:00:00:00:00:0b")


def test_sizes_and_classes():
    assert [len(VirtioNetHdrLegacy()), len(VirtioNetHdr()), len(VirtioNetHdrHashReport())] == [10, 12, 20]
    assert hdr_class(0) is VirtioNetHdrLegacy
    assert hdr_class(1 << VIRTIO_NET_F_MRG_RXBUF) is VirtioNetHdr
    assert hdr_class(1 << VIRTIO_F_VERSION_1) is VirtioNetHdr
    assert hdr_class(1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_HASH_REPORT) is VirtioNetHdrHashReport


def test_little_endian_layout():
    hdr = VirtioNetHdr(
        flags="NEEDS_CSUM+DATA_VALID", gso_type="TCPV6", gso_ecn=1, hdr_len=0x0102, gso_size=0x0304,
        csum_start=0x0506, csum_offset=0x0708, num_buffers=0x090A,
    )
    assert bytes(hdr) == struct.pack("<BBHHHHH", 3, 0x84, 0x0102, 0x0304, 0x0506, 0x0708, 0x090A)
    report = VirtioNetHdrHashReport(hash_value=0x11223344, hash_report="UDPv6")
    assert bytes(report)[12:] == struct.pack("<IHH", 0x11223344, 6, 0)


def test_builds_and_dissects_with_ethernet():
    pkt = VirtioNetHdr(flags="NEEDS_CSUM", csum_start=34, csum_offset=6, num_buffers=1) / ETH / IP() / UDP() / Raw(b"x")
    back = VirtioNetHdr(bytes(pkt))
    assert back.flags.NEEDS_CSUM and not back.flags.DATA_VALID
    assert back[UDP].dport == 53 and back[Raw].load == b"x"
    legacy = VirtioNetHdrLegacy(bytes(VirtioNetHdrLegacy(gso_type="UDP_L4") / ETH / IPv6() / TCP()))
    assert legacy.sprintf("%gso_type%") == "UDP_L4" and TCP in legacy


@given(st.binary(min_size=12, max_size=12))
def test_matches_iovirt_nethdr(raw):
    """Any 12 bytes dissect to the same fields iovirt's own NetHdr parses, and rebuild unchanged."""
    hdr, ref = VirtioNetHdr(raw), NetHdr.unpack(raw)
    assert (int(hdr.flags), hdr.gso_ecn << 7 | hdr.gso_type) == (ref.flags, ref.gso_type)
    assert (hdr.hdr_len, hdr.gso_size, hdr.csum_start, hdr.csum_offset, hdr.num_buffers) == (
        ref.hdr_len, ref.gso_size, ref.csum_start, ref.csum_offset, ref.num_buffers,
    )
    assert bytes(hdr) == raw


def test_partial_checksum_reference():
    for l3 in (IP(src="192.0.2.1", dst="192.0.2.2"), IPv6(src="2001:db8::1", dst="2001:db8::2")):
        for l4, offset in ((UDP(), 6), (TCP(), 16)):
            pkt = ETH / l3 / l4 / Raw(b"payload" * 9)
            frame, start, off = partial_checksum(pkt)
            assert (start, off) == (14 + len(l3.__class__()), offset)
            assert not l4_checksum_ok(Ether(frame)) and l4_checksum_ok(Ether(completed(pkt)))
            # everything outside the checksum field is the completed frame
            done = completed(pkt)
            assert frame[: start + off] == done[: start + off] and frame[start + off + 2 :] == done[start + off + 2 :]


def test_tso_reference_segments():
    pkt = ETH / IP(src="192.0.2.1", dst="192.0.2.2", id=7) / TCP(seq=100, flags="FPA") / Raw(bytes(range(250)) * 12)
    segs = tso_segments(pkt, 1000)
    assert [len(s[TCP].payload) for s in segs] == [1000, 1000, 1000]
    assert [s[TCP].seq for s in segs] == [100, 1100, 2100]
    assert [s[IP].id for s in segs] == [7, 8, 9]
    assert [str(s[TCP].flags) for s in segs] == ["A", "A", "FPA"]
    assert b"".join(bytes(s[TCP].payload) for s in segs) == bytes(pkt[TCP].payload)
    assert all(l4_checksum_ok(s) for s in segs)


def test_ufo_reference_fragments():
    pkt = ETH / IP(src="192.0.2.1", dst="192.0.2.2") / UDP() / Raw(b"u" * 3000)
    frags = ufo_fragments(pkt, 1480)
    assert [f[IP].frag for f in frags] == [0, 185, 370]
    assert b"".join(bytes(f[IP].payload) for f in frags) == bytes(Ether(completed(pkt))[IP].payload)
