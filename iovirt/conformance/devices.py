"""Guest-driver helpers for the two device types: a net port (RX/TX) and blk requests."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Sequence

from iovirt.conformance.link import Link
from iovirt.conformance.registry import CheckFailed, expect
from iovirt.virtio.driver import UsedElem
from iovirt.virtio.blk.defs import REQ_HDR, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP
from iovirt.virtio.net.defs import ETH_HLEN, VIRTIO_NET_F_MRG_RXBUF, NetHdr

MARKER_ETHERTYPE = b"\x88\xb5"  # IEEE 802 local experimental ethertype 1
RX_BUFFER = 2048


def marker_frame(tag: bytes, size: int = 60) -> bytes:
    """A broadcast Ethernet frame carrying a unique ``tag`` (so stray traffic is ignored)."""
    frame = b"\xff" * 6 + b"\x52\x54\x00\xc0\xff\xee" + MARKER_ETHERTYPE + b"iovirt-conform:" + tag
    return frame.ljust(size, b"\x00")


def new_tag() -> bytes:
    """A random tag for :func:`marker_frame`."""
    return os.urandom(8).hex().encode()


@dataclass
class Received:
    """One received frame: its virtio-net header, the frame, and the used entries it took."""

    hdr: NetHdr
    frame: bytes
    lens: list[int] = field(default_factory=list)


class NetPort:
    """receiveq1 (0) and transmitq1 (1) of a net link, driven as a guest driver would."""

    RX, TX = 0, 1

    def __init__(
        self,
        link: Link,
        *,
        enable_rx: bool = True,
        enable_tx: bool = True,
        rx_buffers: int = 16,
        call: bool = True,
        kick: bool = True,
    ) -> None:
        self.link = link
        self.hdr_len = link.net_hdr_len
        self._pending: list[UsedElem] = []
        link.queue(self.RX, 256, enable=enable_rx, call=call, kick=kick)
        link.queue(self.TX, 256, enable=enable_tx, call=call, kick=kick)
        link.driver_ok()
        self.post_rx(rx_buffers)

    def post_rx(self, count: int, size: int = RX_BUFFER) -> None:
        """Make ``count`` receive buffers of ``size`` bytes available."""
        for _ in range(count):
            self.link.add(self.RX, (), [size])
        self.link.submit(self.RX)

    def send(self, frames: Sequence[bytes], *, indirect: bool = False, split: bool = False) -> list[int]:
        """Transmit frames, each with an all-zero header (5.1.6.2); ``split``: header in its own descriptor."""
        hdr = NetHdr().pack(self.hdr_len)
        heads = []
        for frame in frames:
            out = [hdr, frame] if split else [hdr + frame]
            heads.append(self.link.add(self.TX, out, (), indirect=indirect))
        self.link.submit(self.TX)
        return heads

    def tx_done(self, n: int, timeout: float | None = None) -> None:
        """Wait for ``n`` transmit buffers to be used."""
        self.link.wait_used(self.TX, n, timeout)

    def receive(self, tag: bytes, timeout: float) -> Received | None:
        """Wait (bounded) for the next frame carrying ``tag``; other frames are dropped.

        Used entries read past the frame returned are kept for the next call
        (a TSO frame arrives as several frames, all at once).
        """
        deadline = time.monotonic() + timeout
        pending = self._pending
        while True:
            pending += self.link.read_used(self.RX)
            while pending:
                first = pending[0]
                if len(first.data) < self.hdr_len:
                    raise CheckFailed(
                        f"virtio-1.2 5.1.6.4: used receive buffer of {first.len} bytes is shorter than the "
                        f"{self.hdr_len}-byte header"
                    )
                hdr = NetHdr.unpack(first.data[: self.hdr_len])
                count = 1
                if self.link.negotiated.has(VIRTIO_NET_F_MRG_RXBUF):
                    if hdr.num_buffers == 0:
                        raise CheckFailed("virtio-1.2 5.1.6.4.1: num_buffers is 0 with VIRTIO_NET_F_MRG_RXBUF")
                    count = hdr.num_buffers
                if len(pending) < count:
                    break
                elems = pending[:count]
                del pending[:count]
                data = b"".join(e.data for e in elems)[self.hdr_len :]
                self.post_rx(count)
                if tag in data[ETH_HLEN:]:
                    return Received(hdr, data, [e.len for e in elems])
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.001)




# -- virtio-blk (5.2.6) ---------------------------------------------------------------
STATUS_NAMES = {VIRTIO_BLK_S_OK: "OK", VIRTIO_BLK_S_IOERR: "IOERR", VIRTIO_BLK_S_UNSUPP: "UNSUPP"}
STATUS_UNWRITTEN = 0xFF  # the status byte is pre-set to this; the device must overwrite it


@dataclass
class BlkResult:
    """A completed virtio-blk request: status byte, data read, used length."""

    status: int
    data: bytes
    used_len: int


class BlkPort:
    """Requests on one virtio-blk queue, as ``struct virtio_blk_req`` chains (5.2.6)."""

    def __init__(
        self, link: Link, index: int = 0, size: int = 64, *, enable: bool = True, call: bool = True, kick: bool = True
    ) -> None:
        self.link = link
        self.index = index
        self.queue = link.queue(index, size, enable=enable, call=call, kick=kick)
        link.driver_ok()

    @classmethod
    def on(cls, link: Link, index: int) -> "BlkPort":
        """A port on queue ``index`` that the caller has already set up (its own way)."""
        port = cls.__new__(cls)
        port.link, port.index, port.queue = link, index, link.queues[index]
        return port

    def post(
        self,
        rtype: int,
        sector: int = 0,
        out: bytes = b"",
        in_len: int = 0,
        *,
        indirect: bool = False,
        split: bool = False,
    ) -> tuple[int, int, int]:
        """Make one request available; returns (head, data address, status address).

        ``split`` spreads header, data and status over descriptors of odd
        sizes (2.7.4: the device must not assume a layout).
        """
        link, mem = self.link, self.link.memory
        hdr = REQ_HDR.pack(rtype, 0, sector)
        readable: list[tuple[int, int]] = []
        pieces = [hdr[:5], hdr[5:]] if split else [hdr]
        if out:
            pieces += [out[:100], out[100:]] if split and len(out) > 100 else [out]
        for piece in pieces:
            addr = link.alloc.alloc(len(piece))
            mem.write(addr, piece)
            readable.append((addr, len(piece)))
        data_addr = link.alloc.alloc(max(in_len, 1) + 1)
        mem.fill(data_addr, in_len + 1, 0xA5)
        status_addr = data_addr + in_len
        mem.write(status_addr, bytes([STATUS_UNWRITTEN]))
        if split and in_len > 100:
            writable = [(data_addr, 100), (data_addr + 100, in_len - 100), (status_addr, 1)]
        elif split or not in_len:
            writable = ([(data_addr, in_len)] if in_len else []) + [(status_addr, 1)]
        else:
            writable = [(data_addr, in_len + 1)]
        head = link.add_buffers(self.index, readable, writable, indirect=indirect)
        return head, data_addr, status_addr

    def request(
        self, rtype: int, sector: int = 0, out: bytes = b"", in_len: int = 0, *, split: bool = False, indirect: bool = False
    ) -> BlkResult:
        """Submit one request and wait for it; the status byte must be OK, IOERR or UNSUPP."""
        _head, data_addr, status_addr = self.post(rtype, sector, out, in_len, split=split, indirect=indirect)
        self.link.submit(self.index)
        return self.complete(data_addr, status_addr, in_len)

    def complete(self, data_addr: int, status_addr: int, in_len: int) -> BlkResult:
        """Wait for the next used entry and read the request's status and data."""
        (elem,) = self.link.wait_used(self.index, 1)
        status = self.link.memory.read(status_addr, 1)[0]
        expect(
            status in STATUS_NAMES,
            f"virtio-1.2 5.2.6: status byte is {status:#x} after completion, expected OK/IOERR/UNSUPP (0/1/2)",
        )
        return BlkResult(status, self.link.memory.read(data_addr, in_len), elem.len)
