"""The accelerated queue must be what runs by default (no silent fallback)."""

from iovirt import _accel
from iovirt.virtio import queue


def test_cython_queue_is_default():
    if _accel.NO_EXTENSIONS:
        assert queue.IMPLEMENTATION == "python"
        return
    assert queue.IMPLEMENTATION == "cython", "compiled extension expected but the pure-Python queue was loaded"
    assert "cython" in queue.implementations()
