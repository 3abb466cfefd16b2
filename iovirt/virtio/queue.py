"""The split virtqueue (device side), in its accelerated form unless told otherwise.

``SplitQueue`` is the Cython implementation from ``_queue_c`` when it is
built, else the reference from ``_queue_py``; ``IOVIRT_NO_EXTENSIONS=1``
forces the reference.  Both expose the same API:

- ``SplitQueue(memory, size, desc_addr, avail_addr, used_addr, *, index, event_idx,
  last_avail_idx, used_idx)``; ``SplitQueue.from_state(memory, QueueState)``;
  ``state()``; ``refresh()``; ``release()``
- ``pending()``, ``pop()``, ``pop_batch(max_chains)``, ``rewind(n)``, ``push(head, len)``,
  ``push_batch(batch)``
- ``need_notify()``, ``enable_notification()``, ``disable_notification()``
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from iovirt import _accel
from iovirt.virtio import _queue_py

__all__ = ["SplitQueue", "IMPLEMENTATION", "ChainBatch", "implementations"]

if TYPE_CHECKING or _accel.NO_EXTENSIONS:
    from iovirt.virtio._queue_py import IMPLEMENTATION, SplitQueue
    from iovirt.virtio.chain import ChainBatch
else:
    try:
        from iovirt.virtio._queue_c import IMPLEMENTATION, ChainBatch, SplitQueue
    except ImportError:
        if _accel.REQUIRE_EXTENSIONS:
            raise
        from iovirt.virtio._queue_py import IMPLEMENTATION, SplitQueue
        from iovirt.virtio.chain import ChainBatch


def implementations() -> dict[str, type]:
    """Every importable ``SplitQueue`` implementation by name (for tests and benchmarks)."""
    found: dict[str, type] = {"python": _queue_py.SplitQueue}
    try:
        from iovirt.virtio import _queue_c
    except ImportError:
        return found
    found["cython"] = _queue_c.SplitQueue
    return found
