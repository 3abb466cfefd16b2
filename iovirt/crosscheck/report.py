"""Running areas and reporting: the JSON document and the text summary."""

from __future__ import annotations

import json
from typing import Mapping, Sequence

from iovirt.crosscheck.area import AreaResult, run_area
from iovirt.crosscheck.areas import AREAS


def run_areas(names: Sequence[str], seed: int, ops: int) -> list[AreaResult]:
    """Run each named area (a QEMU each, one after the other) for ``ops`` operations."""
    results = []
    for name in names:
        with AREAS[name]() as area:
            results.append(run_area(area, seed, ops))
    return results


def as_json(results: Sequence[AreaResult], seed: int) -> dict[str, object]:
    """``{"seed": S, "areas": {name: {"compared": N, "mismatches": M, "expected_differences": E, …}}}``."""
    return {"seed": seed, "areas": {r.area: r.as_json() for r in results}}


def write_json(
    path: str, results: Sequence[AreaResult], seed: int, extra_areas: Mapping[str, object] | None = None
) -> None:
    """Write :func:`as_json` to ``path``, with ``extra_areas`` (areas outside the runner, e.g. ``vtd-linux``) added."""
    doc = as_json(results, seed)
    if extra_areas:
        areas = doc["areas"]
        assert isinstance(areas, dict)
        areas.update(extra_areas)
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")


def summary(results: Sequence[AreaResult]) -> str:
    """One line per area, then every minimal mismatching sequence and the expected differences seen."""
    lines = [f"{'area':<12} {'compared':>9} {'mismatches':>10} {'expected':>9} {'seconds':>8}"]
    for r in results:
        lines.append(
            f"{r.area:<12} {r.compared:>9} {len(r.mismatches):>10} {sum(r.expected.values()):>9} {r.seconds:>8.2f}"
        )
    for r in results:
        for m in r.mismatches:
            lines += [f"\n{r.area}: unexplained mismatch, minimal sequence (replay with --replay FILE):", m.replay_text()]
        for e, count in r.expected.items():
            lines.append(f"{r.area}: expected difference x{count}: {e.operation}: {e.spec}; {e.reason}")
    return "\n".join(lines)
