"""Which implementation of the accelerated parts runs, and whether it must.

Every hot part (split ring, IOTLB cache, net and blk data paths, VT-d walk
and miss handler) is a Cython extension with a pure-Python reference twin.
``IOVIRT_NO_EXTENSIONS=1`` forces the references everywhere.
``IOVIRT_REQUIRE_EXTENSIONS=1`` (set by the test runner and CI) turns an
extension that failed to load into an error instead of a silent fallback
(the yarl/multidict guard).  :func:`load` is the one place that rule lives.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

NO_EXTENSIONS = os.environ.get("IOVIRT_NO_EXTENSIONS", "") not in ("", "0")
REQUIRE_EXTENSIONS = os.environ.get("IOVIRT_REQUIRE_EXTENSIONS", "") not in ("", "0")


def load(module: str) -> ModuleType | None:
    """The extension ``module`` (a dotted name), or ``None`` when the reference must run."""
    if NO_EXTENSIONS:
        return None
    try:
        return importlib.import_module(module)
    except ImportError:
        if REQUIRE_EXTENSIONS:
            raise
        return None


def implementations(module: str, reference: ModuleType, name: str) -> dict[str, type]:
    """``name`` from every importable implementation, by kind (for tests and benchmarks).

    Unlike :func:`load`, this ignores ``IOVIRT_NO_EXTENSIONS``: tests compare both.
    """
    found: dict[str, type] = {"python": getattr(reference, name)}
    try:
        found["cython"] = getattr(importlib.import_module(module), name)
    except ImportError:
        pass
    return found
