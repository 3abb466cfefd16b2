"""Bench ports: send/recv, header forms, ring wrap, capture port, pcap, fixtures; in-process and over a socket."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw
from scapy.utils import rdpcap

from iovirt.bench.errors import BenchError, BenchTimeout
from iovirt.bench.layers import VirtioNetHdr, VirtioNetHdrLegacy
from iovirt.bench.pair import DEFAULT_FEATURES
from iovirt.bench.pcap import write_pcap
from iovirt.virtio.defs import VIRTIO_F_VERSION_1
from iovirt.virtio.net.defs import VIRTIO_NET_F_MRG_RXBUF

A, B, HOST = "02:00:00:00:00:0a", "02:00:00:00:00:0b", "02:00:00:00:00:0c"
LEGACY = DEFAULT_FEATURES & ~(1 << VIRTIO_NET_F_MRG_RXBUF) & ~(1 << VIRTIO_F_VERSION_1)


def frame(n: int, src: str = A, dst: str = B) -> Ether:
    return Ether(src=src, dst=dst) / IP(src="192.0.2.1", dst="192.0.2.2", id=n) / UDP(sport=n, dport=9) / Raw(b"%05d" % n)


def test_send_recv_round_trip(make_pair):
    pair = make_pair()
    frames = [frame(n) for n in range(5)]
    assert pair.send(frames) == 5
    got = pair.recv(5)
    assert [bytes(p[Ether]) for p in got] == [bytes(f) for f in frames]
    assert all(isinstance(p, VirtioNetHdr) and p.num_buffers == 1 for p in got)
    pair.a.flush()
    assert pair.a.tx_in_flight == 0
    if make_pair.target == "in-process":  # over a socket the bench may find the ring done before it waits
        assert pair.b.target.notifications[0] >= 1 and pair.a.target.notifications[1] >= 1


def test_both_directions(make_pair):
    pair = make_pair()
    pair.b.send(frame(1, src=B, dst=A))
    (back,) = pair.a.recv(1)
    assert back[Ether].src == B


def test_more_frames_than_the_rings_hold(make_pair):
    pair = make_pair(a={"queue_size": 16}, b={"queue_size": 16})
    got = []
    for chunk in range(8):
        pair.send([frame(chunk * 10 + k) for k in range(10)])
        got += pair.recv(10)
    assert [p[IP].id for p in got] == [c * 10 + k for c in range(8) for k in range(10)]


def test_legacy_10_byte_header(make_pair):
    pair = make_pair(features=LEGACY)
    assert pair.a.hdr_size == pair.b.hdr_size == 10
    pair.send(VirtioNetHdrLegacy() / frame(3))
    (got,) = pair.recv(1)
    assert isinstance(got, VirtioNetHdrLegacy) and got[IP].id == 3


def test_wrong_header_form_is_refused(make_pair):
    pair = make_pair(features=LEGACY)
    with pytest.raises(BenchError, match="VirtioNetHdrLegacy"):
        pair.send(VirtioNetHdr() / frame(1))


def test_recv_without_count_does_not_wait_and_timeout_is_bounded(make_pair):
    pair = make_pair(b={"timeout": 0.1})
    assert pair.recv() == []
    pair.send(frame(1))
    with pytest.raises(BenchTimeout) as info:
        pair.recv(2)
    assert info.value.got == 1 and len(info.value.frames) == 1 and "1 of 2" in str(info.value)


def test_non_mergeable_buffer_too_small_is_given_back_empty(make_pair):
    pair = make_pair(b_features=DEFAULT_FEATURES & ~(1 << VIRTIO_NET_F_MRG_RXBUF), b={"rx_buffer_size": 128, "timeout": 0.2})
    pair.send([frame(1) / Raw(b"x" * 200), frame(2)])
    (got,) = pair.recv(1)
    assert got[IP].id == 2 and pair.b.stats["rx_empty_buffers"] == 1


def test_capture_port_sees_and_injects(make_pair):
    pair = make_pair(capture=True)
    pair.send(frame(7, dst="ff:ff:ff:ff:ff:ff"))
    pair.recv(1)
    (seen,) = pair.capture.wait(1, 2.0)
    assert seen.packet[IP].id == 7 and seen.csum is None
    assert pair.capture.inject(frame(8, src=HOST, dst="ff:ff:ff:ff:ff:ff")) == 2
    assert pair.a.recv(1)[0][IP].id == 8 and pair.b.recv(1)[0][IP].id == 8


def test_pcap_of_everything_emitted_reads_back(make_pair, tmp_path):
    pair = make_pair(capture=True)
    pair.send([frame(n, dst="ff:ff:ff:ff:ff:ff") for n in range(3)])
    pair.recv(3)
    pair.capture.wait(3, 2.0)
    path = tmp_path / "out.pcap"
    assert write_pcap(path, pair.emitted) == 6
    back = rdpcap(str(path))
    assert sorted(p[IP].id for p in back) == [0, 0, 1, 1, 2, 2]
    assert all(Ether in p for p in back)


def test_plugin_fixture_in_process(iovirt_net):
    iovirt_net.send(frame(1))
    assert iovirt_net.recv(1)[0][IP].id == 1
    assert iovirt_net.capture is not None


@pytest.mark.parametrize("iovirt_vhost_net", [{"b": {"rx_buffer_size": 256}}], indirect=True)
def test_plugin_fixture_vhost_user_with_options(iovirt_vhost_net):
    iovirt_vhost_net.send(frame(1) / Raw(b"y" * 1000))
    (got,) = iovirt_vhost_net.recv(1)
    assert got.num_buffers == 5 and got[IP].id == 1
