"""The virtio-net device (virtio 1.2 section 5.1), one port of the switch.

Queues are receiveq1, transmitq1, ..., receiveqN, transmitqN (5.1.2): even
indexes receive, odd ones transmit.  A transmitted frame goes to the
:class:`~iovirt.virtio.net.switch.LearningSwitch`; frames the switch delivers
to this port are written into receive buffers, spread over the enabled queue
pairs by a flow hash.

The control virtqueue is not served here: a VMM in front (QEMU's vhost-user
net) handles it and turns ``VIRTIO_NET_CTRL_MQ`` into ring enables.
"""

from __future__ import annotations

import collections

from iovirt.errors import IovirtError
from iovirt.memory import GuestMemory
from iovirt.virtio.chain import read_chain, write_chain
from iovirt.virtio.device import COMMON_FEATURES, VirtioDevice
from iovirt.virtio.net.csum import ChecksumOffsetError, complete_checksum, l4_checksum_valid
from iovirt.virtio.net.gso import GsoError, tso_segments
from iovirt.virtio.net.defs import (
    ETH_HLEN,
    NET_HDR_LEGACY_SIZE,
    NET_HDR_SIZE,
    VIRTIO_ID_NET,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_STATUS,
    VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_S_LINK_UP,
    NetHdr,
)
from iovirt.virtio.net import datapath
from iovirt.virtio.net.switch import LearningSwitch
from iovirt.virtio.defs import VIRTIO_F_VERSION_1
from iovirt.virtio.queue import SplitQueue

TX_BATCH = 64
RX_BACKLOG = 256  # frames held while the driver has posted no receive buffers
MAX_FRAME = 65535 + ETH_HLEN


class VirtioNet(VirtioDevice):
    """A virtio-net device whose other side is a switch port."""

    device_id = VIRTIO_ID_NET
    name = "virtio-net"

    def __init__(
        self,
        mac: bytes,
        switch: LearningSwitch | None = None,
        queue_pairs: int = 1,
        mtu: int = 1500,
        queue_max_size: int = 1024,
        label: str = "",
    ) -> None:
        super().__init__(2 * queue_pairs, queue_max_size, label)
        if len(mac) != 6:
            raise ValueError(f"MAC must be 6 bytes, got {len(mac)}")
        self.mac = mac
        self.mtu = mtu
        self.queue_pairs = queue_pairs
        self.switch = switch
        self.link_up = True
        self.backlog: collections.deque[tuple[bytes, tuple[int, int] | None]] = collections.deque(maxlen=RX_BACKLOG)
        self.stats = collections.Counter()
        if datapath.accel is not None:
            from iovirt.virtio._queue_c import ChainBatch

            self._tx_frames = datapath.accel.Frames()
            self._tx_batch = ChainBatch()
            self._rx_batch = ChainBatch()
        if switch is not None:
            switch.attach(self)

    # -- features and config (5.1.3, 5.1.4) ---------------------------------
    def device_features(self) -> int:
        """Offered: VERSION_1, EVENT_IDX, INDIRECT_DESC, CSUM, GUEST_CSUM, HOST_TSO4/6, MTU, MAC, MRG_RXBUF,
        STATUS, MQ.  Host TSO frames are segmented here, at ingress (see ``gso.py``)."""
        net = (
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_MTU,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_STATUS,
            VIRTIO_NET_F_MQ,
        )
        return COMMON_FEATURES | sum(1 << bit for bit in net)

    def config_space(self) -> bytes:
        """``struct virtio_net_config``: mac, status, max_virtqueue_pairs, mtu."""
        status = VIRTIO_NET_S_LINK_UP if self.link_up else 0
        return (
            self.mac
            + status.to_bytes(2, "little")
            + self.queue_pairs.to_bytes(2, "little")
            + self.mtu.to_bytes(2, "little")
        )

    @property
    def gso_mask(self) -> int:
        """The GSO types the driver may transmit (1 << gso_type): host TSO as negotiated."""
        mask = 0
        if self.has_feature(VIRTIO_NET_F_HOST_TSO4):
            mask |= 1 << VIRTIO_NET_HDR_GSO_TCPV4
        if self.has_feature(VIRTIO_NET_F_HOST_TSO6):
            mask |= 1 << VIRTIO_NET_HDR_GSO_TCPV6
        return mask

    def announce(self, mac: bytes) -> None:
        """Broadcast a RARP for ``mac`` so the switch (and hosts behind it) learn where it is.

        vhost-user SEND_RARP: sent by the front-end after a migration.
        """
        rarp = (
            b"\xff" * 6 + mac + b"\x80\x35"  # Ethernet: broadcast, ETH_P_RARP
            + b"\x00\x01\x08\x00\x06\x04\x00\x03"  # Ethernet/IPv4, op 3: reverse request
            + mac + b"\0" * 4 + mac + b"\0" * 4
        ).ljust(60, b"\0")
        if self.switch is not None:
            self.switch.forward(self, rarp)

    @property
    def hdr_len(self) -> int:
        """5.1.6: the header has num_buffers with VERSION_1 or MRG_RXBUF, else 10 bytes."""
        if self.has_feature(VIRTIO_F_VERSION_1) or self.has_feature(VIRTIO_NET_F_MRG_RXBUF):
            return NET_HDR_SIZE
        return NET_HDR_LEGACY_SIZE

    def _reset(self) -> None:
        self.backlog.clear()
        if self.switch is not None:
            self.switch.forget(self)

    # -- queues ----------------------------------------------------------------------
    def process_queue(self, index: int, queue: SplitQueue) -> None:
        """TX: send what the driver queued; RX: new buffers, flush the backlog."""
        if index % 2:
            self._transmit(index, queue)
        else:
            self._flush_backlog()

    def _transmit(self, index: int, queue: SplitQueue) -> None:
        if datapath.accelerated_queue(queue):
            self._transmit_batches(index, queue)
            return
        memory = queue.memory
        hdr_len = self.hdr_len
        while True:
            batch = queue.pop_batch(TX_BATCH)
            if not len(batch):
                break
            # A disabled ring (vhost-user SET_VRING_ENABLE 0) drops what it transmits.
            forward = self.enabled[index] and self.switch is not None
            for chain in batch:
                data = read_chain(memory, chain, MAX_FRAME + hdr_len)
                if forward:
                    self._send_frame(data, hdr_len)
                else:
                    self.stats["tx_dropped"] += 1
            queue.push_batch(batch)
            self.signal(index)

    def _send_frame(self, data: bytes, hdr_len: int) -> None:
        if len(data) < hdr_len + ETH_HLEN:
            self.stats["tx_errors"] += 1
            self.log.warning("%s: transmitted chain of %d bytes is shorter than header + Ethernet", self.label, len(data))
            return
        hdr = NetHdr.unpack(data[:hdr_len])
        frame = data[hdr_len:]
        csum = (hdr.csum_start, hdr.csum_offset) if hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM else None
        if csum is not None and (hdr.csum_start >= len(frame) or sum(csum) + 2 > len(frame)):
            self.stats["tx_errors"] += 1
            self.log.warning("%s: NEEDS_CSUM offsets %s outside a %d-byte frame", self.label, csum, len(frame))
            return
        if hdr.gso_type != VIRTIO_NET_HDR_GSO_NONE:
            self._send_gso(hdr, frame)
            return
        self.stats["tx_packets"] += 1
        self.stats["tx_bytes"] += len(frame)
        assert self.switch is not None
        self.switch.forward(self, frame, csum)

    def _transmit_batches(self, index: int, queue: SplitQueue) -> None:
        """The C data path: whole batches gathered, then switched together."""
        accel = datapath.accel
        assert accel is not None
        frames = self._tx_frames
        hdr_len = self.hdr_len
        while True:
            batch = queue.pop_batch(TX_BATCH, self._tx_batch)
            if not len(batch):
                break
            frames.clear()
            accel.tx_gather(batch, queue, hdr_len, frames, self.gso_mask)
            queue.push_batch(batch)  # the frames are copied out: the buffers go back now
            self.signal(index)
            bad = sum(frames.errors)
            if bad:
                self.stats["tx_errors"] += bad
                self.log.warning(
                    "%s: dropped %d malformed transmit chains (short %d, too long %d, GSO %d, bad csum offsets %d)",
                    self.label, bad, *frames.errors,
                )
            if self.enabled[index] and self.switch is not None:
                self.stats["tx_packets"] += len(frames)
                self.stats["tx_bytes"] += frames.total_bytes()
                self.switch.forward_batch(self, frames)
            else:
                self.stats["tx_dropped"] += len(frames)

    def _send_gso(self, hdr: NetHdr, frame: bytes) -> None:
        """Segment a host TSO frame (5.1.6.2) and switch its segments."""
        if hdr.gso_type >= 32 or not self.gso_mask >> hdr.gso_type & 1 or not hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
            self.stats["tx_errors"] += 1
            self.log.warning("%s: GSO frame (gso_type %#x) the driver may not send dropped", self.label, hdr.gso_type)
            return
        try:
            segments = tso_segments(frame, hdr.csum_start, hdr.gso_size, hdr.gso_type == VIRTIO_NET_HDR_GSO_TCPV6)
        except GsoError as exc:
            self.stats["tx_errors"] += 1
            self.log.warning("%s: GSO frame dropped: %s", self.label, exc)
            return
        assert self.switch is not None
        for segment in segments:
            self.stats["tx_packets"] += 1
            self.stats["tx_bytes"] += len(segment)
            self.switch.forward(self, segment, None)

    # -- switch port: receive -------------------------------------------------------------
    def deliver_batch(self, frames, indexes: list[int]) -> int:
        """Take frames ``indexes`` of a :class:`~iovirt.virtio.net._datapath.Frames` from the switch.

        A broken receive ring fails this device, never the sender's.
        """
        try:
            return self._deliver_batch(frames, indexes)
        except IovirtError as exc:
            self.fail(exc)
            return 0

    def _deliver_batch(self, frames, indexes: list[int]) -> int:
        index = None if self.backlog or self.needs_reset or not self.link_up else self._rx_queue(frames.flow(indexes[0]))
        queue = None if index is None else self.queues[index]
        if queue is None or not datapath.accelerated_queue(queue):
            return sum(int(self.deliver(frames.frame(i), frames.csum(i))) for i in indexes)
        accel = datapath.accel
        assert accel is not None
        guest_csum = self.has_feature(VIRTIO_NET_F_GUEST_CSUM)
        if not guest_csum:
            accel.complete_pending(frames, indexes)  # 5.1.6.3: the driver cannot take partial checksums
        mergeable = self.has_feature(VIRTIO_NET_F_MRG_RXBUF)
        delivered, dropped, stop, nbytes = accel.rx_scatter(
            queue, frames, indexes, self.hdr_len, guest_csum, mergeable, self._rx_batch
        )
        if dropped:
            # 5.1.6.3.1: without MRG_RXBUF each buffer must hold a whole frame.
            self.log.warning("%s: dropped %d received frames: receive buffers too small", self.label, dropped)
        if delivered or dropped:
            self.stats["rx_packets"] += delivered
            self.stats["rx_bytes"] += nbytes
            self.stats["rx_dropped"] += dropped
            self.signal(index)
        for i in indexes[stop:]:
            # Out of chains, or a frame that spans several mergeable buffers.
            delivered += int(self.deliver(frames.frame(i), frames.csum(i)))
        return delivered

    def deliver(self, frame: bytes, csum: tuple[int, int] | None) -> bool:
        """Take a frame from the switch into a receive queue (or the backlog).

        A broken receive ring fails this device, never the sender's.
        """
        try:
            return self._deliver(frame, csum)
        except IovirtError as exc:
            self.fail(exc)
            return False

    def _deliver(self, frame: bytes, csum: tuple[int, int] | None) -> bool:
        if self.needs_reset or not self.link_up:
            self.stats["rx_dropped"] += 1
            return False
        if self.backlog:
            self.backlog.append((frame, csum))
            self._flush_backlog()
            return True
        if self._receive(frame, csum):
            return True
        if len(self.backlog) == self.backlog.maxlen:
            self.stats["rx_dropped"] += 1
        self.backlog.append((frame, csum))
        return True

    def _flush_backlog(self) -> None:
        while self.backlog:
            frame, csum = self.backlog[0]
            if not self._receive(frame, csum):
                return
            self.backlog.popleft()

    def _rx_queue(self, flow: int) -> int | None:
        """The receive queue for a frame of ``flow`` (its MAC pair): spread over the enabled started pairs.

        Both data paths choose with this, so a flow keeps its queue whichever delivers it.
        """
        ready = [2 * p for p in range(self.queue_pairs) if self.queues[2 * p] is not None and self.enabled[2 * p]]
        if not ready:
            return None
        return ready[flow % len(ready)]

    def _receive(self, frame: bytes, csum: tuple[int, int] | None) -> bool:
        """Write one frame into receive buffers; False if there are not enough of them."""
        index = self._rx_queue(int.from_bytes(frame[:12], "big"))
        if index is None:
            return False
        queue = self.queues[index]
        assert queue is not None
        if csum is not None and not self.has_feature(VIRTIO_NET_F_GUEST_CSUM):
            # The driver cannot take a partial checksum: complete it (5.1.6.3).
            buf = bytearray(frame)
            try:
                complete_checksum(buf, *csum)
            except ChecksumOffsetError as exc:
                self.log.warning("%s: %s", self.label, exc)
                self.stats["rx_dropped"] += 1
                return True
            frame, csum = bytes(buf), None
        if csum:
            hdr = NetHdr(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=csum[0], csum_offset=csum[1])
        elif self.has_feature(VIRTIO_NET_F_GUEST_CSUM) and l4_checksum_valid(frame):
            # 5.1.6.4.1: the device MAY set DATA_VALID, having validated the checksum.
            hdr = NetHdr(flags=VIRTIO_NET_HDR_F_DATA_VALID)
        else:
            hdr = NetHdr()
        if self.has_feature(VIRTIO_NET_F_MRG_RXBUF):
            done = self._receive_mergeable(queue, hdr, frame)
        else:
            done = self._receive_single(queue, hdr, frame)
        if done:
            self.stats["rx_packets"] += 1
            self.stats["rx_bytes"] += len(frame)
            self.signal(index)
        return done

    def _receive_single(self, queue: SplitQueue, hdr: NetHdr, frame: bytes) -> bool:
        chain = queue.pop()
        if chain is None:
            return False
        payload = NetHdr(hdr.flags, hdr.gso_type, hdr.hdr_len, hdr.gso_size, hdr.csum_start, hdr.csum_offset, 1).pack(
            self.hdr_len
        ) + frame
        if chain.writable_len < len(payload):
            # 5.1.6.3.1: without MRG_RXBUF each buffer must hold a whole frame.
            self.log.warning(
                "%s: receive buffer of %d bytes too small for a %d-byte frame; dropped",
                self.label, chain.writable_len, len(payload),
            )
            queue.push(chain.head, 0)
            self.stats["rx_dropped"] += 1
            return True
        queue.push(chain.head, write_chain(queue.memory, chain, payload))
        return True

    def _receive_mergeable(self, queue: SplitQueue, hdr: NetHdr, frame: bytes) -> bool:
        total = self.hdr_len + len(frame)
        chains = []
        room = 0
        while room < total:
            chain = queue.pop()
            if chain is None:
                queue.rewind(len(chains))
                return False
            chains.append(chain)
            room += chain.writable_len
        # num_buffers is the number of chains the frame spans (5.1.6.4).
        payload = memoryview(
            NetHdr(hdr.flags, hdr.gso_type, hdr.hdr_len, hdr.gso_size, hdr.csum_start, hdr.csum_offset, len(chains)).pack()
            + frame
        )
        pos = 0
        memory: GuestMemory = queue.memory
        for chain in chains:
            n = write_chain(memory, chain, payload[pos:])
            chain.used_len = n
            pos += n
        for chain in chains:
            queue.push(chain.head, chain.used_len)
        return True
