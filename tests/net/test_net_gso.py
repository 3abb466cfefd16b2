"""Host TSO segmentation (virtio 1.2 5.1.6.2): the C twin against the reference, and bad GSO frames."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st
from scapy.all import IP, TCP, Ether, IPv6, Raw

from iovirt.virtio.net.gso import GsoError, tso_segments

_datapath = pytest.importorskip("iovirt.virtio.net._datapath_c")


def tcp_frame(ipv6: bool, payload: bytes, flags: str = "PA", options=()) -> tuple[bytes, int]:
    l3 = IPv6(src="fe80::1", dst="fe80::2") if ipv6 else IP(src="10.9.0.1", dst="10.9.0.2", id=65530)
    frame = bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / l3
                  / TCP(sport=4000, dport=80, seq=0xFFFFFF00, flags=flags, options=list(options)) / Raw(payload))
    return frame, 54 if ipv6 else 34


@settings(max_examples=60, deadline=None)
@given(ipv6=st.booleans(), size=st.integers(0, 4000), mss=st.integers(4, 1460), flags=st.sampled_from(["PA", "FPA", "CA", "A"]))
def test_c_segmentation_equals_the_reference(ipv6, size, mss, flags):
    frame, l4 = tcp_frame(ipv6, bytes(range(256)) * (size // 256) + bytes(size % 256), flags)
    reference = tso_segments(frame, l4, mss, ipv6)
    assert _datapath.tso_segments(frame, l4, mss, ipv6) == reference
    # Every segment is a well-formed frame scapy agrees with, sequence numbers wrap at 2^32.
    seq = 0xFFFFFF00
    for k, seg in enumerate(reference):
        pkt = Ether(seg)
        tcp = pkt[TCP]
        assert tcp.seq == seq & 0xFFFFFFFF
        seq += len(tcp.payload)
        checked = Ether(seg)
        del checked[TCP].chksum
        if not ipv6:
            del checked[IP].chksum
            assert pkt[IP].id == (65530 + k) & 0xFFFF
        assert bytes(Ether(bytes(checked))) == seg
        assert len(tcp.payload) <= mss
        last = k == len(reference) - 1
        assert bool(tcp.flags.F) == ("F" in flags and last) and bool(tcp.flags.P) == ("P" in flags and last)
        assert bool(tcp.flags.C) == ("C" in flags and k == 0)


@given(data=st.binary(min_size=0, max_size=200), l4=st.integers(0, 120), mss=st.integers(0, 100), ipv6=st.booleans())
@settings(max_examples=300, deadline=None)
def test_garbage_is_refused_by_both(data, l4, mss, ipv6):
    try:
        reference = tso_segments(data, l4, mss, ipv6)
    except GsoError:
        reference = None
    try:
        ours = _datapath.tso_segments(data, l4, mss, ipv6)
    except ValueError:
        ours = None
    assert ours == reference


def test_tcp_options_are_copied_to_every_segment():
    frame, l4 = tcp_frame(False, bytes(3000), options=[("MSS", 1460), ("NOP", None), ("WScale", 7)])
    segments = tso_segments(frame, l4, 1000, False)
    assert len(segments) == 3
    assert all(Ether(s)[TCP].options == Ether(frame)[TCP].options for s in segments)


@pytest.mark.parametrize("csum_start", [14, 33, 40])
def test_csum_start_not_at_the_tcp_header_is_refused(csum_start):
    frame, _ = tcp_frame(False, bytes(100))
    with pytest.raises(GsoError):
        tso_segments(frame, csum_start, 50, False)
    with pytest.raises(ValueError):
        _datapath.tso_segments(frame, csum_start, 50, False)


def test_wrong_ip_version_for_the_gso_type_is_refused():
    frame, l4 = tcp_frame(False, bytes(100))
    with pytest.raises(GsoError):
        tso_segments(frame, l4, 50, True)
