"""virtio-rng (virtio 1.2 section 5.4) served over vhost-user to iovirt's own front-end."""

from __future__ import annotations

import logging
import os
import time

import pytest

from iovirt.vhost_user.driver import VhostUserDriver
from iovirt.vhost_user.messages import ProtocolFeature as PF
from iovirt.virtio.queue import is_accelerated
from iovirt.virtio.qos import TokenBucket
from iovirt.virtio.rng.device import RETRY_S, VirtioRng


def _used(drv, queue, n=1, timeout=5.0):
    """Wait until ``n`` used entries are there; returns them."""
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        drv.frontend.wait_call(0, timeout=0.1)
        got += queue.get_used()
    return got


def test_adapter_offers_no_config_and_one_queue(serve):
    with VhostUserDriver(serve(VirtioRng())) as drv:
        assert not drv.protocol_features >> PF.VHOST_USER_PROTOCOL_F_CONFIG & 1  # 5.4.4: no config space
        assert drv.frontend.get_queue_num() == 1


def test_urandom_fills_every_buffer(serve):
    dev = VirtioRng()
    with VhostUserDriver(serve(dev)) as drv:
        (queue,) = drv.start_queues([0], size=16).values()
        assert is_accelerated(dev.queues[0]) == (os.environ.get("IOVIRT_NO_EXTENSIONS") != "1")
        heads = [queue.add_data([], [64]), queue.add_data([], [100, 28])]
        drv.kick(0)
        used = _used(drv, queue, 2)
        assert [u.head for u in used] == heads
        assert [u.len for u in used] == [64, 128]
        assert all(any(u.data) for u in used)
        assert used[0].data != used[1].data[:64]


def test_file_source_serves_its_bytes_in_order_then_needs_reset(serve, tmp_path, caplog):
    path = tmp_path / "entropy.bin"
    content = os.urandom(100)
    path.write_bytes(content)
    dev = VirtioRng(source=str(path))
    with VhostUserDriver(serve(dev)) as drv:
        (queue,) = drv.start_queues([0], size=16).values()
        for _ in range(2):
            queue.add_data([], [64])
        drv.kick(0)
        used = _used(drv, queue, 2)
        assert b"".join(u.data for u in used) == content
        assert [u.len for u in used] == [64, 36]
        with caplog.at_level(logging.WARNING, logger="iovirt"):
            queue.add_data([], [64])
            drv.kick(0)
            time.sleep(0.2)
            assert queue.get_used() == []  # nothing invented
            assert dev.needs_reset
            queue.add_data([], [64])
            drv.kick(0)
            time.sleep(0.1)
        assert sum("ended" in r.getMessage() for r in caplog.records) == 1


def test_empty_fifo_does_not_block_and_partial_data_completes(serve, tmp_path):
    fifo = tmp_path / "entropy.fifo"
    os.mkfifo(fifo)
    dev = VirtioRng(source=str(fifo))
    with VhostUserDriver(serve(dev)) as drv:
        (queue,) = drv.start_queues([0], size=16).values()
        head = queue.add_data([], [64])
        drv.kick(0)
        time.sleep(10 * RETRY_S)
        assert queue.get_used() == []  # waiting for data, not completed empty (5.4.6.2: one or more bytes)
        assert drv.frontend.get_queue_num() == 1  # the control plane still answers
        writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(writer, b"0123456789")
            (used,) = _used(drv, queue)
            assert (used.head, used.len, used.data) == (head, 10, b"0123456789")
        finally:
            os.close(writer)
        # A FIFO whose writer left has not ended: the device still serves what comes next.
        assert not dev.needs_reset


def test_rate_limit_spreads_the_bytes(serve):
    rate = 2000.0
    dev = VirtioRng(rate=rate)
    burst = dev.bucket.burst
    with VhostUserDriver(serve(dev)) as drv:
        (queue,) = drv.start_queues([0], size=64).values()
        start = time.monotonic()
        for _ in range(8):
            queue.add_data([], [100])
        drv.kick(0)
        got = _used(drv, queue, 8, timeout=10)
        elapsed = time.monotonic() - start
        total = sum(u.len for u in got)
        assert total == 800 and [u.len for u in got] == [100] * 8
        assert elapsed >= (total - burst) / rate * 0.9  # no faster than the bucket allows


def test_token_bucket_refills_at_the_rate():
    now = [0.0]
    bucket = TokenBucket(100.0, 10.0, clock=lambda: now[0])  # the device's bucket: a burst of 0.1 s, >= 1 byte
    assert bucket.refill() == 10
    bucket.take(10)
    assert bucket.refill() == 0
    assert bucket.wait_time(1) == pytest.approx(0.01)
    assert bucket.wait_time(5) == pytest.approx(0.05)
    assert bucket.wait_time(50) == pytest.approx(0.1)  # at most a burst
    now[0] = 0.05
    assert bucket.refill() == 5
    now[0] = 10.0
    assert bucket.refill() == 10  # never beyond the burst


def test_device_readable_request_gets_length_zero_and_one_log_line(serve, caplog):
    dev = VirtioRng()
    with VhostUserDriver(serve(dev)) as drv:
        (queue,) = drv.start_queues([0], size=16).values()
        with caplog.at_level(logging.WARNING, logger="iovirt"):
            bad = [queue.add_data([b"driver-readable"], [32]) for _ in range(2)]
            good = queue.add_data([], [32])
            drv.kick(0)
            used = _used(drv, queue, 3)
        assert [(u.head, u.len) for u in used] == [(bad[0], 0), (bad[1], 0), (good, 32)]
        assert dev.bad_requests == 2 and not dev.needs_reset
        lines = [r for r in caplog.records if "device-readable" in r.getMessage()]
        assert len(lines) == 1 and not any(r.exc_info for r in caplog.records)
