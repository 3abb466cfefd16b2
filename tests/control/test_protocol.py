"""The line protocol and the Prometheus text, without sockets."""

from __future__ import annotations

import json

import pytest

from iovirt.control import metrics
from iovirt.control.cli import parse_command
from iovirt.control.protocol import (
    MAX_REQUEST_BYTES,
    ControlError,
    LineReader,
    LineTooLong,
    encode_error,
    encode_request,
    encode_return,
    parse_request,
)


def test_lines_split_across_reads():
    reader = LineReader()
    assert reader.feed(b'{"command": "st') == []
    assert reader.feed(b'ats"}\n{"command": "fdb"}\n{"com') == [b'{"command": "stats"}', b'{"command": "fdb"}']
    assert reader.feed(b'mand": "devices"}\n') == [b'{"command": "devices"}']


def test_a_line_over_the_limit_is_refused_with_or_without_its_newline():
    with pytest.raises(LineTooLong):
        LineReader().feed(b"x" * MAX_REQUEST_BYTES)
    with pytest.raises(LineTooLong):
        LineReader(limit=16).feed(b"y" * 20 + b"\n")
    assert LineReader(limit=16).feed(b"z" * 15 + b"\n") == [b"z" * 15]


@pytest.mark.parametrize("line, words", [
    (b"\xff\xfe", "not a JSON object"),
    (b"not json", "not a JSON object"),
    (b"[1, 2]", "JSON object, got list"),
    (b'{"args": {}}', "'command' must be"),
    (b'{"command": 3}', "'command' must be"),
    (b'{"command": "stats", "args": [1]}', "'args' must be"),
    (b'{"command": "stats", "id": 1}', "unknown request members"),
])
def test_malformed_requests(line, words):
    with pytest.raises(ControlError) as info:
        parse_request(line)
    assert info.value.error_class == "BadRequest" and words in info.value.desc


def test_round_trip():
    assert parse_request(encode_request("stats", {"device": "net0"}).rstrip()) == ("stats", {"device": "net0"})
    assert json.loads(encode_return([1])) == {"return": [1]}
    assert json.loads(encode_error("CommandNotFound", "x")) == {"error": {"class": "CommandNotFound", "desc": "x"}}


def test_cli_words():
    assert parse_command(["stats"]) == ("stats", {})
    assert parse_command(["stats", "net0"]) == ("stats", {"device": "net0"})
    assert parse_command(["add-blk", "/s,/i,ro"]) == ("add-blk", {"socket": "/s", "image": "/i", "read_only": True})
    assert parse_command(["limit", "net0", "tx_pps=1000", "tx_bps=1e6"]) == (
        "limit", {"device": "net0", "limits": {"tx_pps": 1000.0, "tx_bps": 1e6}})
    for bad in ([], ["add-net"], ["limit", "net0", "oops"], ["add-blk", "/s"], ["counting", "net0", "maybe"]):
        with pytest.raises(Exception):
            parse_command(bad)


def test_prometheus_text():
    devices = [{
        "name": "net0", "type": "net",
        "counters": {"tx_packets": 5, "rx_dropped": 2, "rx_dropped_small_buffer": 2},
        "queues": [{"index": 0, "frames": 3, "kicks": 1}, {"index": 1, "frames": 5}],
        "iotlb": {"misses_sent": 4},
    }, {"name": 'we"ird', "type": "blk", "counters": {"read": 1}, "queues": [], "iotlb": {}}]
    text = metrics.render(devices, {"forwarded": 1, "entries": 2})
    lines = text.splitlines()
    assert text.endswith("\n")
    assert 'iovirt_tx_packets_total{device="net0",type="net"} 5' in lines
    assert 'iovirt_rx_dropped_by_reason_total{device="net0",type="net",reason="small_buffer"} 2' in lines
    assert 'iovirt_queue_frames_total{device="net0",type="net",queue="1"} 5' in lines
    assert 'iovirt_iotlb_misses_sent_total{device="net0",type="net"} 4' in lines
    assert 'iovirt_read_total{device="we\\"ird",type="blk"} 1' in lines
    assert "iovirt_switch_fdb_entries 2" in lines and "# TYPE iovirt_switch_fdb_entries gauge" in lines
    # One HELP and one TYPE per family, before its samples; families are not split.
    names = [line.split()[2] for line in lines if line.startswith("# TYPE")]
    assert len(names) == len(set(names))
    seen: set[str] = set()
    current = None
    for line in lines:
        if line.startswith("# TYPE"):
            current = line.split()[2]
            seen.add(current)
        elif not line.startswith("#"):
            assert line.split("{")[0].split()[0] == current
