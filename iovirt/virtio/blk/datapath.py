"""virtio-blk's batch data path: the C twin where it runs, else the Python reference.

``_datapath_c.pyx`` and ``_datapath_py.py`` implement the same engine of
asynchronous block I/O (:mod:`iovirt.virtio.blk.aio`) and are run by the
same tests; :mod:`iovirt._accel` decides whether the C one loads (``accel``
is it, or ``None``).  The C twin reads the Cython queue's flat batches, so
it runs only on such a queue (:func:`~iovirt.virtio.queue.is_accelerated`);
with the reference queue the Python twin runs even when the extension is
built.  A device keeps one engine per twin it meets (:func:`engine_key`).
"""

from __future__ import annotations

import os
from typing import Any

from iovirt import _accel
from iovirt.virtio.blk import _datapath_py
from iovirt.virtio.blk.aio import ENGINE_ENV, Image, ImageHook
from iovirt.virtio.queue import IMPLEMENTATION as QUEUE_IMPLEMENTATION
from iovirt.virtio.queue import is_accelerated, ring_of

__all__ = ["IMPLEMENTATION", "accel", "default_key", "default_kind", "engine_key", "memory_backed", "engine_report", "new_engine", "submit", "serve_batch", "uring_built"]

accel: Any = _accel.load("iovirt.virtio.blk._datapath_c")
IMPLEMENTATION = "cython" if accel is not None else "python"


def uring_built() -> bool:
    """Whether the C twin is loaded and was built with liburing."""
    return accel is not None and bool(accel.URING_BUILT)


def engine_key(queue: Any) -> str:
    """Which twin serves ``queue``: ``"cython"`` or ``"python"``."""
    return "cython" if accel is not None and is_accelerated(ring_of(queue)) else "python"


def default_key() -> str:
    """The twin a queue of this process gets (:func:`engine_key`): the C one on the Cython queue."""
    return "cython" if accel is not None and QUEUE_IMPLEMENTATION == "cython" else "python"


def memory_backed(fd: int) -> bool:
    """Whether ``fd``'s file lives in memory (tmpfs, ramfs, hugetlbfs); False without the C twin."""
    return accel is not None and bool(accel.memory_backed(fd))


def fully_allocated(fd: int) -> bool:
    """Whether ``fd``'s file has every block of its size allocated (no holes): the inline engine maps only such.

    A hole read through a mapping is given a page of memory, where ``preadv``
    gives zeros and allocates nothing: a sparse image in memory stays sparse.
    """
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return st.st_blocks * 512 >= st.st_size  # st_blocks counts 512-byte units (stat(2))


INLINE = "inline"
"""The engine kind that does each request at submission: it never signals ``wake_fd``."""


def default_kind(key: str, in_memory: bool, hook: ImageHook | None) -> str | None:
    """The engine kind a device picks when not told: ``"inline"`` for an image in memory, else the default.

    On tmpfs (ramfs, hugetlbfs) a read or write is a copy that never waits
    for a device, and io_uring punts it to its worker threads (the file
    system does not take non-blocking reads), so the round trip costs more
    than the copy: 4 KiB random reads at QD32 went from 230,000 to 320,000
    requests/s in ``benchmarks/vhost_user.py --only blk``.  ``IOVIRT_BLK_ENGINE``
    and a latency hook (which needs a real engine to wait in) keep the default.
    """
    if key != "cython" or os.environ.get(ENGINE_ENV) or (hook is not None and hook.delay):
        return None
    return INLINE if in_memory else None


def new_engine(key: str, wake_fd: int, slots: int, hook: ImageHook | None, kind: str | None = None) -> Any:
    """An engine of twin ``key`` (:func:`engine_key`) that signals ``wake_fd``, for ``slots`` requests in flight."""
    if key == "cython":
        return accel.Engine(wake_fd, slots, hook, kind)
    return _datapath_py.Engine(wake_fd, slots, hook, kind)


def submit(engine: Any, batch: Any, index: int, queue: Any, image: Image) -> tuple[list[int], int, int, int, int]:
    """Start the IN/OUT/FLUSH requests of ``batch`` of queue ``index`` on ``engine``.

    Returns ``(left, nbytes, reads, writes, flushes)``: ``left`` lists the
    chains for the device (other request types, malformed chains, and for
    the C twin unusual layouts and buffers without a host pointer, which the
    device serves with :func:`serve_batch`).
    """
    if isinstance(engine, _datapath_py.Engine):
        return engine.submit(batch, index, queue.memory, image)
    return engine.submit(batch, index, image.fd, image.direct_fd, image.capacity, image.read_only)  # type: ignore[no-any-return]


serve_batch = _datapath_py.serve_batch


def engine_report() -> tuple[str, str]:
    """``(engine, why)``: which engine a blk device of this process runs its image I/O on (``iovirt info``).

    Tries it: io_uring may be compiled in and still refused by the kernel.
    """
    wake_fd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        engine = new_engine(default_key(), wake_fd, 1, None)
        engine.close()
        return engine.kind, engine.reason
    finally:
        os.close(wake_fd)
