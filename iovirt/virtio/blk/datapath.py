"""virtio-blk's batch data path: the Cython twin where it can run, else the Python reference.

``_datapath_c`` (Cython) and ``_datapath_py`` (the readable reference) serve
the IN, OUT and FLUSH requests of a popped batch with the same results;
:mod:`iovirt._accel` decides whether the C one loads (``accel`` is it, or
``None``).  The C twin reads the Cython queue's flat batches, so it runs only
on such a queue (:func:`~iovirt.virtio.queue.is_accelerated`); with the
reference queue the Python twin runs even when the extension is built.
"""

from __future__ import annotations

from typing import Any

from iovirt import _accel
from iovirt.virtio.blk import _datapath_py
from iovirt.virtio.queue import is_accelerated, ring_of

__all__ = ["IMPLEMENTATION", "accel", "serve_batch"]

accel: Any = _accel.load("iovirt.virtio.blk._datapath_c")
IMPLEMENTATION = "cython" if accel is not None else "python"


def serve_batch(
    batch: Any, queue: Any, fd: int, capacity: int, read_only: bool
) -> tuple[list[int], int, int, int, int, int, int]:
    """Serve the IN/OUT/FLUSH requests of ``batch`` on image ``fd`` (``capacity`` in sectors).

    Returns ``(left, read_bytes, written_bytes, flushes, errors, reads, writes)``:
    ``left`` lists the chains for the device (other request types, malformed
    chains); ``reads`` and ``writes`` count the IN and OUT requests served.
    The C twin leaves unusual layouts and buffers without a host pointer
    too; the reference serves those.
    """
    ring = ring_of(queue)  # serving pops and pushes nothing: the queue beneath any wrapper will do
    if accel is None or not is_accelerated(ring):
        return _datapath_py.serve_batch(batch, queue, fd, capacity, read_only)
    left, *counts = accel.serve_batch(batch, ring, fd, capacity, read_only)
    if left:
        left, *more = _datapath_py.serve_batch(batch, queue, fd, capacity, read_only, left)
        counts = [a + b for a, b in zip(counts, more)]
    return (left, *counts)  # type: ignore[return-value]
