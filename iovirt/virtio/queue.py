"""The split and packed virtqueues (device side), in their accelerated form unless told otherwise.

``SplitQueue`` is the Cython implementation from ``_queue_c`` when it is
built, else the reference from ``_queue_py``; ``IOVIRT_NO_EXTENSIONS=1``
forces the reference.  Both expose the same API:

- ``SplitQueue(memory, size, desc_addr, avail_addr, used_addr, *, index, event_idx,
  last_avail_idx, used_idx, in_order)``; ``SplitQueue.from_state(memory, QueueState)``;
  ``state()``; ``refresh()``; ``release()``
- ``pending()``, ``pop()``, ``pop_batch(max_chains)``, ``rewind(n)``, ``push(head, len)``,
  ``push_batch(batch, coalesce=False)``; ``resubmit(heads)`` (walk given heads again: inflight resubmission)
- ``in_order`` (VIRTIO_F_IN_ORDER, 2.7.9 / 2.8.8): pushes must follow pop order
  (:class:`~iovirt.virtio.errors.UsedOrderError`), and ``push_batch(batch, coalesce=True)``
  returns a run of chains used whole through one used entry
- ``need_notify()``, ``enable_notification()``, ``disable_notification()``

``PackedQueue`` (virtio 1.2 section 2.8; ``_packed_c`` or ``_packed_py``) has
the same API, except that ``resubmit(lists)`` takes the saved ring descriptors
of each list (a packed ring's lists may be overwritten in the ring); its
chains' ``head`` is the Buffer ID, its ``avail_addr``/``used_addr`` the
Driver/Device Event Suppression areas.  A transport picks one with
:func:`queue_class`; the Cython twins share a C base (``_queue_c.Virtqueue``)
that the C device data paths take, so both ring layouts run them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from iovirt import _accel
from iovirt.virtio import _packed_py, _queue_py

__all__ = [
    "SplitQueue", "PackedQueue", "IMPLEMENTATION", "ChainBatch", "implementations", "packed_implementations",
    "is_accelerated", "queue_class", "QueueWrapper", "ring_of",
]

if TYPE_CHECKING:
    from iovirt.virtio._packed_py import PackedQueue
    from iovirt.virtio._queue_py import IMPLEMENTATION, SplitQueue
    from iovirt.virtio.chain import ChainBatch

    _ACCELERATED: tuple[type, ...]
else:
    _impl = _accel.load("iovirt.virtio._queue_c") or _queue_py
    # The reference batches in chain.ChainBatch; the accelerated queue has its own.
    IMPLEMENTATION, SplitQueue, ChainBatch = _impl.IMPLEMENTATION, _impl.SplitQueue, _impl.ChainBatch
    # The accelerated packed queue fills the accelerated split queue's ChainBatch.
    PackedQueue = (_accel.load("iovirt.virtio._packed_c") or _packed_py).PackedQueue
    # The Cython split and packed queues share this C base, which the C device data paths take.
    _ACCELERATED = (_impl.Virtqueue,) if IMPLEMENTATION == "cython" else ()


def implementations() -> dict[str, type]:
    """Every importable ``SplitQueue`` implementation by name (for tests and benchmarks)."""
    return _accel.implementations("iovirt.virtio._queue_c", _queue_py, "SplitQueue")


def packed_implementations() -> dict[str, type]:
    """Every importable ``PackedQueue`` implementation by name (for tests and benchmarks)."""
    return _accel.implementations("iovirt.virtio._packed_c", _packed_py, "PackedQueue")


def is_accelerated(queue: object) -> bool:
    """Whether ``queue`` is a Cython queue (split or packed), whose flat batches the C device data paths read."""
    return isinstance(queue, _ACCELERATED)


def queue_class(packed: bool) -> "type[SplitQueue] | type[PackedQueue]":
    """The queue a transport starts: ``PackedQueue`` with VIRTIO_F_RING_PACKED negotiated, else ``SplitQueue``."""
    return PackedQueue if packed else SplitQueue


class QueueWrapper:
    """Base of the wrappers a transport puts around a device's queue (same API; ``inner`` is the queue).

    The transport's bookkeeping runs in the wrapper's pops and pushes (e.g.
    vhost-user inflight tracking), so a device must pop and push through the
    queue it was given.  Work on a popped batch that neither pops nor pushes
    may use :func:`ring_of` to reach the queue beneath.
    """

    inner: SplitQueue


def ring_of(queue: object) -> object:
    """The queue beneath any :class:`QueueWrapper` around ``queue``."""
    while isinstance(queue, QueueWrapper):
        queue = queue.inner
    return queue
