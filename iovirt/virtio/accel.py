"""Whether a queue can feed the C device data paths (net, blk).

Those paths read a popped batch's flat arrays, so they need the Cython
:class:`~iovirt.virtio._queue_c.SplitQueue`; with the reference queue the
devices' Python paths run.  Which extensions load is :mod:`iovirt._accel`'s rule.
"""

from __future__ import annotations


def usable(queue: object) -> bool:
    """Whether ``queue`` is the Cython SplitQueue."""
    try:
        from iovirt.virtio import _queue_c
    except ImportError:
        return False
    return isinstance(queue, _queue_c.SplitQueue)
