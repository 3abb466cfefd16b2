"""Reports of a conformance run: a terminal table, JSON rows and JUnit XML."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from collections import Counter
from typing import Sequence, TextIO

from iovirt.conformance.registry import CheckResult, Verdict

MARK = {Verdict.PASS: "pass", Verdict.FAIL: "FAIL", Verdict.NA: "n/a"}


def summary(results: Sequence[CheckResult]) -> str:
    """``"30 pass, 2 fail, 5 n/a"``."""
    counts = Counter(r.verdict for r in results)
    return ", ".join(f"{counts[v]} {v.value}" for v in (Verdict.PASS, Verdict.FAIL, Verdict.NA))


def table(results: Sequence[CheckResult], width: int | None = None) -> str:
    """One row per clause: clause, verdict, reason (wrapped to the terminal width)."""
    width = width or shutil.get_terminal_size((120, 24)).columns
    cw = max([len("clause")] + [len(r.clause) for r in results])
    head = f"{'clause':<{cw}}  {'verdict':<7}  reason"
    lines = [head, "-" * min(width, max(len(head), 40))]
    room = max(20, width - cw - 11)
    for r in results:
        reason = r.reason or r.title
        chunks = [reason[i : i + room] for i in range(0, len(reason), room)] or [""]
        lines.append(f"{r.clause:<{cw}}  {MARK[r.verdict]:<7}  {chunks[0]}")
        lines += [f"{'':<{cw}}  {'':<7}  {c}" for c in chunks[1:]]
    lines.append(summary(results))
    return "\n".join(lines)


def to_json(results: Sequence[CheckResult]) -> str:
    """The JSON report: a list of ``{"clause", "title", "verdict", "reason"}`` rows."""
    return json.dumps([r.to_dict() for r in results], indent=2) + "\n"


def to_junit(results: Sequence[CheckResult], suite: str = "iovirt-conformance") -> str:
    """JUnit XML: one testcase per clause; fail -> <failure>, n/a -> <skipped>."""
    counts = Counter(r.verdict for r in results)
    root = ET.Element(
        "testsuite",
        name=suite,
        tests=str(len(results)),
        failures=str(counts[Verdict.FAIL]),
        skipped=str(counts[Verdict.NA]),
        errors="0",
        time=f"{sum(r.seconds for r in results):.3f}",
    )
    for r in results:
        case = ET.SubElement(root, "testcase", classname=suite, name=f"{r.clause} {r.title}", time=f"{r.seconds:.3f}")
        if r.verdict is Verdict.FAIL:
            ET.SubElement(case, "failure", message=r.reason).text = r.reason
        elif r.verdict is Verdict.NA:
            ET.SubElement(case, "skipped", message=r.reason)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


class ProgressLine:
    """Shows progress while checks run: an overwritten line on a terminal, one line per check otherwise."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()

    def __call__(self, done: int, total: int, check, result: CheckResult) -> None:
        text = f"[{done}/{total}] {MARK[result.verdict]:<4} {check.clause}"
        if self.tty:
            self.stream.write("\r\x1b[K" + text + ("\n" if done == total else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
