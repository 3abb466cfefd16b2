"""A bench port: the guest driver of one virtio-net device, with frames in and out.

:meth:`BenchPort.send` places frames with their ``virtio_net_hdr`` on the
transmit queue and kicks; :meth:`BenchPort.recv` returns what the device wrote
into the receive buffers the port keeps posted, as
``VirtioNetHdr / Ether / ...`` packets.  Queue 0 is receiveq1 and queue 1
transmitq1 (virtio 1.2 5.1.2).

:meth:`BenchPort.send_raw` and :meth:`BenchPort.recv_raw` are the same
without scapy: bytes in, :class:`~iovirt.bench.rawpath.RawFrame` out (its
``packet`` dissects on demand).  Both paths share one data path,
:mod:`iovirt.bench.rawpath` (Cython, with a pure-Python twin), and may be
mixed on one port.  Ingress and egress timestamps (the monotonic clock of
:mod:`iovirt.bench.clock`) feed a :class:`~iovirt.bench.latency.LatencyMeter`.

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
import time
from typing import Any, Iterable, Sequence

from scapy.packet import Packet

from iovirt.bench import rawpath
from iovirt.bench.errors import BenchError, BenchTimeout, TargetError, UsedRingError
from iovirt.bench.latency import LatencyMeter
from iovirt.bench.layers import VirtioNetHdr, VirtioNetHdrHashReport, VirtioNetHdrLegacy, hdr_class
from iovirt.bench.target import DEFAULT_TIMEOUT, DriverTarget
from iovirt.virtio.defs import VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1
from iovirt.virtio.driver import DriverQueue
from iovirt.virtio.net.defs import (
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
        rxq, txq = queues[RX_QUEUE], queues[TX_QUEUE]
        # The raw path (rawpath, _rawpath_c) drives the split layout only (virtio 1.2 §2.7); targets
        # never negotiate VIRTIO_F_RING_PACKED for a bench port.
        if not isinstance(rxq, DriverQueue) or not isinstance(txq, DriverQueue):
            raise TargetError(self.name, "bench ports drive split rings only; the target negotiated packed rings")
        self.rxq: DriverQueue = rxq
        self.txq: DriverQueue = txq
        memory, alloc = target.memory, target.alloc
        self.memory = memory
        # Rings and buffers all come from ``alloc``: one window over its range serves the raw path.
        self._win = rawpath.Window(memory, alloc.base, alloc.end - alloc.base)
        self.rx_buffer_size = rx_buffer_size
        nrx = queue_size if rx_buffers is None else rx_buffers
        self._rx_slots = [alloc.alloc(rx_buffer_size) for _ in range(nrx)]
        self._rx_by_head: dict[int, int] = {}
        self.tx_buffer_size = tx_buffer_size
        self._tx_free = [alloc.alloc(tx_buffer_size) for _ in range(queue_size)]
        self._tx_by_head: dict[int, int] = {}
        self._rx_pending: list[tuple[int, bytes]] = []  # (used len, bytes) of buffers of a frame not yet whole
        self._rx_frames: collections.deque[Any] = collections.deque()  # RawFrames not yet returned
        self.received: list[Packet] = []
        """Every frame :meth:`recv` returned, in order (for pcaps); :meth:`recv_raw` keeps nothing."""
        self.rx_buffer_lens: list[tuple[int, ...]] = []
        """For each frame in :attr:`received`: the used len of every buffer it took (MRG_RXBUF accounting)."""
        self.stats: collections.Counter = collections.Counter()
        rawpath.rx_post(self._win, self.rxq, self._rx_slots, self._rx_by_head, rx_buffer_size)
        self._kick(self.rxq)

    def _kick(self, queue: DriverQueue) -> None:
        """Publish the queue's avail idx and notify the device if it asked for it (2.7.10)."""
        if rawpath.publish(self._win, queue):
            self.target.notify(queue.index)

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
        pairs = [self._split(pkt) for pkt in pkts]
        if self.split_header:
            return self._send_split(pairs)
        return self._transmit([hdr + frame for hdr, frame in pairs], b"", None)

    def send_raw(self, frames: Sequence[bytes], hdr: bytes | None = None, *, latency: LatencyMeter | None = None) -> int:
        """Queue Ethernet frames (bytes, no FCS) on transmitq1 and kick, without scapy; returns how many.

        Every frame gets ``hdr`` (a raw header of the negotiated size; by
        default all zero: no offload, 5.1.6.2).  With ``latency`` each frame
        is recorded with its ingress timestamp: the moment its batch was
        made available to the device.
        """
        hdr = self._zero_hdr if hdr is None else bytes(hdr)
        if len(hdr) != self.hdr_size:
            raise BenchError(f"{self.name}: a {len(hdr)}-byte header was given, the negotiated one has {self.hdr_size}")
        frames = frames if type(frames) is list else list(frames)
        if frames and max(map(len, frames)) + len(hdr) > self.tx_buffer_size:
            raise BenchError(
                f"{self.name}: a {max(map(len, frames))}-byte frame with header exceeds the {self.tx_buffer_size}-byte TX buffer"
            )
        if self.split_header:
            return self._send_split([(hdr, bytes(frame)) for frame in frames], latency)
        return self._transmit(frames, hdr, latency)

    def _transmit(self, frames: list, hdr: bytes, latency: LatencyMeter | None) -> int:
        """``hdr + frame`` for each frame, one descriptor each, in as many batches as the ring takes."""
        done = 0
        while done < len(frames):
            posted = rawpath.tx_post(
                self._win, self.txq, frames, done, hdr, self._tx_free, self._tx_by_head, self.tx_buffer_size
            )
            if posted:
                self._publish_tx(frames[done : done + posted], latency)
                done += posted
            if done < len(frames):
                self._reap_tx(wait_for=1)  # the ring is full: wait (bounded) for the device
        self.stats["tx_frames"] += done
        self._reap_tx(wait_for=0)
        return done

    def _send_split(self, pairs: list[tuple[bytes, bytes]], latency: LatencyMeter | None = None) -> int:
        """Header and frame in separate descriptors (any layout is allowed, 2.7.4 / 5.1.6.2)."""
        batch: list[bytes] = []
        for hdr, frame in pairs:
            if self.txq.num_free < 2 or not self._tx_free:
                self._publish_tx(batch, latency)
                batch = []
                self._reap_tx(wait_for=1)
            slot = self._tx_free.pop()
            self.memory.write(slot, hdr + frame)
            head = self.txq.add_chain([(slot, len(hdr)), (slot + len(hdr), len(frame))])
            self._tx_by_head[head] = slot
            batch.append(frame)
        self._publish_tx(batch, latency)
        self.stats["tx_frames"] += len(pairs)
        self._reap_tx(wait_for=0)
        return len(pairs)

    def _publish_tx(self, frames: list, latency: LatencyMeter | None) -> None:
        """Make the frames just queued available and kick; their ingress time is now."""
        t_ns = rawpath.monotonic_ns()
        self._kick(self.txq)
        if latency is not None:
            latency.sent(frames, t_ns)

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
            taken += rawpath.tx_reap(self._win, self.txq, self._tx_free, self._tx_by_head)
            if taken >= wait_for:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchTimeout("transmitted frames completed", f"{self.name} queue {TX_QUEUE}", wait_for, taken, timeout)
            self.target.wait(TX_QUEUE, remaining)

    # -- receive ------------------------------------------------------------------
    def recv(self, count: int | None = None, timeout: float | None = None) -> list[Packet]:
        """Frames the device wrote, dissected as ``VirtioNetHdr / Ether / ...``.

        ``count=None`` returns what has arrived so far without waiting;
        otherwise waits (at most ``timeout``) for exactly ``count`` frames and
        raises :class:`BenchTimeout` (holding the frames that did arrive) when
        fewer came.  Frames beyond ``count`` stay for the next call.
        """
        try:
            frames = self._take_rx(count, timeout)
        except BenchTimeout as exc:
            exc.frames = [self._keep(frame) for frame in exc.frames]
            raise
        return [self._keep(frame) for frame in frames]

    def recv_raw(self, count: int | None = None, timeout: float | None = None, *, latency: LatencyMeter | None = None) -> list[Any]:
        """As :meth:`recv`, without scapy: :class:`~iovirt.bench.rawpath.RawFrame` objects.

        Each has ``data`` (the Ethernet frame), ``hdr`` (the header the
        device wrote), ``t_ns`` (the egress timestamp) and ``packet`` (the
        scapy dissection, made on first use).  With ``latency`` each frame is
        matched to its ingress timestamp.  :attr:`received` keeps none of them.
        """
        frames = self._take_rx(count, timeout)
        if latency is not None:
            latency.received(frames)
        return frames

    def _keep(self, frame: Any) -> Packet:
        self.received.append(frame.packet)
        self.rx_buffer_lens.append(frame.buffer_lens)
        return frame.packet

    def _take_rx(self, count: int | None, timeout: float | None) -> list[Any]:
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        frames = self._rx_frames
        while True:
            self._collect_rx()
            if count is None or len(frames) >= count:
                if count is None or count == len(frames):
                    out = list(frames)
                    frames.clear()
                    return out
                return [frames.popleft() for _ in range(count)]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if self._rx_pending:
                    _length, first = self._rx_pending[0]
                    raise UsedRingError(
                        RX_QUEUE,
                        f"a frame's header says num_buffers "
                        f"{int.from_bytes(first[rawpath.NUM_BUFFERS_OFFSET : rawpath.NUM_BUFFERS_OFFSET + 2], 'little')} "
                        f"but only {len(self._rx_pending)} buffers were used within {timeout:g} s",
                    )
                got = list(frames)
                frames.clear()
                raise BenchTimeout("frames received", f"{self.name} queue {RX_QUEUE}", count, len(got), timeout, got)
            self.target.wait(RX_QUEUE, remaining)

    def _collect_rx(self) -> None:
        """Whole frames from the used ring into ``_rx_frames``; the buffers reposted (and the device kicked)."""
        out: list[Any] = []
        before = self.rxq.avail_idx
        try:
            _taken, empty = rawpath.rx_harvest(
                self._win, self.rxq, self._rx_by_head, self.rx_buffer_size, self.hdr_size, self.mergeable,
                self._rx_pending, out,
            )
        finally:
            if self.rxq.avail_idx != before:
                self._kick(self.rxq)
            self._rx_frames.extend(out)
            self.stats["rx_frames"] += len(out)
        if empty:
            # Buffers the device gave back unwritten: it dropped frames
            # (iovirt does so for a non-mergeable buffer too small for one).
            self.stats["rx_empty_buffers"] += empty

    def close(self) -> None:
        """Release the target (the memory window first: the region cannot close while viewed)."""
        self._win.release()
        self.target.close()

