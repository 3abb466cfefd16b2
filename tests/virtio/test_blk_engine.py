"""virtio-blk's asynchronous block I/O in process, on both queue twins and every engine.

A device whose transport does not serve its completion eventfd (no
``complete_async``) completes every request before ``process_queue``
returns, through the same engines; ``O_DIRECT`` is used for aligned
requests on a file system that takes it, buffered I/O for the rest, and
both see the same data.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
import time

import pytest

from iovirt.memory import BumpAllocator, GuestMemory
from iovirt.virtio.blk import datapath
from iovirt.virtio.blk.aio import ImageHook, ThreadPool
from iovirt.virtio.blk.defs import (
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
)
from iovirt.virtio.blk.device import POKE_S, VirtioBlk
from iovirt.virtio.driver import DriverQueue

MEMORY = 4 << 20
PAGE = 4096


def engines_for(queue_cls) -> list[str]:
    """io_uring, the thread pool and inline on the C twin (the Cython queue), the thread pool on the Python one."""
    c_twin = datapath.accel is not None and queue_cls.__module__ == "iovirt.virtio._queue_c"
    return ["io_uring", "threads", "inline"] if c_twin else ["threads"]


@pytest.fixture(params=["io_uring", "threads", "inline"])
def engine(request, queue_cls):
    if request.param not in engines_for(queue_cls):
        pytest.skip("the Python twin has only the thread pool")
    return request.param


class Disk:
    """A ring over real guest memory served by a ``VirtioBlk`` (no transport)."""

    def __init__(self, queue_cls, path: str, engine: str, hook: ImageHook | None = None) -> None:
        self.memory = GuestMemory.from_ranges([(0, MEMORY)])
        self.alloc = BumpAllocator(0x1000, MEMORY - 0x1000)
        self.driver = DriverQueue(self.memory, self.alloc, 64)
        self.queue = queue_cls.from_state(self.memory, self.driver.state())
        self.blk = VirtioBlk(path, label="blk0", engine=engine, hook=hook)
        self.blk.set_queue_enabled(0, True)

    def request(self, rtype: int, sector: int, out: bytes = b"", in_len: int = 0, align: int = PAGE) -> int:
        hdr = self.alloc.alloc(16)
        self.memory.write(hdr, struct.pack("<IIQ", rtype, 0, sector))
        readable, writable = [(hdr, 16)], []
        if out:
            readable.append((self.alloc.alloc(len(out), align), len(out)))
            self.memory.write(readable[-1][0], out)
        if in_len:
            writable.append((self.alloc.alloc(in_len, align), in_len))
        writable.append((self.alloc.alloc(1), 1))
        return self.driver.add_chain(readable, writable)

    def serve(self) -> dict:
        self.driver.publish()
        self.blk.process_queue(0, self.queue)
        return {u.head: u for u in self.driver.get_used()}


@pytest.fixture
def disk(queue_cls, engine, tmp_path):
    (tmp_path / "disk.img").write_bytes(bytes(1 << 20))
    d = Disk(queue_cls, str(tmp_path / "disk.img"), engine)
    yield d
    d.blk.close()


def test_the_image_on_a_regular_file_is_opened_o_direct(disk):
    assert disk.blk.image.direct_fd >= 0


def test_requests_complete_before_process_queue_returns_without_an_async_transport(disk, engine):
    heads = [disk.request(VIRTIO_BLK_T_OUT, 8 * k, bytes([k + 1]) * PAGE) for k in range(8)]
    flush = disk.request(VIRTIO_BLK_T_FLUSH, 0)
    used = disk.serve()
    assert sorted(used) == sorted(heads + [flush])
    assert all(u.data == bytes([VIRTIO_BLK_S_OK]) for u in used.values())
    assert disk.blk.engine().startswith(engine)
    assert disk.blk.stats["write_bytes"] == 8 * PAGE and disk.blk.stats["flush"] == 1


def test_direct_and_buffered_requests_see_the_same_data(disk):
    # Aligned (O_DIRECT) writes, unaligned (buffered) reads, and the other way round.
    disk.request(VIRTIO_BLK_T_OUT, 0, b"\x11" * PAGE)
    disk.request(VIRTIO_BLK_T_OUT, 8, b"\x22" * 512, align=8)
    disk.serve()
    a, b = disk.request(VIRTIO_BLK_T_IN, 0, in_len=PAGE, align=8), disk.request(VIRTIO_BLK_T_IN, 8, in_len=512)
    used = disk.serve()
    assert used[a].data == b"\x11" * PAGE + b"\0" and used[b].data == b"\x22" * 512 + b"\0"


def test_bad_requests_complete_with_ioerr(disk):
    beyond = disk.request(VIRTIO_BLK_T_IN, (1 << 20) // 512, in_len=512)
    partial = disk.request(VIRTIO_BLK_T_OUT, 0, b"x" * 100)
    used = disk.serve()
    assert used[beyond].data[-1] == used[partial].data[-1] == VIRTIO_BLK_S_IOERR
    assert disk.blk.stats["errors"] == 2


def test_the_hook_fails_chosen_requests(queue_cls, engine, tmp_path):
    (tmp_path / "disk.img").write_bytes(bytes(1 << 20))
    d = Disk(queue_cls, str(tmp_path / "disk.img"), engine, ImageHook(fail=lambda op, off, n: op == "write"))
    try:
        w, r = d.request(VIRTIO_BLK_T_OUT, 0, b"x" * 512), d.request(VIRTIO_BLK_T_IN, 0, in_len=512)
        used = d.serve()
        assert used[w].data[-1] == VIRTIO_BLK_S_IOERR and used[r].data[-1] == VIRTIO_BLK_S_OK
    finally:
        d.blk.close()


def test_a_thread_pool_barrier_starts_after_every_job_before_it(tmp_path):
    import os
    import threading

    wake = os.eventfd(0)
    gate = threading.Event()
    order: list[str] = []

    def run(job: str) -> int:
        if job == "slow":
            gate.wait(5)
        order.append(job)
        return 0

    pool = ThreadPool(run, wake, workers=4)
    try:
        pool.submit("slow")
        pool.submit("barrier", barrier=True)
        pool.submit("after")
        assert pool.in_flight == 3
        gate.set()
        done: list = []
        while len(done) < 3:
            pool.wait()
            done += pool.reap()
        assert order == ["slow", "barrier", "after"]
        assert pool.in_flight == 0
    finally:
        pool.close()
        os.close(wake)


# -- the engine a device picks for itself --------------------------------------------------------------

def c_twin_only():
    if datapath.accel is None:
        pytest.skip("IOVIRT_NO_EXTENSIONS: the Python twin has only the thread pool")


@pytest.fixture
def in_memory_image():
    """A 1 MiB image on /dev/shm (tmpfs)."""
    directory = tempfile.mkdtemp(dir="/dev/shm")
    path = os.path.join(directory, "disk.img")
    with open(path, "wb") as f:
        f.truncate(1 << 20)
    yield path
    shutil.rmtree(directory)


def test_an_image_in_memory_gets_the_inline_engine(in_memory_image, tmp_path, monkeypatch):
    c_twin_only()
    monkeypatch.delenv("IOVIRT_BLK_ENGINE", raising=False)
    from iovirt.virtio._queue_c import SplitQueue

    disk = Disk(SplitQueue, in_memory_image, None)
    try:
        heads = [disk.request(VIRTIO_BLK_T_OUT, 8 * k, bytes([k + 1]) * PAGE) for k in range(4)]
        reads = [disk.request(VIRTIO_BLK_T_IN, 8 * k, in_len=PAGE) for k in range(4)]
        used = disk.serve()
        assert sorted(used) == sorted(heads + reads)
        assert [used[r].data for r in reads] == [bytes([k + 1]) * PAGE + b"\0" for k in range(4)]
        assert disk.blk.engine().startswith("inline")
    finally:
        disk.blk.close()
    # An image on a disk keeps io_uring.
    (tmp_path / "disk.img").write_bytes(bytes(1 << 20))
    disk = Disk(SplitQueue, str(tmp_path / "disk.img"), None)
    try:
        disk.request(VIRTIO_BLK_T_FLUSH, 0)
        disk.serve()
        assert not disk.blk.engine().startswith("inline")
    finally:
        disk.blk.close()


@pytest.mark.parametrize("why", ["environment", "latency hook"])
def test_the_environment_and_a_latency_hook_keep_a_real_engine_for_an_image_in_memory(in_memory_image, monkeypatch,
                                                                                       why):
    c_twin_only()
    from iovirt.virtio._queue_c import SplitQueue

    hook = None
    if why == "environment":
        monkeypatch.setenv("IOVIRT_BLK_ENGINE", "threads")
    else:
        monkeypatch.delenv("IOVIRT_BLK_ENGINE", raising=False)
        hook = ImageHook(delay=0.001)
    disk = Disk(SplitQueue, in_memory_image, None, hook)
    try:
        disk.request(VIRTIO_BLK_T_IN, 0, in_len=PAGE)
        disk.serve()
        assert not disk.blk.engine().startswith("inline")
    finally:
        disk.blk.close()


def test_the_inline_engine_refuses_a_latency_hook(tmp_path):
    c_twin_only()
    with pytest.raises(ValueError, match="cannot add the test hook's latency"):
        datapath.accel.Engine(-1, 4, ImageHook(delay=0.01), "inline")


def test_requests_in_flight_are_looked_for_on_the_timer_without_a_wake_up(disk, engine):
    """A completion the wake-up eventfd does not announce still reaches the driver: the timer pokes the engine.

    ``pytest -n 2 tests/backend`` lost an io_uring write that way about every
    second run (it turned up only once the submitting thread exited); the
    device now looks on its timer (``POKE_S``) while requests are in flight.
    Here the wake-up eventfd is never served: only the timer completes them.
    """
    if engine == "inline":
        pytest.skip("the inline engine completes each request at submission")
    timers: list = []
    disk.blk.complete_async = True
    disk.blk.call_later = lambda delay, handler: timers.append((delay, handler))
    polls = []
    heads = [disk.request(VIRTIO_BLK_T_OUT, 8 * k, bytes([k + 1]) * PAGE) for k in range(4)]
    disk.driver.publish()
    disk.blk.process_queue(0, disk.queue)
    used: dict = {}
    deadline = time.monotonic() + 10
    while len(used) < len(heads) and time.monotonic() < deadline:
        if timers:
            delay, handler = timers.pop()
            assert delay == POKE_S and not timers  # one poke at a time
            polls.append(1)
            handler()
        used.update({u.head: u for u in disk.driver.get_used()})
        time.sleep(0.001)
    assert sorted(used) == sorted(heads)
    assert all(u.data == bytes([VIRTIO_BLK_S_OK]) for u in used.values())
    assert polls, "nothing was looked for on the timer"
    assert not timers, "a poke was armed with nothing in flight"


# -- an image in memory, mapped: requests are copies ------------------------------------------------------

@pytest.fixture
def allocated_image():
    """A 1 MiB image on /dev/shm with every block written (no holes): the inline engine maps it."""
    directory = tempfile.mkdtemp(dir="/dev/shm")
    path = os.path.join(directory, "disk.img")
    with open(path, "wb") as f:
        f.write(b"".join(struct.pack("<Q", sector) * 64 for sector in range((1 << 20) // 512)))
    yield path
    shutil.rmtree(directory)


def mapped_disk(path: str) -> Disk:
    c_twin_only()
    from iovirt.virtio._queue_c import SplitQueue

    return Disk(SplitQueue, path, None)


def test_an_image_in_memory_without_holes_is_mapped_and_requests_see_the_file(allocated_image, monkeypatch):
    monkeypatch.delenv("IOVIRT_BLK_ENGINE", raising=False)
    disk = mapped_disk(allocated_image)
    try:
        assert disk.blk.engine().startswith("inline") and "mapped" in disk.blk.engine()
        # Reads give what the file holds, aligned or not, into one buffer or across two.
        a = disk.request(VIRTIO_BLK_T_IN, 8, in_len=PAGE)
        b = disk.request(VIRTIO_BLK_T_IN, 3, in_len=512, align=8)
        hdr = disk.alloc.alloc(16)
        disk.memory.write(hdr, struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 100))
        two = [(disk.alloc.alloc(512), 512), (disk.alloc.alloc(1024), 1024), (disk.alloc.alloc(1), 1)]
        c = disk.driver.add_chain([(hdr, 16)], two)
        used = disk.serve()
        assert used[a].data == struct.pack("<Q", 8) * 64 + b"".join(struct.pack("<Q", 9 + i) * 64 for i in range(7)) \
            + b"\0"
        assert used[b].data == struct.pack("<Q", 3) * 64 + b"\0"
        assert used[c].data == b"".join(struct.pack("<Q", 100 + i) * 64 for i in range(3)) + b"\0"
        # Writes land in the file; out of range and partial sectors fail as the system calls' path fails them.
        w = disk.request(VIRTIO_BLK_T_OUT, 16, b"\x5a" * PAGE)
        beyond = disk.request(VIRTIO_BLK_T_IN, (1 << 20) // 512, in_len=512)
        partial = disk.request(VIRTIO_BLK_T_OUT, 0, b"x" * 100)
        flush = disk.request(VIRTIO_BLK_T_FLUSH, 0)
        used = disk.serve()
        assert used[w].data[-1] == used[flush].data[-1] == VIRTIO_BLK_S_OK
        assert used[beyond].data[-1] == used[partial].data[-1] == VIRTIO_BLK_S_IOERR
        with open(allocated_image, "rb") as f:
            f.seek(16 * 512)
            assert f.read(PAGE) == b"\x5a" * PAGE
        assert disk.blk.stats["read_bytes"] == PAGE + 512 + 1536 and disk.blk.stats["write_bytes"] == PAGE
    finally:
        disk.blk.close()


def test_a_sparse_image_in_memory_is_not_mapped(in_memory_image, monkeypatch):
    """A hole read through a mapping would be given memory: a sparse image keeps the system calls."""
    monkeypatch.delenv("IOVIRT_BLK_ENGINE", raising=False)
    disk = mapped_disk(in_memory_image)
    try:
        r = disk.request(VIRTIO_BLK_T_IN, 0, in_len=PAGE)
        assert disk.serve()[r].data == bytes(PAGE + 1)
        assert disk.blk.engine().startswith("inline") and "mapped" not in disk.blk.engine()
    finally:
        disk.blk.close()


def test_a_mapped_image_shrunk_under_the_device_fails_reads_and_the_process_lives_on(allocated_image, monkeypatch):
    """SIGBUS in the copy (the pages are gone): the request goes through the fd, so it ends as the system call does.

    A read beyond the file's new end reads nothing: IOERR; a write there
    extends the file (pwritev), and then reads through the mapping again.
    """
    monkeypatch.delenv("IOVIRT_BLK_ENGINE", raising=False)
    disk = mapped_disk(allocated_image)
    try:
        assert "mapped" in disk.blk.engine()
        os.truncate(allocated_image, 0)
        r = disk.request(VIRTIO_BLK_T_IN, 8, in_len=PAGE)
        assert disk.serve()[r].data[-1] == VIRTIO_BLK_S_IOERR
        w = disk.request(VIRTIO_BLK_T_OUT, 8, b"\x33" * PAGE)
        assert disk.serve()[w].data[-1] == VIRTIO_BLK_S_OK
        assert os.path.getsize(allocated_image) == 8 * 512 + PAGE
        r = disk.request(VIRTIO_BLK_T_IN, 8, in_len=PAGE)
        assert disk.serve()[r].data == b"\x33" * PAGE + b"\0"
    finally:
        disk.blk.close()


SIGBUS_ELSEWHERE = """
import faulthandler, mmap, os, sys
faulthandler.enable()
from iovirt.virtio.blk import datapath
path = os.path.join(sys.argv[1], "disk.img")
with open(path, "wb") as f:
    f.write(b"x" * 65536)
fd = os.open(path, os.O_RDWR)
engine = datapath.accel.Engine(-1, 4, None, "inline")
assert engine.map_image(fd, 65536, True)
other = mmap.mmap(fd, 65536)
os.truncate(path, 0)
print("touching", flush=True)
other[4096]
print("survived", flush=True)
"""


def test_a_sigbus_outside_the_mapped_copy_still_reaches_the_handler_before_it():
    """Only the engine's copy turns SIGBUS into a failed request; any other goes where it went before (here
    faulthandler, which reports it and lets the process die of it)."""
    c_twin_only()
    import signal
    import subprocess
    import sys

    directory = tempfile.mkdtemp(dir="/dev/shm")
    try:
        proc = subprocess.run([sys.executable, "-c", SIGBUS_ELSEWHERE, directory], capture_output=True, text=True,
                              timeout=60)
    finally:
        shutil.rmtree(directory)
    assert proc.returncode == -signal.SIGBUS, (proc.returncode, proc.stdout, proc.stderr)
    assert "touching" in proc.stdout and "survived" not in proc.stdout
    assert "Bus error" in proc.stderr, proc.stderr
