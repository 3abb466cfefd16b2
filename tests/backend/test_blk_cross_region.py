"""virtio-blk requests whose buffers cross from one memory region into the next (issue 12, failure 9).

VMMs hand over adjacent regions (memory hot-plug, DIMMs, ADD_MEM_REG
slots), and a driver's buffer may start in one and end in the next: the
chain is valid (virtio 1.2 2.7.5 asks only that the buffer be guest memory).
Checked in process, with a device and a ring over a ``GuestMemory`` of two
adjacent regions, for both queue twins, and over vhost-user with two memfds
shared by SET_MEM_TABLE or ADD_MEM_REG.  A buffer that runs into a gap is
still refused: the ring fails the device, and memory that vanished between
pop and serve makes the request complete with IOERR.
"""

from __future__ import annotations

import logging
import os
import select
import struct

import pytest

from iovirt.memory import Access, BumpAllocator, GuestMemory, GuestMemoryError, MemoryRegion
from iovirt.vhost_user import bringup
from iovirt.vhost_user.frontend import VhostUserFrontend
from iovirt.virtio.blk.defs import (
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
)
from iovirt.virtio.blk.device import VirtioBlk
from iovirt.virtio.defs import VIRTIO_F_EVENT_IDX
from iovirt.virtio.driver import DriverQueue
from iovirt.virtio.errors import DescBufferError
from iovirt.virtio.queue import QueueWrapper

from backend_helpers import log_line, wait_until

BOUNDARY = 16 << 20  # regions [0, 16 MiB) and [16 MiB, 32 MiB)
REGION = 16 << 20
GAP = 64 << 10
CROSSING = BOUNDARY - 2048  # a 4 KiB buffer here has half in each region
SCRATCH = 0x20_0000  # headers and status bytes, well inside the first region
SECTOR = 512


def header(rtype: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", rtype, 0, sector)


class Guest:
    """Guest memory of two regions and a ring in the first, with buffers placed at exact addresses."""

    def __init__(self, memory: GuestMemory, size: int = 16, event_idx: bool = False) -> None:
        self.memory = memory
        self.driver = DriverQueue(memory, BumpAllocator(0x1000, SCRATCH - 0x1000), size, event_idx=event_idx)
        self.driver.set_interrupts(True)
        self.scratch = BumpAllocator(SCRATCH, 0x10_0000)

    def put(self, data: bytes, addr: int | None = None) -> tuple[int, int]:
        """``data`` in guest memory (at ``addr``, or in the scratch area); the buffer."""
        if addr is None:
            addr = self.scratch.alloc(len(data))
        self.memory.write(addr, data)
        return addr, len(data)

    def status_buffer(self) -> tuple[int, int]:
        return self.put(b"\xee")

    def add(self, readable, writable) -> None:
        self.driver.add_chain(readable, writable)
        self.driver.publish()


class InProcess(Guest):
    """A ``VirtioBlk`` serving the ring directly (no transport)."""

    def __init__(self, queue_cls, tmp_path, ranges) -> None:
        super().__init__(GuestMemory.from_ranges(ranges))
        self.queue = queue_cls.from_state(self.memory, self.driver.state())
        self.image = tmp_path / "disk.img"
        self.blk = VirtioBlk(str(self.image), size=1 << 20, label="blk0")
        self.blk.set_queue_enabled(0, True)

    def serve(self, readable, writable, queue=None):
        self.add(readable, writable)
        self.blk.process_queue(0, queue or self.queue)
        (used,) = self.driver.get_used()
        return used

    def close(self) -> None:
        self.blk.close()


@pytest.fixture
def disk(queue_cls, tmp_path):
    d = InProcess(queue_cls, tmp_path, [(0, REGION), (BOUNDARY, REGION)])
    yield d
    d.close()


def test_memory_views_split_at_the_region_boundary(disk):
    views = disk.memory.views(CROSSING, 4096)
    assert [v.nbytes for v in views] == [2048, 2048]
    disk.memory.write(CROSSING, bytes(range(256)) * 16)
    assert b"".join(bytes(v) for v in views) == bytes(range(256)) * 16
    assert [v.nbytes for v in disk.memory.views(0x1000, 4096)] == [4096]
    for v in views:
        v.release()
    readonly = GuestMemory([MemoryRegion(0, 4096, bytearray(4096), readonly=True)])
    assert [v.nbytes for v in readonly.views(0, 16)] == [16]
    with pytest.raises(GuestMemoryError, match="read-only"):
        readonly.views(0, 16, Access.WRITE)


def test_out_and_in_across_the_boundary(disk):
    data = os.urandom(4096)
    status = disk.status_buffer()
    used = disk.serve([disk.put(header(VIRTIO_BLK_T_OUT, 8)), disk.put(data, CROSSING)], [status])
    assert disk.memory.read(status[0], 1)[0] == VIRTIO_BLK_S_OK
    assert used.len == 1
    assert disk.image.read_bytes()[8 * SECTOR : 8 * SECTOR + 4096] == data

    disk.memory.fill(CROSSING, 4096)
    used = disk.serve([disk.put(header(VIRTIO_BLK_T_IN, 8))], [(CROSSING, 4096), status])
    assert used.data == data + bytes([VIRTIO_BLK_S_OK])
    assert disk.memory.read(CROSSING, 4096) == data
    assert disk.blk.stats["read_bytes"] == disk.blk.stats["write_bytes"] == 4096
    assert not disk.blk.stats["errors"]


def test_header_and_status_sharing_crossing_buffers(disk):
    """The header itself crosses the boundary, and for IN the data and status byte share one crossing buffer."""
    data = os.urandom(2 * SECTOR)
    disk.image.write_bytes(bytes(SECTOR) + data + bytes((1 << 20) - 3 * SECTOR))
    hdr = disk.put(header(VIRTIO_BLK_T_IN, 1), BOUNDARY - 8)
    used = disk.serve([hdr], [(BOUNDARY - SECTOR, len(data) + 1)])
    assert used.data == data + bytes([VIRTIO_BLK_S_OK])


def test_get_id_discard_and_write_zeroes_across_the_boundary(disk):
    status = disk.status_buffer()
    used = disk.serve([disk.put(header(VIRTIO_BLK_T_GET_ID))], [(BOUNDARY - 10, 20), status])
    assert used.data[:20].rstrip(b"\0") == b"iovirt" and used.data[20] == VIRTIO_BLK_S_OK

    disk.image.write_bytes(b"\xab" * (1 << 20))
    for rtype, sector in ((VIRTIO_BLK_T_DISCARD, 0), (VIRTIO_BLK_T_WRITE_ZEROES, 8)):
        segment = disk.put(struct.pack("<QII", sector, 8, 0), BOUNDARY - 8)
        disk.serve([disk.put(header(rtype)), segment], [status])
        assert disk.memory.read(status[0], 1)[0] == VIRTIO_BLK_S_OK
    assert disk.image.read_bytes()[: 16 * SECTOR] == bytes(16 * SECTOR)
    assert disk.image.read_bytes()[16 * SECTOR : 17 * SECTOR] == b"\xab" * SECTOR


def test_a_scatter_list_longer_than_iov_max(queue_cls, tmp_path, monkeypatch):
    """More views than one preadv takes go in slices (here IOV_MAX is made 2)."""
    from iovirt.virtio.blk import _datapath_py

    monkeypatch.setattr(_datapath_py, "IOV_MAX", 2)
    # Three adjacent 64 KiB regions after the first: a buffer across all three and a plain one make four views.
    step = 64 << 10
    memory_ranges = [(0, 8 << 20)] + [((8 << 20) + k * step, step) for k in range(3)]
    d = InProcess(queue_cls, tmp_path, memory_ranges)
    try:
        crossing = ((8 << 20) + step - SECTOR, step + 2 * SECTOR)  # three regions
        data = os.urandom(crossing[1] + SECTOR)
        d.memory.write(crossing[0], data[: crossing[1]])
        plain = d.put(data[crossing[1] :])
        status = d.status_buffer()
        # The C twin leaves this chain (no single host pointer) to the reference, which slices.
        d.serve([d.put(header(VIRTIO_BLK_T_OUT, 2)), crossing, plain], [status])
        assert d.memory.read(status[0], 1)[0] == VIRTIO_BLK_S_OK
        assert d.image.read_bytes()[2 * SECTOR : 2 * SECTOR + len(data)] == data
    finally:
        d.close()


def test_a_buffer_running_into_a_gap_is_refused(queue_cls, tmp_path):
    d = InProcess(queue_cls, tmp_path, [(0, REGION), (BOUNDARY + GAP, REGION)])
    try:
        with pytest.raises(DescBufferError, match="not backed"):
            d.serve([d.put(header(VIRTIO_BLK_T_IN))], [(CROSSING, 4096), d.status_buffer()])
        assert d.image.read_bytes() == bytes(1 << 20)
    finally:
        d.close()


class RemoveAfterPop(QueueWrapper):
    """The device's queue; the second region is away between a pop and the push of its chains."""

    def __init__(self, queue, memory: GuestMemory) -> None:
        self.inner = queue
        self.memory_ = memory
        self.removed = None

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def pop_batch(self, max_chains, batch=None):
        batch = self.inner.pop_batch(max_chains, batch)
        if len(batch) and self.removed is None:
            self.removed = self.memory_.remove_region(BOUNDARY)
        return batch

    def push_batch(self, batch) -> None:
        self.memory_.add_region(self.removed)  # back, for the driver to read its buffers
        self.inner.push_batch(batch)


def test_memory_gone_between_pop_and_serve_is_ioerr(disk, caplog):
    caplog.set_level(logging.WARNING, logger="iovirt")
    status = disk.status_buffer()
    queue = RemoveAfterPop(disk.queue, disk.memory)
    used = disk.serve([disk.put(header(VIRTIO_BLK_T_IN))], [(CROSSING, 4096), status], queue)
    assert queue.removed is not None
    assert used.data[-1] == VIRTIO_BLK_S_IOERR
    assert disk.blk.stats["errors"] == 1
    assert "no longer in guest memory" in log_line(caplog, "blk0:", "1 requests failed with IOERR")


# -- over vhost-user ---------------------------------------------------------------


class Remote(Guest):
    """A front-end sharing two adjacent memfd regions with the back-end's blk device."""

    def __init__(self, path: str, ranges, mem_slots: bool) -> None:
        self.frontend = VhostUserFrontend.connect(path, timeout=5)
        try:
            for gpa, size in ranges:
                self.frontend.add_region(gpa, size)
            negotiated = bringup.negotiate(self.frontend)
            bringup.features_ok(self.frontend)
            bringup.share_memory(self.frontend, mem_slots=mem_slots)
            super().__init__(self.frontend.memory, size=64, event_idx=negotiated.has(VIRTIO_F_EVENT_IDX))
            d = self.driver
            bringup.start_vring(self.frontend, 0, d.size, d.desc_addr, d.avail_addr, d.used_addr)
            self.frontend.set_vring_err(0)
            bringup.driver_ok(self.frontend)
        except BaseException:
            self.frontend.close()
            raise

    def serve(self, readable, writable):
        self.add(readable, writable)
        self.frontend.kick(0)
        assert self.frontend.wait_call(0, timeout=5)
        (used,) = self.driver.get_used()
        return used

    def close(self) -> None:
        self.frontend.close()


def round_trip(backend, remote: Remote) -> None:
    """OUT, IN, GET_ID and WRITE_ZEROES with buffers across the boundary, all OK."""
    data = os.urandom(4096)
    status = remote.status_buffer()
    remote.serve([remote.put(header(VIRTIO_BLK_T_OUT, 8)), remote.put(data, CROSSING)], [status])
    assert remote.memory.read(status[0], 1)[0] == VIRTIO_BLK_S_OK
    assert backend.image.read_bytes()[8 * SECTOR : 8 * SECTOR + 4096] == data

    remote.memory.fill(CROSSING, 4096)
    used = remote.serve([remote.put(header(VIRTIO_BLK_T_IN, 8))], [(CROSSING, 4096), status])
    assert used.data == data + bytes([VIRTIO_BLK_S_OK])

    used = remote.serve([remote.put(header(VIRTIO_BLK_T_GET_ID))], [(BOUNDARY - 10, 20), status])
    assert used.data[:20].rstrip(b"\0") == b"iovirt" and used.data[20] == VIRTIO_BLK_S_OK
    segment = remote.put(struct.pack("<QII", 8, 8, 0), BOUNDARY - 8)
    remote.serve([remote.put(header(VIRTIO_BLK_T_WRITE_ZEROES)), segment], [status])
    assert remote.memory.read(status[0], 1)[0] == VIRTIO_BLK_S_OK
    assert backend.image.read_bytes()[8 * SECTOR : 8 * SECTOR + 4096] == bytes(4096)
    assert not backend.blk.needs_reset


@pytest.mark.parametrize("mem_slots", [False, True], ids=["set_mem_table", "add_mem_reg"])
def test_vhost_user_out_and_in_across_adjacent_regions(backend, mem_slots):
    remote = Remote(backend.blk_path, [(0, REGION), (BOUNDARY, REGION)], mem_slots)
    try:
        round_trip(backend, remote)
    finally:
        remote.close()


def test_vhost_user_buffer_into_a_gap_fails_the_device_only(backend, logs):
    remote = Remote(backend.blk_path, [(0, REGION), (BOUNDARY + GAP, REGION)], mem_slots=False)
    try:
        remote.add([remote.put(header(VIRTIO_BLK_T_IN))], [(CROSSING, 4096), remote.status_buffer()])
        remote.frontend.kick(0)
        readable, _, _ = select.select([remote.frontend.err_fds[0]], [], [], 5.0)
        assert readable, "the err eventfd was not signalled"
        assert "not backed" in log_line(logs, "blk0: queue 0")
        assert backend.blk.needs_reset
    finally:
        remote.close()
    # The process keeps serving: the next front-end gets a reset device.
    assert wait_until(lambda: all(e.connection is None for e in backend.server.endpoints))
    remote = Remote(backend.blk_path, [(0, REGION), (BOUNDARY, REGION)], mem_slots=False)
    try:
        round_trip(backend, remote)
    finally:
        remote.close()
