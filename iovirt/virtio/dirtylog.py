"""Dirty-page logging of device writes to guest memory (live migration).

A :class:`DirtyLog` is a bitmap over a writable buffer, one bit per 4 KiB
page of guest-physical address: bit ``page % 8`` of byte ``page // 8``
(vhost-user.rst "Migration", "Dirty page logging"; the same layout as the
kernel's vhost log of little-endian u64 words).  Whoever owns the buffer
(the vhost-user back-end maps the front-end's log fd) hands the log to the
queues with ``SplitQueue.set_dirty_log``; the ring code then marks the
pages of every device-writable buffer of a chain it returns through the
used ring, and the used ring itself, after the device wrote them.  Neither
the queues nor the devices know where the log came from.

Bits are set with an atomic OR (the C twin, ``_dirtylog_c``): the VMM clears
them concurrently.  The pure-Python fallback (``IOVIRT_NO_EXTENSIONS=1``)
does a read-modify-write of one byte under a lock: it cannot lose a bit set
by another thread of this process (they take the same lock), and a bit the
VMM cleared meanwhile may be set again, which only makes the VMM send a
page twice.
"""

from __future__ import annotations

import os
import threading
from typing import Callable

from iovirt import _accel

VHOST_LOG_PAGE = 0x1000  # vhost-user.rst "Migration": one bit per 4 KiB page
_PAGE_SHIFT = 12

_lock = threading.Lock()


def _mark_py(bitmap: memoryview, gpa: int, length: int) -> int:
    """Set the bits of ``[gpa, gpa+length)``; returns the pages beyond the bitmap (reference twin)."""
    if length <= 0:
        return 0
    first, last = gpa >> _PAGE_SHIFT, (gpa + length - 1) >> _PAGE_SHIFT
    size = len(bitmap)
    beyond = 0
    with _lock:
        for page in range(first, last + 1):
            byte = page >> 3
            if byte < size:
                bitmap[byte] |= 1 << (page & 7)
            else:
                beyond += 1
    return beyond


_ext = _accel.load("iovirt.virtio._dirtylog_c")
_mark: Callable[[memoryview, int, int], int] = _ext.mark if _ext is not None else _mark_py
IMPLEMENTATION = "cython" if _ext is not None else "python"


def log_bytes_needed(end: int) -> int:
    """Bytes of log a guest-physical address space ending (exclusive) at ``end`` needs."""
    pages = (end + VHOST_LOG_PAGE - 1) >> _PAGE_SHIFT
    return (pages + 7) >> 3


class DirtyLog:
    """One bit per 4 KiB guest-physical page over ``bitmap`` (a writable byte buffer).

    ``notify_fd``, if set, is an eventfd written after each batch of
    writes is logged (vhost-user ``SET_LOG_FD``).  ``beyond`` counts pages
    that lay past the end of the bitmap and could not be logged;
    ``unresolved`` counts written buffers whose guest-physical address could
    not be found (an IOMMU mapping gone meanwhile).  The owner of the
    buffer must take the log away from every queue (``set_dirty_log(None)``)
    before it releases the buffer.
    """

    def __init__(self, bitmap: memoryview, notify_fd: int | None = None) -> None:
        view = memoryview(bitmap).cast("B")
        if view.readonly:
            raise ValueError("a dirty log needs a writable buffer")
        self.bitmap = view
        self.notify_fd = notify_fd
        self.beyond = 0
        self.unresolved = 0

    @property
    def size(self) -> int:
        """Bytes in the bitmap."""
        return len(self.bitmap)

    def covers(self, end: int) -> bool:
        """Whether every page below guest-physical ``end`` has a bit."""
        return log_bytes_needed(end) <= self.size

    def mark(self, gpa: int, length: int) -> None:
        """Log a device write of ``length`` bytes at guest-physical ``gpa``."""
        beyond = _mark(self.bitmap, gpa, length)
        if beyond:
            self.beyond += beyond

    def is_dirty(self, gpa: int) -> bool:
        """Whether the page holding ``gpa`` is marked (for tests and tools)."""
        page = gpa >> _PAGE_SHIFT
        return (page >> 3) < self.size and bool(self.bitmap[page >> 3] >> (page & 7) & 1)

    def dirty_pages(self) -> list[int]:
        """Guest-physical addresses of every marked page, ascending."""
        data = bytes(self.bitmap)
        return [
            ((i << 3) + b) << _PAGE_SHIFT
            for i, byte in enumerate(data) if byte
            for b in range(8) if byte >> b & 1
        ]

    def notify(self) -> None:
        """A batch of writes is logged: signal ``notify_fd``, never blocking."""
        fd = self.notify_fd
        if fd is not None:
            try:
                os.eventfd_write(fd, 1)
            except OSError:
                pass  # a full counter: the reader has a pending notification already

    def release(self) -> None:
        """Drop the view of the buffer (every queue must have let the log go)."""
        self.bitmap.release()
