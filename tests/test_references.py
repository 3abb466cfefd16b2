"""Docstrings, comments and docs point only at files that exist in this repository.

Every docstring and comment of ``iovirt/`` (``.py``, ``.pyx``, ``.pxd``) and
the whole text of ``README.md`` and ``docs/`` is scanned for tokens that look
like relative file paths (``iovirt/virtio/device.py``, ``docs/devices.md``,
``benchmarks/bench_ring.py``, a bare ``NOTES.md``): a name with one of the
extensions of :data:`EXTENSIONS` that contains a ``/`` or ends in ``.md``.
Each must exist relative to the repository root, to the referencing file's
directory, or to one of that directory's parents inside the repository (so
``virtio/device.py`` written inside ``iovirt/`` resolves).

Files of other projects (QEMU's ``docs/interop/vhost-user.rst``, ...) are
allowed only through :data:`EXTERNAL`, and only where the same docstring,
comment block or paragraph names their owner.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

EXTENSIONS = ("py", "pyx", "pxd", "md", "rst", "toml")

EXTERNAL: dict[str, str] = {
    # QEMU's vhost-user protocol specification (qemu.git docs/interop/vhost-user.rst).
    "docs/interop/vhost-user.rst": "QEMU",
    # QEMU's machine protocol specification (qemu.git docs/interop/qmp-spec.rst).
    "docs/interop/qmp-spec.rst": "QEMU",
    # The Linux kernel's initramfs format (linux.git Documentation/driver-api/early-userspace/buffer-format.rst).
    "Documentation/driver-api/early-userspace/buffer-format.rst": "kernel",
    # The Linux x86 boot protocol (linux.git Documentation/x86/boot.rst): the bzImage setup header.
    "Documentation/x86/boot.rst": "Linux",
}
"""Paths in other projects' trees that the text may cite: path -> the owner it must name nearby."""

_PATH = re.compile(
    r"(?<![\w./\\-])"  # not the tail of a longer path, an absolute path or a dotted name
    r"((?:[\w.-]+/)*[\w-][\w.-]*\.(?:" + "|".join(EXTENSIONS) + r"))"
    r"(?![\w/-])"
)
_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://\S+", re.IGNORECASE)


@dataclass(frozen=True)
class Reference:
    """One path-like token: where it was written, and the text around it (for :data:`EXTERNAL`)."""

    source: Path
    line: int
    path: str
    context: str

    def __str__(self) -> str:
        return f"{self.source.relative_to(ROOT)}:{self.line}: {self.path}"


def _chunks_py(text: str) -> list[tuple[int, str]]:
    """``(first line, text)`` of every docstring (string statement) and comment block of Python source."""
    chunks: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            chunks.append((node.lineno, node.value.value))
    block: list[str] = []
    start = previous = 0
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type != tokenize.COMMENT:
            continue
        line = tok.start[0]
        if block and line != previous + 1:
            chunks.append((start, "\n".join(block)))
            block = []
        if not block:
            start = line
        block.append(tok.string)
        previous = line
    if block:
        chunks.append((start, "\n".join(block)))
    return chunks


_CYTHON_STRING = re.compile(r'"""(.*?)"""|\'\'\'(.*?)\'\'\'', re.DOTALL)


def _chunks_cython(text: str) -> list[tuple[int, str]]:
    """Triple-quoted strings and ``#`` comment blocks of Cython source (which :mod:`ast` cannot parse)."""
    chunks: list[tuple[int, str]] = []
    for match in _CYTHON_STRING.finditer(text):
        chunks.append((text.count("\n", 0, match.start()) + 1, match.group(1) or match.group(2) or ""))
    stripped = _CYTHON_STRING.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    block: list[str] = []
    start = 0
    for number, line in enumerate(stripped.splitlines(), 1):
        comment = line.partition("#")[2] if "#" in line else None
        if comment is None:
            if block:
                chunks.append((start, "\n".join(block)))
                block = []
            continue
        if not block:
            start = number
        block.append(comment)
    if block:
        chunks.append((start, "\n".join(block)))
    return chunks


def _chunks_markdown(text: str) -> list[tuple[int, str]]:
    """Paragraphs (blank-line separated) of a Markdown file."""
    chunks: list[tuple[int, str]] = []
    line = 1
    for paragraph in re.split(r"(\n\s*\n)", text):
        if paragraph.strip():
            chunks.append((line, paragraph))
        line += paragraph.count("\n")
    return chunks


def _sources() -> list[Path]:
    code = [p for ext in ("py", "pyx", "pxd") for p in (ROOT / "iovirt").rglob(f"*.{ext}")]
    docs = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]
    return sorted(p for p in code + docs if p.is_file())


def references(source: Path) -> list[Reference]:
    """Every path-like token in the docstrings and comments (or, for Markdown, the text) of ``source``."""
    text = source.read_text(encoding="utf-8")
    if source.suffix == ".py":
        chunks = _chunks_py(text)
    elif source.suffix in (".pyx", ".pxd"):
        chunks = _chunks_cython(text)
    else:
        chunks = _chunks_markdown(text)
    found = []
    for first_line, chunk in chunks:
        clean = _URL.sub(lambda m: " " * len(m.group(0)), chunk)
        for match in _PATH.finditer(clean):
            path = match.group(1)
            if "/" in path or path.endswith(".md"):
                line = first_line + clean.count("\n", 0, match.start())
                found.append(Reference(source, line, path, chunk))
    return found


def resolves(ref: Reference) -> bool:
    """Whether ``ref`` names a file of the repository, or an allowed external file with its owner named."""
    owner = EXTERNAL.get(ref.path)
    if owner is not None:
        return owner in ref.context
    directory = ref.source.parent
    bases = [ROOT, *(d for d in [directory, *directory.parents] if d.is_relative_to(ROOT))]
    return any((base / ref.path).exists() for base in bases)


def test_the_scanner_sees_references() -> None:
    """The scan is not vacuous: it finds references, including ones in comments and in Markdown."""
    refs = [r for source in _sources() for r in references(source)]
    assert len(refs) > 10
    assert any(r.source.suffix == ".md" for r in refs)
    assert any(r.source.suffix == ".py" for r in refs)


def test_scanner_rules() -> None:
    """URLs, absolute paths and dotted module names are not references; an owner must be named for EXTERNAL."""
    probe = ROOT / "iovirt" / "_probe_for_test.py"
    text = (
        '"""See https://example.org/a/b.md and /usr/lib/x/y.py and iovirt.virtio.device.\n\n'
        'Real: iovirt/virtio/device.py, missing/nowhere.py; QEMU\'s docs/interop/vhost-user.rst."""\n'
        "# docs/interop/vhost-user.rst without its owner\n"
    )
    chunks = _chunks_py(text)
    refs = []
    for first_line, chunk in chunks:
        for match in _PATH.finditer(_URL.sub(" ", chunk)):
            refs.append(Reference(probe, first_line, match.group(1), chunk))
    assert [r.path for r in refs] == [
        "iovirt/virtio/device.py",
        "missing/nowhere.py",
        "docs/interop/vhost-user.rst",
        "docs/interop/vhost-user.rst",
    ]
    assert [resolves(r) for r in refs] == [True, False, True, False]


@pytest.mark.parametrize("source", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_references_exist(source: Path) -> None:
    """Every file ``source`` points at exists (or is an external file whose owner the text names)."""
    dangling = [str(r) for r in references(source) if not resolves(r)]
    assert not dangling, "references to files that are not in the repository:\n" + "\n".join(dangling)
