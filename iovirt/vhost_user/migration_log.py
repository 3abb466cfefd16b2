"""The shared dirty-page log of one session (vhost-user.rst "Migration", "Dirty page logging").

The front-end hands over the log with SET_LOG_BASE (an fd, its size and
offset; LOG_SHMFD) and may name an eventfd with SET_LOG_FD.  This module
maps the log, checks it against the memory table, and installs it on the
vrings as a :class:`~iovirt.virtio.dirtylog.DirtyLog`; VHOST_F_LOG_ALL
(negotiated in SET_FEATURES) turns the logging itself on and off there.
"""

from __future__ import annotations

import logging
import os

from iovirt.memory import GuestMemoryError, MemoryRegion
from iovirt.vhost_user.errors import RequestRefused
from iovirt.vhost_user.fds import close_fds
from iovirt.vhost_user.memtable import GuestMemoryTable, MemoryTableError
from iovirt.vhost_user.messages import FrontendRequest as R
from iovirt.vhost_user.vrings import Vrings, take_eventfd
from iovirt.virtio.dirtylog import DirtyLog, log_bytes_needed

log = logging.getLogger("iovirt.vhost_user")


class MigrationLog:
    """SET_LOG_BASE and SET_LOG_FD for one session's memory table and vrings."""

    def __init__(self, label: str, table: GuestMemoryTable, vrings: Vrings) -> None:
        self.label = label
        self.table = table
        self.vrings = vrings
        self.region: MemoryRegion | None = None  # SET_LOG_BASE's mapping
        self.fd: int | None = None  # SET_LOG_FD's eventfd

    def memory_end(self) -> int:
        """The end of the highest guest-physical region (the log needs a bit per page below it)."""
        regions = self.table.memory.regions
        return regions[-1].end if regions else 0

    def check_coverage(self) -> None:
        """After a memory-table change: warn if the log no longer covers guest memory."""
        dirty_log = self.vrings.dirty_log
        if dirty_log is not None and not dirty_log.covers(self.memory_end()):
            # QEMU sends a larger log (SET_LOG_BASE) after growing its memory map.
            log.warning("%s: the dirty log (%d bytes) no longer covers guest memory (needs %d) until the next "
                        "SET_LOG_BASE: writes above it are not logged", self.label, dirty_log.size,
                        log_bytes_needed(self.memory_end()))

    def set_base(self, mmap_size: int, mmap_offset: int, fd: int) -> None:
        """Map the shared log; it replaces the previous one (QEMU resizes the log this way).

        Takes ``fd`` over (closes it once mapped) only if the log is accepted.
        """
        needed = log_bytes_needed(self.memory_end())
        if mmap_size < needed:
            raise RequestRefused(
                R.VHOST_USER_SET_LOG_BASE, f"log of {mmap_size} bytes is too small for guest memory up to "
                f"{self.memory_end():#x}: one bit per 4 KiB page needs {needed} bytes"
            )
        try:
            region = MemoryRegion.from_fd(0, mmap_size, fd, mmap_offset)
        except GuestMemoryError as exc:
            raise RequestRefused(R.VHOST_USER_SET_LOG_BASE, f"cannot map the log: {exc}") from exc
        try:
            self.table.seals.admit(region.fd_info, fd, "dirty log")
        except MemoryTableError as exc:
            region.close()
            raise RequestRefused(R.VHOST_USER_SET_LOG_BASE, str(exc)) from exc
        os.close(fd)  # the mapping keeps the memory
        old_region, old_log = self.region, self.vrings.dirty_log
        self.region = region
        self.vrings.set_logging(self.vrings.log_all, DirtyLog(region.view, self.fd))
        if old_log is not None:
            old_log.release()
        if old_region is not None:
            old_region.close()
        log.info("%s: dirty log of %d bytes at offset %#x", self.label, mmap_size, mmap_offset)

    def set_fd(self, fd: int) -> None:
        """The eventfd the back-end writes after logging a batch of writes; taken over."""
        take_eventfd(fd)
        close_fds([self.fd])
        self.fd = fd
        if self.vrings.dirty_log is not None:
            self.vrings.dirty_log.notify_fd = fd

    def drop(self) -> None:
        """Stop logging and unmap the log (the session ends)."""
        dirty_log = self.vrings.dirty_log
        self.vrings.set_logging(False, None)
        if dirty_log is not None:
            if dirty_log.beyond or dirty_log.unresolved:
                log.warning("%s: dirty log: %d pages beyond the log and %d buffers without a guest-physical "
                            "address were not logged", self.label, dirty_log.beyond, dirty_log.unresolved)
            dirty_log.release()
        if self.region is not None:
            self.region.close()
            self.region = None
        close_fds([self.fd])
        self.fd = None
