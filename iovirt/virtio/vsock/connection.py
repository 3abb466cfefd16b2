"""One vsock stream connection between a guest port and a host UNIX socket (virtio 1.2 section 5.10.6.3).

Holds the two byte queues and the credit arithmetic of 5.10.6.3 ("Buffer
Space Management"): the device never sends the guest more than the guest's
``buf_alloc - (tx_cnt - peer_fwd_cnt)``, and advertises its own
``buf_alloc``/``fwd_cnt`` so the guest never sends it more than it can hold.
Counters are 32-bit and wrap, as the header fields do.
"""

from __future__ import annotations

import socket
from enum import Enum

BUF_ALLOC = 256 << 10
"""The buffer the device advertises per connection: bytes from the guest it holds until the host socket takes them."""

TO_GUEST_MAX = 256 << 10
"""Bytes read from a host socket and not yet sent to the guest, above which the socket is not read."""

U32 = 0xFFFFFFFF


class State(Enum):
    """Where a connection is in its life (5.10.6.3)."""

    REQUESTED = "requested"
    """Host-initiated: OP_REQUEST queued or sent, no OP_RESPONSE yet."""
    ESTABLISHED = "established"


class Connection:
    """A stream between guest port ``peer_port`` and host port ``local_port``, carried by ``sock``."""

    def __init__(self, local_port: int, peer_port: int, sock: socket.socket, state: State) -> None:
        self.local_port = local_port
        self.peer_port = peer_port
        self.sock = sock
        self.state = state
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        self.tx_cnt = 0
        """Payload bytes sent to the guest."""
        self.rx_cnt = 0
        """Payload bytes received from the guest."""
        self.fwd_cnt = 0
        """Payload bytes from the guest written to the host socket (5.10.6.3: freed buffer space)."""
        self.fwd_cnt_sent = 0
        """The fwd_cnt of the last header sent to the guest: what the guest knows we freed."""
        self.to_host = bytearray()
        self.to_guest = bytearray()
        self.host_eof = False
        """The host socket reached end of file: nothing more to read from it."""
        self.shutdown_sent = False
        """OP_SHUTDOWN with SEND went to the guest (after the last byte read from the host)."""
        self.host_write_closed = False
        """The host socket's write side was shut down (the guest sent SHUTDOWN with SEND)."""
        self.peer_shutdown = 0
        """VIRTIO_VSOCK_SHUTDOWN_F_* flags the guest sent."""
        self.credit_requested = False
        self.credit_update_queued = False
        self.events = 0
        """The epoll events the host socket is registered for (0: not registered)."""

    @property
    def key(self) -> tuple[int, int]:
        """(host port, guest port): how packets find the connection."""
        return self.local_port, self.peer_port

    def update_peer_credit(self, buf_alloc: int, fwd_cnt: int) -> None:
        """Every packet from the guest carries its current buffer space (5.10.6.3)."""
        self.peer_buf_alloc = buf_alloc
        self.peer_fwd_cnt = fwd_cnt
        self.credit_requested = False

    def peer_credit(self) -> int:
        """Bytes the guest can take now: ``buf_alloc - (tx_cnt - fwd_cnt)``, never negative."""
        in_flight = (self.tx_cnt - self.peer_fwd_cnt) & U32
        return max(0, self.peer_buf_alloc - in_flight)

    def own_free(self) -> int:
        """Bytes the guest may still send us (what we advertised minus what we hold)."""
        return BUF_ALLOC - len(self.to_host)

    def guest_view_free(self) -> int:
        """Free space as the guest last heard it: BUF_ALLOC less what it sent and we had not said we forwarded."""
        return BUF_ALLOC - ((self.rx_cnt - self.fwd_cnt_sent) & U32)

    def wants_credit_update(self) -> bool:
        """Tell the guest about freed space once its view fell below half the buffer and we freed some."""
        return self.fwd_cnt != self.fwd_cnt_sent and self.guest_view_free() < BUF_ALLOC // 2

    def take_for_guest(self, limit: int) -> bytes:
        """Up to ``limit`` bytes of host data for one packet, within the guest's credit."""
        n = min(limit, len(self.to_guest), self.peer_credit())
        data = bytes(self.to_guest[:n])
        del self.to_guest[:n]
        self.tx_cnt = (self.tx_cnt + n) & U32
        return data

    def __str__(self) -> str:
        return f"host port {self.local_port} <-> guest port {self.peer_port}"
