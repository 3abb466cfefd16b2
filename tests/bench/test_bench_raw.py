"""The raw path of bench ports: bytes in and out, lazy dissection, both twins alike, latency."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from iovirt import _accel
from iovirt.bench import _rawpath_py, rawpath
from iovirt.bench.errors import BenchError, UsedRingError
from iovirt.bench.latency import LatencyHistogram, LatencyMeter
from iovirt.bench.layers import VirtioNetHdr
from iovirt.bench.pair import NetPair
from iovirt.bench.port import RX_QUEUE
from iovirt.bench.traffic import make_frame, measure

from twins import outcome

FUNCTIONS = ("RawFrame", "Window", "monotonic_ns", "publish", "tx_post", "tx_reap", "rx_post", "rx_harvest")


def _twin(name: str):
    if name == "python":
        return _rawpath_py
    if rawpath.accel is None:
        if _accel.NO_EXTENSIONS:
            pytest.skip("IOVIRT_NO_EXTENSIONS set: pure Python run")
        pytest.fail("the Cython bench raw path did not load (build it: python3 setup.py build_ext --inplace)")
    return rawpath.accel


@pytest.fixture(params=["python", "cython"])
def raw_impl(request, monkeypatch):
    """Bench ports built in this test run the given twin of the raw path."""
    module = _twin(request.param)
    for name in FUNCTIONS:
        monkeypatch.setattr(rawpath, name, getattr(module, name))
    return request.param


def test_cython_raw_path_is_default():
    if _accel.NO_EXTENSIONS:
        assert rawpath.IMPLEMENTATION == "python"
        return
    assert rawpath.IMPLEMENTATION == "cython", "compiled extension expected but the pure-Python raw path was loaded"
    assert ("bench raw path", "cython") in [(part.name, choice.implementation) for part, choice in _accel.report()]


def udp(n: int, size: int = 0) -> bytes:
    pkt = Ether(src="02:00:00:00:00:0a", dst="02:00:00:00:00:0b") / IP(id=n) / UDP(sport=n, dport=9) / Raw(b"%05d" % n)
    return bytes(pkt) + bytes(max(0, size - len(pkt)))


def test_raw_round_trip_and_lazy_dissection(raw_impl):
    with NetPair.in_process() as pair:
        frames = [udp(n) for n in range(5)]
        before = rawpath.monotonic_ns()
        assert pair.a.send_raw(frames) == 5
        got = pair.b.recv_raw(5)
        assert [f.data for f in got] == frames and [bytes(f) for f in got] == frames
        assert all(len(f.hdr) == 12 and f.hdr[10:] == b"\x01\x00" and f.buffer_lens == (12 + len(f),) for f in got)
        assert all(before <= f.t_ns <= rawpath.monotonic_ns() for f in got)
        pkt = got[3].packet
        assert isinstance(pkt, VirtioNetHdr) and pkt.num_buffers == 1 and pkt[IP].id == 3
        assert got[3].packet is pkt  # dissected once
        assert pair.b.received == []  # the raw path keeps nothing


def test_raw_frames_wrap_the_16_bit_ring_indexes(raw_impl):
    with NetPair.in_process(a={"queue_size": 64}, b={"queue_size": 64}) as pair:
        frames = [udp(n) for n in range(64)]
        total = 0
        for _ in range(70_000 // 64 + 1):
            pair.a.send_raw(frames)
            got = pair.b.recv_raw(64)
            assert got[0].data == frames[0] and got[-1].data == frames[-1]
            total += len(got)
        assert total > 0x10000 and pair.b.rxq.last_used_idx == total & 0xFFFF
        assert pair.a.tx_in_flight == 0


def test_scapy_and_raw_mix_on_one_port(raw_impl, make_pair):
    pair = make_pair()
    pair.send(Ether(src="02:00:00:00:00:0a", dst="02:00:00:00:00:0b") / IP(id=1))
    pair.a.send_raw([udp(2), udp(3)])
    first = pair.recv(1)[0]
    rest = pair.b.recv_raw(2)
    assert first[IP].id == 1 and [f.packet[IP].id for f in rest] == [2, 3]
    assert len(pair.b.received) == 1


def test_mergeable_frames_span_small_buffers(raw_impl, make_pair):
    pair = make_pair(b={"rx_buffer_size": 256})
    frames = [udp(n, 1500) for n in range(3)] + [udp(9)]
    pair.a.send_raw(frames)
    got = pair.b.recv_raw(4)
    assert [f.data for f in got] == frames
    assert [len(f.buffer_lens) for f in got] == [6, 6, 6, 1] and sum(got[0].buffer_lens) == 12 + 1500


def test_split_header_and_given_header(raw_impl):
    with NetPair.in_process(a={"split_header": True}) as pair:
        hdr = bytes(VirtioNetHdr(flags=2))  # DATA_VALID: the device passes it on or not, the frame is intact
        meter = LatencyMeter()
        pair.a.send_raw([udp(1), udp(2)], hdr, latency=meter)
        assert [f.data for f in pair.b.recv_raw(2, latency=meter)] == [udp(1), udp(2)]
        assert len(meter.histogram) == 2 and meter.outstanding == meter.unmatched == 0


def test_bad_raw_sends(raw_impl):
    with NetPair.in_process(a={"tx_buffer_size": 512}) as pair:
        with pytest.raises(BenchError, match="10-byte header was given, the negotiated one has 12"):
            pair.a.send_raw([udp(1)], bytes(10))
        with pytest.raises(BenchError, match="1000-byte frame with header exceeds the 512-byte TX buffer"):
            pair.a.send_raw([udp(1), bytes(1000)])
        pair.a.send_raw([udp(4)])  # the port still works
        assert pair.b.recv_raw(1)[0].data == udp(4)


def _forge_used(port, entries, advance=None):
    queue = port.rxq
    for k, (head, length) in enumerate(entries):
        slot = queue.used_addr + 4 + 8 * ((queue.last_used_idx + k) % queue.size)
        port.memory.write_u32(slot, head)
        port.memory.write_u32(slot + 4, length)
    port.memory.write_u16(queue.used_addr + 2, (queue.last_used_idx + (advance or len(entries))) & 0xFFFF)


BROKEN = {
    "idx-jump": lambda heads: ([(heads[0], 64)], 300),
    "unknown-id": lambda heads: ([(999, 64)], None),
    "same-id-twice": lambda heads: ([(heads[0], 64), (heads[0], 64)], None),
    "len-too-big": lambda heads: ([(heads[0], 5000)], None),
    "too-short": lambda heads: ([(heads[0], 7)], None),
    "num-buffers-0": lambda heads: ([(heads[0], 76)], None),
}


def _broken(module, case):
    for name in FUNCTIONS:
        setattr(rawpath, name, getattr(module, name))
    with NetPair.in_process() as pair:
        port = pair.b
        heads = sorted(port._rx_by_head)
        port.memory.write(port._rx_by_head[heads[0]], bytes(76))  # a header with num_buffers 0
        entries, advance = BROKEN[case](heads)
        _forge_used(port, entries, advance)
        return outcome(port.recv_raw, 1, 0.1)


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_rx_used_rings_fail_alike(case, monkeypatch):
    for name in FUNCTIONS:
        monkeypatch.setattr(rawpath, name, getattr(rawpath, name))  # restored after the test
    py = _broken(_rawpath_py, case)
    assert py[0] == "raised" and py[1][0] is UsedRingError and py[1][2]["queue"] == RX_QUEUE
    assert py == _broken(_twin("cython"), case)


def test_latency_histogram_percentiles_and_buckets():
    hist = LatencyHistogram()
    hist.extend(range(1000, 1_001_000, 1000))  # 1 us .. 1000 us
    assert hist.percentile(50) == 500_000 and hist.percentile(99) == 990_000 and hist.percentile(99.9) == 999_000
    summary = hist.summary_us()
    assert summary == {"min": 1.0, "p50": 500.0, "p99": 990.0, "p999": 999.0, "max": 1000.0}
    buckets = hist.buckets()
    assert sum(count for _lo, _hi, count in buckets) == 1000
    assert all(lo * 2 == hi for lo, hi, _count in buckets) and buckets[0][0] <= 1000 < buckets[0][1]
    assert "p50 500.0 us, p99 990.0 us, p999 999.0 us" in hist.format()
    with pytest.raises(ValueError):
        hist.percentile(0)
    with pytest.raises(ValueError, match="no latency samples"):
        LatencyHistogram().percentile(50)


def test_latency_meter_matches_by_bytes():
    meter = LatencyMeter()
    meter.sent([b"a", b"a", b"b"], 100)
    meter.sent([b"a"], 150)
    received = [rawpath.RawFrame(b"", data, t, (1,)) for data, t in ((b"a", 200), (b"a", 210), (b"c", 220), (b"a", 300))]
    meter.received(received)
    assert sorted(meter.histogram._ordered()) == [100, 110, 150] and meter.unmatched == 1 and meter.outstanding == 1


@pytest.mark.parametrize("size", [64, 1500])
def test_measure_with_latency(make_pair, size):
    pair = make_pair()
    result = measure(pair.a, pair.b, size=size, seconds=0.2, batch=32, latency=True)
    assert result.frames >= 32 and result.frames % 32 == 0 and result.frames_per_s > 0
    assert result.latency is not None and len(result.latency) == result.frames and result.unmatched == 0
    assert result.latency.percentile(50) > 0


def test_make_frame():
    assert len(make_frame(64)) == 64 and Ether(make_frame(64)).type == 0x88B5
    with pytest.raises(ValueError):
        make_frame(10)


def test_pair_raw_delegates(make_pair):
    pair = make_pair()
    meter = LatencyMeter()
    assert pair.send_raw([udp(1), udp(2)], latency=meter) == 2
    assert [f.data for f in pair.recv_raw(2, latency=meter)] == [udp(1), udp(2)]
    assert len(meter.histogram) == 2 and meter.outstanding == 0
