"""virtio-scsi's batch data path: the Cython twin where it can run, else the Python reference.

``_datapath_c`` (Cython) and ``_datapath_py`` (the readable reference) serve
the READ/WRITE(10/16) commands of a popped batch that end GOOD with the same
results; :mod:`iovirt._accel` decides whether the C one loads (``accel`` is
it, or ``None``).  The C twin reads the Cython queue's flat batches, so it
runs only on such a queue (:func:`~iovirt.virtio.queue.is_accelerated`);
with the reference queue the Python twin runs even when the extension is
built.
"""

from __future__ import annotations

from typing import Any, Sequence

from iovirt import _accel
from iovirt.virtio.queue import is_accelerated, ring_of
from iovirt.virtio.scsi import _datapath_py
from iovirt.virtio.scsi._datapath_py import LunInfo

__all__ = ["IMPLEMENTATION", "LunInfo", "accel", "serve_batch"]

accel: Any = _accel.load("iovirt.virtio.scsi._datapath_c")
IMPLEMENTATION = "cython" if accel is not None else "python"


def serve_batch(
    batch: Any, queue: Any, luns: Sequence[LunInfo], sense_size: int, cdb_size: int
) -> tuple[list[int], int, int, int, int]:
    """Serve the READ/WRITE(10/16) commands of ``batch`` that end GOOD, on ``luns`` (a tuple, LUN ``i`` at ``i``).

    Returns ``(left, reads, writes, read_bytes, written_bytes)``: ``left``
    lists the chains for the device (other commands, and every command that
    does not end GOOD).  The C twin leaves unusual layouts and buffers
    without a host pointer too; the reference serves those.
    """
    ring = ring_of(queue)  # serving pops and pushes nothing: the queue beneath any wrapper will do
    if accel is None or not is_accelerated(ring):
        return _datapath_py.serve_batch(batch, queue, luns, sense_size, cdb_size)
    left, *counts = accel.serve_batch(batch, ring, luns, sense_size, cdb_size)
    if left:
        left, *more = _datapath_py.serve_batch(batch, queue, luns, sense_size, cdb_size, left)
        counts = [a + b for a, b in zip(counts, more)]
    return (left, *counts)  # type: ignore[return-value]
