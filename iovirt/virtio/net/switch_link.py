"""A switch port whose other side is another process: frames over a ``SOCK_SEQPACKET`` socket.

Under ``iovirt serve --isolate`` (:mod:`iovirt.vhost_user.isolate`) each
net device runs in its own worker process, and the
:class:`~iovirt.virtio.net.switch.LearningSwitch` joining the ports lives in
the supervisor.  One socket pair links each worker to it, and both ends are a
:class:`LinkPort`:

- in the worker, the link and the device are the two ports of a
  :class:`Hub` (every frame goes to the other port: the learning is done
  once, at the other end of the link);
- in the supervisor, each worker's link is one port of the switch that joins
  every net device.

Wire format: one datagram carries a batch of frames, so a batch the device
transmitted costs one ``send`` and one ``recv``, not one per frame::

    u16 count | count x (u32 length | u16 csum_start | u16 csum_offset) | the frames back to back

All little-endian; bit 31 of ``length`` says the frame has a pending checksum
(``NEEDS_CSUM``, virtio 1.2 5.1.6.2) at ``(csum_start, csum_offset)``.  A
datagram carries at most :data:`DATAGRAM_BYTES` of frames (a longer frame goes
alone).

The supervisor's sends never wait: when a worker's socket is full the batch
is dropped and counted, as a switch drops under congestion, so a hung worker
never stalls the supervisor or the other workers.  A worker's uplink may wait
a little (``send_wait_s``) for room before it drops: that is backpressure.
The worker then stops draining its guest's transmit ring for a moment and
leaves the CPU to the switch, instead of consuming frames only to drop them
(what a link holds is bounded by the sender's ``SO_SNDBUF``, a few hundred
small datagrams at the default ``wmem_default``).  What arrives is checked before use
(count, lengths, Ethernet header size): the peer may be a worker serving a
hostile front-end, so a malformed datagram is logged, counted and dropped.
"""

from __future__ import annotations

import collections
import functools
import logging
import select
import socket
import struct
from typing import Any, Callable, Sequence

from iovirt.virtio.net import datapath
from iovirt.virtio.net.defs import ETH_HLEN, MAX_FRAME
from iovirt.virtio.net.switch import LearningSwitch, SwitchPort

log = logging.getLogger("iovirt.switch")

COUNT = struct.Struct("<H")
RECORD = struct.Struct("<IHH")
CSUM_PENDING = 1 << 31
LENGTH_MASK = CSUM_PENDING - 1
DATAGRAM_BYTES = 1 << 16  # frame bytes per datagram: well under the default socket buffer (wmem_default)
MAX_BATCH = 0xFFFF  # frames per datagram (the u16 count)
RECV_BYTES = COUNT.size + RECORD.size + MAX_FRAME  # the largest datagram: one frame of MAX_FRAME bytes
READ_BATCH = 64  # datagrams read per readable event, so one busy link cannot starve the others
FORWARD_FRAMES = 256  # frames gathered from several datagrams before one forward_batch

Csum = tuple[int, int] | None


def link_pair() -> tuple[socket.socket, socket.socket]:
    """A connected ``SOCK_SEQPACKET`` pair (close-on-exec; the caller passes one end on)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)


@functools.lru_cache(maxsize=256)
def _records(count: int) -> struct.Struct:
    """The ``count`` records of a datagram as one struct: one (un)pack call per batch, not per frame."""
    return struct.Struct("<" + "IHH" * count)


def encode(frames: Sequence[bytes], csums: Sequence[Csum]) -> bytes:
    """One datagram carrying ``frames`` with their pending checksums."""
    fields: list[int] = []
    for frame, csum in zip(frames, csums):
        if csum is None:
            fields += (len(frame), 0, 0)
        else:
            fields += (len(frame) | CSUM_PENDING, csum[0], csum[1])
    return COUNT.pack(len(frames)) + _records(len(frames)).pack(*fields) + b"".join(frames)


class MalformedDatagram(ValueError):
    """A datagram whose header does not match its size, or that carries a frame shorter than an Ethernet header."""


def decode(data: memoryview, out: Any) -> int:
    """Append the frames of one datagram to ``out`` (a ``datapath.Frames``); returns how many.

    Nothing is appended when the datagram is malformed (:class:`MalformedDatagram`).
    """
    if len(data) < COUNT.size:
        raise MalformedDatagram(f"{len(data)}-byte datagram has no frame count")
    (count,) = COUNT.unpack_from(data)
    start = COUNT.size + count * RECORD.size
    if not count:
        raise MalformedDatagram("datagram carries no frames")
    if start > len(data):
        raise MalformedDatagram(f"{count} frame records do not fit a {len(data)}-byte datagram")
    fields = _records(count).unpack_from(data, COUNT.size)
    words = fields[0::3]
    lengths = [word & LENGTH_MASK for word in words]
    if sum(lengths) != len(data) - start:
        raise MalformedDatagram(f"frame lengths do not add up to the {len(data) - start} bytes carried")
    if min(lengths) < ETH_HLEN:
        raise MalformedDatagram("a frame is shorter than an Ethernet header")
    pos = start
    if lengths == list(words):  # no pending checksum in the batch: the common case
        for length in lengths:
            out.append(data[pos : pos + length])
            pos += length
        return count
    for k, length in enumerate(lengths):
        csum = (fields[3 * k + 1], fields[3 * k + 2]) if words[k] & CSUM_PENDING else None
        out.append(data[pos : pos + length], csum)
        pos += length
    return count


class Hub(LearningSwitch):
    """A worker's own switch: its device and the :class:`LinkPort` to the real switch, and nothing else.

    With two ports every frame goes to the other one, so nothing is learned
    or looked up here; the switch at the other end of the link learns, floods
    and filters for both.  (A :class:`LearningSwitch`, so it plugs into a
    device where one is expected.)
    """

    def forward_batch(self, ingress: SwitchPort, frames: Any) -> int:
        """Every frame of the batch to every other port."""
        if not len(frames):
            return 0
        indexes = list(range(len(frames)))
        self.forwarded += len(frames)
        return sum(self._deliver(port, frames, indexes) for port in self.ports if port is not ingress)

    def forward(self, ingress: SwitchPort, frame: bytes, csum: tuple[int, int] | None = None) -> int:
        """The frame to every other port."""
        if len(frame) < ETH_HLEN:
            return 0
        self.forwarded += 1
        return sum(int(port.deliver(frame, csum)) for port in self.ports if port is not ingress)


class LinkPort:
    """A switch port on one end of a :func:`link_pair`: what the switch gives it goes to the other end.

    ``on_readable`` (run by the owner's event loop when the socket is
    readable) forwards what the other end sent into ``switch``.  When the
    other end is gone, ``on_closed`` runs once; the owner stops watching the
    socket and calls :meth:`close`.  A full socket drops the batch at once,
    or after waiting up to ``send_wait_s`` for room (see the module
    docstring: only a worker's uplink waits).
    """

    def __init__(
        self,
        sock: socket.socket,
        switch: LearningSwitch,
        name: str,
        on_closed: Callable[[], None] | None = None,
        send_wait_s: float = 0.0,
    ) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.send_wait_s = send_wait_s
        self.switch = switch
        self.name = name
        self.on_closed = on_closed
        self.closed = False
        self.stats: collections.Counter[str] = collections.Counter()
        self._buffer = bytearray(RECV_BYTES)
        self._frames = datapath.Frames()
        switch.attach(self)

    def fileno(self) -> int:
        """The socket's fd, for the owner's event loop."""
        return self.sock.fileno()

    def close(self) -> None:
        """Leave the switch (forgetting the MACs learned here) and close the socket."""
        self.switch.detach(self)
        self.closed = True
        self.sock.close()

    # -- from the switch to the other end ------------------------------------------------------
    def deliver(self, frame: bytes, csum: Csum) -> bool:
        """Send one frame to the other end; False if it was dropped."""
        return self._send([frame], [csum]) == 1

    def deliver_batch(self, frames: Any, indexes: list[int]) -> int:
        """Send frames ``indexes`` of a ``datapath.Frames``, as few datagrams as fit."""
        return self._send([frames.frame(i) for i in indexes], [frames.csum(i) for i in indexes])

    def _send(self, frames: list[bytes], csums: list[Csum]) -> int:
        sent = first = size = 0
        for i, frame in enumerate(frames):
            if i > first and (size + len(frame) > DATAGRAM_BYTES or i - first == MAX_BATCH):
                sent += self._send_datagram(frames[first:i], csums[first:i])
                first, size = i, 0
            size += len(frame)
        return sent + self._send_datagram(frames[first:], csums[first:])

    def _send_datagram(self, frames: list[bytes], csums: list[Csum]) -> int:
        if self.closed:
            self.stats["tx_dropped"] += len(frames)
            return 0
        datagram = encode(frames, csums)
        try:
            try:
                self.sock.send(datagram)
            except BlockingIOError:
                # The other end is not keeping up: wait for room if this end may, else drop.
                if not self.send_wait_s or not select.select([], [self.sock], [], self.send_wait_s)[1]:
                    raise
                self.sock.send(datagram)
        except BlockingIOError:
            self.stats["tx_dropped"] += len(frames)
            return 0
        except OSError as exc:
            self.stats["tx_dropped"] += len(frames)
            if not self.stats["tx_errors"]:
                log.warning("%s: link send failed: %s", self.name, exc)
            self.stats["tx_errors"] += 1
            return 0
        self.stats["tx_packets"] += len(frames)
        return len(frames)

    # -- from the other end into the switch ----------------------------------------------------
    def on_readable(self) -> None:
        """Read what the other end sent (up to :data:`READ_BATCH` datagrams) and switch it."""
        frames = self._frames
        frames.clear()
        view = memoryview(self._buffer)
        try:
            for _ in range(READ_BATCH):
                try:
                    n = self.sock.recv_into(self._buffer)
                except BlockingIOError:
                    break
                except OSError as exc:
                    log.warning("%s: link receive failed: %s", self.name, exc)
                    self._hang_up()
                    break
                if n == 0:  # SOCK_SEQPACKET: end of file (no empty datagram is ever sent)
                    self._hang_up()
                    break
                try:
                    self.stats["rx_packets"] += decode(view[:n], frames)
                except MalformedDatagram as exc:
                    self.stats["rx_malformed"] += 1
                    log.warning("%s: dropped a malformed datagram from the link: %s", self.name, exc)
                if len(frames) >= FORWARD_FRAMES:
                    self.switch.forward_batch(self, frames)
                    frames.clear()
            if len(frames):
                self.switch.forward_batch(self, frames)
        finally:
            frames.clear()
            view.release()

    def _hang_up(self) -> None:
        if self.on_closed is not None:
            callback, self.on_closed = self.on_closed, None
            callback()
