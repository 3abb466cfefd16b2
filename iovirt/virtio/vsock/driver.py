"""The guest driver's side of a virtio-vsock device, for tests and the conformance suite (virtio 1.2 section 5.10).

:class:`VsockDriver` plays a guest's vsock transport over a
:class:`~iovirt.vhost_user.driver.VhostUserDriver`: it keeps the receive
and event queues filled with buffers (5.10.6.1, 5.10.6.7), sends packets on
the transmit queue, and collects what the device sends, header and payload.
It checks nothing itself: callers say what they expect.
"""

from __future__ import annotations

import time
from typing import Callable

from iovirt.vhost_user.driver import AnyDriverQueue, VhostUserDriver
from iovirt.virtio.vsock.defs import (
    EVENT,
    EVENT_QUEUE,
    HDR_SIZE,
    RX_QUEUE,
    TX_QUEUE,
    VIRTIO_VSOCK_TYPE_STREAM,
    VMADDR_CID_HOST,
    Header,
)

RX_BUF_SIZE = 4096
"""Payload bytes per receive buffer, as Linux posts them (VIRTIO_VSOCK_DEFAULT_RX_BUF_SIZE)."""

Packet = tuple[Header, bytes]


class VsockDriver:
    """Driver-side rings of a vsock device: ``send`` packets, ``receive`` them, read ``events``."""

    def __init__(self, drv: VhostUserDriver, guest_cid: int, *, size: int = 256, rx_buffers: int = 64,
                 rx_buf_size: int = RX_BUF_SIZE) -> None:
        self.drv = drv
        self.guest_cid = guest_cid
        self.rx_buf_size = rx_buf_size
        queues = drv.start_queues([RX_QUEUE, TX_QUEUE, EVENT_QUEUE], size=size)
        self.rx: AnyDriverQueue = queues[RX_QUEUE]
        self.tx: AnyDriverQueue = queues[TX_QUEUE]
        self.evq: AnyDriverQueue = queues[EVENT_QUEUE]
        for _ in range(rx_buffers):
            self.rx.add_data([], [HDR_SIZE + rx_buf_size])
        for _ in range(4):
            self.evq.add_data([], [EVENT.size])
        drv.kick(RX_QUEUE)
        drv.kick(EVENT_QUEUE)
        self.received: list[Packet] = []

    def header(self, src_port: int, dst_port: int, op: int, *, length: int = 0, flags: int = 0,
               buf_alloc: int = 256 << 10, fwd_cnt: int = 0) -> Header:
        """A well-formed header from this guest to the host."""
        return Header(self.guest_cid, VMADDR_CID_HOST, src_port, dst_port, length, VIRTIO_VSOCK_TYPE_STREAM,
                      op, flags, buf_alloc, fwd_cnt)

    def send(self, hdr: Header | bytes, payload: bytes = b"", *, split: bool = True) -> None:
        """Put one packet on the transmit queue (header and payload in two buffers unless not ``split``)."""
        raw = hdr.pack() if isinstance(hdr, Header) else hdr
        out = [raw, payload] if split and payload else [raw + payload]
        deadline = time.monotonic() + 5.0
        while True:
            self.tx.get_used()  # free what the device has consumed
            if self.tx.num_free >= len(out) or time.monotonic() > deadline:
                break  # (past the deadline add_data says the ring is full)
            self.drv.frontend.wait_call(TX_QUEUE, timeout=0.05)
        self.tx.add_data(out, [])
        self.drv.kick(TX_QUEUE)

    def _collect(self) -> int:
        used = self.rx.get_used()
        for elem in used:
            if elem.len >= HDR_SIZE:
                hdr = Header.unpack(elem.data)
                self.received.append((hdr, elem.data[HDR_SIZE:elem.len]))
            else:
                self.received.append((Header(0, 0, 0, 0, elem.len, 0, 0), elem.data[:elem.len]))
            self.rx.add_data([], [HDR_SIZE + self.rx_buf_size])
        if used:
            self.drv.kick(RX_QUEUE)
        return len(used)

    def wait(self, want: Callable[[Packet], bool], timeout: float = 5.0) -> Packet:
        """The first received packet ``want`` accepts (taken out of :attr:`received`); TimeoutError if none comes."""
        deadline = time.monotonic() + timeout
        while True:
            self._collect()
            for i, packet in enumerate(self.received):
                if want(packet):
                    del self.received[i]
                    return packet
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no such packet within {timeout}s; received {[str(h) for h, _ in self.received]}")
            self.drv.frontend.wait_call(RX_QUEUE, timeout=min(left, 0.05))

    def wait_op(self, op: int, port: int | None = None, timeout: float = 5.0) -> Packet:
        """The next packet with ``op`` (to guest port ``port`` if given)."""
        return self.wait(lambda p: p[0].op == op and (port is None or p[0].dst_port == port), timeout)

    def quiet(self, seconds: float = 0.3) -> list[Packet]:
        """Everything received within ``seconds`` (for checking that nothing came)."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self._collect()
            time.sleep(0.02)
        out, self.received = self.received, []
        return out

    def events(self, timeout: float = 2.0) -> list[int]:
        """Event ids the device put on the event queue (waits up to ``timeout`` for the first)."""
        deadline = time.monotonic() + timeout
        while True:
            used = self.evq.get_used()
            if used or time.monotonic() >= deadline:
                for _ in used:
                    self.evq.add_data([], [EVENT.size])
                if used:
                    self.drv.kick(EVENT_QUEUE)
                return [EVENT.unpack(u.data[:EVENT.size])[0] for u in used if u.len >= EVENT.size]
            self.drv.frontend.wait_call(EVENT_QUEUE, timeout=0.05)
