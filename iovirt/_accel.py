"""Which implementation of the accelerated parts runs, why, and whether it must.

Every hot part is a Cython extension ``_x_c`` with a pure-Python reference
twin ``_x_py``; the module ``x`` picks one with :func:`load` (for example
:mod:`iovirt.virtio.queue` over ``_queue_c`` / ``_queue_py``).  :data:`PARTS`
names every such extension.  ``IOVIRT_NO_EXTENSIONS=1`` forces the
references everywhere.  ``IOVIRT_REQUIRE_EXTENSIONS=1`` (set by the test
runner and CI) turns an extension that failed to load into an error instead
of a silent fallback (the yarl/multidict guard).  :func:`load` is the one
place that rule lives, and it records what it chose and why, which
``iovirt info`` prints (:func:`report`).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from types import ModuleType

NO_EXTENSIONS = os.environ.get("IOVIRT_NO_EXTENSIONS", "") not in ("", "0")
REQUIRE_EXTENSIONS = os.environ.get("IOVIRT_REQUIRE_EXTENSIONS", "") not in ("", "0")

#: Why the reference runs when the environment asks for it.
REASON_DISABLED = "IOVIRT_NO_EXTENSIONS is set"
#: Why the extension runs.
REASON_LOADED = "compiled extension loaded"


@dataclass(frozen=True)
class Part:
    """One accelerated part: what it is, and its compiled extension's module name."""

    name: str
    module: str


#: Every accelerated part, in the order ``iovirt info`` lists them.
PARTS: tuple[Part, ...] = (
    Part("split ring", "iovirt.virtio._queue_c"),
    Part("packed ring", "iovirt.virtio._packed_c"),
    Part("IOTLB cache", "iovirt.virtio._iotlb_c"),
    Part("net data path", "iovirt.virtio.net._datapath_c"),
    Part("blk data path", "iovirt.virtio.blk._datapath_c"),
    Part("scsi data path", "iovirt.virtio.scsi._datapath_c"),
    Part("VT-d page walk", "iovirt.vtd._walk_c"),
    Part("VT-d miss handler", "iovirt.vtd._dma_c"),
    Part("dirty-page log", "iovirt.virtio._dirtylog_c"),
    Part("bench raw path", "iovirt.bench._rawpath_c"),
    Part("worker hand-off ring", "iovirt.vhost_user._handoff_c"),
    Part("worker kick loop", "iovirt.vhost_user._kickloop_c"),
)


@dataclass(frozen=True)
class Choice:
    """What :func:`load` chose for one extension: ``"cython"`` or ``"python"`` (see :func:`report`), and why."""

    module: str
    implementation: str
    reason: str


_choices: dict[str, Choice] = {}


def _try(module: str) -> tuple[ModuleType | None, Choice, ImportError | None]:
    """Import ``module`` unless the environment forbids it; the ImportError is returned, not raised."""
    if NO_EXTENSIONS:
        return None, Choice(module, "python", REASON_DISABLED), None
    try:
        ext = importlib.import_module(module)
    except ImportError as exc:
        return None, Choice(module, "python", f"ImportError: {exc}"), exc
    return ext, Choice(module, "cython", REASON_LOADED), None


def load(module: str) -> ModuleType | None:
    """The extension ``module`` (a dotted name), or ``None`` when the reference must run.

    Records the choice and its reason for :func:`report`.  Raises the
    ImportError when ``IOVIRT_REQUIRE_EXTENSIONS`` is set.
    """
    ext, choice, error = _try(module)
    _choices[module] = choice
    if error is not None and REQUIRE_EXTENSIONS:
        raise error
    return ext


def report() -> list[tuple[Part, Choice]]:
    """Every part of :data:`PARTS` with the implementation that runs and why.

    A part whose selector has not run yet in this process is probed now
    under the same rules, without raising: one that would raise (required
    but not importable) runs ``"nothing"``.
    """
    rows = []
    for part in PARTS:
        choice = _choices.get(part.module)
        if choice is None:
            _, choice, error = _try(part.module)
            if error is not None and REQUIRE_EXTENSIONS:
                choice = Choice(part.module, "nothing", f"IOVIRT_REQUIRE_EXTENSIONS is set and {choice.reason}")
        rows.append((part, choice))
    return rows


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
