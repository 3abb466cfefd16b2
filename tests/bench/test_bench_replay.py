"""pcap/pcapng reading and writing, ``iovirt bench replay|capture|run``, and their bad input (exit 2, no traceback)."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import threading
import time

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw
from scapy.utils import PcapNgReader, PcapNgWriter, wrpcap

from iovirt.bench.pair import NetPair, ServedNet
from iovirt.bench.pcapio import (
    DIRECTION_INBOUND,
    DIRECTION_OUTBOUND,
    PcapError,
    PcapNgWriter as OurPcapNgWriter,
    read_frames,
)
from iovirt.bench.traffic import Recorder, capture, replay, schedule
from iovirt.cli import main

A, B = "02:00:00:00:00:0a", "02:00:00:00:00:0b"


def pkts(n: int, gap: float = 0.0, t0: float = 1_700_000_000.0):
    out = []
    for i in range(n):
        pkt = Ether(src=A, dst=B) / IP(src="192.0.2.1", dst="192.0.2.2", id=i) / UDP(sport=i, dport=9) / Raw(b"x" * i)
        pkt.time = t0 + i * gap
        out.append(pkt)
    return out


@pytest.fixture
def pcap(tmp_path):
    path = tmp_path / "in.pcap"
    wrpcap(str(path), pkts(20))
    return path


# -- reading --------------------------------------------------------------------------------
def test_reads_pcap_in_both_resolutions_and_pcapng(tmp_path):
    frames = pkts(5, gap=0.25)
    wrpcap(str(tmp_path / "us.pcap"), frames)
    wrpcap(str(tmp_path / "ns.pcap"), frames, nano=True)
    with PcapNgWriter(str(tmp_path / "x.pcapng")) as w:
        for f in frames:
            w.write(f)
    for name in ("us.pcap", "ns.pcap", "x.pcapng"):
        records = read_frames(tmp_path / name)
        assert [r.data for r in records] == [bytes(f) for f in frames]
        assert [r.t_ns - records[0].t_ns for r in records] == [i * 250_000_000 for i in range(5)]


def test_big_endian_pcap(tmp_path):
    path = tmp_path / "be.pcap"
    frame = bytes(pkts(1)[0])
    path.write_bytes(struct.pack(">IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)
                     + struct.pack(">IIII", 7, 5, len(frame), len(frame)) + frame)
    (rec,) = read_frames(path)
    assert rec.data == frame and rec.t_ns == 7_000_005_000


def _pcap_header(snaplen=65535, linktype=1, magic=0xA1B2C3D4):
    return struct.pack("<IHHiIII", magic, 2, 4, 0, 0, snaplen, linktype)


FRAME = bytes(pkts(1)[0])
BAD_PCAPS = {
    "empty": (b"", "too short for a pcap or pcapng header"),
    "bad-magic": (b"GIF89a" + bytes(30), "bad magic 47494638"),
    "truncated-header": (_pcap_header()[:20], "truncated file header: 20 of 24 bytes"),
    "truncated-record-header": (_pcap_header() + bytes(8), "truncated record header: 8 of 16 bytes"),
    "truncated-record": (_pcap_header() + struct.pack("<IIII", 0, 0, 100, 100) + bytes(40), "truncated record: 40 of 100"),
    "snaplen-lies": (_pcap_header(snaplen=64) + struct.pack("<IIII", 0, 0, 100, 100) + bytes(100),
                     "record of 100 bytes exceeds the snapshot length 64"),
    "caplen-over-origlen": (_pcap_header() + struct.pack("<IIII", 0, 0, 100, 60) + bytes(100),
                            "exceeds its original length 60"),
    "huge-caplen": (_pcap_header(snaplen=0xFFFFFFFF) + struct.pack("<IIII", 0, 0, 0x7FFFFFFF, 0x7FFFFFFF),
                    "exceeds the snapshot length 262144"),
    "not-ethernet": (_pcap_header(linktype=101) + struct.pack("<IIII", 0, 0, 20, 20) + bytes(20),
                     "link type 101: only Ethernet"),
    "pcapng-truncated-block": (struct.pack("<IIIHHq", 0x0A0D0D0A, 28, 0x1A2B3C4D, 1, 0, -1), "truncated block: 24 of 28 bytes"),
    "pcapng-bad-length": (struct.pack("<IIIHHq", 0x0A0D0D0A, 27, 0x1A2B3C4D, 1, 0, -1), "block length 27"),
    "pcapng-unknown-interface": (
        struct.pack("<IIIHHqI", 0x0A0D0D0A, 28, 0x1A2B3C4D, 1, 0, -1, 28)
        + struct.pack("<IIIIIIII", 6, 32 + 4, 3, 0, 0, 0, 0, 36)[:32] + struct.pack("<I", 36),
        "interface id 3, but only 0 interfaces were described",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_PCAPS))
def test_malformed_capture_files(tmp_path, case):
    data, message = BAD_PCAPS[case]
    path = tmp_path / f"{case}.pcap"
    path.write_bytes(data)
    with pytest.raises(PcapError, match=message) as info:
        read_frames(path)
    assert info.value.path == str(path) and str(path) in str(info.value)


@pytest.mark.parametrize("case", sorted(BAD_PCAPS))
def test_replay_of_a_malformed_file_exits_2(tmp_path, capsys, case):
    path = tmp_path / f"{case}.pcap"
    path.write_bytes(BAD_PCAPS[case][0])
    assert main(["bench", "replay", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("iovirt bench replay: ") and BAD_PCAPS[case][1].split(":")[0] in err


def test_replay_of_an_unreadable_file_exits_2(tmp_path, capsys):
    assert main(["bench", "replay", str(tmp_path / "missing.pcap")]) == 2
    err = capsys.readouterr().err
    assert "cannot read" in err and "No such file" in err
    assert main(["bench", "replay", str(tmp_path)]) == 2  # a directory
    assert "cannot read" in capsys.readouterr().err


def test_replay_of_an_empty_capture_exits_2(tmp_path, capsys):
    path = tmp_path / "empty.pcap"
    path.write_bytes(_pcap_header())
    assert main(["bench", "replay", str(path)]) == 2
    assert "no frames to replay" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rate", "0"], "--rate must be greater than 0, got 0"),
        (["--rate", "-5"], "--rate must be greater than 0, got -5"),
        (["--rate", "fast"], "--rate must be a number"),
        (["--speedup", "0"], "--speedup must be greater than 0"),
        (["--speedup", "-1"], "--speedup must be greater than 0"),
        (["--rate", "10", "--speedup", "2"], "not allowed with argument"),
        (["--rate", "10", "--timing"], "not allowed with argument"),
        (["--speedup", "2", "--timing"], "not allowed with argument"),
        (["--wait", "-1"], "--wait must be greater than 0"),
    ],
)
def test_bad_replay_options_exit_2(pcap, capsys, args, message):
    with pytest.raises(SystemExit) as info:
        main(["bench", "replay", str(pcap), *args])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_input_never_prints_a_traceback(tmp_path):
    path = tmp_path / "bad.pcap"
    path.write_bytes(_pcap_header(snaplen=64) + struct.pack("<IIII", 0, 0, 100, 100) + bytes(100))
    for args in ([str(path)], [str(tmp_path / "missing.pcap")], [str(path), "--rate", "-1"]):
        proc = subprocess.run([sys.executable, "-m", "iovirt", "bench", "replay", *args],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.strip(), proc.stderr


def test_capture_needs_a_stop_condition(capsys, tmp_path):
    assert main(["bench", "capture", "--socket", str(tmp_path / "s"), "-w", str(tmp_path / "o.pcapng")]) == 2
    assert "give --seconds or --count" in capsys.readouterr().err


def test_unwritable_output_exits_2(pcap, tmp_path, capsys):
    assert main(["bench", "replay", str(pcap), "-w", str(tmp_path / "no" / "such" / "dir.pcapng")]) == 2
    assert "cannot write" in capsys.readouterr().err


def test_unreachable_socket_exits_1(pcap, tmp_path, capsys):
    assert main(["bench", "replay", str(pcap), "--socket", str(tmp_path / "nobody.sock"), "--timeout", "0.5"]) == 1
    assert "bring-up failed" in capsys.readouterr().err


# -- writing pcapng --------------------------------------------------------------------------
def test_pcapng_carries_port_and_direction(tmp_path):
    path = tmp_path / "o.pcapng"
    frames = [bytes(p) for p in pkts(3)]
    with OurPcapNgWriter(path) as w:
        a, b = w.add_interface("port a"), w.add_interface("port b")
        w.write(a, 1_700_000_000_123_456_789, frames[0], DIRECTION_OUTBOUND)
        w.write(b, 1_700_000_000_223_456_789, frames[1], DIRECTION_INBOUND)
        w.write(b, 1_700_000_000_323_456_789, frames[2][:7], DIRECTION_INBOUND)  # odd length: padded
    got = list(PcapNgReader(str(path)))
    assert [bytes(p) for p in got] == [frames[0], frames[1], frames[2][:7]]
    assert [p.sniffed_on for p in got] == ["port a", "port b", "port b"]
    assert [p.direction for p in got] == [DIRECTION_OUTBOUND, DIRECTION_INBOUND, DIRECTION_INBOUND]
    assert got[0].time == pytest.approx(1_700_000_000.123456789, abs=1e-6)
    assert [r.data for r in read_frames(path)] == [frames[0], frames[1], frames[2][:7]]


@pytest.mark.skipif(not shutil.which("tshark"), reason="tshark not installed")
def test_tshark_reads_port_and_direction(tmp_path):
    path = tmp_path / "o.pcapng"
    with OurPcapNgWriter(path) as w:
        a, b = w.add_interface("port a"), w.add_interface("port b")
        w.write(a, time.time_ns(), bytes(pkts(1)[0]), DIRECTION_OUTBOUND)
        w.write(b, time.time_ns(), bytes(pkts(2)[1]), DIRECTION_INBOUND)
    proc = subprocess.run(["tshark", "-r", str(path), "-T", "fields", "-e", "frame.interface_name",
                           "-e", "frame.p2p_dir", "-e", "udp.srcport"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    # frame.p2p_dir: 0 sent, 1 received (wireshark's P2P_DIR_SENT / P2P_DIR_RECV, from epb_flags)
    assert [line.split("\t") for line in proc.stdout.splitlines()] == [["port a", "0", "0"], ["port b", "1", "1"]]


@pytest.mark.skipif(not shutil.which("tcpdump"), reason="tcpdump not installed")
def test_tcpdump_reads_our_files(tmp_path, pcap):
    out = tmp_path / "o.pcapng"
    assert main(["bench", "replay", str(pcap), "-w", str(out)]) == 0
    proc = subprocess.run(["tcpdump", "-r", str(out), "-n"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 40, proc.stderr


# -- replay -------------------------------------------------------------------------------------
def test_replay_in_process_records_both_directions(pcap, tmp_path, capsys):
    out = tmp_path / "o.pcapng"
    assert main(["bench", "replay", str(pcap), "-w", str(out)]) == 0
    text = capsys.readouterr().out
    assert "sent 20 frames into port a" in text and "received 20 frames on port b" in text
    assert "p50" in text and "unmatched 0, not received 0" in text
    got = list(PcapNgReader(str(out)))
    sent = [p for p in got if p.direction == DIRECTION_OUTBOUND]
    came = [p for p in got if p.direction == DIRECTION_INBOUND]
    assert [bytes(p) for p in sent] == [bytes(p) for p in came] == [bytes(p) for p in pkts(20)]
    assert {p.sniffed_on for p in sent} == {"port a"} and {p.sniffed_on for p in came} == {"port b"}


def test_replay_to_classic_pcap_records_what_came_out(pcap, tmp_path):
    out = tmp_path / "o.pcap"
    assert main(["bench", "replay", str(pcap), "-w", str(out), "--rate", "5000"]) == 0
    assert [r.data for r in read_frames(out)] == [bytes(p) for p in pkts(20)]


def test_schedule():
    records = read_frames_from(pkts(4, gap=0.5))
    assert schedule(records, rate=4) == [0, 250_000_000, 500_000_000, 750_000_000]
    assert schedule(records, speedup=2) == [0, 250_000_000, 500_000_000, 750_000_000]
    assert schedule(records, speedup=1) == [0, 500_000_000, 1_000_000_000, 1_500_000_000]
    assert schedule(records) == [0, 0, 0, 0]


def read_frames_from(frames):
    from iovirt.bench.pcapio import Record

    return [Record(int(f.time * 1e9), bytes(f)) for f in frames]


def test_paced_replays_take_their_time(tmp_path):
    path = tmp_path / "slow.pcap"
    wrpcap(str(path), pkts(4, gap=0.05))  # 150 ms from first to last
    records = read_frames(path)
    with NetPair.in_process() as pair:
        start = time.monotonic()
        result = replay(records, [pair.a, pair.b], speedup=1.0, wait=0.05)
        assert time.monotonic() - start >= 0.14 and result.received == [0, 4]
        start = time.monotonic()
        result = replay(records * 5, [pair.a, pair.b], rate=100, wait=0.05)  # 20 frames at 100/s: >= 190 ms
        assert time.monotonic() - start >= 0.18 and result.received == [0, 20]


def test_capture_and_replay_over_vhost_user(tmp_path, pcap, capsys):
    with ServedNet(tmp_path, ports=3) as served:
        # capture on port 2 while a bench port on port 0 keeps sending to an unknown MAC (flooded to 1 and 2)
        cap_out = tmp_path / "cap.pcapng"
        result: list[int] = []
        thread = threading.Thread(target=lambda: result.append(main([
            "bench", "capture", "--socket", served.paths[2], "-w", str(cap_out), "--count", "5", "--seconds", "20"])))
        thread.start()
        with NetPair.vhost_user(served.paths[0], served.paths[1]) as pair:
            flood = bytes(Ether(src=A, dst="02:00:00:00:00:ee") / IP() / UDP())
            while thread.is_alive():
                pair.a.send_raw([flood])
                time.sleep(0.02)
        thread.join()
        assert result == [0]
        got = list(PcapNgReader(str(cap_out)))
        assert len(got) >= 5 and all(bytes(p) == flood and p.direction == DIRECTION_INBOUND for p in got)
        assert {p.sniffed_on for p in got} == {served.paths[2]}
        assert f"received {len(got)} frames on {served.paths[2]}" in capsys.readouterr().out

        out = tmp_path / "o.pcapng"
        assert main(["bench", "replay", str(pcap), "--socket", served.paths[0], "--socket", served.paths[1],
                     "-w", str(out)]) == 0
        text = capsys.readouterr().out
        assert f"received 20 frames on {served.paths[1]}" in text
        got = list(PcapNgReader(str(out)))
        assert sum(p.direction == DIRECTION_INBOUND and p.sniffed_on == served.paths[1] for p in got) == 20
        assert sum(p.direction == DIRECTION_OUTBOUND and p.sniffed_on == served.paths[0] for p in got) == 20


def test_capture_api_stops_on_count(tmp_path):
    with NetPair.in_process() as pair:
        pair.a.send_raw([bytes(p) for p in pkts(3)])
        recorder = Recorder(tmp_path / "c.pcapng", ["a", "b"])
        counts = capture([pair.a, pair.b], recorder, seconds=5, count=3)
        recorder.close()
        assert counts == [0, 3] and recorder.count == 3


def test_bench_run_prints_throughput_and_latency(capsys):
    assert main(["bench", "run", "--seconds", "0.2", "--batch", "16", "--json"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("throughput: ") and "frames/s" in out[1]
    figures = json.loads(out[-1])
    assert set(figures) == {"frames_per_s", "latency_p50_us", "latency_p99_us", "latency_p999_us"}
    assert 0 < figures["latency_p50_us"] <= figures["latency_p99_us"] <= figures["latency_p999_us"]


def test_bench_run_wants_two_sockets(capsys, tmp_path):
    assert main(["bench", "run", "--socket", str(tmp_path / "one")]) == 2
    assert "--socket must be given twice" in capsys.readouterr().err


def test_the_cli_parser_does_not_import_scapy():
    code = "import sys, iovirt.cli; iovirt.cli.build_parser(); print('scapy' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "False", proc.stderr


@pytest.mark.parametrize("size, message", [(10, "frame 2 has 10 bytes, less than an Ethernet header (14)"),
                                           (70000, "frame 2 has 70000 bytes, more than a transmit buffer takes")])
def test_replay_of_frames_no_port_can_send_exits_2(tmp_path, capsys, size, message):
    path = tmp_path / "odd.pcap"
    data = _pcap_header(snaplen=262144)
    for frame in (FRAME, bytes(size)):
        data += struct.pack("<IIII", 0, 0, len(frame), len(frame)) + frame
    path.write_bytes(data)
    assert main(["bench", "replay", str(path)]) == 2
    assert message in capsys.readouterr().err
