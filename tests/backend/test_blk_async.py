"""virtio-blk I/O off the data-plane thread, over vhost-user: a slow image, failing I/O, a front-end that goes.

The image gets a test hook (:class:`~iovirt.virtio.blk.aio.ImageHook`):
latency before every read and write, or EIO for chosen requests.  Each test
runs on every engine the data path in use has (io_uring and the thread pool
for the C twin; the thread pool for the Python twin, ``IOVIRT_NO_EXTENSIONS=1``).
"""

from __future__ import annotations

import logging
import struct
import threading
import time

import pytest

from iovirt.memory import MemoryRegion
from iovirt.vhost_user.driver import VhostUserDriver
from iovirt.vhost_user.server import VhostUserServer
from iovirt.virtio.blk import datapath
from iovirt.virtio.blk.aio import ImageHook
from iovirt.virtio.blk.defs import (
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
)
from iovirt.virtio.blk.device import VirtioBlk
from iovirt.virtio.queue import IMPLEMENTATION as QUEUE_IMPLEMENTATION

from backend_helpers import log_line, wait_until

C_TWIN = datapath.accel is not None and QUEUE_IMPLEMENTATION == "cython"
ENGINES = ["io_uring", "threads"] if C_TWIN else ["threads"]
DELAY = 0.3  # seconds of the slow image


def header(rtype: int, sector: int) -> bytes:
    return struct.pack("<IIQ", rtype, 0, sector)


class SlowBackend:
    """A ``VhostUserServer`` in a thread serving one blk device whose image has ``hook``."""

    def __init__(self, tmp, hook: ImageHook, engine: str) -> None:
        self.image = tmp / "disk.img"
        self.image.write_bytes(b"".join(bytes([s]) * 512 for s in range(64)))
        self.blk = VirtioBlk(str(self.image), label="blk0", hook=hook, engine=engine)
        self.path = str(tmp / "blk.sock")
        self.server = VhostUserServer()
        self.server.add_socket(self.path, self.blk, name="blk0")
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()
        self.blk.close()


@pytest.fixture(params=ENGINES)
def engine(request):
    return request.param


@pytest.fixture
def make_backend(tmp_path, engine):
    made = []

    def make(hook: ImageHook) -> SlowBackend:
        made.append(SlowBackend(tmp_path, hook, engine))
        return made[-1]

    yield make
    for b in made:
        b.stop()


@pytest.fixture
def logs(caplog):
    caplog.set_level(logging.INFO, logger="iovirt")
    return caplog


def read(queue, sector: int) -> int:
    return queue.add_data([header(VIRTIO_BLK_T_IN, sector)], [512, 1])


def used_by_head(queue, count: int) -> dict:
    used: list = []
    assert wait_until(lambda: used.extend(queue.get_used()) or len(used) >= count, 5)
    return {u.head: u for u in used}


def test_engine_is_named_in_the_log(make_backend, engine, logs):
    backend = make_backend(ImageHook())
    assert backend.blk.engine().startswith(engine)
    assert f"block I/O on {engine}" in log_line(logs, "blk0:", "block I/O on")


def test_a_request_whose_io_fails_is_ioerr_and_the_device_goes_on(make_backend, logs):
    backend = make_backend(ImageHook(fail=lambda op, offset, nbytes: op == "read" and offset == 8 * 512))
    with VhostUserDriver(backend.path) as drv:
        (queue,) = drv.start_queues([0]).values()
        bad, good = read(queue, 8), read(queue, 9)
        drv.kick(0)
        used = used_by_head(queue, 2)
        assert used[bad].data[-1] == VIRTIO_BLK_S_IOERR
        assert used[good].data == bytes([9]) * 512 + bytes([VIRTIO_BLK_S_OK])
        again = read(queue, 10)
        drv.kick(0)
        assert used_by_head(queue, 1)[again].data == bytes([10]) * 512 + bytes([VIRTIO_BLK_S_OK])
    assert backend.blk.stats["errors"] == 1
    assert "the image I/O failed" in log_line(logs, "blk0:", "1 requests failed with IOERR")
    assert "Traceback" not in logs.text


def test_a_flush_waits_for_the_writes_before_it(make_backend):
    backend = make_backend(ImageHook(delay=DELAY))  # writes are slow, a flush is not
    with VhostUserDriver(backend.path) as drv:
        (queue,) = drv.start_queues([0]).values()
        write = queue.add_data([header(VIRTIO_BLK_T_OUT, 3), b"\xaa" * 512], [1])
        flush = queue.add_data([header(VIRTIO_BLK_T_FLUSH, 0)], [1])
        drv.kick(0)
        used: list = []
        assert wait_until(lambda: used.extend(queue.get_used()) or len(used) >= 2, 5)
        assert [u.head for u in used] == [write, flush]
        assert [u.data[-1] for u in used] == [VIRTIO_BLK_S_OK] * 2
    assert backend.image.read_bytes()[3 * 512 : 4 * 512] == b"\xaa" * 512


def test_requests_complete_out_of_order_without_stalling_the_ring(make_backend):
    """Reads on a slow image are all in flight at once: 16 of them take about one delay, not 16."""
    backend = make_backend(ImageHook(delay=DELAY))
    with VhostUserDriver(backend.path) as drv:
        (queue,) = drv.start_queues([0]).values()
        heads = [read(queue, s) for s in range(8)]  # the thread pool runs 8 at a time
        start = time.monotonic()
        drv.kick(0)
        used = used_by_head(queue, len(heads))
        assert time.monotonic() - start < 4 * DELAY
        assert [used[h].data for h in heads] == [bytes([s]) * 512 + b"\0" for s in range(8)]


def test_get_vring_base_waits_for_the_io_in_flight(make_backend):
    """GET_VRING_BASE (a migration's stop) reports the base only once every popped request is used."""
    backend = make_backend(ImageHook(delay=DELAY))
    with VhostUserDriver(backend.path) as drv:
        (queue,) = drv.start_queues([0]).values()
        heads = [read(queue, s) for s in range(4)]
        drv.kick(0)
        assert wait_until(lambda: backend.blk.stats["read"] == 4, 5)  # popped, in flight
        assert drv.frontend.get_vring_base(0) == 4
        assert queue.used_idx() == 4  # pushed before the base was reported
        used = {u.head: u for u in queue.get_used()}
        assert [used[h].data[-1] for h in heads] == [VIRTIO_BLK_S_OK] * 4


def test_a_ring_reset_mid_io(make_backend, logs):
    backend = make_backend(ImageHook(delay=DELAY))
    with VhostUserDriver(backend.path) as drv:
        (queue,) = drv.start_queues([0]).values()
        for s in range(4):
            read(queue, s)
        drv.kick(0)
        assert wait_until(lambda: backend.blk.stats["read"] == 4, 5)
        drv.frontend.reset_device()
        assert queue.used_idx() == 4
    # The device serves a new front-end.
    with VhostUserDriver(backend.path) as drv:
        (queue,) = drv.start_queues([0]).values()
        head = read(queue, 5)
        drv.kick(0)
        assert used_by_head(queue, 1)[head].data == bytes([5]) * 512 + b"\0"
    assert "Traceback" not in logs.text


class CloseSpy:
    """Records when the server's threads unmap guest memory (MemoryRegion.close)."""

    def __init__(self, monkeypatch) -> None:
        self.closed: list[float] = []
        close = MemoryRegion.close
        main = threading.current_thread()

        def spy(region: MemoryRegion) -> None:
            if threading.current_thread() is not main:
                self.closed.append(time.monotonic())
            close(region)

        monkeypatch.setattr(MemoryRegion, "close", spy)


def completions(hook: ImageHook) -> list[float]:
    """Make ``hook`` record when each read and write completes."""
    done: list[float] = []

    def fail(op: str, offset: int, nbytes: int) -> bool:
        done.append(time.monotonic())
        return False

    hook.fail = fail
    return done


def test_a_front_end_gone_with_requests_in_flight(make_backend, monkeypatch, logs):
    """The connection closes mid-I/O: guest memory is unmapped only after the I/O into it completed."""
    hook = ImageHook(delay=DELAY)
    done = completions(hook)
    backend = make_backend(hook)
    spy = CloseSpy(monkeypatch)
    with VhostUserDriver(backend.path) as drv:
        (queue,) = drv.start_queues([0]).values()
        for s in range(4):
            read(queue, s)
        drv.kick(0)
        assert wait_until(lambda: backend.blk.stats["read"] == 4, 5)
    assert wait_until(lambda: spy.closed, 5)
    assert len(done) == 4 and max(done) <= min(spy.closed)
    with VhostUserDriver(backend.path) as drv:  # the process serves on
        (queue,) = drv.start_queues([0]).values()
        head = read(queue, 7)
        drv.kick(0)
        assert used_by_head(queue, 1)[head].data == bytes([7]) * 512 + b"\0"
    assert "Traceback" not in logs.text


def test_a_new_memory_table_waits_for_the_io_in_flight(make_backend, monkeypatch, logs):
    """SET_MEM_TABLE mid-I/O: the old mappings close only after the reads into them completed."""
    hook = ImageHook(delay=DELAY)
    done = completions(hook)
    backend = make_backend(hook)
    spy = CloseSpy(monkeypatch)
    with VhostUserDriver(backend.path) as drv:
        (queue,) = drv.start_queues([0]).values()
        heads = [read(queue, s) for s in range(4)]
        drv.kick(0)
        assert wait_until(lambda: backend.blk.stats["read"] == 4, 5)
        drv.frontend.set_mem_table()  # the same memory again: the back-end maps it anew
        assert spy.closed and len(done) == 4 and max(done) <= min(spy.closed)
        used = used_by_head(queue, 4)
        assert [used[h].data for h in heads] == [bytes([s]) * 512 + b"\0" for s in range(4)]
    assert "Traceback" not in logs.text
