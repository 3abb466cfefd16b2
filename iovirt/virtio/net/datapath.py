"""Which virtio-net data path runs: the Cython batch path unless told otherwise.

``accel`` is the ``_datapath`` extension, or ``None`` when the per-frame
Python path in ``device.py`` (the reference) runs; see :mod:`iovirt._accel`.
"""

from __future__ import annotations

from iovirt import _accel
from iovirt.virtio import accel as _loader

accel = _accel.load("iovirt.virtio.net._datapath")
IMPLEMENTATION = "cython" if accel is not None else "python"


def accelerated_queue(queue: object) -> bool:
    """Whether the C data path can work on ``queue``."""
    return accel is not None and _loader.usable(queue)
