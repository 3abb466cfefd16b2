"""The hand-off ring between data-plane workers: the Cython twin where it can run, else the reference.

A frame switched from a port served by one worker to a port served by
another does not take the other worker's lock: the sending worker pushes the
work onto a single-producer, single-consumer ring that only the receiving
worker pops (:meth:`~iovirt.vhost_user.dataplane.DataPlane.post`).  One ring
per (producer, consumer) pair of workers keeps every ring single-producer.
"""

from __future__ import annotations

from typing import Any

from iovirt import _accel
from iovirt.vhost_user import _handoff_py

__all__ = ["FULL", "IMPLEMENTATION", "PUSHED", "WAS_EMPTY", "HandoffRing"]

accel: Any = _accel.load("iovirt.vhost_user._handoff_c")
IMPLEMENTATION = "cython" if accel is not None else "python"

HandoffRing: Any = accel.HandoffRing if accel is not None else _handoff_py.HandoffRing
FULL = _handoff_py.FULL
PUSHED = _handoff_py.PUSHED
WAS_EMPTY = _handoff_py.WAS_EMPTY
