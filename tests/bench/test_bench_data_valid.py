"""Which received frames get DATA_VALID: the C and Python checksum validators against scapy's frames."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt
from scapy.layers.l2 import Dot1Q, Ether
from scapy.packet import Raw

from iovirt.bench.checks import l4_frames, udp_zero_checksum_frames
from iovirt.virtio.net import datapath
from iovirt.virtio.net.csum import l4_checksum_valid as python_valid

VALIDATORS = {"python": python_valid}
if datapath.accel is not None:
    VALIDATORS["cython"] = datapath.accel.l4_checksum_valid


@pytest.fixture(params=["python", "cython"])
def valid(request):
    if request.param not in VALIDATORS:
        pytest.skip("the _datapath_c extension is not loaded (IOVIRT_NO_EXTENSIONS=1)")
    return VALIDATORS[request.param]


def _bad(frame: bytes, pos: int = -1) -> bytes:
    """``frame`` with one bit of its L4 segment flipped (at ``pos``)."""
    broken = bytearray(frame)
    broken[pos] ^= 0x01
    return bytes(broken)


ETH = Ether(src="02:00:00:00:00:0a", dst="02:00:00:00:00:0b")
V4 = IP(src="192.0.2.1", dst="192.0.2.2")
V6 = IPv6(src="2001:db8::1", dst="2001:db8::2")

VALID = {
    **{name: bytes(pkt) for name, pkt in l4_frames().items()},
    "tcp4-options": bytes(ETH / IP(src="192.0.2.1", dst="192.0.2.2", options=b"\x01\x01\x01\x00") / TCP() / b"x"),
    "vlan-udp4": bytes(ETH / Dot1Q(vlan=7) / V4 / UDP() / b"odd"),
    "udp6-zero-sum": bytes(udp_zero_checksum_frames()["udp6-zero"]),  # computed 0, sent as 0xFFFF
    "padded-udp4": bytes(ETH / V4 / UDP() / b"a").ljust(60, b"\0"),  # Ethernet padding after the IP packet
}

NOT_VALID = {
    "udp4-no-checksum": bytes(ETH / V4 / UDP(chksum=0) / b"data"),  # RFC 768: none, nothing validated
    "udp6-checksum-0": bytes(ETH / V6 / UDP(chksum=0) / b"data"),  # RFC 8200 8.1: invalid
    "icmp": bytes(ETH / V4 / ICMP()),
    "arp-like": bytes(Ether(type=0x0806) / Raw(b"\0" * 28)),
    "fragment": bytes(ETH / IP(src="192.0.2.1", dst="192.0.2.2", flags="MF") / UDP() / b"part"),
    "ipv6-ext-header": bytes(ETH / V6 / IPv6ExtHdrDestOpt() / UDP() / b"data"),
    "truncated": bytes(ETH / V4 / TCP() / (b"x" * 40))[:-10],
    "udp-length-mismatch": bytes(ETH / V4 / UDP(len=9) / b"data"),
    "runt": b"\x01" * 13,
    "empty": b"",
}


@pytest.mark.parametrize("name", sorted(VALID))
def test_right_checksums_are_valid(valid, name):
    assert valid(VALID[name])


@pytest.mark.parametrize("name", sorted(VALID))
def test_wrong_checksums_are_not_valid(valid, name):
    last_l4_byte = 42 if name == "padded-udp4" else -1  # not the padding, which no checksum covers
    assert not valid(_bad(VALID[name], last_l4_byte))


@pytest.mark.parametrize("name", sorted(NOT_VALID))
def test_unverifiable_frames_are_not_valid(valid, name):
    assert not valid(NOT_VALID[name])


@pytest.mark.skipif(datapath.accel is None, reason="the _datapath_c extension is not loaded")
@settings(max_examples=300, deadline=None)
@given(
    base=st.sampled_from(sorted(VALID)),
    flips=st.lists(st.tuples(st.integers(0, 200), st.integers(1, 255)), max_size=3),
)
def test_c_and_python_agree(base, flips):
    frame = bytearray(VALID[base])
    for pos, mask in flips:
        if pos < len(frame):
            frame[pos] ^= mask
    assert datapath.accel.l4_checksum_valid(bytes(frame)) == python_valid(bytes(frame))
