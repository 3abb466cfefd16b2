"""Dirty-page logging through the real server (vhost-user.rst "Migration", "Dirty page logging").

iovirt's front-end turns logging on as QEMU does (SET_LOG_BASE, SET_FEATURES
with VHOST_F_LOG_ALL, SET_VRING_ADDR with VHOST_VRING_F_LOG); the pages of
the buffers the device wrote, and of the used rings, must then be set in the
shared log, and no others; with a vIOMMU too.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading

import pytest

from iovirt.vhost_user import bringup
from iovirt.vhost_user.driver import IOVA_BASE, VhostUserDriver
from iovirt.vhost_user.errors import NackError
from iovirt.vhost_user.messages import VHOST_F_LOG_ALL, Log, ProtocolFeature as PF
from iovirt.vhost_user.server import VhostUserServer
from iovirt.virtio.blk.defs import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from iovirt.virtio.blk.device import VirtioBlk
from iovirt.virtio.defs import used_ring_size
from iovirt.virtio.net.defs import NetHdr
from iovirt.virtio.net.device import VirtioNet
from iovirt.virtio.net.switch import LearningSwitch

from backend_helpers import log_line, wait_until

PAGE = 4096
HDR = 12
MAC = [bytes([0x02, 0, 0, 0, 0x1D, i]) for i in range(2)]


class LogBackend:
    """Two net ports and a blk device, with or without ACCESS_PLATFORM offered."""

    def __init__(self, tmp, iommu: bool) -> None:
        self.switch = LearningSwitch()
        self.server = VhostUserServer()
        self.net = [VirtioNet(MAC[i], self.switch, label=f"net{i}") for i in range(2)]
        self.net_paths = [str(tmp / f"net{i}.sock") for i in range(2)]
        for dev, path in zip(self.net, self.net_paths):
            self.server.add_socket(path, dev, name=dev.label, iommu=iommu)
        self.blk = VirtioBlk(str(tmp / "disk.img"), size=1 << 20, label="blk0")
        self.blk_path = str(tmp / "blk.sock")
        self.server.add_socket(self.blk_path, self.blk, name="blk0", iommu=iommu)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(timeout=10)
        self.blk.close()


@pytest.fixture(params=[False, True], ids=["gpa", "viommu"])
def backend(request, tmp_path):
    b = LogBackend(tmp_path, request.param)
    b.iommu = request.param
    yield b
    b.stop()


@pytest.fixture
def plain(tmp_path):
    b = LogBackend(tmp_path, False)
    yield b
    b.stop()


def driver(path: str, iommu: bool = False, queues=(0, 1)) -> VhostUserDriver:
    drv = VhostUserDriver(path, memory_size=4 << 20, iommu=iommu)
    drv.start_queues(list(queues), size=16)
    return drv


def gpa(drv: VhostUserDriver, addr: int) -> int:
    return addr - IOVA_BASE if drv.iommu is not None else addr


def dirty(log) -> set[int]:
    return {((i << 3) + b) * PAGE for i, byte in enumerate(bytes(log)) if byte for b in range(8) if byte >> b & 1}


def page_set(drv, addr: int, length: int) -> set[int]:
    lo, hi = gpa(drv, addr) // PAGE, (gpa(drv, addr) + length - 1) // PAGE
    return {p * PAGE for p in range(lo, hi + 1)}


def used_pages(drv) -> set[int]:
    out: set[int] = set()
    for q in drv.queues.values():
        out |= page_set(drv, q.used_addr, used_ring_size(q.size))
    return out


def wait_used(drv, q: int, count: int) -> None:
    queue = drv.queues[q]
    if drv.iommu is not None:
        assert drv.iommu.serve_until(lambda: queue.used_idx() >= count)
    else:
        assert wait_until(lambda: queue.used_idx() >= count)


def test_net_rx_buffers_and_used_ring_are_logged(backend):
    iommu = backend.iommu
    a, b = driver(backend.net_paths[0], iommu), driver(backend.net_paths[1], iommu)
    try:
        log = b.start_logging()
        assert dirty(log) <= used_pages(b)  # the rings restarted: only used-ring writes so far
        log[:] = bytes(len(log))
        rx = b.queues[0]
        bufs = [b.alloc.alloc(PAGE, PAGE) for _ in range(2)]
        for addr in bufs:
            rx.add_chain(writable=[(addr, PAGE)])
        b.kick(0)
        frame = b"\xff" * 6 + MAC[0] + b"\x88\xb5" + bytes(50)
        a.queues[1].add_data([NetHdr().pack() + frame])
        a.kick(1)
        wait_used(b, 0, 1)
        (used,) = rx.get_used()
        assert used.data[HDR:] == frame
        pages = dirty(log)
        # The buffer the frame went into and the used rings; not the buffer still posted.
        assert page_set(b, bufs[0], PAGE) <= pages
        assert page_set(b, rx.used_addr, used_ring_size(rx.size)) <= pages
        assert pages <= page_set(b, bufs[0], PAGE) | used_pages(b)
        b.stop_logging()
        log[:] = bytes(len(log))
        a.queues[1].add_data([NetHdr().pack() + frame])
        a.kick(1)
        wait_used(b, 0, 2)
        assert not dirty(log)  # logging is off again
    finally:
        a.close()
        b.close()


def test_blk_in_buffers_are_logged_and_out_buffers_are_not(backend):
    drv = driver(backend.blk_path, backend.iommu, queues=[0])
    try:
        log = drv.start_logging()
        q = drv.queues[0]
        hdr = drv.alloc.alloc(PAGE, PAGE)
        data = drv.alloc.alloc(2 * PAGE, PAGE)
        status = drv.alloc.alloc(PAGE, PAGE)
        drv.memory.write(hdr, struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, 8))
        drv.memory.write(data, os.urandom(2 * PAGE))
        q.add_chain(readable=[(hdr, 16), (data, 2 * PAGE)], writable=[(status, 1)])
        drv.kick(0)
        wait_used(drv, 0, 1)
        assert q.get_used()[0].data == bytes([VIRTIO_BLK_S_OK])
        assert dirty(log) <= page_set(drv, status, 1) | used_pages(drv)
        assert not dirty(log) & page_set(drv, data, 2 * PAGE)
        drv.memory.write(hdr, struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 8))
        q.add_chain(readable=[(hdr, 16)], writable=[(data, 2 * PAGE), (status, 1)])
        drv.kick(0)
        wait_used(drv, 0, 2)
        assert q.get_used()[0].data[-1] == VIRTIO_BLK_S_OK
        expected = page_set(drv, data, 2 * PAGE) | page_set(drv, status, 1)
        assert expected | page_set(drv, q.used_addr, used_ring_size(q.size)) <= dirty(log)
        assert dirty(log) <= expected | used_pages(drv)
    finally:
        drv.close()


# -- bad input -----------------------------------------------------------------------------


def memfd(size: int) -> int:
    fd = os.memfd_create("test-log", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def test_log_smaller_than_the_memory_map_is_refused(plain, logs):
    drv = driver(plain.blk_path, queues=[0])
    fd = memfd(PAGE)
    try:
        # 4 MiB of guest memory needs 1024 pages: 128 bytes of log.
        with pytest.raises(NackError):
            drv.frontend.set_log_base(Log(127, 0), fd)
        assert "too small" in log_line(logs, "SET_LOG_BASE", "127 bytes")
        drv.frontend.set_log_base(Log(128, 0), fd)  # the connection still works, and the right size is taken
    finally:
        os.close(fd)
        drv.close()


def test_log_base_beyond_the_fd_is_refused(plain, logs):
    drv = driver(plain.blk_path, queues=[0])
    fd = memfd(PAGE)
    try:
        with pytest.raises(NackError):
            drv.frontend.set_log_base(Log(PAGE, PAGE), fd)
        log_line(logs, "SET_LOG_BASE", "cannot map the log")
        with pytest.raises(NackError):
            drv.frontend.set_log_base(Log(1 << 62, 0), fd)
    finally:
        os.close(fd)
        drv.close()


def test_log_base_without_log_shmfd_is_refused(plain, logs):
    drv = VhostUserDriver(plain.blk_path, memory_size=4 << 20,
                          protocol_features=~(1 << PF.VHOST_USER_PROTOCOL_F_LOG_SHMFD) & ((1 << 64) - 1))
    fd = memfd(PAGE)
    try:
        with pytest.raises(NackError):
            drv.frontend.set_log_base(Log(PAGE, 0), fd)
        log_line(logs, "SET_LOG_BASE", "LOG_SHMFD was not negotiated")
    finally:
        os.close(fd)
        drv.close()


def test_log_all_without_a_log_holds_the_rings_until_set_log_base(plain, logs):
    """QEMU may send SET_FEATURES(LOG_ALL) before SET_LOG_BASE (a device restarted while migrating):
    accepted, but no ring writes guest memory until there is a log to record it in."""
    drv = driver(plain.blk_path, queues=[0])
    try:
        drv.frontend.set_features(drv.frontend.features | 1 << VHOST_F_LOG_ALL)
        log_line(logs, "VHOST_F_LOG_ALL is on and there is no log")
        q = drv.queues[0]
        q.add_data([struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0)], [512, 1])
        drv.kick(0)
        assert not drv.frontend.wait_call(0, timeout=0.3) and q.used_idx() == 0
        fd, size = bringup.make_log(drv.frontend)
        try:
            drv.frontend.set_log_base(Log(size, 0), fd)
            wait_used(drv, 0, 1)
            log = memoryview(bytearray(os.pread(fd, size, 0)))
        finally:
            os.close(fd)
        (used,) = q.get_used()
        assert used.data[-1] == VIRTIO_BLK_S_OK
        assert dirty(log)  # the request's buffers, logged
    finally:
        drv.close()


def test_set_log_fd_is_signalled_after_logged_writes(plain):
    """SET_LOG_FD: the back-end writes the eventfd once a batch of writes is logged; never otherwise."""
    drv = driver(plain.blk_path, queues=[0])
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        drv.frontend.set_log_fd(os.dup(efd))
        log = drv.start_logging()
        with pytest.raises(BlockingIOError):  # nothing written to guest memory yet
            os.eventfd_read(efd)
        q = drv.queues[0]
        q.add_data([struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0)], [512, 1])
        drv.kick(0)
        wait_used(drv, 0, 1)
        assert dirty(log)
        assert wait_until(lambda: _eventfd_count(efd) > 0)
        drv.stop_logging()
        q.add_data([struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0)], [512, 1])
        drv.kick(0)
        wait_used(drv, 0, 2)
        assert _eventfd_count(efd) == 0  # logging is off: no signal
    finally:
        os.close(efd)
        drv.close()


def test_set_log_fd_that_is_not_an_eventfd_is_refused(plain, logs):
    drv = driver(plain.blk_path, queues=[0])
    r, w = os.pipe()
    try:
        with pytest.raises(NackError):
            drv.frontend.set_log_fd(r)
        log_line(logs, "SET_LOG_FD")
        log = drv.start_logging()  # the session goes on
        assert isinstance(log, mmap.mmap)
    finally:
        os.close(w)
        drv.close()


def _eventfd_count(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0
