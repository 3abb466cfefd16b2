#!/usr/bin/env python3
"""Generate iovirt/conformance/statements.json, the inventory of device-side normative statements.

Reads a local checkout of the virtio specification's TeX sources (oasis-tcs/virtio-spec) and a local
copy of QEMU's ``docs/interop/vhost-user.rst``; neither is downloaded nor stored in the repo.  Writes
data only: for every statement its id, section label, section number, keyword, source file and a
summary made of the spec names it mentions (fields, constants, messages) - never the spec's
sentences.  Hand-written summaries and the statement-to-check mapping live beside it in
iovirt/conformance/coverage_map.json, which this script does not touch.

    python3 tools/spec_inventory.py --spec SPEC_DIR --spec-version 1.4-cs01 \\
        --old-spec SPEC_1.2_DIR --old-version 1.2-cs01 \\
        --vhost-user vhost-user.rst --vhost-user-version "QEMU ..." \\
        --out iovirt/conformance/statements.json

``--old-spec`` gives the section numbers of the release the checks cite (their clause ids are
``virtio-1.2:<number>``), so the coverage module can resolve a check's clause to a section label.

A statement is one RFC 2119 keyword in capitals (MUST, MUST NOT, SHOULD, SHOULD NOT, MAY, ...) in a
``\\devicenormative`` section (a sentence with two keywords holds two statements); in vhost-user.rst, one sentence with
"must" or "should" (any case: that document writes them in lower case) whose subject is the back-end.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

LEVELS = ("chapter", "section", "subsection", "subsubsection", "paragraph", "subparagraph")

AREAS = {
    # area name: (section label prefix of the devicenormative label, descriptive name)
    "chapter2": "Basic Facilities of a Virtio Device",
    "virtio-pci": "Virtio Transport Options / Virtio Over PCI Bus",
    "net": "Device Types / Network Device",
    "blk": "Device Types / Block Device",
    "entropy": "Device Types / Entropy Device",
    "scsi": "Device Types / SCSI Host Device",
    "input": "Device Types / Input Device",
    "vsock": "Device Types / Socket Device",
}

KEYWORDS = re.compile(r"\b(MUST NOT|MUST|SHALL NOT|SHALL|SHOULD NOT|SHOULD|MAY|REQUIRED|RECOMMENDED|OPTIONAL)\b")
COMMAND = re.compile(
    r"\\(?P<norm>devicenormative|drivernormative|conformance)\s*\{\\(?P<nlevel>[a-z]+)\}"
    r"|\\(?P<level>chapter|section|subsection|subsubsection|paragraph|subparagraph)(?P<star>\*?)\s*(?:\[[^\]]*\])?\s*\{"
    r"|\\input\{(?P<input>[^}]+)\}"
    r"|\\appendix\b(?P<appendix>)"
)
NAMES = re.compile(r"\\field\{([^{}]+)\}|\b((?:VIRTIO|VIRTQ|VRING|VHOST)_[A-Z0-9_]+)\b")


def strip_comments(text: str) -> str:
    """TeX source without its % comments (an escaped \\% stays)."""
    return re.sub(r"(?<!\\)%.*", "", text)


def braced(text: str, start: int) -> tuple[str, int]:
    """The group opening at ``text[start] == '{'`` and the index after its closing brace."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i], i + 1
    raise ValueError("unbalanced braces")


@dataclass
class Section:
    """One numbered section of the specification."""

    number: str
    title: str
    label: str
    source: str
    normative: str = ""  # "device", "driver" or ""
    body: list[str] = field(default_factory=list)


class Walker:
    """Follows ``\\input`` from main.tex and numbers sections the way LaTeX's report class does."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.counters = [0] * len(LEVELS)
        self.sections: list[Section] = []
        self.done = False

    def walk(self, name: str = "main.tex") -> list[Section]:
        path = self.root / (name if name.endswith(".tex") else name + ".tex")
        if not path.exists() or self.done:
            return self.sections
        text = strip_comments(path.read_text(encoding="utf-8", errors="replace"))
        rel = str(path.relative_to(self.root))
        pos = 0
        for m in COMMAND.finditer(text):
            if m.start() < pos:
                continue
            self._text(text[pos : m.start()])
            if m.group("input") is not None:
                pos = m.end()
                self.walk(m.group("input").strip())
                if self.done:
                    return self.sections
                continue
            if m.group("appendix") is not None:
                self.done = True  # appendices are outside the inventory
                return self.sections
            if m.group("norm"):
                level = m.group("nlevel")
                args = []
                end = m.end()
                for _ in range(2 if m.group("norm") == "conformance" else 2):
                    while end < len(text) and text[end] in " \n\t":
                        end += 1
                    arg, end = braced(text, end)
                    args.append(arg)
                kind = {"devicenormative": "device", "drivernormative": "driver"}.get(m.group("norm"), "")
                label = args[1] if kind else ""
                title = args[0]
                pos = end
                self._open(level, title, label, rel, kind)
                continue
            level = m.group("level")
            title, end = braced(text, m.end() - 1)
            pos = end
            label_m = re.match(r"\s*\\label\{([^}]*)\}", text[end:])
            label = label_m.group(1) if label_m else ""
            if m.group("star"):
                self._open_unnumbered(title, rel)
            else:
                self._open(level, title, label, rel, "")
        self._text(text[pos:])
        return self.sections

    def _open(self, level: str, title: str, label: str, source: str, normative: str) -> None:
        depth = LEVELS.index(level)
        self.counters[depth] += 1
        for i in range(depth + 1, len(LEVELS)):
            self.counters[i] = 0
        number = ".".join(str(c) for c in self.counters[: depth + 1])
        label = re.sub(r"^sec:", "", " ".join(label.split()))
        self.sections.append(Section(number, " ".join(title.split()), label, source, normative))

    def _open_unnumbered(self, title: str, source: str) -> None:
        self.sections.append(Section("", " ".join(title.split()), "", source, ""))

    def _text(self, chunk: str) -> None:
        if self.sections:
            self.sections[-1].body.append(chunk)


def sentences(tex: str) -> list[str]:
    """Split a TeX body into sentences; every list item starts a new one."""
    tex = re.sub(r"\\begin\{(lstlisting|verbatim)\}.*?\\end\{\1\}", " ", tex, flags=re.S)
    tex = re.sub(r"\\(begin|end)\{[a-z*]+\}", "\n\n", tex)
    tex = tex.replace("\\item", "\n\n")
    parts: list[str] = []
    for para in re.split(r"\n\s*\n", tex):
        para = " ".join(para.split())
        parts += [s for s in re.split(r"(?<=[.;:])\s+(?=[A-Z\\])", para) if s.strip()]
    return parts


def clauses(sentence: str) -> list[tuple[str, re.Match[str]]]:
    """One statement per keyword: the keyword's match and the words from the previous keyword to the next."""
    found = list(KEYWORDS.finditer(sentence))
    out = []
    for i, m in enumerate(found):
        start = found[i - 1].end() if i else 0
        end = found[i + 1].start() if i + 1 < len(found) else len(sentence)
        out.append((sentence[start:end], m))
    return out


def summary(sentence: str, keyword: str, topic: str) -> str:
    """A summary built from the section's topic and the spec names a sentence mentions (never its prose)."""
    names: list[str] = []
    for m in NAMES.finditer(sentence):
        name = (m.group(1) or m.group(2)).replace("\\_", "_")
        name = name.replace("\\", "")
        if name not in names:
            names.append(name)
    return f"{topic}: {keyword}" + (f" ({', '.join(names[:5])})" if names else "")


def area_of(label: str) -> str | None:
    for area, prefix in AREAS.items():
        if label == prefix or label.startswith(prefix + " /"):
            return area
    return None


def virtio_statements(root: Path, version: str, old: list[Section]) -> list[dict[str, object]]:
    """Every device statement of the areas in :data:`AREAS`."""
    old_numbers = {s.label: s.number for s in old if s.normative == "device"}
    rows: list[dict[str, object]] = []
    for sec in Walker(root).walk():
        if sec.normative != "device":
            continue
        area = area_of(sec.label)
        if area is None:
            continue
        ordinal = 0
        for sentence in sentences("".join(sec.body)):
            for part, m in clauses(sentence):
                ordinal += 1
                rows.append(
                    {
                        "id": f"{sec.label}#{ordinal}",
                        "area": area,
                        "section": sec.label,
                        "number": sec.number,
                        "number_old": old_numbers.get(sec.label, ""),
                        "keyword": m.group(1),
                        "summary": summary(part, m.group(1), sec.label.rsplit(" / ", 1)[-1]),
                        "source": sec.source,
                        "version": f"virtio-{version}",
                    }
                )
    return rows


RST_HEADING = re.compile(r"^(?P<title>[^\n]+)\n(?P<rule>[=\-^~]{3,})\s*$", re.M)
RST_MESSAGE = re.compile(r"^``(VHOST_USER_[A-Z0-9_]+)``\s*$", re.M)
RST_KEYWORD = re.compile(r"\b(must not|must|should not|should)\b", re.I)
# Before QEMU 8.1 the document calls the back-end "slave" and, in its ring rules, "client".
BACKEND = re.compile(r"\b(back-?ends?|slaves?|server|client)\b", re.I)
FRONTEND = re.compile(r"\b(front-?ends?|masters?|QEMU)\b", re.I)


def vhost_user_statements(path: Path, version: str) -> list[dict[str, object]]:
    """Back-end rules of vhost-user.rst; the section is the heading or message they sit under."""
    text = path.read_text(encoding="utf-8")
    marks = [(m.start(), m.group("title").strip()) for m in RST_HEADING.finditer(text)]
    marks += [(m.start(), m.group(1)) for m in RST_MESSAGE.finditer(text)]
    marks.sort()
    rows: list[dict[str, object]] = []
    counts: dict[str, int] = {}
    for i, (start, title) in enumerate(marks):
        end = marks[i + 1][0] if i + 1 < len(marks) else len(text)
        body = text[start:end].split("\n", 2)[-1]
        body = re.sub(r"::\n(\n?[ \t]+.*\n?)+", ". ", body)  # literal blocks
        for sentence in sentences(body):
            m = RST_KEYWORD.search(sentence)
            if not m:
                continue
            subject = sentence[: m.start()]
            backend, frontend = BACKEND.search(subject), FRONTEND.search(subject)
            if not backend or (frontend and frontend.start() > backend.start()):
                continue  # a rule for the front-end, or one with no subject named
            counts[title] = counts.get(title, 0) + 1
            names = list(dict.fromkeys(re.findall(r"\b(VHOST_[A-Z0-9_]+|VIRTIO_[A-Z0-9_]+)\b", sentence)))
            rows.append(
                {
                    "id": f"vhost-user:{title}#{counts[title]}",
                    "area": "vhost-user",
                    "section": f"vhost-user:{title}",
                    "number": "",
                    "number_old": "",
                    "keyword": m.group(1).upper(),
                    "summary": f"{title}: {m.group(1).upper()}" + (f" ({', '.join(names[:5])})" if names else ""),
                    "source": "docs/interop/vhost-user.rst",
                    "version": version,
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", type=Path, required=True, help="virtio-spec checkout (TeX sources)")
    p.add_argument("--spec-version", required=True, help="its release, e.g. 1.4-cs01")
    p.add_argument("--old-spec", type=Path, required=True, help="checkout of the release the checks cite")
    p.add_argument("--old-version", required=True, help="its release, e.g. 1.2-cs01")
    p.add_argument("--vhost-user", type=Path, required=True, help="QEMU docs/interop/vhost-user.rst")
    p.add_argument("--vhost-user-version", required=True, help="where that file comes from")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    old = Walker(args.old_spec).walk()
    # number -> label in the release the checks cite; device requirement sections marked as such
    sections = {s.number: ("devicenormative:" if s.normative == "device" else "") + s.label for s in old if s.number}
    rows = virtio_statements(args.spec, args.spec_version, old)
    rows += vhost_user_statements(args.vhost_user, args.vhost_user_version)
    data = {
        "generated_by": "tools/spec_inventory.py",
        "virtio_version": f"virtio-{args.spec_version}",
        "old_version": f"virtio-{args.old_version}",
        "vhost_user_version": args.vhost_user_version,
        "old_sections": sections,
        "statements": rows,
    }
    args.out.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    print(f"{len(rows)} statements -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
