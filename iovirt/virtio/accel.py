"""Loading the device data-path extensions (Cython), with the same rules as the queue's.

``load(name)`` imports ``iovirt.virtio.<name>`` unless ``IOVIRT_NO_EXTENSIONS=1``
forces the pure-Python paths; with ``IOVIRT_REQUIRE_EXTENSIONS=1`` a missing
extension is an import error instead of a silent fallback.  ``usable(queue)``
says whether a queue is the Cython one those paths work on.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from iovirt import _accel


def load(name: str) -> ModuleType | None:
    """The extension module ``iovirt.virtio.<name>``, or ``None`` for the Python path."""
    if _accel.NO_EXTENSIONS:
        return None
    try:
        return importlib.import_module(f"iovirt.virtio.{name}")
    except ImportError:
        if _accel.REQUIRE_EXTENSIONS:
            raise
        return None


def usable(queue: object) -> bool:
    """Whether ``queue`` is the Cython SplitQueue (the C data paths need its batches)."""
    try:
        from iovirt.virtio import _queue_c
    except ImportError:
        return False
    return isinstance(queue, _queue_c.SplitQueue)
