"""``iovirt conform --coverage --html FILE --run NAME=FILE``: the statement-by-back-end matrix."""

from __future__ import annotations

import json

import pytest

from iovirt.cli import main
from iovirt.conformance import coverage
from iovirt.conformance.matrix import FAIL, NA, NOT_RUN, PASS, Run, cell, to_html


def checked_statement() -> coverage.Statement:
    return next(s for s in coverage.statements() if s.status == coverage.CHECKED)


@pytest.mark.parametrize("verdicts, expected", [
    (["pass"], PASS),
    (["fail"], FAIL),
    (["n/a"], NA),
    ([], NOT_RUN),
])
def test_a_cell_is_the_verdict_of_the_checks_mapped_to_the_statement(verdicts, expected):
    statement = checked_statement()
    run = Run("peer", {clause: (v, "why") for clause, v in zip(statement.by, verdicts)})
    assert cell(statement, run)[0] == expected


def test_one_failed_check_fails_the_statement_whatever_the_others_say():
    statement = coverage.Statement("s#1", "net", "S", "1", "MUST", "x", "v", coverage.CHECKED, ("c1", "c2", "c3"))
    run = Run("peer", {"c1": ("pass", ""), "c2": ("fail", "it broke"), "c3": ("n/a", "")})
    assert cell(statement, run) == (FAIL, "c2: it broke")


def test_the_page_has_a_row_per_statement_and_a_column_per_run():
    rows = coverage.statements()
    page = to_html(rows, [Run("a<b>", {}), Run("other", {})])
    assert page.count("<tr>") == len(rows) + 1
    assert "<th>a&lt;b&gt;</th>" in page and "<th>other</th>" in page  # names are escaped


def test_the_cli_writes_the_matrix_from_json_reports(tmp_path, capsys):
    statement = checked_statement()
    report = tmp_path / "peer.json"
    report.write_text(json.dumps([{"clause": statement.by[0], "title": "t", "verdict": "fail", "reason": "broken"}]))
    out = tmp_path / "matrix.html"
    assert main(["conform", "--coverage", "--html", str(out), "--run", f"peer={report}"]) == 0
    page = out.read_text()
    assert '<th>peer</th>' in page and 'class="fail"' in page and "broken" in page


@pytest.mark.parametrize("argv, why", [
    (["--coverage", "--run", "a=b"], "--run needs --html"),
    (["--coverage", "--html", "x.html", "--run", "nameless"], "want NAME=FILE"),
    (["--coverage", "--html", "x.html", "--run", "a=/nonexistent.json"], "not a conformance JSON report"),
    (["--in-process", "net", "--html", "x.html"], "go with --coverage"),
])
def test_bad_matrix_arguments_are_clear_errors(tmp_path, capsys, monkeypatch, argv, why):
    monkeypatch.chdir(tmp_path)
    assert main(["conform", *argv]) == 2
    assert why in capsys.readouterr().err
