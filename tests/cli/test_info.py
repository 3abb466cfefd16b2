"""``iovirt info``: every accelerated part, the implementation that runs, and why (a real process)."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from iovirt import _accel
from iovirt.cli import BLK_ENGINE_ROW


def info(**env: str) -> dict[str, tuple[str, str, str]]:
    """Run ``python -m iovirt info`` with only ``env`` of the IOVIRT_* switches set; rows by part name."""
    environ = {k: v for k, v in os.environ.items() if k not in ("IOVIRT_NO_EXTENSIONS", "IOVIRT_REQUIRE_EXTENSIONS")}
    out = subprocess.run(
        [sys.executable, "-m", "iovirt", "info"], env={**environ, **env}, capture_output=True, text=True, check=True
    ).stdout
    lines = out.splitlines()
    assert lines[0].startswith("iovirt ") and lines[1].split() == ["part", "runs", "extension", "why"]
    rows = {}
    # The last row is the blk I/O engine (test_the_blk_engine_is_named).
    assert lines[-1].startswith(BLK_ENGINE_ROW)
    for line in lines[2:-1]:
        name, runs, module, why = re.split(r"\s{2,}", line.strip(), maxsplit=3)
        rows[name] = (runs, module, why)
    return rows


def importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def test_every_part_is_listed_with_what_runs_and_why():
    rows = info()
    assert list(rows) == [part.name for part in _accel.PARTS]
    for part in _accel.PARTS:
        runs, module, why = rows[part.name]
        assert module == part.module
        if importable(part.module):
            assert (runs, why) == ("cython", _accel.REASON_LOADED)
        else:
            assert runs == "python" and why.startswith("ImportError: "), why


def test_the_named_parts_are_all_there():
    names = {part.name for part in _accel.PARTS}
    assert {"split ring", "IOTLB cache", "net data path", "blk data path", "VT-d page walk",
            "VT-d miss handler"} <= names


def test_no_extensions_runs_every_reference():
    rows = info(IOVIRT_NO_EXTENSIONS="1")
    assert list(rows) == [part.name for part in _accel.PARTS]
    for runs, _module, why in rows.values():
        assert (runs, why) == ("python", _accel.REASON_DISABLED)
        assert "IOVIRT_NO_EXTENSIONS" in why


def test_a_required_extension_that_does_not_import_runs_nothing():
    missing = [part for part in _accel.PARTS if not importable(part.module)]
    if not missing:
        pytest.skip("every extension is built")
    rows = info(IOVIRT_REQUIRE_EXTENSIONS="1")
    for part in missing:
        runs, _module, why = rows[part.name]
        assert runs == "nothing" and "IOVIRT_REQUIRE_EXTENSIONS" in why and "ImportError" in why


def test_every_extension_in_the_tree_is_a_registered_part():
    """A new ``_x_c.pyx`` shows up in ``iovirt info`` only once it is registered in ``iovirt._accel.PARTS``."""
    root = Path(__file__).resolve().parents[2]
    built = {".".join(p.relative_to(root).with_suffix("").parts) for p in (root / "iovirt").rglob("*_c.pyx")}
    assert built == {part.module for part in _accel.PARTS}


def engine_row(**env: str) -> tuple[str, str]:
    environ = {k: v for k, v in os.environ.items() if k not in ("IOVIRT_NO_EXTENSIONS", "IOVIRT_REQUIRE_EXTENSIONS")}
    out = subprocess.run(
        [sys.executable, "-m", "iovirt", "info"], env={**environ, **env}, capture_output=True, text=True, check=True
    ).stdout
    name, runs, module, why = re.split(r"\s{2,}", out.splitlines()[-1].strip(), maxsplit=3)
    assert (name, module) == (BLK_ENGINE_ROW, "iovirt.virtio.blk.aio")
    return runs, why


def test_the_blk_engine_is_named():
    from iovirt.virtio.blk import datapath

    runs, why = engine_row()
    if datapath.uring_built():
        assert (runs, why) == ("io_uring", "liburing") or (runs == "threads" and "io_uring refused" in why)
    assert engine_row(IOVIRT_BLK_ENGINE="threads")[0] == "threads"
    assert engine_row(IOVIRT_NO_EXTENSIONS="1") == ("threads", "the pure-Python data path")
