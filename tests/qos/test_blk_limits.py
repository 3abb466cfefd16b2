"""Issue 14, QoS for blk: per-device limits in requests/s (iops) and data bytes/s (bps).

Requests beyond a limit wait in the ring, none fails.  On a device driven
directly there is no transport timer: the guest's next notification serves
them (the driver here notifies every half millisecond).  Over vhost-user
the data plane's timer serves them without one (``test_limits_vhost_user.py``).
"""

from __future__ import annotations

import math
import time

import pytest

from iovirt.memory import BumpAllocator, GuestMemory
from iovirt.virtio.blk.device import VirtioBlk
from iovirt.virtio.defs import VIRTIO_F_VERSION_1
from iovirt.virtio.driver import DriverQueue

from qos_helpers import Reader, within

MEM = 4 << 20


@pytest.fixture
def disk(tmp_path):
    dev = VirtioBlk(str(tmp_path / "disk.img"), size=1 << 20, label="blk0")
    yield dev
    dev.close()


def guest(dev: VirtioBlk, depth: int = 32, size: int = 4096) -> Reader:
    memory = GuestMemory.from_ranges([(0, MEM)])
    queue = DriverQueue(memory, BumpAllocator(0x1000, MEM - 0x1000), 128)  # 3 descriptors a read
    dev.set_features(1 << VIRTIO_F_VERSION_1)
    dev.start_queue(0, memory, queue.state(), notify=lambda: None)
    dev.set_queue_enabled(0, True)

    def kick() -> None:
        queue.publish()
        dev.kick(0)

    return Reader(queue, depth, size, kick)


def test_set_limits_and_read_them_back(disk):
    assert disk.limits() == {"iops": 0.0, "bps": 0.0}
    disk.set_limits({"iops": 100, "bps": 1 << 20})
    disk.set_limits({"iops": 0})
    assert disk.limits() == {"iops": 0.0, "bps": float(1 << 20)}


@pytest.mark.parametrize(
    "limits, message",
    [
        ({"pps": 10}, "blk0: unknown limit 'pps'; the limits are iops, bps"),
        ({"iops": -1.5}, "blk0: limit iops=-1.5 must be a finite number >= 0"),
        ({"bps": math.nan}, "blk0: limit bps=nan must be a finite number >= 0"),
    ],
)
def test_bad_limits_are_refused(disk, limits, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        disk.set_limits(limits)
    assert disk.limits() == {"iops": 0.0, "bps": 0.0}


def test_requests_beyond_the_limit_wait_and_none_fails(disk):
    reader = guest(disk, depth=32)
    disk.set_limits({"iops": 20})  # a burst of 2, then one each 50 ms
    reader.step()
    reader.step()
    assert reader.done in (2, 3) and len(reader.by_head) == 32  # the others wait in the ring
    time.sleep(0.5)
    reader.kick()  # the guest's next notification: the bucket holds its burst of 2 however long it was idle
    reader.collect()
    assert 4 <= reader.done <= 6
    disk.set_limits({"iops": 0})
    reader.kick()
    reader.collect()
    assert reader.done >= 32 and reader.bad_status == 0


def test_iops_limit_holds_over_5_s(disk):
    """Reads at queue depth 32, as fast as the device completes them, held to 400 requests/s."""
    reader = guest(disk)
    disk.set_limits({"iops": 400})
    start = time.monotonic()
    while time.monotonic() - start < 5.0:
        reader.step()
        reader.kick()  # no transport timer here: the guest's notifications serve the waiting requests
        time.sleep(0.0005)
    elapsed = time.monotonic() - start
    reader.step()
    assert reader.bad_status == 0
    assert within(reader.done / elapsed, 400), f"{reader.done} requests in {elapsed:.2f} s"
