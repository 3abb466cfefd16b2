"""The coverage matrix as HTML: one row per spec statement, one column per back-end run.

A back-end's cell for a statement comes from the verdicts its run gave the
checks mapped to that statement (``coverage_map.json``): ``fail`` when any
of them failed, ``pass`` when at least one passed and none failed, ``n/a``
when none applied (a feature that back-end does not offer), and ``not run``
when the run had none of them.  Statements without a check show their
status instead (not observable, with the reason; or not yet).  The runs are
the JSON reports of ``iovirt conform --json`` (:func:`iovirt.conformance.report.to_json`).
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from typing import Sequence

from iovirt.conformance.coverage import CHECKED, NOT_OBSERVABLE, Statement, inventory, summary
from iovirt.errors import IovirtError

FAIL, PASS, NA, NOT_RUN = "fail", "pass", "n/a", "not run"

_STYLE = """
body { font-family: sans-serif; font-size: 13px; }
table { border-collapse: collapse; }
th, td { border: 1px solid #ccc; padding: 2px 6px; vertical-align: top; }
th { background: #eee; position: sticky; top: 0; }
td.pass { background: #cfc; } td.fail { background: #f99; font-weight: bold; }
td.na { background: #eee; color: #666; } td.notrun, td.not_yet { background: #ffd; }
td.not_observable { color: #666; }
"""


class MatrixError(IovirtError):
    """A run's report cannot be read."""


@dataclass(frozen=True)
class Run:
    """One back-end's results: its name (the column) and each clause's verdict and reason."""

    name: str
    verdicts: dict[str, tuple[str, str]]

    @classmethod
    def load(cls, name: str, path: str) -> "Run":
        """A run from the JSON report ``iovirt conform --json`` wrote at ``path``."""
        try:
            with open(path, encoding="utf-8") as f:
                rows = json.load(f)
            return cls(name, {row["clause"]: (row["verdict"], row.get("reason", "")) for row in rows})
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise MatrixError(f"{path}: not a conformance JSON report ({exc})") from None


def cell(statement: Statement, run: Run) -> tuple[str, str]:
    """``(verdict, why)`` of ``run`` for ``statement`` (a checked one)."""
    found = [(clause, *run.verdicts[clause]) for clause in statement.by if clause in run.verdicts]
    if not found:
        return NOT_RUN, "no check of this statement in the run"
    failed = [f"{clause}: {reason}" for clause, verdict, reason in found if verdict == FAIL]
    if failed:
        return FAIL, "; ".join(failed)
    if any(verdict == PASS for _, verdict, _ in found):
        return PASS, ", ".join(clause for clause, verdict, _ in found if verdict == PASS)
    return NA, "; ".join(f"{clause}: {reason}" for clause, _, reason in found)


def to_html(rows: Sequence[Statement], runs: Sequence[Run]) -> str:
    """The whole page: the per-area counts, then the matrix."""
    esc = html.escape
    inv = inventory()
    total = summary(list(rows))["total"]
    out = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8"><title>iovirt conformance matrix</title>',
        f"<style>{_STYLE}</style></head><body>",
        "<h1>iovirt conformance matrix</h1>",
        f"<p>Statements from {esc(inv['virtio_version'])} and {esc(inv['vhost_user_version'])}: "
        f"{total['statements']} in all, {total[CHECKED]} checked, {total[NOT_OBSERVABLE]} not observable from "
        f"the driver side, {total['not_yet']} not yet.</p>",
        "<table><tr><th>section</th><th>#</th><th>keyword</th><th>statement</th><th>coverage</th>",
    ]
    out += [f"<th>{esc(run.name)}</th>" for run in runs]
    out.append("</tr>")
    for s in rows:
        number = f"{s.number} " if s.number else ""
        status = ", ".join(s.by) if s.status == CHECKED else s.reason or "not yet"
        out.append(
            f"<tr><td>{esc(number + s.section)}</td><td>{esc(s.id.rsplit('#', 1)[-1])}</td>"
            f"<td>{esc(s.keyword)}</td><td>{esc(s.summary)}</td>"
            f'<td class="{s.status}">{esc(status)}</td>'
        )
        for run in runs:
            if s.status != CHECKED:
                out.append(f'<td class="{s.status}"></td>')
                continue
            verdict, why = cell(s, run)
            css = {NA: "na", NOT_RUN: "notrun"}.get(verdict, verdict)
            out.append(f'<td class="{css}" title="{esc(why)}">{esc(verdict)}</td>')
        out.append("</tr>")
    out.append("</table></body></html>")
    return "\n".join(out) + "\n"
