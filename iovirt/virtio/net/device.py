"""The virtio-net device (virtio 1.2 section 5.1), one port of the switch.

Queues are receiveq1, transmitq1, ..., receiveqN, transmitqN (5.1.2): even
indexes receive, odd ones transmit.  A transmitted frame goes to the
:class:`~iovirt.virtio.net.switch.LearningSwitch`; frames the switch delivers
to this port are written into receive buffers, spread over the enabled queue
pairs by a flow hash.

Batches of frames go through ``datapath.py`` (the Cython twin, or the Python
reference with the reference queue): transmit chains are gathered into
frames, received frames written one chain each.  What the batch path leaves
(the backlog, and frames spanning several MRG_RXBUF buffers) is written here
frame by frame.

The control virtqueue is not served here under vhost-user: a VMM in front
(QEMU's vhost-user net) handles it and turns ``VIRTIO_NET_CTRL_MQ`` into ring
enables.  In-process, ``ctrl_vq=True`` adds it (``ctrl.py``): the VLAN filter
table, the receive modes and MAC filtering table (honoured on receive), the
announce acknowledgement, notification coalescing (honoured in :meth:`VirtioNet.signal`)
and device statistics, each offered only by such a device.
"""

from __future__ import annotations

import collections
import struct
from typing import Any, Mapping

from iovirt.errors import IovirtError
from iovirt.memory import GuestMemory
from iovirt.virtio.chain import ChainBatch as Chains, DescChain, write_chain
from iovirt.virtio.counters import restore_counters
from iovirt.virtio.device import COMMON_FEATURES, VirtioDevice
from iovirt.virtio.kickjob import KickJob
from iovirt.virtio.net.crossing import Crossing
from iovirt.virtio.net.csum import ChecksumOffsetError, complete_checksum, l4_checksum_valid
from iovirt.virtio.net.defs import (
    FORWARD_EMPTY,
    FORWARD_HOLD,
    FORWARD_REFUSED,
    FORWARD_SLOW,
    FORWARD_SWITCH,
    ETH_HLEN,
    ETH_P_8021Q,
    MAX_FRAME,
    VIRTIO_NET_F_CTRL_MAC_ADDR,
    VIRTIO_NET_F_CTRL_RX,
    VIRTIO_NET_F_CTRL_RX_EXTRA,
    VIRTIO_NET_F_CTRL_VLAN,
    VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_DEVICE_STATS,
    VIRTIO_NET_F_GUEST_ANNOUNCE,
    VIRTIO_NET_F_HASH_TUNNEL,
    VIRTIO_NET_F_NOTF_COAL,
    VIRTIO_NET_F_RSS,
    VIRTIO_NET_F_VQ_NOTF_COAL,
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
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_DUPLEX_UNKNOWN,
    VIRTIO_NET_S_ANNOUNCE,
    VIRTIO_NET_S_LINK_UP,
    VIRTIO_NET_SPEED_UNKNOWN,
    VLAN_HLEN,
    NetHdr,
)
from iovirt.virtio.net import datapath
from iovirt.virtio.net.backlog import RxBacklog
from iovirt.virtio.net.ctrl import NetCtrl
from iovirt.virtio.net.rss import (
    RSS_MAX_INDIRECTION_TABLE_LENGTH,
    RSS_MAX_KEY_SIZE,
    SUPPORTED_HASH_TYPES,
    SUPPORTED_TUNNEL_TYPES,
)
from iovirt.virtio.net.switch import MAC_BITS, MAC_MASK, LearningSwitch
from iovirt.virtio.defs import VIRTIO_F_VERSION_1
from iovirt.virtio.queue import IMPLEMENTATION as QUEUE_IMPLEMENTATION
from iovirt.virtio.queue import ChainBatch, SplitQueue, is_accelerated
from iovirt.virtio.qos import Limits, TokenBucket
from iovirt.virtio.state import QueueState

TX_BATCH = 128
"""Transmit chains popped, gathered, returned and switched together.  The Python around the C parts costs
per batch: 128 against 64 took the 64 B sink from 2.7-3.1 M to 5.5 M frames/s and port to port from
1.4-1.6 M to 2.4 M (benchmarks/RESULTS.md, fifth session).  256 overran receivers' rings of 256 (the
frames went through the backlog; port to port fell to 0.3 M)."""
TX_BUDGET = 32
"""Transmit batches served per kick before the queue yields the thread that serves it (when the transport
has a timer to resume it at once): a port flooded by its driver must not keep the other devices of that
thread from their work (a blk device's completions, another port's kicks).  4096 frames, as before."""
RX_BACKLOG = 256  # frames held while the driver has posted no receive buffers
TX_ERROR_REASONS = ("short", "too_long", "gso", "csum_offset")
"""Why a transmit chain was malformed, in the order of ``datapath.Frames.errors``."""
MIN_MTU = 68  # RFC 791: every IPv4 host takes 68-byte datagrams
MAX_MTU = 65535  # virtio 1.2 5.1.4: mtu is a le16
CTRL_FEATURES = (
    VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_CTRL_RX,
    VIRTIO_NET_F_CTRL_VLAN,
    VIRTIO_NET_F_CTRL_RX_EXTRA,
    VIRTIO_NET_F_GUEST_ANNOUNCE,
    VIRTIO_NET_F_CTRL_MAC_ADDR,
    VIRTIO_NET_F_DEVICE_STATS,
    VIRTIO_NET_F_VQ_NOTF_COAL,
    VIRTIO_NET_F_NOTF_COAL,
    VIRTIO_NET_F_RSS,
    VIRTIO_NET_F_HASH_TUNNEL,
)
"""What a device with a control queue (``ctrl_vq=True``) offers on top: the commands ``ctrl.py`` serves."""
USECS = 1e-6
RSS_CONFIG_FIELDS = struct.pack(
    "<IBBHII", VIRTIO_NET_SPEED_UNKNOWN, VIRTIO_NET_DUPLEX_UNKNOWN, RSS_MAX_KEY_SIZE, RSS_MAX_INDIRECTION_TABLE_LENGTH,
    SUPPORTED_HASH_TYPES, SUPPORTED_TUNNEL_TYPES,
)
"""5.1.4: speed, duplex, rss_max_key_size, rss_max_indirection_table_length, supported_hash_types,
supported_tunnel_types."""
LIMITS = ("pps", "bps")  # transmit limits: frames/s, bytes/s (docs/qos.md)


def _reusable_batch() -> Any:
    """A batch the Cython queue pops into again and again; ``None`` with the reference queue (it allocates)."""
    batch_type: Any = ChainBatch  # the Cython batch is built empty, the reference one from its chains
    return batch_type() if QUEUE_IMPLEMENTATION == "cython" else None


MAC_LEN = 6
CONFIG_FIELDS = ((0, MAC_LEN), (6, 2), (8, 2), (10, 2))
"""``struct virtio_net_config`` fields: mac, status, max_virtqueue_pairs, mtu (5.1.4)."""


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
        ctrl_vq: bool = False,
    ) -> None:
        super().__init__(2 * queue_pairs + int(ctrl_vq), queue_max_size, label)
        if len(mac) != 6:
            raise ValueError(f"MAC must be 6 bytes, got {len(mac)}")
        self.mac = mac
        self.hw_mac = mac
        """The address a reset puts back in ``mac`` (VIRTIO_NET_CTRL_MAC_ADDR_SET changes ``mac``)."""
        self.announce_pending = False
        """VIRTIO_NET_S_ANNOUNCE: the device asked the driver to announce itself (5.1.9.5.4)."""
        self.mtu = mtu
        self.queue_pairs = queue_pairs
        self.switch = switch
        self.link_up = True
        self.backlog = RxBacklog(RX_BACKLOG)
        self.stats: collections.Counter[str] = collections.Counter()
        self._tx_frames = datapath.Frames()
        # (driver features, header length, GSO mask) the transmit path last worked out; -1: none yet.
        self._tx_params: tuple[int, int, int] = (-1, 0, 0)
        # Batches the Cython queue pops into again and again (the reference queue allocates its own).
        self._tx_batch = _reusable_batch()
        self._tx_resuming: set[int] = set()  # transmit queues that yielded, to be served again by the timer
        # The flow (Frames.flow) of the last batch switched: what the next kick tries to forward straight.
        self._flow: int | None = None
        self._rx_batch = _reusable_batch()
        # Transmit limits: None without any (the data path's one check), else the pps and bps buckets.
        self._limits = Limits(LIMITS, self.label, min_burst={"bps": MAX_FRAME})
        self._tx_buckets: tuple[TokenBucket | None, TokenBucket | None] | None = None
        self.ctrl = NetCtrl(self) if ctrl_vq else None  # the control queue, after the pairs (5.1.2)
        if switch is not None:
            switch.attach(self)

    # -- features and config (5.1.3, 5.1.4) ---------------------------------
    def device_features(self) -> int:
        """Offered: VERSION_1, EVENT_IDX, INDIRECT_DESC, CSUM, GUEST_CSUM, HOST_TSO4/6, MTU, MAC, MRG_RXBUF,
        STATUS, MQ; with a control queue also :data:`CTRL_FEATURES`.  Host TSO frames are segmented here, at
        ingress (see ``gso.py``)."""
        net: tuple[int, ...] = (
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
        if self.ctrl is not None:
            net += CTRL_FEATURES
        return COMMON_FEATURES | sum(1 << bit for bit in net)

    def config_space(self) -> bytes:
        """``struct virtio_net_config``: mac, status, max_virtqueue_pairs, mtu; with a control queue (which
        offers VIRTIO_NET_F_RSS and _HASH_TUNNEL) also speed and duplex (unknown: SPEED_DUPLEX is not offered)
        and the RSS and tunnel hash limits."""
        status = VIRTIO_NET_S_LINK_UP if self.link_up else 0
        if self.announce_pending and self.has_feature(VIRTIO_NET_F_GUEST_ANNOUNCE):
            status |= VIRTIO_NET_S_ANNOUNCE
        config = (
            self.mac
            + status.to_bytes(2, "little")
            + self.queue_pairs.to_bytes(2, "little")
            + self.mtu.to_bytes(2, "little")
        )
        if self.ctrl is not None:
            config += RSS_CONFIG_FIELDS
        return config

    def config_fields(self) -> tuple[tuple[int, int], ...]:
        """``(offset, size)`` of mac, status, max_virtqueue_pairs and mtu (5.1.4)."""
        return CONFIG_FIELDS

    def write_config(self, offset: int, data: bytes) -> bool:
        """5.1.4 legacy interface: ``mac`` is driver-writable while VIRTIO_F_VERSION_1 is not negotiated."""
        if self.has_feature(VIRTIO_F_VERSION_1) or offset + len(data) > MAC_LEN:
            return super().write_config(offset, data)
        mac = bytearray(self.mac)
        mac[offset : offset + len(data)] = data
        self.mac = bytes(mac)
        return True

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

    def request_announce(self) -> bool:
        """Ask the driver to announce the device (VIRTIO_NET_S_ANNOUNCE, 5.1.9.5.4), as after a migration.

        Only with VIRTIO_NET_F_GUEST_ANNOUNCE negotiated; returns whether the
        bit is now set.  The caller tells the transport the configuration
        changed; the driver's VIRTIO_NET_CTRL_ANNOUNCE_ACK clears it.
        """
        self.announce_pending = self.has_feature(VIRTIO_NET_F_GUEST_ANNOUNCE)
        return self.announce_pending

    # -- QoS: transmit limits (docs/qos.md) -----------------------------------------
    def set_limits(self, limits: Mapping[str, float]) -> None:
        """Limit what the guest transmits into the switch: ``pps`` (frames/s), ``bps`` (bytes/s).

        Keys not given keep their limit; 0 removes one.  Frames beyond a
        limit are dropped and counted (``stats["tx_drop_rate_limit"]``).
        Takes effect at the next transmit batch; safe from any thread.
        ``ValueError`` for an unknown key or a value not a finite number >= 0.
        """

        def apply(buckets: dict[str, TokenBucket]) -> None:
            self._tx_buckets = (buckets.get("pps"), buckets.get("bps")) if buckets else None

        self._limits.update(limits, apply)

    def limits(self) -> dict[str, float]:
        """The transmit limits, ``pps`` and ``bps``; 0.0 where there is none."""
        return self._limits.values()

    def _police(self, buckets: tuple[TokenBucket | None, TokenBucket | None], frames: Any) -> None:
        """Drop the frames of ``frames`` beyond the limits (from the first that does not fit on)."""
        pps, bps = buckets
        count = len(frames)
        allowed = count if pps is None else min(count, max(0, int(pps.refill())))
        if bps is not None:
            allowed, nbytes = frames.fit(allowed, max(0, int(bps.refill())))
            bps.take(nbytes)
        if pps is not None:
            pps.take(allowed)
        if allowed < count:
            frames.truncate(allowed)
            self.stats["tx_drop_rate_limit"] += count - allowed

    # -- saved state (port configuration and counters, outside guest memory) ---------
    def state(self) -> dict[str, Any]:
        """The port's configuration and counters as plain data (:meth:`restore` takes it back)."""
        return {
            "mac": self.mac.hex(":"),
            "mtu": self.mtu,
            "link_up": self.link_up,
            "queue_pairs": self.queue_pairs,
            "stats": dict(self.stats),
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Take another port's :meth:`state`: untrusted, every field is checked before any is applied.

        ``queue_pairs`` must be this port's: the queues a device has are fixed
        when it is created.  Raises ``ValueError`` naming the field.
        """
        try:
            mac_text, mtu, link_up, queue_pairs = state["mac"], state["mtu"], state["link_up"], state["queue_pairs"]
            stats = restore_counters(state["stats"])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a virtio-net state: {exc!r} missing or malformed") from exc
        try:
            mac = bytes.fromhex(mac_text.replace(":", ""))
        except (AttributeError, ValueError):
            mac = b""
        if len(mac) != 6:
            raise ValueError(f"MAC {mac_text!r} is not 6 hexadecimal bytes")
        if type(mtu) is not int or not MIN_MTU <= mtu <= MAX_MTU:
            raise ValueError(f"MTU {mtu!r} outside [{MIN_MTU}, {MAX_MTU}]")
        if type(link_up) is not bool:
            raise ValueError(f"link_up {link_up!r} is not a boolean")
        if queue_pairs != self.queue_pairs:
            raise ValueError(f"{queue_pairs!r} queue pairs saved, this port has {self.queue_pairs}")
        self.mac, self.mtu, self.link_up, self.stats = mac, mtu, link_up, stats
        self.hw_mac = mac

    @property
    def hdr_len(self) -> int:
        """5.1.6: the header has num_buffers with VERSION_1 or MRG_RXBUF, else 10 bytes."""
        if self.has_feature(VIRTIO_F_VERSION_1) or self.has_feature(VIRTIO_NET_F_MRG_RXBUF):
            return NET_HDR_SIZE
        return NET_HDR_LEGACY_SIZE

    def _reset(self) -> None:
        self.backlog.clear()
        self._tx_resuming.clear()
        self._flow = None
        self.announce_pending = False
        if self.ctrl is not None:
            self.ctrl.reset()
            self.mac = self.hw_mac
        if self.switch is not None:
            self.switch.forget(self)

    # -- queues ----------------------------------------------------------------------
    def process_queue(self, index: int, queue: SplitQueue) -> None:
        """TX: send what the driver queued; RX: new buffers, flush the backlog; the control queue's commands."""
        if self.ctrl is not None and self.counting:
            self.queue_stats[index]["notifications"] += 1  # 5.1.9.5.11: rx/tx_notifications
        if self.ctrl is not None and index == 2 * self.queue_pairs:
            self.ctrl.process(index, queue)
        elif index % 2:
            self._transmit(index, queue)
        else:
            self._flush_backlog()

    def _transmit(self, index: int, queue: SplitQueue) -> None:
        """Whole batches gathered by the data path, returned to the driver, then switched together.

        While the batches are of one flow that the switch sends to one port
        taking them as they are (:meth:`_shortcut`), the whole loop runs in C
        with the GIL released (``datapath.forward``); this loop is its
        reference and takes over wherever it stops.
        """
        frames = self._tx_frames
        _, hdr_len, gso_mask = self._tx_parameters()
        reuse = self._tx_batch if is_accelerated(queue) else None
        # Without a timer (the in-process transport) the ring is served until it is empty.
        budget = TX_BUDGET if self.call_later is not None else -1
        route = self._shortcut(index)
        while True:
            if budget == 0:
                self._yield_tx(index)
                break
            if route is not None:
                taken, route, empty = self._forward(index, queue, route, hdr_len, gso_mask, budget)
                if budget > 0:
                    budget -= taken
                if empty:
                    break
                continue
            budget -= 1
            batch = queue.pop_batch(TX_BATCH, reuse)
            if not len(batch):
                break
            frames.clear()
            datapath.tx_gather(batch, queue, hdr_len, frames, gso_mask)
            # The frames are copied out: the buffers go back now; with VIRTIO_F_IN_ORDER through one used
            # entry (2.7.9, 2.8.8): transmit buffers are used whole (read, nothing written).
            queue.push_batch(batch, coalesce=True)
            self.signal(index)
            self._switch(index, frames)

    def _tx_parameters(self) -> tuple[int, int, int]:
        """``(driver features, header length, GSO mask)`` for transmit: worked out once per negotiation, not per kick."""
        params: tuple[int, int, int] = self._tx_params
        if params[0] != self.driver_features:
            params = self._tx_params = (self.driver_features, self.hdr_len, self.gso_mask)
        return params

    def _switch(self, index: int, frames: Any) -> None:
        """Count, police and switch a transmit batch gathered from queue ``index`` (its chains returned)."""
        bad = sum(frames.errors)
        if bad:
            self._count_tx_errors(index, bad, frames.errors)
            self.log.warning(
                "%s: dropped %d malformed transmit chains (short %d, too long %d, GSO %d, bad csum offsets %d)",
                self.label, bad, *frames.errors,
            )
        # A disabled ring (vhost-user SET_VRING_ENABLE 0) drops what it transmits.
        if self.enabled[index] and self.switch is not None:
            buckets = self._tx_buckets
            if buckets is not None:
                self._police(buckets, frames)
            if self.counting:  # checked here: _count_tx is a call, once per batch on the hottest path
                self._count_tx(index, len(frames), frames.total_bytes())
            if len(frames):
                self._flow = frames.flow(0)
            self.switch.forward_batch(self, frames)
        else:
            self._count_drops(index, "tx", "ring_disabled", len(frames))

    def _shortcut(self, index: int, across: bool = False) -> tuple[Any, ...] | None:
        """Where transmit queue ``index``'s batches may go straight this kick (``datapath.forward``), if anywhere.

        The flow of the last batch switched, when the switch sends the whole
        of it to one port (:meth:`LearningSwitch.shortcut`) that takes it
        without looking at each batch (:meth:`receiver`), and this port has
        nothing to do with a batch either (no control queue, no transmit
        limits, its ring enabled).  With ``across``, a port another worker
        serves gives ``(crossing, src, dst)`` (``iovirt/virtio/net/crossing.py``).
        """
        flow, switch = self._flow, self.switch
        if flow is None or switch is None or self.ctrl is not None or self._tx_buckets is not None \
                or not self.enabled[index]:
            return None
        src, dst = flow & MAC_MASK, flow >> MAC_BITS
        egress = switch.shortcut(self, src, dst, across)
        if isinstance(egress, Crossing):
            return egress, src, dst
        receiver = getattr(egress, "receiver", None)
        rx = None if receiver is None else receiver(flow)
        return None if rx is None else (egress, src, dst, *rx)

    def _forward(
        self, index: int, queue: SplitQueue, route: tuple[Any, ...], hdr_len: int, gso_mask: int, budget: int
    ) -> tuple[int, tuple[Any, ...] | None, bool]:
        """One run of ``datapath.forward`` along ``route``; returns (batches taken, the route left, ring empty).

        What it leaves, this loop does: a batch of another flow or with
        rejected chains is switched, frames the receiver's ring did not take
        go through its own path, a ring it cannot serve is popped here.
        """
        egress, src, dst, rx_index, rx_queue, rx_batch, rx_hdr_len, guest_csum, mergeable, max_len = route
        frames = self._tx_frames
        answer = datapath.forward(
            queue, self._tx_batch, frames, hdr_len, gso_mask, src, dst, rx_queue, rx_batch, rx_hdr_len, guest_csum,
            mergeable, max_len, TX_BATCH, budget if budget > 0 else TX_BUDGET,
        )
        if answer is None:
            return 0, None, False
        stopped, batches, tx_frames, tx_bytes, delivered, rx_bytes, dropped, over_mtu, stop, tx_notify, rx_notify = answer
        self._forwarded(index, egress, rx_index, batches - int(stopped == FORWARD_SWITCH), tx_frames, tx_bytes,
                        (delivered, dropped, over_mtu, rx_bytes), rx_notify)
        notify = self.notifiers[index]
        if tx_notify and notify is not None:
            notify()
        if self._finish(index, egress, rx_index, stopped, stop):
            return batches, None, False
        return batches, None if stopped == FORWARD_SLOW else route, stopped == FORWARD_EMPTY

    def _forwarded(self, index: int, egress: Any, rx_index: int, switched: int, tx_frames: int, tx_bytes: int,
                   received: tuple[int, int, int, int], notify: bool) -> None:
        """Count what ``datapath.forward`` moved from transmit queue ``index`` into ``egress``'s ``rx_index``.

        ``switched`` batches went whole where the switch said;
        ``received``: ``(delivered, dropped, over_mtu, nbytes)`` for
        :meth:`received`, which also sends ``egress``'s notification if ``notify``.
        """
        if tx_frames:
            if self.counting:
                self._count_tx(index, tx_frames, tx_bytes)
            assert self.switch is not None  # (a route comes from it)
            self.switch.took_shortcut(switched)
        delivered, dropped, over_mtu, nbytes = received
        egress.received(rx_index, delivered, dropped, over_mtu, nbytes, notify)

    def _finish(self, index: int, egress: Any, rx_index: int, stopped: int, stop: int) -> bool:
        """Do what ``datapath.forward`` stopped at and left to this loop; whether it stopped at a batch.

        A batch of another flow or with rejected chains is switched; the
        frames from ``stop`` on, which ``egress``'s receive queue ``rx_index``
        did not take, go through its own path (:meth:`deliver_rest`: held in
        its backlog, and later frames behind them).
        """
        frames = self._tx_frames
        if stopped == FORWARD_SWITCH:
            self._switch(index, frames)
            return True
        if stopped == FORWARD_HOLD:
            egress.deliver_rest(frames, list(range(stop, len(frames))), rx_index)
            return True
        if stopped == FORWARD_REFUSED:  # the receive ring's next chain is for its own path, which raises or defers
            egress.deliver_batch(frames, list(range(stop, len(frames))))
            return True
        return False

    def kick_job(self, index: int) -> KickJob | None:
        """Transmit queue ``index``'s kicks as a kick job: ``datapath.forward`` along this kick's route (:meth:`_shortcut`).

        None where the kick needs this device's own loop: not a transmit
        queue, no route, a ring ``forward`` does not serve, or without the C
        twin.  The job holds as long as the transport says (nothing changed
        since it was offered); :meth:`_settle` counts what it did.
        """
        queue = self.queues[index]
        if not index % 2 or index >= 2 * self.queue_pairs or queue is None or self.needs_reset:
            return None
        route = self._shortcut(index, across=True)
        if route is None:
            return None
        _, hdr_len, gso_mask = self._tx_parameters()
        if isinstance(route[0], Crossing):
            return self._send_job(index, queue, route[0], route[1], route[2], hdr_len, gso_mask)
        egress, src, dst, rx_index, rx_queue, rx_batch, rx_hdr_len, guest_csum, mergeable, max_len = route
        job = datapath.forward_job(
            queue, self._tx_batch, self._tx_frames, hdr_len, gso_mask, src, dst, rx_queue, rx_batch, rx_hdr_len,
            guest_csum, mergeable, max_len, TX_BATCH, TX_BUDGET,
        )
        if job is None:
            return None
        return KickJob(job, (self.notifiers[index], egress.notifiers[rx_index]), rx_queue,
                       lambda: self._settle(index, job, egress, rx_index))

    def _settle(self, index: int, job: Any, egress: Any, rx_index: int) -> None:
        """Count what kick job ``job`` did, and finish where it stopped (its notifications went out already)."""
        pending, stop, switched, tx_frames, tx_bytes, delivered, rx_bytes, dropped, over_mtu, error = job.take()
        self._forwarded(index, egress, rx_index, switched, tx_frames, tx_bytes,
                        (delivered, dropped, over_mtu, rx_bytes), False)
        if error is not None:
            self._job_failed(error)
        elif pending is not None:
            self._finish(index, egress, rx_index, pending, stop)

    def _send_job(self, index: int, queue: SplitQueue, crossing: Crossing, src: int, dst: int, hdr_len: int,
                  gso_mask: int) -> KickJob | None:
        """Transmit queue ``index``'s kicks as a kick job publishing the flow ``src`` to ``dst`` into ``crossing``."""
        job = datapath.send_job(queue, self._tx_batch, self._tx_frames, crossing.channel, hdr_len, gso_mask, src, dst,
                                TX_BATCH, TX_BUDGET)
        if job is None:
            return None

        def settle() -> None:
            pending, batches, tx_frames, tx_bytes, error = job.take()
            if tx_frames:
                if self.counting:
                    self._count_tx(index, tx_frames, tx_bytes)
                assert self.switch is not None  # (a crossing comes from it)
                self.switch.crossed(batches)
            if error is not None:
                self._job_failed(error)
            elif pending == FORWARD_SWITCH:
                self._switch(index, self._tx_frames)

        return KickJob(job, (self.notifiers[index], crossing.doorbell), crossing.channel, settle)

    def crossing_job(self, crossing: Crossing) -> KickJob | None:
        """This port's side of ``crossing`` (batches another worker's ports send here) as a kick job, or None.

        ``datapath.receive_job`` into the receive queue :meth:`receiver`
        gives, while there is one queue to take every flow (more: which
        queue a frame goes to depends on its flow, and Python chooses).
        What the job leaves goes through this port's own path.
        """
        if len(self._rx_queues()) != 1 or self.backlog:
            return None  # (frames held: the channel's batches go behind them, through deliver_batch, which flushes)
        rx = self.receiver(0)
        if rx is None:
            return None
        rx_index, queue, batch, hdr_len, guest_csum, mergeable, max_len = rx
        job = datapath.receive_job(crossing.channel, queue, batch, hdr_len, guest_csum, mergeable, max_len,
                                   TX_BATCH, TX_BUDGET)
        if job is None:
            return None

        def settle() -> None:
            pending, _batches, delivered, rx_bytes, dropped, over_mtu, error = job.take()
            self.received(rx_index, delivered, dropped, over_mtu, rx_bytes, False)
            if error is not None:
                # A broken receive ring fails this device, and the rest of the batch it was writing is lost, as
                # when deliver_batch's own pop raises (the frames are not counted: the device is failed).
                self._job_failed(error)
                if crossing.channel.front() is not None:
                    crossing.taken()
                return
            item = crossing.channel.front() if pending is not None else None
            if item is None:
                return
            frames, start = item
            rest = list(range(start, len(frames)))
            try:
                if pending == FORWARD_HOLD:
                    self.deliver_rest(frames, rest, rx_index)
                else:  # the receive ring's next chain is for its own calls, which raise or defer
                    self.deliver_batch(frames, rest)
            finally:
                crossing.taken()

        return KickJob(job, (crossing.space, self.notifiers[rx_index]), queue, settle)

    def _job_failed(self, error: BaseException) -> None:
        """A kick job's slow path raised ``error``: a ring its driver broke fails this device, as kick would; else raised."""
        if not isinstance(error, IovirtError):
            raise error
        self.fail(error)

    def _yield_tx(self, index: int) -> None:
        """Give the thread back with chains left in transmit queue ``index``; the transport or a timer serves them next.

        No driver notification would: the driver kicks when the device caught
        up (2.7.10), and it has not.  The transport's :attr:`requeue` serves
        the queue after what else waits (a worker's kick loop may take it
        over: ``iovirt/vhost_user/kickloop.py``); else a timer, one resume
        per queue at a time.
        """
        if self.requeue is not None:
            self.requeue(index)
            return
        call_later = self.call_later
        if call_later is None or index in self._tx_resuming:
            return
        self._tx_resuming.add(index)

        def resume() -> None:
            self._tx_resuming.discard(index)
            self.kick(index)

        call_later(0.0, resume)

    # -- used buffer notifications, with coalescing (5.1.9.5.10) ---------------------------
    def signal(self, index: int) -> None:
        """Notify queue ``index``'s used buffers, holding the notification back as the coalescing parameters say.

        With non-zero ``max_packets`` and ``max_usecs`` a data queue notifies
        once ``max_packets`` frames went through since its last notification,
        or ``max_usecs`` after the first of them (on the transport's timer).
        Without a timer, or without the counters, it notifies at once: the
        parameters are best-effort (5.1.9.5.10.6 lets a device notify more
        often).  Suppression by the driver is honoured either way (2.7.7).
        """
        ctrl = self.ctrl
        if ctrl is None:
            super().signal(index)  # no control queue (vhost-user): the front-end has the coalescing commands
            return
        if index >= 2 * self.queue_pairs or self.call_later is None or not self.counting:
            self._notify(index)
            return
        coal = ctrl.coalescing
        max_packets, max_usecs = coal.params[index]
        pending = self.queue_stats[index]["frames"] - coal.notified_frames[index]
        if not (max_packets and max_usecs) or pending >= max_packets:
            self._notify(index)
        elif index not in coal.armed:
            coal.armed.add(index)
            self.call_later(max_usecs * USECS, lambda: self._coalesced(index))

    def _coalesced(self, index: int) -> None:
        """``max_usecs`` ran out on queue ``index``: notify what was held back."""
        assert self.ctrl is not None
        if index in self.ctrl.coalescing.armed:
            self._notify(index)

    def _notify(self, index: int) -> None:
        """Notify queue ``index`` if the driver wants it (2.7.7), counting it (5.1.9.5.11 rx/tx_interrupts)."""
        queue, notify = self.queues[index], self.notifiers[index]
        assert self.ctrl is not None
        if index < 2 * self.queue_pairs:
            coal = self.ctrl.coalescing
            coal.armed.discard(index)
            coal.notified_frames[index] = self.queue_stats[index]["frames"]
        if queue is not None and notify is not None and queue.need_notify():
            notify()
            if self.counting:
                self.queue_stats[index]["interrupts"] += 1  # 5.1.9.5.11: rx/tx_interrupts

    def coalescing_changed(self) -> None:
        """New coalescing parameters: queues whose held frames now meet them notify at once (5.1.9.5.10)."""
        assert self.ctrl is not None
        for index in sorted(self.ctrl.coalescing.armed):
            self.signal(index)

    def stop_queue(self, index: int) -> QueueState | None:
        """Also: a data queue disabled takes its direction's TX_SET / RX_SET coalescing when enabled again."""
        if self.ctrl is not None and index < 2 * self.queue_pairs:
            self.ctrl.coalescing.queue_disabled(index)
        return super().stop_queue(index)

    # -- counters (per batch: device totals and the queue's own) ------------------------
    def _count_tx(self, index: int, frames: int, nbytes: int) -> None:
        """``frames`` frames of ``nbytes`` bytes were transmitted on queue ``index``."""
        stats, qstats = self.stats, self.queue_stats[index]
        stats["tx_packets"] += frames
        stats["tx_bytes"] += nbytes
        qstats["frames"] += frames
        qstats["bytes"] += nbytes

    def _count_rx(self, index: int, frames: int, nbytes: int) -> None:
        """``frames`` frames of ``nbytes`` bytes were received on queue ``index``."""
        stats, qstats = self.stats, self.queue_stats[index]
        stats["rx_packets"] += frames
        stats["rx_bytes"] += nbytes
        qstats["frames"] += frames
        qstats["bytes"] += nbytes

    def _count_drops(self, index: int | None, direction: str, reason: str, frames: int) -> None:
        """``frames`` frames dropped for ``reason`` (a ``<direction>_dropped_<reason>`` counter)."""
        if not self.counting:
            return
        self.stats[direction + "_dropped"] += frames
        self.stats[f"{direction}_dropped_{reason}"] += frames
        if index is not None:
            self.queue_stats[index]["dropped"] += frames

    def _count_tx_errors(self, index: int, bad: int, errors: Any) -> None:
        """Malformed transmit chains, by reason (the order of ``datapath.Frames.errors``)."""
        if not self.counting:
            return
        self.stats["tx_errors"] += bad
        self.queue_stats[index]["errors"] += bad
        for reason, count in zip(TX_ERROR_REASONS, errors):
            if count:
                self.stats["tx_error_" + reason] += count

    # -- switch port: receive -------------------------------------------------------------
    def deliver_batch(self, frames: Any, indexes: list[int]) -> int:
        """Take frames ``indexes`` of a ``datapath.Frames`` from the switch.

        A broken receive ring fails this device, never the sender's.
        """
        if self.ctrl is not None:
            indexes = [i for i in indexes if self._ctrl_allows(frames.frame(i))]
            if not indexes:
                return 0
        try:
            return self._deliver_batch(frames, indexes)
        except IovirtError as exc:
            self.fail(exc)
            return 0

    def _deliver_batch(self, frames: Any, indexes: list[int]) -> int:
        if self.backlog and not self.needs_reset and self.link_up:
            self._flush_backlog()
            if not self.backlog.room:
                # Still no receive buffers and the backlog full: drop the batch at once (tail drop), counted.
                # Frame by frame, a guest that stopped receiving slowed every port's transmit (they share
                # the data-plane thread): 4 ports flooded by a sender went from 750 k to 19 k frames/s.
                self._count_drops(None, "rx", "no_buffers", len(indexes))
                return 0
        indexes = self._within_mtu(frames, indexes)
        if not indexes:
            return 0
        if self.backlog and not self.needs_reset and self.link_up:
            return self._hold(frames, indexes)  # still frames held (no buffers): these go behind them
        if self.ctrl is not None and self.ctrl.rss is not None:
            # RSS steers each frame by its own hash: the per-frame path (5.1.9.5.7.3).
            return sum(int(self._deliver(frames.frame(i), frames.csum(i))) for i in indexes)
        index = None if self.needs_reset or not self.link_up else self._rx_queue(frames.flow(indexes[0]))
        queue = None if index is None else self.queues[index]
        if index is None or queue is None:
            return sum(int(self.deliver(frames.frame(i), frames.csum(i))) for i in indexes)
        delivered, stop = self._scatter(index, queue, frames, indexes)
        return delivered + self._hold(frames, indexes[stop:], index, queue)

    def _within_mtu(self, frames: Any, indexes: list[int]) -> list[int]:
        """``indexes`` without the frames longer than the MTU allows (5.1.4.1: not passed to the driver), counted."""
        if not self.has_feature(VIRTIO_NET_F_MTU):
            return indexes
        longer = [i for i in frames.longer(self.mtu + ETH_HLEN, indexes) if self._over_mtu(frames.frame(i))]
        if not longer:
            return indexes
        over = set(longer)
        fitting = [i for i in indexes if i not in over]
        self._count_drops(None, "rx", "over_mtu", len(indexes) - len(fitting))
        return fitting

    def deliver_rest(self, frames: Any, indexes: list[int], index: int) -> int:
        """Frames ``indexes`` of a batch another port's transmit loop wrote into receive queue ``index`` up to them.

        ``datapath.forward`` stopped there (the ring ran out of chains, a
        frame spans mergeable buffers, a chain it left to the queue's own
        calls): the rest goes as this port's batch path sends what its ring
        did not take (:meth:`_hold`).  A broken receive ring fails this device.
        """
        try:
            indexes = self._within_mtu(frames, indexes)
            return self._hold(frames, indexes, index, self.queues[index]) if indexes else 0
        except IovirtError as exc:
            self.fail(exc)
            return 0

    def _hold(self, frames: Any, indexes: list[int], index: int | None = None, queue: SplitQueue | None = None) -> int:
        """Frames the batch path left (out of chains, or one spanning mergeable buffers); returns those taken.

        The first goes through the per-frame path: it spans mergeable
        buffers, or is held in the backlog.  Once one is held, the rest join
        it at once (tail drop when it is full), not one failed write each.
        If it went out instead, the rest go through the batch path into
        receive queue ``index`` again: the driver may have posted buffers
        meanwhile, and frame by frame a receiver that keeps just up with its
        sender cost a Python step per frame (``benchmarks/RESULTS.md``, ninth
        session: 64 B port to port ran at a quarter of the rate it has now).
        """
        taken = 0
        while indexes:
            if self.backlog:
                held = self.backlog.extend(frames, indexes)
                if held < len(indexes):
                    self._count_drops(None, "rx", "no_buffers", len(indexes) - held)
                return taken + held
            first, indexes = indexes[0], indexes[1:]
            taken += int(self.deliver(frames.frame(first), frames.csum(first)))
            if indexes and index is not None and queue is not None and not self.backlog and not self.needs_reset \
                    and self.link_up:
                delivered, stop = self._scatter(index, queue, frames, indexes)
                taken += delivered
                indexes = indexes[stop:]
        return taken

    def _scatter(self, index: int, queue: SplitQueue, frames: Any, indexes: list[int]) -> tuple[int, int]:
        """Write frames ``indexes`` into receive queue ``index`` through the batch data path.

        Returns ``(delivered, stop)``: ``indexes[stop:]`` were left (chains ran
        out, or a frame spans several mergeable buffers).
        """
        guest_csum = self.has_feature(VIRTIO_NET_F_GUEST_CSUM)
        if not guest_csum:
            datapath.complete_pending(frames, indexes)  # 5.1.6.3: the driver cannot take partial checksums
        mergeable = self.has_feature(VIRTIO_NET_F_MRG_RXBUF)
        reuse = self._rx_batch if is_accelerated(queue) else None
        delivered, dropped, stop, nbytes = datapath.rx_scatter(
            queue, frames, indexes, self.hdr_len, guest_csum, mergeable, reuse
        )
        self._account_rx(index, delivered, dropped, nbytes)
        if delivered or dropped:
            self.signal(index)
        return delivered, stop

    def _account_rx(self, index: int, delivered: int, dropped: int, nbytes: int) -> None:
        """Count a batch written into receive queue ``index``; log the frames too big for their buffer."""
        if dropped:
            # 5.1.6.3.1: without MRG_RXBUF each buffer must hold a whole frame.
            self.log.warning("%s: dropped %d received frames: receive buffers too small", self.label, dropped)
        if (delivered or dropped) and self.counting:
            self._count_rx(index, delivered, nbytes)
            if dropped:
                self._count_drops(index, "rx", "small_buffer", dropped)

    # -- switch port: frames written straight in by another port's transmit loop ---------------
    def receiver(self, flow: int) -> tuple[int, SplitQueue, Any, int, bool, bool, int] | None:
        """Where another port's transmit loop may write frames of ``flow`` straight in (``datapath.forward``).

        ``(index, queue, batch, hdr_len, guest_csum, mergeable, max_len)``:
        the receive queue :meth:`_rx_queue` picks for the flow, with what
        writing into it takes.  None while this port's own path must see
        each batch: a control queue (filters, RSS), frames held in the
        backlog that its buffers cannot take yet, a reset pending, the link
        down, no queue ready.
        """
        if self.ctrl is not None or self.needs_reset or not self.link_up:
            return None
        if self.backlog:
            try:
                self._flush_backlog()  # as a batch from the switch would: what is held goes first
            except IovirtError as exc:  # a broken receive ring fails this device, never the sender's
                self.fail(exc)
                return None
            if self.backlog:
                return None
        index = self._rx_queue(flow)
        queue = None if index is None else self.queues[index]
        if index is None or queue is None:
            return None
        max_len = self.mtu + ETH_HLEN if self.has_feature(VIRTIO_NET_F_MTU) else MAX_FRAME
        return (index, queue, self._rx_batch, self.hdr_len, self.has_feature(VIRTIO_NET_F_GUEST_CSUM),
                self.has_feature(VIRTIO_NET_F_MRG_RXBUF), max_len)

    def received(self, index: int, delivered: int, dropped: int, over_mtu: int, nbytes: int, notify: bool) -> None:
        """Another port's transmit loop wrote into receive queue ``index``: count it, notify if ``notify``.

        ``over_mtu`` frames were dropped for this port's MTU (5.1.4.1);
        ``notify``: the driver asked for the notification (the loop asked
        the queue, once).
        """
        if over_mtu:
            self._count_drops(None, "rx", "over_mtu", over_mtu)
        self._account_rx(index, delivered, dropped, nbytes)
        notifier = self.notifiers[index]
        if notify and notifier is not None:
            notifier()

    def deliver(self, frame: bytes, csum: tuple[int, int] | None) -> bool:
        """Take a frame from the switch into a receive queue (or the backlog).

        A broken receive ring fails this device, never the sender's.
        """
        if self.ctrl is not None and not self._ctrl_allows(frame):
            return False
        try:
            return self._deliver(frame, csum)
        except IovirtError as exc:
            self.fail(exc)
            return False

    def _deliver(self, frame: bytes, csum: tuple[int, int] | None) -> bool:
        if self.needs_reset or not self.link_up:
            self._count_drops(None, "rx", "link_down", 1)
            return False
        if self._over_mtu(frame):
            self._count_drops(None, "rx", "over_mtu", 1)
            return False
        if self.ctrl is not None and self._frame_queue(frame) is None:
            # 5.1.9.5.6.2: every receive queue in use is being reset (or not set up); 5.1.9.5.7.3: the queue RSS
            # chose is: the frame is dropped, not held for later.
            self._count_drops(None, "rx", "no_queue", 1)
            return False
        if self.backlog:
            self._flush_backlog()
            if not self.backlog.append(frame, csum):  # tail drop: the frames held keep their order
                self._count_drops(None, "rx", "no_buffers", 1)
                return False
            self._flush_backlog()
            return True
        if self._receive(frame, csum):
            return True
        if not self.backlog.append(frame, csum):
            self._count_drops(None, "rx", "no_buffers", 1)
            return False
        return True

    def _over_mtu(self, frame: bytes) -> bool:
        """Whether a received frame exceeds mtu plus its Ethernet header (a VLAN tag included) with MTU negotiated."""
        if not self.has_feature(VIRTIO_NET_F_MTU):
            return False
        tagged = int.from_bytes(frame[12:14], "big") == ETH_P_8021Q
        return len(frame) > self.mtu + ETH_HLEN + (VLAN_HLEN if tagged else 0)

    def _ctrl_allows(self, frame: bytes) -> bool:
        """The filters the driver set through the control queue, as negotiated: VLAN (5.1.9.5.3; a tagged frame
        whose VID is not in the table is dropped), then receive modes and MAC table (5.1.9.5.1, 5.1.9.5.2)."""
        ctrl = self.ctrl
        assert ctrl is not None
        if self.has_feature(VIRTIO_NET_F_CTRL_VLAN) and not ctrl.allows(frame):
            self._count_drops(None, "rx", "vlan_filter", 1)
            return False
        if self.has_feature(VIRTIO_NET_F_CTRL_RX) and not ctrl.rx_filter.allows(frame, self.mac):
            self._count_drops(None, "rx", "rx_filter", 1)
            return False
        return True

    def _flush_backlog(self) -> None:
        """Write the frames held into receive buffers, oldest first, until the buffers run out.

        Runs of frames bound for one queue go through the batch data path, as frames from the switch do: a
        receiver that falls behind for a moment (its ring full for 256 frames) otherwise costs its port 256
        frames on the per-frame path, and every port of the thread pays (issue 15:
        tests/backend/test_blk_slow_disk_net.py).  Behind an IOMMU (the queue's memory has a translator) one
        frame at a time: there a completion makes the IOTLB forget the buffers' translations, and the batch
        path livelocked a receive queue, every IOTLB UPDATE retrying the backlog and missing again
        (tests/realguest/test_viommu_guests.py).  A frame the batch path leaves (it spans mergeable buffers)
        goes alone.
        """
        backlog = self.backlog
        while backlog:
            index = self._frame_queue(backlog[0][0])
            queue = None if index is None else self.queues[index]
            if index is None or queue is None or not queue.pending():
                return  # no receive buffer: nothing to try (this runs for every batch the switch brings)
            if queue.memory.translator is None:
                frames, indexes = backlog.oldest(TX_BATCH)
                if self.queue_pairs > 1:  # with one pair every frame is for the first one's queue
                    run = 1
                    while run < len(indexes) and self._frame_queue(frames.frame(indexes[run])) == index:
                        run += 1
                    del indexes[run:]  # the run for this queue ends here
                _, stop = self._scatter(index, queue, frames, indexes)
                backlog.popleft(stop)
                if stop == len(indexes):
                    continue
            frame, csum = backlog[0]
            if not self._receive(frame, csum):
                return
            backlog.popleft()

    def _frame_queue(self, frame: bytes) -> int | None:
        """The receive queue for ``frame``: by RSS once the driver configured it (a queue being reset is not
        replaced: the frame is dropped, 5.1.9.5.7.3), else by its flow (:meth:`_rx_queue`)."""
        rss = self.ctrl.rss if self.ctrl is not None else None
        if rss is None:
            return self._rx_queue(int.from_bytes(frame[:12], "big"))
        assert self.ctrl is not None
        index = rss.queue(frame, self.ctrl.tunnel_types)
        return index if self.queues[index] is not None and self.enabled[index] else None

    def _rx_queue(self, flow: int) -> int | None:
        """The receive queue for a frame of ``flow`` (its MAC pair): spread over the enabled started pairs.

        Both data paths choose with this, so a flow keeps its queue whichever delivers it.  With the control
        queue served here only the pairs the driver set with VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET are used, receiveq1
        alone after a reset (5.1.9.5.6.2); a queue being reset is passed over for the others.
        """
        ready = self._rx_queues()
        if not ready:
            return None
        return ready[flow % len(ready)]

    def _rx_queues(self) -> list[int]:
        """The receive queues :meth:`_rx_queue` spreads flows over."""
        pairs = self.queue_pairs
        if self.ctrl is not None:
            pairs = self.ctrl.virtqueue_pairs if self.has_feature(VIRTIO_NET_F_MQ) else 1
        return [2 * p for p in range(pairs) if self.queues[2 * p] is not None and self.enabled[2 * p]]

    def _receive(self, frame: bytes, csum: tuple[int, int] | None) -> bool:
        """Write one frame into receive buffers; False if there are not enough of them."""
        index = self._frame_queue(frame)
        queue = None if index is None else self.queues[index]
        if index is None or queue is None:
            return False
        if csum is not None and not self.has_feature(VIRTIO_NET_F_GUEST_CSUM):
            # The driver cannot take a partial checksum: complete it (5.1.6.3).
            buf = bytearray(frame)
            try:
                complete_checksum(buf, *csum)
            except ChecksumOffsetError as exc:
                self.log.warning("%s: %s", self.label, exc)
                self._count_drops(index, "rx", "csum_offset", 1)
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
            done = self._receive_single(index, queue, hdr, frame)
        if done:
            if self.counting:
                self._count_rx(index, 1, len(frame))
            self.signal(index)
        return done

    def _receive_single(self, index: int, queue: SplitQueue, hdr: NetHdr, frame: bytes) -> bool:
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
            self._count_drops(index, "rx", "small_buffer", 1)
            return True
        queue.push(chain.head, write_chain(queue.memory, chain, payload))
        return True

    def _receive_mergeable(self, queue: SplitQueue, hdr: NetHdr, frame: bytes) -> bool:
        total = self.hdr_len + len(frame)
        chains: list[DescChain] = []
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
        # One used idx update for the whole frame: a driver that sees the first
        # buffer's num_buffers must also see every buffer it counts (5.1.6.4).
        queue.push_batch(Chains(chains))
        return True
