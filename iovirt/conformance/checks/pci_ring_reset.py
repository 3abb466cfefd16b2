"""Virtqueue reset through ``queue_reset`` (virtio 1.2 sections 2.6.1 and 4.1.4.3, with VIRTIO_F_RING_RESET).

The driver resets one queue of a live device, checks the device lets it go (no request of it served,
no notification for it), then sets it up again with a smaller ring and runs more requests through it
than the new size: a device that kept the old available/used state or the old size stalls or misreads.
Runs against a :class:`~iovirt.conformance.platform_target.PlatformTarget`.
"""

from __future__ import annotations

import time

from iovirt.conformance.checks.pci import PCI
from iovirt.conformance.platform_target import QUEUE_SIZE, PciContext
from iovirt.conformance.registry import check, expect
from iovirt.conformance.target import needs_feature
from iovirt.virtio.defs import VIRTIO_F_RING_RESET
from iovirt.virtio.transport.defs import (
    VIRTIO_PCI_COMMON_Q_ENABLE,
    VIRTIO_PCI_COMMON_Q_RESET,
    VIRTIO_PCI_COMMON_Q_SELECT,
)

RESET_POLL_S = 0.001
NEW_SIZE = QUEUE_SIZE // 8  # indexes wrap at NEW_SIZE only if the device took the new size
RUNS_AFTER = 3 * NEW_SIZE


def _queue_reset(ctx: PciContext, index: int) -> int:
    d = ctx.driver
    d.common_write(VIRTIO_PCI_COMMON_Q_SELECT, 2, index)
    return d.common_read(VIRTIO_PCI_COMMON_Q_RESET, 2)


@check(
    "virtio-1.2:4.1.4.3.1#queue_reset",
    "with RING_RESET: queue_reset reads 0 after reset and enable, a reset queue reads queue_reset and queue_enable 0, "
    "serves and notifies nothing, and comes back from fresh state with a new size",
    transport=PCI,
    applies=needs_feature(VIRTIO_F_RING_RESET, "VIRTIO_F_RING_RESET"),
)
def queue_reset(ctx: PciContext) -> None:
    d = ctx.driver
    index = ctx.request_index
    ctx.init()
    expect(d.has_feature(VIRTIO_F_RING_RESET), "VIRTIO_F_RING_RESET offered but not negotiated")
    d.reset()
    expect(_queue_reset(ctx, index) == 0, "queue_reset does not read 0 after a device reset")
    ctx.bring_up()
    expect(_queue_reset(ctx, index) == 0, f"queue_reset does not read 0 once queue {index} is enabled")
    ctx.post_request()
    ctx.kick()
    expect(ctx.used() == 1, "the request before the reset was not served")
    d.queues[index].get_used()

    old = d.queues[index]
    ctx.post_request()  # made available before the reset: must never be served
    old.publish()
    d.common_write(VIRTIO_PCI_COMMON_Q_SELECT, 2, index)
    d.common_write(VIRTIO_PCI_COMMON_Q_RESET, 2, 1)
    deadline = time.monotonic() + ctx.timeout
    while d.common_read(VIRTIO_PCI_COMMON_Q_RESET, 2):  # 1 while the reset is ongoing (4.1.4.3.1)
        expect(time.monotonic() < deadline, f"queue_reset still reads 1 after {ctx.timeout:g} s")
        time.sleep(RESET_POLL_S)
    expect(d.common_read(VIRTIO_PCI_COMMON_Q_ENABLE, 2) == 0, "queue_enable is not 0 once the queue reset completed")
    before = ctx.take_interrupts().get(index, 0)
    d.host.mmio_write(d.notify_addr[index], 2, index)
    expect((old.used_idx() - old.last_used_idx) & 0xFFFF == 0,
           "the device served a request of a queue the driver had reset")
    expect(ctx.take_interrupts().get(index, 0) == before, "the device notified a queue the driver had reset")

    d.setup_queue(index, NEW_SIZE)
    d.common_write(VIRTIO_PCI_COMMON_Q_SELECT, 2, index)
    expect(d.common_read(VIRTIO_PCI_COMMON_Q_RESET, 2) == 0, "queue_reset does not read 0 after the queue was re-enabled")
    for i in range(RUNS_AFTER):
        ctx.post_request()
        ctx.kick()
        expect(ctx.used() == 1, f"request {i + 1} on the re-enabled queue (size {NEW_SIZE}, indexes from 0) "
                                "was not served: the device kept old ring state or the old size")
        d.queues[index].get_used()
    expect((old.used_idx() - old.last_used_idx) & 0xFFFF == 0, "the device wrote into the ring it had been told to forget")
