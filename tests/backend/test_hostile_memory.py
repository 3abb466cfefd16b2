"""Hostile guest memory and inflight fds (issue 12, failures 1, 2, 7 and 8).

A front-end chooses the fds the back-end maps and can change them afterwards.
A mapping that reaches past the end of its file raises SIGBUS at the first
access, which kills the whole process; so the tests that could fault run the
back-end as a real ``iovirt serve`` process and check that it is still alive
and still serving a new front-end afterwards, and that its log has no
traceback.  Policy tests (which never map a hostile fd) run in this process.

Failure 1: ``/dev/zero`` (a shared mapping of it is only as long as the
mapping) with a non-zero offset, or any file shorter than offset + size, in
SET_MEM_TABLE, ADD_MEM_REG and SET_INFLIGHT_FD.  Failure 2: a memfd shrunk
after it was mapped (sealed memfds accepted, unsealed ones refused under
``require_sealed_memory``; docs/security.md "Guest memory").  Failure 7: an
inflight region with fewer entries than a ring has descriptors.  Failure 8:
sizes and offsets of 2^63 and more.
"""

from __future__ import annotations

import fcntl
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from iovirt.memory import BumpAllocator, GuestMemory, MemoryRegion
from iovirt.vhost_user.backend import BackendSession, RequestRefused
from iovirt.vhost_user.bringup import negotiate
from iovirt.vhost_user.dataplane import DataPlane
from iovirt.vhost_user.devices import vhost_user_device
from iovirt.vhost_user.driver import VhostUserDriver
from iovirt.vhost_user.errors import BackendClosedError, NackError
from iovirt.vhost_user.frontend import VhostUserFrontend
from iovirt.vhost_user.inflight import InflightError, InflightQueue, QueueRegion, queue_region_size
from iovirt.vhost_user import requests as rq
from iovirt.vhost_user.messages import (
    FrontendRequest as R,
    Inflight,
    MemoryTable,
    MemRegion,
    SingleMemRegion,
)
from iovirt.virtio.blk.defs import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from iovirt.virtio.blk.device import VirtioBlk
from iovirt.virtio.driver import DriverQueue
from blk_client import blk_request

from backend_helpers import log_line, wait_until

ALL = (1 << 64) - 1
USER = 0x7E00_0000_0000
PAGE = 4096
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


# -- helpers -----------------------------------------------------------------------------
def memfd(size: int, sealed: bool = False) -> int:
    fd = os.memfd_create("hostile", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if sealed:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    return fd


def dev_zero() -> int:
    return os.open("/dev/zero", os.O_RDWR | os.O_CLOEXEC)


def negotiated(path: str) -> VhostUserFrontend:
    """A front-end with everything negotiated (REPLY_ACK: every refusal is a NACK)."""
    front = VhostUserFrontend.connect(path, timeout=5.0)
    try:
        negotiate(front, ALL, ALL)
    except BaseException:
        front.close()
        raise
    assert front.reply_ack
    return front


def nacked(front: VhostUserFrontend, request: int, payload, fds=()) -> None:
    with pytest.raises(NackError):
        front.call(request, payload, list(fds), need_reply=True)


def blk_round_trip(drv: VhostUserDriver, sector: int = 3) -> None:
    data = os.urandom(512)
    assert blk_request(drv, VIRTIO_BLK_T_OUT, sector, out=data)[1] == VIRTIO_BLK_S_OK
    assert blk_request(drv, VIRTIO_BLK_T_IN, sector, in_len=512) == (data, VIRTIO_BLK_S_OK)


def serves_a_new_frontend(path: str, timeout: float = 10.0) -> None:
    """A new front-end on ``path`` gets blk I/O done (retried while the old connection is being closed)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with VhostUserDriver(path) as drv:
                drv.start_queues([0], size=16)
                blk_round_trip(drv)
                return
        except (BackendClosedError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class Served:
    """``iovirt serve --blk`` in its own process, its log in a file."""

    def __init__(self, tmp: Path) -> None:
        self.path = str(tmp / "blk.sock")
        self.log = tmp / "serve.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "iovirt", "serve", "--blk", f"{self.path},{tmp / 'disk.img'},size=1M"],
                stdout=out, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while not os.path.exists(self.path):
            assert self.proc.poll() is None, self.text()
            assert time.monotonic() < deadline, "the socket never appeared"
            time.sleep(0.05)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def log_line(self, *words: str) -> str:
        found: list[str] = []

        def seen() -> bool:
            found[:] = [line for line in self.text().splitlines() if all(w in line for w in words)]
            return bool(found)

        assert wait_until(seen), f"no log line with {words}:\n{self.text()}"
        return found[0]

    def still_serving(self, front: VhostUserFrontend | None = None) -> None:
        """Alive (not killed by a fault), the hostile connection closed, a new one served; no traceback."""
        if front is not None:
            front.close()
        time.sleep(0.2)  # a fault at the first access would have happened by now
        assert self.proc.poll() is None, f"iovirt serve died ({self.proc.returncode}):\n{self.text()}"
        serves_a_new_frontend(self.path)
        assert self.proc.poll() is None, self.text()
        assert "Traceback" not in self.text(), self.text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def served(tmp_path):
    s = Served(tmp_path)
    yield s
    s.stop()


# -- failure 1: fds that do not cover the region ----------------------------------------------
def test_dev_zero_inflight_fd_is_refused(served):
    """One SET_INFLIGHT_FD of /dev/zero at offset 4096 used to kill the process (SIGBUS)."""
    front = negotiated(served.path)
    fd = dev_zero()
    try:
        nacked(front, R.VHOST_USER_SET_INFLIGHT_FD, Inflight(PAGE, PAGE, 1, 64), [fd])
    finally:
        os.close(fd)
    line = served.log_line("VHOST_USER_SET_INFLIGHT_FD", "character device")
    assert "/dev/zero" in line
    served.still_serving(front)


@pytest.mark.parametrize("request_", [R.VHOST_USER_SET_MEM_TABLE, R.VHOST_USER_ADD_MEM_REG], ids=lambda r: r.name)
def test_dev_zero_guest_memory_is_refused(served, request_):
    """/dev/zero at a non-zero offset as guest memory: refused, not a SIGBUS at the first ring access."""
    front = negotiated(served.path)
    desc = MemRegion(0, 0x10000, USER, PAGE)
    payload = MemoryTable((desc,)) if request_ == R.VHOST_USER_SET_MEM_TABLE else SingleMemRegion(desc)
    fd = dev_zero()
    try:
        nacked(front, request_, payload, [fd])
    finally:
        os.close(fd)
    assert "/dev/zero" in served.log_line(request_.name, "character device")
    served.still_serving(front)


@pytest.mark.parametrize(
    "request_", [R.VHOST_USER_SET_MEM_TABLE, R.VHOST_USER_ADD_MEM_REG, R.VHOST_USER_SET_INFLIGHT_FD], ids=lambda r: r.name
)
def test_file_shorter_than_offset_plus_size_is_refused(served, request_):
    front = negotiated(served.path)
    fd = memfd(0x10000, sealed=True)
    try:
        if request_ == R.VHOST_USER_SET_INFLIGHT_FD:
            nacked(front, request_, Inflight(0x10000, 0x8000, 1, 64), [fd])
        else:
            desc = MemRegion(0, 0x10000, USER, 0x8000)
            payload = MemoryTable((desc,)) if request_ == R.VHOST_USER_SET_MEM_TABLE else SingleMemRegion(desc)
            nacked(front, request_, payload, [fd])
    finally:
        os.close(fd)
    assert "fd is 65536 bytes, the region needs offset+size 0x8000+0x10000" in served.log_line(request_.name)
    served.still_serving(front)


@pytest.mark.parametrize("make", [lambda: os.pipe(), lambda: (os.eventfd(0),)], ids=["pipe", "eventfd"])
def test_other_fd_types_are_refused_with_their_type(served, make):
    front = negotiated(served.path)
    fds = make()
    try:
        nacked(front, R.VHOST_USER_SET_INFLIGHT_FD, Inflight(PAGE, 0, 1, 64), [fds[0]])
        nacked(front, R.VHOST_USER_SET_MEM_TABLE, MemoryTable((MemRegion(0, 0x10000, USER, 0),)), [fds[0]])
    finally:
        for fd in fds:
            os.close(fd)
    served.log_line("VHOST_USER_SET_INFLIGHT_FD", "not a regular file, memfd or hugetlbfs file")
    served.log_line("VHOST_USER_SET_MEM_TABLE", "not a regular file, memfd or hugetlbfs file")
    served.still_serving(front)


# -- failure 8: sizes and offsets of 2^63 and more ------------------------------------------------
@pytest.mark.parametrize(
    "size, offset",
    [(1 << 63, 0), (ALL, 0), (PAGE, 1 << 63), (PAGE, ALL - PAGE + 1), ((1 << 63) - PAGE, (1 << 63) - PAGE)],
    ids=["size-2^63", "size-2^64-1", "offset-2^63", "offset-top-page", "sum-overflows"],
)
def test_huge_inflight_sizes_and_offsets_are_refused_cleanly(served, size, offset):
    """Used to raise OverflowError out of the handler: a traceback in the log."""
    front = negotiated(served.path)
    fd = memfd(PAGE, sealed=True)
    try:
        nacked(front, R.VHOST_USER_SET_INFLIGHT_FD, Inflight(size, offset, 1, 64), [fd])
    finally:
        os.close(fd)
    line = served.log_line("VHOST_USER_SET_INFLIGHT_FD", "cannot map the inflight region")
    assert "2^63" in line or "fd is 4096 bytes, the region needs" in line
    served.still_serving(front)


@pytest.mark.parametrize("size, offset", [(1 << 63, 0), (PAGE, 1 << 63), (PAGE, ALL - PAGE + 1)])
def test_huge_region_sizes_and_offsets_are_refused_cleanly(served, size, offset):
    front = negotiated(served.path)
    fd = memfd(PAGE, sealed=True)
    try:
        nacked(front, R.VHOST_USER_ADD_MEM_REG, SingleMemRegion(MemRegion(0, size, 0, offset)), [fd])
    finally:
        os.close(fd)
    served.log_line("VHOST_USER_ADD_MEM_REG", "cannot mmap")
    served.still_serving(front)


# -- failure 2: memory shrunk after it was mapped -------------------------------------------------
def test_sealed_guest_memory_cannot_be_shrunk_under_the_backend(served):
    """Sealed memfds (QEMU's default; iovirt's front-end too) are accepted silently and cannot shrink."""
    with VhostUserDriver(served.path) as drv:
        drv.start_queues([0], size=16)
        fd = drv.frontend.region_fd(drv.region)
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)
        blk_round_trip(drv)
    assert "F_SEAL_SHRINK" not in served.text()
    served.still_serving()


def test_unsealed_guest_memory_is_accepted_with_one_warning_per_connection(backend, logs):
    path = backend.blk_path
    for _ in range(2):
        front = negotiated(path)
        fds = [memfd(0x10000), memfd(0x10000)]
        try:
            front.call(R.VHOST_USER_SET_MEM_TABLE, MemoryTable((MemRegion(0, 0x10000, USER, 0),)), [fds[0]])
            front.call(R.VHOST_USER_ADD_MEM_REG, SingleMemRegion(MemRegion(0x10000, 0x10000, USER + 0x10000, 0)),
                       [fds[1]])
            info, inflight = front.get_inflight_fd(1, 16)
            front.set_inflight_fd(info, inflight)  # the back-end's own inflight memfd is sealed
            os.close(inflight)
        finally:
            for fd in fds:
                os.close(fd)
        front.close()
        assert wait_until(lambda: next(e for e in backend.server.endpoints if e.path == path).connection is None)
    warnings = [r for r in logs.records if "F_SEAL_SHRINK" in r.getMessage()]
    assert len(warnings) == 2, [r.getMessage() for r in warnings]  # one per connection, none for the inflight fd
    assert "region at 0x0" in warnings[0].getMessage() and warnings[0].levelname == "WARNING"


@pytest.fixture
def strict_session(tmp_path):
    """A session that requires sealed memory, driven request by request."""
    disk = VirtioBlk(str(tmp_path / "disk.img"), size=1 << 20, num_queues=1, label="blk")
    dataplane = DataPlane()
    session = BackendSession(vhost_user_device(disk), dataplane, "blk", require_sealed_memory=True)
    session.handle(rq.SetProtocolFeatures(features=session.supported_protocol_features))
    yield session
    session.close()
    disk.close()


def test_unsealed_memory_is_refused_when_sealed_memory_is_required(strict_session, logs):
    session = strict_session
    fd = memfd(0x10000)
    region = MemRegion(0, 0x10000, USER, 0)
    try:
        for req in (rq.SetMemTable(regions=(region,), fds=(os.dup(fd),)), rq.AddMemReg(region=region, fds=(os.dup(fd),))):
            with pytest.raises(RequestRefused, match="not sealed with F_SEAL_SHRINK and sealed memory is required"):
                session.handle(req)
        assert session.table.memory.regions == ()
        # The regression: shrinking it now cannot fault the back-end, since nothing of it was mapped.
        os.ftruncate(fd, 0)
        session.handle(rq.SetVringNum(index=0, num=16))
        session.handle(rq.SetVringAddr(index=0, flags=0, desc_user_addr=USER, used_user_addr=USER + 0x2000,
                                       avail_user_addr=USER + 0x1000))
        kick = os.eventfd(0)
        with pytest.raises(RequestRefused, match="in no region"):
            session.handle(rq.SetVringKick(index=0, fds=(kick,)))
    finally:
        os.close(fd)


def test_sealed_memory_is_accepted_when_sealed_memory_is_required(strict_session):
    session = strict_session
    fd = memfd(0x10000, sealed=True)
    session.handle(rq.SetMemTable(regions=(MemRegion(0, 0x10000, USER, 0),), fds=(fd,)))
    assert [r.size for r in session.table.memory.regions] == [0x10000]


def test_unsealed_inflight_fd_is_refused_when_sealed_memory_is_required(strict_session):
    session = strict_session
    size = queue_region_size(16)
    with pytest.raises(RequestRefused, match="inflight region: fd .* not sealed"):
        session.handle(rq.SetInflightFd(mmap_size=size, mmap_offset=0, num_queues=1, queue_size=16,
                                        fds=(memfd(size),)))
    assert session.inflight_map is None
    # GET_INFLIGHT_FD's own memfd is sealed: handed back, it is accepted.
    info, (fd,) = session.handle(rq.GetInflightFd(mmap_size=0, mmap_offset=0, num_queues=1, queue_size=16))
    session.handle(rq.SetInflightFd(mmap_size=info.mmap_size, mmap_offset=0, num_queues=1, queue_size=16, fds=(fd,)))
    assert session.inflight_map is not None


# -- failure 7: an inflight region smaller than a ring ----------------------------------------------
def test_ring_larger_than_the_inflight_region_is_refused(backend, logs):
    """GET_INFLIGHT_FD for 16 descriptors, then a ring of 64: its heads 16..63 have no entry."""
    with VhostUserDriver(backend.blk_path) as drv:
        info, fd = drv.frontend.get_inflight_fd(1, 16)
        os.close(fd)
        with pytest.raises(NackError):
            drv.start_queues([0], size=64)
        assert "does not fit the inflight region's queue_size 16" in log_line(logs, "VHOST_USER_SET_VRING_NUM")
        drv.queues.clear()
    with VhostUserDriver(backend.blk_path) as drv:  # a ring that fits is tracked and served
        drv.frontend.get_inflight_fd(1, 16)
        drv.start_queues([0], size=16)
        blk_round_trip(drv)


def test_inflight_region_smaller_than_a_ring_is_refused(backend, logs):
    front = negotiated(backend.blk_path)
    front.set_vring_num(0, 64)
    fd = memfd(queue_region_size(16), sealed=True)
    try:
        nacked(front, R.VHOST_USER_SET_INFLIGHT_FD, Inflight(queue_region_size(16), 0, 1, 16), [fd])
    finally:
        os.close(fd)
    assert "vring 0 has 64 descriptors, more than the inflight region's queue_size 16" in log_line(
        logs, "VHOST_USER_SET_INFLIGHT_FD"
    )
    # GET_INFLIGHT_FD's reply cannot say "refused": the connection is closed.
    with pytest.raises(BackendClosedError):
        front.get_inflight_fd(1, 16)
    front.close()


def test_inflight_region_cannot_change_under_a_started_ring(backend, logs):
    with VhostUserDriver(backend.blk_path) as drv:
        drv.start_queues([0], size=16)
        fd = memfd(queue_region_size(16), sealed=True)
        try:
            nacked(drv.frontend, R.VHOST_USER_SET_INFLIGHT_FD, Inflight(queue_region_size(16), 0, 1, 16), [fd])
        finally:
            os.close(fd)
        assert "while rings are started" in log_line(logs, "VHOST_USER_SET_INFLIGHT_FD")
        blk_round_trip(drv)


def test_a_ring_left_out_of_a_new_inflight_region_is_no_longer_tracked(backend):
    """Two queues tracked, then one: ring 1 must not keep the unmapped region of the first."""
    with VhostUserDriver(backend.blk_path) as drv:
        for queues in (2, 1):
            _, fd = drv.frontend.get_inflight_fd(queues, 16)
            os.close(fd)
        drv.start_queues([1], size=16)
        data = os.urandom(512)
        queue = drv.queues[1]
        queue.add_data([struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, 5), data], [1])
        drv.kick(1)
        assert drv.frontend.wait_call(1, timeout=5)
        assert queue.get_used()[0].data[-1] == VIRTIO_BLK_S_OK


@pytest.mark.parametrize("head", [16, 17, 0xFFFF, -1])
def test_queue_region_never_indexes_past_its_entries(head):
    area = bytearray(queue_region_size(16))
    region = QueueRegion(memoryview(area), 16, fresh=True)
    before = bytes(area)
    for action in (region.popped, region.unpopped, lambda h: region.completing([h]),
                   lambda h: region.completed([h], 1)):
        with pytest.raises(InflightError, match=f"head {head} is beyond the inflight region's 16 descriptors"):
            action(head)
    assert bytes(area) == before


def test_queue_region_refuses_a_view_too_small():
    with pytest.raises(InflightError):
        QueueRegion(memoryview(bytearray(queue_region_size(16) - 1)), 16, fresh=True)


def test_a_head_beyond_the_region_fails_the_device_cleanly(tmp_path, caplog):
    """Whatever let it through: the device needs a reset (err eventfd), no struct.error."""
    memory = GuestMemory([MemoryRegion(0, 1 << 20, bytearray(1 << 20))])
    driver = DriverQueue(memory, BumpAllocator(0x1000, (1 << 20) - 0x1000), 64)
    disk = VirtioBlk(str(tmp_path / "disk.img"), size=1 << 20, num_queues=1, label="blk")
    failed: list[Exception] = []
    disk.on_needs_reset = lambda device, error: failed.append(error)
    try:
        region = QueueRegion(memoryview(bytearray(queue_region_size(16))), 16, fresh=True)
        disk.start_queue(0, memory, driver.state(), lambda: None,
                         lambda queue: InflightQueue(queue, region, []))
        disk.set_queue_enabled(0, True)
        for sector in range(20):  # heads 0..19: the 17th has no inflight entry
            driver.add_data([struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, sector)], [512, 1])
        driver.publish()
        disk.kick(0)
        assert disk.needs_reset and isinstance(failed[0], InflightError)
    finally:
        disk.close()
