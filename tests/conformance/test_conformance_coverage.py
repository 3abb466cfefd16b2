"""The statement inventory, its mapping to checks, and ``iovirt conform --coverage``."""

from __future__ import annotations

import copy
import json
from collections import Counter

import pytest

from iovirt.cli import main
from iovirt.conformance import coverage
from iovirt.conformance.registry import all_checks

COUNT_KEYS = ["statements", "checked", "not_observable", "not_yet"]


def test_inventory_rows_are_complete_and_ids_unique():
    rows = coverage.inventory()["statements"]
    ids = Counter(r["id"] for r in rows)
    assert [i for i, n in ids.items() if n > 1] == []
    for r in rows:
        assert r["id"].startswith(r["section"] + "#")
        assert r["keyword"] in r["summary"]
        assert r["version"] and r["source"] and r["area"]


def test_inventory_covers_the_areas_of_the_issue():
    # Device statements per area at virtio 1.4 (issue 17's table: pci 64, net 152, blk 59).
    areas = Counter(r["area"] for r in coverage.inventory()["statements"])
    assert areas["virtio-pci"] == 64 and areas["net"] == 152 and areas["blk"] == 59
    for area in ("chapter2", "entropy", "scsi", "input", "vsock", "vhost-user"):
        assert areas[area] > 0, area


def test_mapping_names_only_registered_checks_and_known_statements():
    coverage.validate()


def test_mapping_resolves_virtio_clauses_to_sections_of_the_cited_release():
    # Each check mapped to virtio statements cites a section number that exists in the release it names.
    old = coverage.inventory()["old_sections"]
    current = {r["number"] for r in coverage.inventory()["statements"]}  # virtio-1.4-cs01 numbering
    for clause in coverage.mapping()["checks"]:
        if clause.startswith("virtio-1.2:"):
            assert clause.split(":", 1)[1].split("#")[0] in old, clause
        if clause.startswith("virtio-1.4:"):
            assert clause.split(":", 1)[1].split("#")[0] in current, clause


def test_a_check_naming_an_unknown_statement_fails_validation():
    mp = copy.deepcopy(coverage.mapping())
    mp["checks"]["virtio-1.2:2.4.1"] = ["Basic Facilities of a Virtio Device / Device Reset#99"]
    with pytest.raises(coverage.CoverageMapError, match="Device Reset#99"):
        coverage.validate(mp=mp)


def test_a_statement_mapped_to_an_unknown_check_fails_validation():
    mp = copy.deepcopy(coverage.mapping())
    mp["checks"]["virtio-1.2:9.9.9#nothing"] = ["Basic Facilities of a Virtio Device / Device Reset#1"]
    with pytest.raises(coverage.CoverageMapError, match="not registered"):
        coverage.validate(mp=mp)


def test_unknown_statement_in_not_observable_fails_validation():
    mp = copy.deepcopy(coverage.mapping())
    mp["not_observable"]["no such section#1"] = "why"
    with pytest.raises(coverage.CoverageMapError, match="no such section#1"):
        coverage.validate(mp=mp)


def test_status_checked_beats_not_observable_and_names_the_checks():
    rows = {s.id: s for s in coverage.statements()}
    reset = rows["Basic Facilities of a Virtio Device / Device Reset#1"]
    assert reset.status == coverage.CHECKED and reset.by == ("virtio-1.2:2.4.1",)
    registered = {c.clause for c in all_checks()}
    for s in rows.values():
        assert set(s.by) <= registered
        assert (s.status == coverage.NOT_OBSERVABLE) == bool(s.reason)


def test_coverage_json_has_exactly_the_issue_shape(tmp_path, capsys):
    out = tmp_path / "coverage.json"
    assert main(["conform", "--coverage", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert list(data) == ["sections", "total"]
    assert list(data["total"]) == COUNT_KEYS
    for s in data["sections"]:
        assert list(s) == ["section"] + COUNT_KEYS
        assert s["statements"] == s["checked"] + s["not_observable"] + s["not_yet"]
    for key in COUNT_KEYS:
        assert data["total"][key] == sum(s[key] for s in data["sections"])
    assert data["total"]["statements"] == len(coverage.inventory()["statements"])
    printed = capsys.readouterr().out
    assert "Basic Facilities of a Virtio Device / Device Reset" in printed and "total" in printed


def test_coverage_refuses_run_options(capsys):
    assert main(["conform", "--coverage", "--device", "net"]) == 2
    assert "--coverage takes only --json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["conform", "--coverage", "--in-process", "net"])
    assert exc.value.code == 2


def test_generator_numbers_sections_and_counts_one_statement_per_keyword(tmp_path):
    # A made-up spec tree (no spec text): numbering follows \input order, a sentence with two keywords is two statements.
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "tools" / "spec_inventory.py"
    spec = importlib.util.spec_from_file_location("spec_inventory", path)
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    sys.modules["spec_inventory"] = gen  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(gen)
    finally:
        del sys.modules["spec_inventory"]
    (tmp_path / "main.tex").write_text("\\chapter{Intro}\n\\input{content.tex}\n")
    (tmp_path / "content.tex").write_text(
        "\\chapter{Basic Facilities of a Virtio Device}\\label{sec:Basic Facilities of a Virtio Device}\n"
        "\\section{Widgets}\\label{sec:Basic Facilities of a Virtio Device / Widgets}\n"
        "\\devicenormative{\\subsection}{Widgets}{Basic Facilities of a Virtio Device / Widgets}\n"
        "The device MUST frob \\field{knob} and MUST NOT twiddle it. % a comment with MAY\n\n"
        "The device MAY spin.\n"
        "\\drivernormative{\\subsection}{Widgets}{Basic Facilities of a Virtio Device / Widgets}\n"
        "The driver MUST wait.\n"
    )
    rows = gen.virtio_statements(tmp_path, "9.9", [])
    assert [(r["id"].rsplit("/", 1)[-1], r["number"], r["keyword"]) for r in rows] == [
        (" Widgets#1", "2.1.1", "MUST"),
        (" Widgets#2", "2.1.1", "MUST NOT"),
        (" Widgets#3", "2.1.1", "MAY"),
    ]
    assert rows[0]["summary"] == "Widgets: MUST (knob)"
