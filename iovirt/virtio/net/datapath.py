"""Which virtio-net data path runs: the Cython batch path unless told otherwise.

``accel`` is the ``_datapath`` extension module, or ``None`` when it is not
built or ``IOVIRT_NO_EXTENSIONS=1`` forces the pure-Python per-frame path in
``device.py`` (the reference).  ``IOVIRT_REQUIRE_EXTENSIONS=1`` makes a
missing extension an import error.
"""

from __future__ import annotations

from types import ModuleType

from iovirt import _accel

accel: ModuleType | None = None
if not _accel.NO_EXTENSIONS:
    try:
        from iovirt.virtio.net import _datapath as accel
    except ImportError:
        if _accel.REQUIRE_EXTENSIONS:
            raise

IMPLEMENTATION = "cython" if accel is not None else "python"


def accelerated_queue(queue: object) -> bool:
    """Whether ``queue`` is one the C data path can work on (the Cython SplitQueue)."""
    if accel is None:
        return False
    from iovirt.virtio import _queue_c

    return isinstance(queue, _queue_c.SplitQueue)
