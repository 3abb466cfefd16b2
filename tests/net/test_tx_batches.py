"""Transmit batches: one notification and one switching per batch of ``TX_BATCH`` chains (issue 15).

A kicked transmit queue pops a batch, gathers its frames and returns its
buffers, then notifies the driver once and hands the switch all its frames
at once: the per-batch Python work (the notification, the counters, the
switch's lookups) is paid once per batch, not per frame.  (Draining 4
batches before one switching was measured and dropped: benchmarks/RESULTS.md.)
A malformed chain after good ones must not cost the good ones: their
buffers are already used, so their frames are switched before the device
fails.
"""

from __future__ import annotations

from iovirt.memory import BumpAllocator, GuestMemory
from iovirt.virtio.defs import VIRTIO_F_VERSION_1, VIRTQ_DESC_F_NEXT
from iovirt.virtio.driver import DriverQueue
from iovirt.virtio.net.defs import NET_HDR_SIZE
from iovirt.virtio.net.device import TX_BATCH, VirtioNet
from iovirt.virtio.net.switch import LearningSwitch

MEM = 4 << 20
MAC = bytes.fromhex("525400000001")


class Recorder(LearningSwitch):
    """A switch that records each batch it is given (the frames' bytes)."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[bytes]] = []

    def forward_batch(self, ingress, frames) -> int:  # noqa: ARG002
        self.batches.append([frames.frame(i) for i in range(len(frames))])
        return len(frames)


def port(size: int = 1024):
    memory = GuestMemory.from_ranges([(0, MEM)])
    drv = DriverQueue(memory, BumpAllocator(0x1000, MEM - 0x1000), size)
    switch = Recorder()
    dev = VirtioNet(MAC, switch)
    dev.set_features(1 << VIRTIO_F_VERSION_1)
    notified = []
    dev.start_queue(1, memory, drv.state(), notify=lambda: notified.append(1))
    dev.set_queue_enabled(1, True)
    return dev, drv, switch, notified


def post_frames(drv: DriverQueue, n: int) -> list[bytes]:
    frames = []
    for i in range(n):
        frame = bytes.fromhex("02000000000b02000000000a0800") + i.to_bytes(4, "big") + bytes(46)
        buf = drv.alloc.alloc(NET_HDR_SIZE + len(frame))
        drv.memory.write(buf, bytes(NET_HDR_SIZE) + frame)
        drv.add_chain(readable=[(buf, NET_HDR_SIZE + len(frame))])
        frames.append(frame)
    drv.publish()
    return frames


def test_one_notification_and_one_switching_per_batch():
    dev, drv, switch, notified = port()
    sent = post_frames(drv, 2 * TX_BATCH + 10)
    dev.kick(1)
    assert [len(b) for b in switch.batches] == [TX_BATCH, TX_BATCH, 10]
    assert [f for b in switch.batches for f in b] == sent
    assert len(drv.get_used()) == len(sent)
    assert len(notified) == 3  # one per batch, not one per frame
    assert dev.stats["tx_packets"] == len(sent)


def test_a_malformed_chain_after_good_ones_costs_none_of_them(caplog):
    dev, drv, switch, _ = port()
    good = post_frames(drv, TX_BATCH + 5)  # the bad chain is in the second batch, after good ones of it
    buf = drv.alloc.alloc(64)
    # A looping chain (its second descriptor points back at its first), on descriptors no chain uses.
    drv.write_desc(1000, buf, 32, VIRTQ_DESC_F_NEXT, next=1001)
    drv.write_desc(1001, buf + 32, 32, VIRTQ_DESC_F_NEXT, next=1000)
    drv.post_head(1000)
    drv.publish()
    dev.kick(1)
    assert [f for b in switch.batches for f in b] == good
    assert dev.needs_reset
