"""A flooded transmit queue yields the data-plane thread after ``TX_BUDGET`` batches (issue 15).

One thread serves every device of a ``iovirt serve`` process.  A transmit
queue whose driver refills it as fast as the device drains it was served
until it was empty, that is for seconds: a blk device in the same process
had its completions reaped only when the flood paused, so a "loaded" disk
served almost nothing while frames flowed (``tests/backend/
test_blk_slow_disk_net.py`` measured 0-160 reads/s of the 640 its driver
kept in flight).  Now the queue gives the thread back after ``TX_BUDGET``
batches and its transport's timer serves it again at once, after the other
ready work; without a timer (in-process) the ring is still served to empty.
"""

from __future__ import annotations

import os
import threading

import pytest

from iovirt.memory import BumpAllocator, GuestMemory
from iovirt.vhost_user.dataplane import DataPlane
from iovirt.virtio.defs import VIRTIO_F_VERSION_1
from iovirt.virtio.driver import DriverQueue
from iovirt.virtio.net import device as net_device
from iovirt.virtio.net.defs import NET_HDR_SIZE
from iovirt.virtio.net.device import TX_BATCH, VirtioNet

MEM = 4 << 20
MAC = bytes.fromhex("525400000001")
BUDGET = 2  # batches per kick in these tests: TX_BUDGET * TX_BATCH would need a ring of 8192
CHAINS = 2 * BUDGET * TX_BATCH + 44  # two budgets' worth, and some left for the resume
RING = 1 << (CHAINS - 1).bit_length()  # the queue size that holds them all


@pytest.fixture(autouse=True)
def small_budget(monkeypatch):
    monkeypatch.setattr(net_device, "TX_BUDGET", BUDGET)


def flooded_port() -> tuple[VirtioNet, DriverQueue]:
    """A started net device whose transmit queue holds ``CHAINS`` frames (no switch: they are dropped)."""
    memory = GuestMemory.from_ranges([(0, MEM)])
    drv = DriverQueue(memory, BumpAllocator(0x1000, MEM - 0x1000), RING)
    dev = VirtioNet(MAC)
    dev.set_features(1 << VIRTIO_F_VERSION_1)
    dev.start_queue(1, memory, drv.state(), notify=lambda: None)
    dev.set_queue_enabled(1, True)
    buf = drv.alloc.alloc(NET_HDR_SIZE + 60)
    for _ in range(CHAINS):
        drv.add_chain(readable=[(buf, NET_HDR_SIZE + 60)])
    drv.publish()
    return dev, drv


def test_a_flooded_queue_yields_after_its_budget_and_the_timer_resumes_it():
    dev, drv = flooded_port()
    timers = []
    dev.call_later = lambda delay, handler: timers.append((delay, handler))
    dev.kick(1)
    assert len(drv.get_used()) == BUDGET * TX_BATCH
    assert [delay for delay, _ in timers] == [0.0]
    dev.kick(1)  # a kick while a resume is pending: served, and no second resume
    assert len(drv.get_used()) == BUDGET * TX_BATCH
    assert len(timers) == 1
    served = 2 * BUDGET * TX_BATCH
    while timers:
        _, handler = timers.pop()
        handler()
        served += len(drv.get_used())
    assert served == CHAINS


def test_without_a_timer_the_queue_is_served_to_empty():
    dev, drv = flooded_port()
    assert dev.call_later is None
    dev.kick(1)
    assert len(drv.get_used()) == CHAINS


def test_on_the_data_plane_other_work_runs_between_budgets():
    """A completion signalled while the queue is flooded is served before the flood is."""
    dev, drv = flooded_port()
    plane = DataPlane()
    dev.call_later = plane.call_later
    kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    other_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    served_when_other_ran: list[int] = []
    done = threading.Event()
    used = []

    def net_kick() -> None:
        os.eventfd_write(other_fd, 1)  # e.g. a blk device's completion arrives now
        dev.kick(1)

    def other() -> None:
        used.extend(drv.get_used())
        served_when_other_ran.append(len(used))

    def resumed_kick(index: int) -> None:
        VirtioNet.kick(dev, index)
        used.extend(drv.get_used())
        if len(used) == CHAINS:
            done.set()

    dev.kick = resumed_kick  # type: ignore[method-assign]
    plane.add_eventfd(kick_fd, net_kick)
    plane.add_eventfd(other_fd, other)
    plane.start()
    try:
        os.eventfd_write(kick_fd, 1)
        assert done.wait(10), f"{len(used)} of {CHAINS} chains served"
    finally:
        plane.stop()
        os.close(kick_fd)
        os.close(other_fd)
    assert served_when_other_ran and served_when_other_ran[0] < CHAINS
