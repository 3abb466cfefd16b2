"""A bench port: the guest driver of one virtio-net device, with scapy packets in and out.

:meth:`BenchPort.send` places frames with their ``virtio_net_hdr`` on the
transmit queue and kicks; :meth:`BenchPort.recv` returns what the device wrote
into the receive buffers the port keeps posted, as
``VirtioNetHdr / Ether / ...`` packets.  Queue 0 is receiveq1 and queue 1
transmitq1 (virtio 1.2 5.1.2).

With VIRTIO_NET_F_MRG_RXBUF a frame may span several receive buffers: the
first holds the header whose ``num_buffers`` counts them (5.1.6.4), and the
port joins them back.  Without it every buffer holds one whole frame with
``num_buffers`` 1.  Buffers live at fixed guest addresses and are reposted
once read, so a port can move any number of frames.

The device is not trusted: a used ring that names a buffer not in flight,
jumps further than the buffers in flight, reports more bytes than a buffer
holds, or a header with ``num_buffers`` 0 raise :class:`UsedRingError`; a
device that does not answer raises :class:`BenchTimeout` after the timeout.
"""

from __future__ import annotations

import collections
import math
import time
from typing import Any, Iterable

from scapy.packet import Packet

from iovirt.bench.errors import BenchError, BenchTimeout, UsedRingError
from iovirt.bench.layers import VirtioNetHdr, VirtioNetHdrHashReport, VirtioNetHdrLegacy, hdr_class
from iovirt.bench.target import DEFAULT_TIMEOUT, DriverTarget
from iovirt.virtio.defs import VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1
from iovirt.virtio.driver import DriverQueue, DriverQueueError, UsedElem
from iovirt.virtio.net import impair
from iovirt.virtio.net.defs import (
    ETH_HLEN,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_HOST_ECN,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_HOST_UFO,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_STATUS,
    VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
)

RX_QUEUE = 0
TX_QUEUE = 1

SUPPORTED_FEATURES = sum(
    1 << bit
    for bit in (
        VIRTIO_F_VERSION_1,
        VIRTIO_F_EVENT_IDX,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_MTU,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_HOST_UFO,
        VIRTIO_NET_F_HOST_ECN,
    )
)
"""Feature bits a bench port can drive; it never acks others (packed rings, control queue, GUEST_TSO...)."""

MAX_FRAME = 65550  # 5.1.6.3.1: the largest receive buffer a driver posts is 65562 bytes with the header
DEFAULT_RX_BUFFER = 2048  # > 1526, the least a non-mergeable buffer must hold (5.1.6.3.1)

HDR_CLASSES = (VirtioNetHdrLegacy, VirtioNetHdr, VirtioNetHdrHashReport)


class BenchPort:
    """The guest driver of one virtio-net device behind ``target``.

    ``rx_buffer_size`` and ``rx_buffers`` set the receive buffers kept
    posted (small ones exercise MRG_RXBUF); ``split_header`` puts the header
    and the frame of each transmitted packet in separate descriptors
    (any layout, 2.7.4 / 5.1.6.2); ``timeout`` bounds every wait.
    """

    def __init__(
        self,
        target: DriverTarget,
        *,
        queue_size: int = 256,
        rx_buffer_size: int = DEFAULT_RX_BUFFER,
        rx_buffers: int | None = None,
        tx_buffer_size: int = MAX_FRAME,
        split_header: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
        name: str = "",
    ) -> None:
        self.target = target
        self.name = name or target.name
        self.timeout = timeout
        self.split_header = split_header
        self.features = target.features
        self.hdr_cls = hdr_class(self.features)
        self._zero_hdr = bytes(self.hdr_cls())  # no offload (5.1.6.2); built once, scapy is slow
        self.hdr_size = len(self._zero_hdr)
        self.mergeable = bool(self.features >> VIRTIO_NET_F_MRG_RXBUF & 1)
        queues = target.start_queues([RX_QUEUE, TX_QUEUE], queue_size)
        self.rxq: DriverQueue = queues[RX_QUEUE]
        self.txq: DriverQueue = queues[TX_QUEUE]
        memory, alloc = target.memory, target.alloc
        self.memory = memory
        self.rx_buffer_size = rx_buffer_size
        nrx = queue_size if rx_buffers is None else rx_buffers
        self._rx_slots = [alloc.alloc(rx_buffer_size) for _ in range(nrx)]
        self._rx_by_head: dict[int, int] = {}
        self.tx_buffer_size = tx_buffer_size
        self._tx_free = [alloc.alloc(tx_buffer_size) for _ in range(queue_size)]
        self._tx_by_head: dict[int, int] = {}
        self._rx_used: collections.deque[UsedElem] = collections.deque()
        self._rx_frames: collections.deque[Packet] = collections.deque()
        self.received: list[Packet] = []
        """Every frame the device wrote to this port, in order (for pcaps)."""
        self.rx_buffer_lens: list[tuple[int, ...]] = []
        """For each frame in :attr:`received`: the used len of every buffer it took (MRG_RXBUF accounting)."""
        self.stats: collections.Counter = collections.Counter()
        self._impairers: dict[str, impair.Impairer[bytes]] = {}
        for slot in self._rx_slots:
            self._post_rx(slot)
        self.target.kick(RX_QUEUE)

    def has_feature(self, bit: int) -> bool:
        """Whether feature ``bit`` was negotiated."""
        return bool(self.features >> bit & 1)

    # -- transmit ---------------------------------------------------------------------
    def send(self, pkts: Packet | bytes | Iterable[Packet | bytes]) -> int:
        """Queue frames on transmitq1 and kick; returns how many were queued.

        A packet may start with a ``VirtioNetHdr*`` layer of the negotiated
        form (its fields go to the device as given); anything else gets an
        all-zero header (no offload, 5.1.6.2).  When the ring is full the port
        waits (bounded) for the device to complete earlier frames.
        """
        if isinstance(pkts, (Packet, bytes, bytearray)):
            pkts = [pkts]
        if self._impairers:
            pkts = self._impair_sent(pkts)
        count = 0
        for pkt in pkts:
            hdr, frame = (pkt.hdr, bytes(pkt)) if isinstance(pkt, _Held) else self._split(pkt)
            needed = 2 if self.split_header else 1
            if self.txq.num_free < needed or not self._tx_free:
                self.target.kick(TX_QUEUE)
                self._reap_tx(wait_for=1)
            slot = self._tx_free.pop()
            self.memory.write(slot, hdr + frame)
            if self.split_header:
                head = self.txq.add_chain([(slot, len(hdr)), (slot + len(hdr), len(frame))])
            else:
                head = self.txq.add_chain([(slot, len(hdr) + len(frame))])
            self._tx_by_head[head] = slot
            count += 1
        self.target.kick(TX_QUEUE)
        self.stats["tx_frames"] += count
        self._reap_tx(wait_for=0)
        return count

    def _split(self, pkt: Packet | bytes) -> tuple[bytes, bytes]:
        if isinstance(pkt, Packet) and isinstance(pkt, HDR_CLASSES):
            if not isinstance(pkt, self.hdr_cls):
                raise BenchError(
                    f"{self.name}: a {type(pkt).__name__} header was given, "
                    f"but the negotiated features ({self.features:#x}) call for {self.hdr_cls.__name__}"
                )
            raw = bytes(pkt)
            hdr, frame = raw[: self.hdr_size], raw[self.hdr_size :]
        else:
            hdr, frame = self._zero_hdr, bytes(pkt)
        if len(hdr) + len(frame) > self.tx_buffer_size:
            raise BenchError(
                f"{self.name}: {len(frame)}-byte frame with header exceeds the {self.tx_buffer_size}-byte TX buffer"
            )
        return hdr, frame

    def flush(self, timeout: float | None = None) -> None:
        """Wait until the device has completed every queued frame."""
        self._reap_tx(wait_for=len(self._tx_by_head), timeout=timeout)

    @property
    def tx_in_flight(self) -> int:
        """Frames queued and not yet completed by the device."""
        return len(self._tx_by_head)

    def _reap_tx(self, wait_for: int, timeout: float | None = None) -> None:
        """Take completed TX chains; wait (bounded) until at least ``wait_for`` were taken."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        taken = 0
        while True:
            for elem in self._get_used(self.txq):
                self._tx_free.append(self._tx_by_head.pop(elem.head))
                taken += 1
            if taken >= wait_for:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchTimeout("transmitted frames completed", f"{self.name} queue {TX_QUEUE}", wait_for, taken, timeout)
            self.target.wait(TX_QUEUE, remaining)

    # -- receive ------------------------------------------------------------------
    def _post_rx(self, slot: int) -> None:
        head = self.rxq.add_chain(writable=[(slot, self.rx_buffer_size)])
        self._rx_by_head[head] = slot

    def recv(self, count: int | None = None, timeout: float | None = None) -> list[Packet]:
        """Frames the device wrote, dissected as ``VirtioNetHdr / Ether / ...``.

        ``count=None`` returns what has arrived so far without waiting;
        otherwise waits (at most ``timeout``) for exactly ``count`` frames and
        raises :class:`BenchTimeout` (holding the frames that did arrive) when
        fewer came.  Frames beyond ``count`` stay for the next call.
        """
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            self._collect_rx()
            if self._impairers:
                self._impair_release()
            if count is None or len(self._rx_frames) >= count:
                n = len(self._rx_frames) if count is None else count
                return [self._rx_frames.popleft() for _ in range(n)]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if self._rx_used:
                    first = self._rx_used[0]
                    raise UsedRingError(
                        RX_QUEUE,
                        f"a frame's header says num_buffers {self._num_buffers(first)} "
                        f"but only {len(self._rx_used)} buffers were used within {timeout:g} s",
                    )
                frames = list(self._rx_frames)
                self._rx_frames.clear()
                raise BenchTimeout("frames received", f"{self.name} queue {RX_QUEUE}", count, len(frames), timeout, frames)
            self.target.wait(RX_QUEUE, self._impair_wait(remaining) if self._impairers else remaining)

    def _collect_rx(self) -> None:
        used = self._get_used(self.rxq)
        if not used:
            return
        # Take every slot back before reposting any: a reposted chain may reuse
        # the head of an entry later in this batch.
        slots = [self._rx_by_head.pop(elem.head) for elem in used]
        for slot in slots:
            self._post_rx(slot)
        self.target.kick(RX_QUEUE)
        for elem in used:
            if elem.len > self.rx_buffer_size:
                raise UsedRingError(
                    RX_QUEUE, f"used len {elem.len} for head {elem.head} exceeds its {self.rx_buffer_size}-byte buffer"
                )
        self._rx_used.extend(used)
        while self._rx_used:
            first = self._rx_used[0]
            if first.len == 0:
                # The device gave the buffer back unwritten: it dropped a frame
                # (iovirt does so for a non-mergeable buffer too small for it).
                self._rx_used.popleft()
                self.stats["rx_empty_buffers"] += 1
                continue
            if first.len < self.hdr_size + ETH_HLEN:
                self._rx_used.popleft()
                raise UsedRingError(
                    RX_QUEUE,
                    f"used len {first.len} is shorter than the {self.hdr_size}-byte header plus an Ethernet header",
                )
            spans = self._num_buffers(first) if self.mergeable else 1
            if spans == 0:
                self._rx_used.popleft()
                raise UsedRingError(RX_QUEUE, "num_buffers is 0; with MRG_RXBUF it must be at least 1 (5.1.6.4)")
            if spans > len(self._rx_used):
                return  # the rest of the frame has not been written yet
            elems = [self._rx_used.popleft() for _ in range(spans)]
            self.rx_buffer_lens.append(tuple(e.len for e in elems))
            data = b"".join(e.data for e in elems)
            if "egress" in self._impairers:
                self._impair_received(data)
            else:
                self._rx_frames.append(self._dissect(data))

    def _num_buffers(self, elem: UsedElem) -> int:
        return int.from_bytes(elem.data[10:12], "little")

    def _dissect(self, data: bytes) -> Packet:
        pkt = self.hdr_cls(data)
        pkt.time = time.time()
        self.received.append(pkt)
        self.stats["rx_frames"] += 1
        return pkt

    # -- impairments (iovirt/virtio/net/impair.py) ----------------------------------------
    def impair(self, direction: str = impair.DEFAULT_DIR, **settings: Any) -> None:
        """Impair what this port sends (``ingress``: into the switch), receives (``egress``) or ``both``.

        ``settings`` are :class:`~iovirt.virtio.net.impair.Impairment` fields:
        ``port.impair(drop=0.1, delay_ms=5, seed=1)``; none stop impairing the
        direction.  Frames held by a delay or a rate go on when the port next
        sends or receives (:meth:`recv` waits for them).  Counters go to
        :attr:`stats` (``tx_impair_dropped``, ``rx_impair_delayed``, ...).
        Raises :class:`~iovirt.virtio.net.impair.ImpairmentError` for an
        impossible setting.
        """
        if direction not in impair.DIR_CHOICES:
            raise impair.ImpairmentError(f"direction: want one of {', '.join(impair.DIR_CHOICES)}, got {direction!r}")
        try:
            impairment = impair.Impairment(**settings)
        except TypeError:
            known = ", ".join(impair.Impairment.__dataclass_fields__)
            raise impair.ImpairmentError(f"unknown impairment in {sorted(settings)} (known: {known})") from None
        for name in impair.DIR_CHOICES[direction]:
            self._impair_release(math.inf)  # what the old setting held goes on
            if impairment.active:
                self._impairers[name] = impair.Impairer(impairment, name, count=impair.counting(self.stats, name),
                                                        retag=_corrupted_hdr)
            else:
                self._impairers.pop(name, None)

    def _impair_sent(self, pkts: Iterable[Packet | bytes]) -> list[Packet | bytes]:
        """What leaves now of ``pkts``; the ingress impairer holds or drops the rest."""
        self._impair_release()
        impairer = self._impairers.get("ingress")
        out: list[Packet | bytes] = []
        for pkt in pkts:
            if isinstance(pkt, _Held) or impairer is None:  # held here before, its time has come; or not impaired
                out.append(pkt)
                continue
            hdr, frame = self._split(pkt)
            out += [_Held(f, h or hdr) for f, _, h in impairer.admit(frame, _pending(hdr), hdr)]
        return out

    def _impair_received(self, data: bytes) -> None:
        hdr, frame = data[: self.hdr_size], data[self.hdr_size :]
        for f, _, h in self._impairers["egress"].admit(frame, _pending(hdr), hdr):
            self._rx_frames.append(self._dissect((h or hdr) + f))

    def _impair_release(self, now: float | None = None) -> None:
        """Let held frames whose time has come go on: sent ones to the device, received ones to :meth:`recv`."""
        ingress, egress = self._impairers.get("ingress"), self._impairers.get("egress")
        if ingress is not None and len(ingress):
            due = [_Held(f, h or self._zero_hdr) for f, _, h in ingress.release(now)]
            if due:
                self.send(due)
        if egress is not None and len(egress):
            for f, _, h in egress.release(now):
                self._rx_frames.append(self._dissect((h or b"") + f))

    def _impair_wait(self, remaining: float) -> float:
        """How long :meth:`recv` may wait: ``remaining``, or less when a held frame is due sooner."""
        dues = [d for d in (i.next_due() for i in self._impairers.values()) if d is not None]
        return min([remaining, *(max(0.0, d - time.monotonic()) for d in dues)])

    # -- used ring ------------------------------------------------------------------
    def _get_used(self, queue: DriverQueue) -> list[UsedElem]:
        """New used entries, after checking that the device's used idx is believable."""
        in_flight = queue.size - queue.num_free
        used_idx = queue.used_idx()
        pending = (used_idx - queue.last_used_idx) & 0xFFFF
        if pending > in_flight:
            raise UsedRingError(
                queue.index,
                f"used idx {used_idx} is {pending} entries past the last one read ({queue.last_used_idx}), "
                f"but only {in_flight} descriptors are in flight (2.7.8)",
            )
        try:
            return queue.get_used()
        except DriverQueueError as exc:
            raise UsedRingError(queue.index, f"{exc} (2.7.8: used id must be the head of an available chain)") from exc

    def close(self) -> None:
        """Release the target."""
        self.target.close()


class _Held(bytes):
    """A frame that went through the port's ingress impairment, with the ``virtio_net_hdr`` it goes with."""

    hdr: bytes

    def __new__(cls, frame: bytes, hdr: bytes) -> "_Held":
        held = super().__new__(cls, frame)
        held.hdr = hdr
        return held


def _pending(hdr: bytes) -> tuple[int, int] | None:
    """The pending checksum (csum_start, csum_offset) a ``virtio_net_hdr`` asks for (5.1.6.2), if any."""
    if not hdr[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM:
        return None
    return int.from_bytes(hdr[6:8], "little"), int.from_bytes(hdr[8:10], "little")


def _corrupted_hdr(hdr: bytes | None) -> bytes | None:
    """The header of a corrupted frame: its checksum was completed (no NEEDS_CSUM), and is not known valid."""
    if hdr is None:
        return None
    return bytes([hdr[0] & ~(VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID)]) + hdr[1:]
