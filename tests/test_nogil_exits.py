"""No function of the Cython hot paths takes the GIL just to return.

A Python local (``except E as exc``, ``raw = ...``) inside a ``nogil``
function makes Cython acquire the GIL at every exit to release it, on the
fast path too: in the split ring that cost more than half of the pop time.
Slow paths that need Python objects go in helper methods that hold the GIL.
This reads the C that Cython generated for every extension in the tree.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FUNCTION = re.compile(r"\nstatic [^\n;]*? (__pyx_f_\w+)\([^\n;]*\) \{\n")
GENERATED = sorted(p for p in (ROOT / "iovirt").rglob("*.c") if p.with_suffix(".pyx").exists())


def gil_on_exit(source: str) -> list[str]:
    """Functions whose common exit (label ``__pyx_L0``) acquires the GIL."""
    found = []
    for match in FUNCTION.finditer(source):
        body = source[match.end() : source.find("\n}\n", match.end())]
        exit_at = body.find("__pyx_L0:;")
        if exit_at != -1 and "__Pyx_PyGILState_Ensure" in body[exit_at : exit_at + 400]:
            found.append(match.group(1))
    return found


def test_the_detector_sees_a_python_local_in_a_nogil_function():
    source = "\nstatic int __pyx_f_x_walk(int a) {\n  __pyx_L0:;\n  __pyx_gilstate_save = __Pyx_PyGILState_Ensure();\n}\n"
    assert gil_on_exit(source) == ["__pyx_f_x_walk"]


@pytest.mark.skipif(not GENERATED, reason="no Cython-generated C in the tree (pure-Python install)")
@pytest.mark.parametrize("path", GENERATED, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_gil_taken_on_return(path):
    assert gil_on_exit(path.read_text()) == []
