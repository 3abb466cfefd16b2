"""Reports (table, JSON rows, JUnit XML) and the conform CLI's exit codes."""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET

import pytest

from iovirt.conformance import cli
from iovirt.conformance.registry import CheckResult, Verdict
from iovirt.conformance.report import table, to_json, to_junit

ROWS = [
    CheckResult("vhost-user:Header", "t1", Verdict.PASS),
    CheckResult("virtio-1.2:2.7.8.2", "t2", Verdict.FAIL, "used id 99 is not an in-flight head"),
    CheckResult("virtio-1.2:5.2.6.2#ro", "t3", Verdict.NA, "VIRTIO_BLK_F_RO not offered"),
]


def test_json_rows():
    rows = json.loads(to_json(ROWS))
    assert rows[1] == {"clause": "virtio-1.2:2.7.8.2", "title": "t2", "verdict": "fail",
                       "reason": "used id 99 is not an in-flight head"}
    assert [r["verdict"] for r in rows] == ["pass", "fail", "n/a"]


def test_junit():
    root = ET.fromstring(to_junit(ROWS).split("?>", 1)[1])
    assert root.get("tests") == "3" and root.get("failures") == "1" and root.get("skipped") == "1"
    cases = root.findall("testcase")
    assert cases[1].find("failure").get("message") == "used id 99 is not an in-flight head"
    assert cases[2].find("skipped") is not None


def test_table_has_every_clause():
    text = table(ROWS, width=100)
    assert all(r.clause in text for r in ROWS) and "1 pass, 1 fail, 1 n/a" in text


def _parse(argv):
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    return parser.parse_args(["conform", *argv])


def test_cli_usage_error_exits_2():
    with pytest.raises(SystemExit) as exc:
        _parse(["--device", "net"])  # neither --socket nor --in-process
    assert exc.value.code == 2


def test_cli_exit_codes_and_files(iovirt_backend, tmp_path):
    out_json, out_xml = tmp_path / "r.json", tmp_path / "r.xml"
    args = _parse(["--socket", iovirt_backend.blk_ro_path, "--device", "blk", "--timeout", "2",
                   "--json", str(out_json), "--junit", str(out_xml)])
    assert args.func(args) == 0  # iovirt's read-only blk conforms
    assert not any(r["verdict"] == "fail" for r in json.loads(out_json.read_text()))
    assert ET.parse(out_xml).getroot().tag == "testsuite"
    # A back-end that is not there: every net check fails, exit 1; a check of another device type stays n/a.
    args = _parse(["--socket", str(tmp_path / "nobody.sock"), "--device", "net", "--timeout", "2",
                   "--json", str(out_json)])
    assert args.func(args) == 1
    rows = json.loads(out_json.read_text())
    assert any(r["verdict"] == "fail" for r in rows)
    assert all(r["verdict"] == "fail" or r["reason"].startswith("only for ") and "net" not in r["reason"] for r in rows)
