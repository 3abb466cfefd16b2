"""Frames in and out of a virtio-net device through its driver (virtio 1.2 5.1.6).

Queue 0 is receiveq1 and queue 1 transmitq1.  Every transmitted frame is
prefixed with a ``virtio_net_hdr`` of 12 bytes (VERSION_1 is always
negotiated, 5.1.6); received buffers start with the header too, and with
VIRTIO_NET_F_MRG_RXBUF a frame may span ``num_buffers`` of them (5.1.6.4).
"""

from __future__ import annotations

from iovirt.platform.virtio_driver import VirtioPciDriver
from iovirt.virtio.net.defs import NET_HDR_SIZE, VIRTIO_NET_F_MRG_RXBUF, NetHdr

RX_QUEUE = 0
TX_QUEUE = 1
RX_BUFFER_SIZE = 2048  # an MTU-sized frame plus the header fits one buffer


class VirtioNetDriver:
    """Send and receive Ethernet frames on a brought-up virtio-net device."""

    def __init__(self, driver: VirtioPciDriver) -> None:
        self.driver = driver
        self.rx = driver.queues[RX_QUEUE]
        self.tx = driver.queues[TX_QUEUE]

    def post_rx(self, count: int, size: int = RX_BUFFER_SIZE) -> None:
        """Make ``count`` receive buffers of ``size`` bytes available and notify the device."""
        for _ in range(count):
            self.rx.add_data(in_sizes=[size])
        self.driver.kick(RX_QUEUE)

    def send(self, frame: bytes, hdr: NetHdr | None = None) -> None:
        """Queue one frame (header + frame in one readable buffer) and notify the device."""
        self.tx.add_data(out=[(hdr or NetHdr()).pack(NET_HDR_SIZE) + frame])
        self.driver.kick(TX_QUEUE)

    def tx_completed(self) -> int:
        """Reclaim transmitted buffers; returns how many."""
        return len(self.tx.get_used())

    def receive(self) -> list[tuple[NetHdr, bytes]]:
        """Frames the device wrote into receive buffers, with their headers; buffers are reposted."""
        used = self.rx.get_used()
        frames = []
        i = 0
        while i < len(used):
            data = used[i].data
            hdr = NetHdr.unpack(data[:NET_HDR_SIZE])
            spans = hdr.num_buffers if self.driver.has_feature(VIRTIO_NET_F_MRG_RXBUF) else 1
            payload = data[NET_HDR_SIZE:] + b"".join(u.data for u in used[i + 1 : i + spans])
            frames.append((hdr, payload))
            i += max(spans, 1)
        if used:
            self.post_rx(len(used))
        return frames
