"""The virtio-vsock device (virtio 1.2 section 5.10): guest AF_VSOCK streams to host UNIX sockets.

Host addressing follows the hybrid-vsock convention of Firecracker,
cloud-hypervisor and vhost-device-vsock, around one UNIX socket path ``uds``:

* a guest ``connect(CID 2, port P)`` makes the device connect to ``<uds>_P``;
  the guest gets OP_RESPONSE if that succeeds, OP_RST if it does not;
* a host program connects to ``<uds>`` and writes ``CONNECT P\\n``; the
  device sends OP_REQUEST to the guest's port P and, on OP_RESPONSE, answers
  ``OK <hostport>\\n``; from then on the socket carries the stream.

Every host socket is non-blocking and watched by one epoll set of the device
(:meth:`VirtioVsock.fileno`), which the owner adds to its event loop (the
vhost-user data plane: :func:`iovirt.vhost_user.devices.vsock.attach`) with
:meth:`VirtioVsock.on_host_events` as handler, so host sockets and queue
kicks are served by one thread under one lock.  Data waiting for guest
receive buffers or for the guest's credit stays queued per connection,
bounded: a host socket is not read while its queue is full
(:data:`~iovirt.virtio.vsock.connection.TO_GUEST_MAX`), and the guest may not
send more than the buffer the device advertises
(:data:`~iovirt.virtio.vsock.connection.BUF_ALLOC`).

Bad packets get the answer Linux's virtio transport gives them: OP_RST to
the sender (a packet of an unknown type or op, for no connection, too long,
or beyond the advertised credit), or dropped when no reply can be addressed
(a wrong src_cid, a header shorter than 44 bytes); each is logged once.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import select
import socket
import stat
from typing import Callable

from iovirt.errors import IovirtError
from iovirt.virtio.chain import DescChain, read_chain, write_chain
from iovirt.virtio.device import COMMON_FEATURES, VirtioDevice
from iovirt.virtio.queue import SplitQueue
from iovirt.virtio.vsock.connection import BUF_ALLOC, TO_GUEST_MAX, U32, Connection, State
from iovirt.virtio.vsock.defs import (
    CONFIG,
    EVENT,
    EVENT_QUEUE,
    HDR_SIZE,
    MAX_PKT_PAYLOAD,
    RESERVED_CIDS,
    RX_QUEUE,
    TX_QUEUE,
    VIRTIO_ID_VSOCK,
    VIRTIO_VSOCK_EVENT_TRANSPORT_RESET,
    VIRTIO_VSOCK_F_NO_IMPLIED_STREAM,
    VIRTIO_VSOCK_F_STREAM,
    VIRTIO_VSOCK_OP_CREDIT_REQUEST,
    VIRTIO_VSOCK_OP_CREDIT_UPDATE,
    VIRTIO_VSOCK_OP_REQUEST,
    VIRTIO_VSOCK_OP_RESPONSE,
    VIRTIO_VSOCK_OP_RST,
    VIRTIO_VSOCK_OP_RW,
    VIRTIO_VSOCK_OP_SHUTDOWN,
    VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE,
    VIRTIO_VSOCK_SHUTDOWN_F_SEND,
    VIRTIO_VSOCK_SHUTDOWN_MASK,
    VIRTIO_VSOCK_TYPE_STREAM,
    VMADDR_CID_HOST,
    VMADDR_CID_MAX,
    Header,
)

MAX_CONNECTIONS = 1024
"""Connections (both directions) the device holds at once; more are refused with OP_RST or a closed socket."""

MAX_CONTROL_BACKLOG = 256
"""Packets waiting for a guest receive buffer above which the transmit queue is not processed (it waits)."""

MAX_CONNECT_LINE = 64
"""The longest ``CONNECT P\\n`` line a host program may send."""

HOST_PORT_BASE = 1 << 30
"""Host-initiated connections get host ports from here up (away from the ports guests connect to)."""

RECV_CHUNK = 64 << 10

log = logging.getLogger("iovirt.virtio-vsock")


class VsockConfigError(IovirtError):
    """A guest CID or socket path the device cannot be set up with."""


class VirtioVsock(VirtioDevice):
    """A virtio-vsock device whose host side is UNIX sockets around ``uds`` (hybrid vsock)."""

    device_id = VIRTIO_ID_VSOCK
    name = "virtio-vsock"

    def __init__(self, guest_cid: int, uds: str, label: str = "vsock0") -> None:
        super().__init__(num_queues=3, label=label)
        if not isinstance(guest_cid, int) or guest_cid in RESERVED_CIDS or not 0 < guest_cid <= VMADDR_CID_MAX:
            raise VsockConfigError(f"guest CID {guest_cid!r} is reserved or out of range (want 3..{VMADDR_CID_MAX - 1})")
        self.guest_cid = guest_cid
        self.uds = uds
        self._epoll = select.epoll()
        self._handlers: dict[int, Callable[[int], None]] = {}
        self.connections: dict[tuple[int, int], Connection] = {}
        self._handshakes: dict[int, tuple[socket.socket, bytearray]] = {}
        self._control: collections.deque[tuple[Header, Connection | None]] = collections.deque()
        self._ready: collections.deque[Connection] = collections.deque()
        self._next_host_port = HOST_PORT_BASE
        self._tx_stalled = False
        self.pending_events: collections.deque[int] = collections.deque()
        self.listener = _listen(uds)
        self._watch(self.listener.fileno(), select.EPOLLIN, self._on_accept)

    # -- virtio ------------------------------------------------------------------------
    def device_features(self) -> int:
        """5.10.3: streams.  STREAM and NO_IMPLIED_STREAM (which the device SHOULD offer) let a driver
        choose them explicitly; a driver that negotiates neither gets streams as before."""
        return COMMON_FEATURES | 1 << VIRTIO_VSOCK_F_STREAM | 1 << VIRTIO_VSOCK_F_NO_IMPLIED_STREAM

    @property
    def streams(self) -> bool:
        """Whether the driver has streams: not when it negotiated NO_IMPLIED_STREAM without STREAM (5.10.3)."""
        return self.has_feature(VIRTIO_VSOCK_F_STREAM) or not self.has_feature(VIRTIO_VSOCK_F_NO_IMPLIED_STREAM)

    def config_space(self) -> bytes:
        """5.10.4: ``le64 guest_cid``."""
        return CONFIG.pack(self.guest_cid)

    def process_queue(self, index: int, queue: SplitQueue) -> None:
        """TX: packets from the guest; RX: new receive buffers; EVENT: new event buffers."""
        if not self.enabled[index]:
            return  # vhost-user "Ring states": a disabled ring has no side effects
        if index == TX_QUEUE:
            self._process_tx()
        elif index == EVENT_QUEUE:
            self._flush_events()
            return
        self._flush_rx()
        if self._tx_stalled:
            self._process_tx()
            self._flush_rx()

    def _reset(self) -> None:
        """2.4 and 5.10.6.7: every connection is reset; the driver hears TRANSPORT_RESET once it posts event buffers."""
        self._drop_all("device reset")
        self._post_event(VIRTIO_VSOCK_EVENT_TRANSPORT_RESET)

    def transport_reset(self) -> None:
        """Reset every connection and send VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (5.10.6.7), e.g. after a migration."""
        self._drop_all("transport reset")
        self._post_event(VIRTIO_VSOCK_EVENT_TRANSPORT_RESET)
        self._guarded(self._flush_events)

    def _post_event(self, event: int) -> None:
        if event not in self.pending_events:  # one pending reset says it all
            self.pending_events.append(event)

    def close(self) -> None:
        """Close every host socket and the listener, and remove the listener's socket file."""
        self._drop_all("device closed")
        self._unwatch(self.listener.fileno())
        self.listener.close()
        _unlink_socket(self.uds)
        self._epoll.close()

    # -- the host side's event loop ---------------------------------------------------------
    def fileno(self) -> int:
        """The epoll fd that is readable whenever a host socket has an event for :meth:`on_host_events`."""
        return self._epoll.fileno()

    def on_host_events(self) -> None:
        """Serve every ready host socket (never blocks), then send what became ready to the guest."""
        for fd, events in self._epoll.poll(0):
            handler = self._handlers.get(fd)
            if handler is not None:
                handler(events)
        self._guarded(self._flush_rx)

    def _guarded(self, step: Callable[[], None]) -> None:
        # Outside kick() a ring error must still end in fail() (docs/devices.md: never escape to the transport).
        if self.needs_reset:
            return
        try:
            step()
        except IovirtError as exc:
            self.fail(exc)

    def _watch(self, fd: int, events: int, handler: Callable[[int], None]) -> None:
        self._epoll.register(fd, events)
        self._handlers[fd] = handler

    def _unwatch(self, fd: int) -> None:
        if self._handlers.pop(fd, None) is not None:
            self._epoll.unregister(fd)

    def _set_events(self, conn: Connection) -> None:
        """Watch the host socket for what the connection can take now; unregistered when nothing (no HUP storms)."""
        want = 0
        if conn.state is State.ESTABLISHED and not conn.host_eof and len(conn.to_guest) < TO_GUEST_MAX \
                and not conn.peer_shutdown & VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE:
            want |= select.EPOLLIN
        if conn.to_host:
            want |= select.EPOLLOUT
        if want == conn.events:
            return
        fd = conn.sock.fileno()
        if not want:
            self._unwatch(fd)
        elif not conn.events:
            self._watch(fd, want, functools.partial(self._on_host_socket, conn))
        else:
            self._epoll.modify(fd, want)
        conn.events = want

    # -- host-initiated connections: <uds> and "CONNECT P\n" --------------------------------
    def _on_accept(self, _events: int) -> None:
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning("%s: accept on %s failed: %s", self.label, self.uds, exc)
            return
        sock.setblocking(False)
        if not self.streams:
            log.warning("%s: host connection refused: the driver negotiated no stream sockets", self.label)
            sock.close()
            return
        if len(self.connections) + len(self._handshakes) >= MAX_CONNECTIONS:
            log.warning("%s: host connection refused: %d connections already", self.label, MAX_CONNECTIONS)
            sock.close()
            return
        self._handshakes[sock.fileno()] = (sock, bytearray())
        self._watch(sock.fileno(), select.EPOLLIN, functools.partial(self._on_handshake, sock))

    def _on_handshake(self, sock: socket.socket, _events: int) -> None:
        fd = sock.fileno()
        _, line = self._handshakes[fd]
        try:
            data = sock.recv(MAX_CONNECT_LINE + 1 - len(line))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            data, problem = b"", f"read failed: {exc}"
        else:
            problem = "closed before CONNECT" if not data else ""
        line += data
        if not problem and b"\n" not in line:
            if len(line) <= MAX_CONNECT_LINE:
                return
            problem = f"no CONNECT line in the first {MAX_CONNECT_LINE} bytes"
        port = None
        if not problem:
            text, _, extra = bytes(line).partition(b"\n")
            port = _connect_port(text)
            if port is None:
                problem = f"bad handshake {text[:MAX_CONNECT_LINE]!r} (want 'CONNECT PORT')"
            elif extra:
                problem = "data before OK"
        self._unwatch(fd)
        del self._handshakes[fd]
        if problem or port is None:
            log.warning("%s: host connection on %s: %s; closed", self.label, self.uds, problem)
            sock.close()
            return
        conn = Connection(self._host_port(port), port, sock, State.REQUESTED)
        self.connections[conn.key] = conn
        self._send_control(conn, VIRTIO_VSOCK_OP_REQUEST)

    def _host_port(self, peer_port: int) -> int:
        while True:
            port = self._next_host_port
            self._next_host_port = HOST_PORT_BASE + (port + 1 - HOST_PORT_BASE) % HOST_PORT_BASE
            if (port, peer_port) not in self.connections:
                return port

    # -- host sockets of established connections -----------------------------------------------
    def _on_host_socket(self, conn: Connection, events: int) -> None:
        if self.connections.get(conn.key) is not conn:
            return
        if events & select.EPOLLOUT or (events & (select.EPOLLERR | select.EPOLLHUP) and conn.to_host):
            self._write_host(conn)
            if self.connections.get(conn.key) is not conn:
                return
        if events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR) and conn.events & select.EPOLLIN:
            self._read_host(conn)

    def _read_host(self, conn: Connection) -> None:
        room = TO_GUEST_MAX - len(conn.to_guest)
        try:
            data = conn.sock.recv(min(room, RECV_CHUNK))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._host_vanished(conn, f"read failed: {exc.strerror or exc}")
            return
        if not data:
            conn.host_eof = True
            self._maybe_shutdown_guest(conn)
        else:
            conn.to_guest += data
            self._mark_ready(conn)
        self._set_events(conn)

    def _write_host(self, conn: Connection) -> None:
        while conn.to_host:
            try:
                n = conn.sock.send(conn.to_host)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._host_vanished(conn, f"write failed: {exc.strerror or exc}")
                return
            del conn.to_host[:n]
            conn.fwd_cnt = (conn.fwd_cnt + n) & U32
        if not conn.to_host:
            if conn.peer_shutdown & VIRTIO_VSOCK_SHUTDOWN_F_SEND and not conn.host_write_closed:
                conn.host_write_closed = True
                try:
                    conn.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
            if self._finished(conn):
                return
        if conn.wants_credit_update() and not conn.credit_update_queued:
            conn.credit_update_queued = True
            self._send_control(conn, VIRTIO_VSOCK_OP_CREDIT_UPDATE)
        self._set_events(conn)

    def _host_vanished(self, conn: Connection, why: str) -> None:
        log.warning("%s: %s: host peer gone (%s); connection reset", self.label, conn, why)
        self._reset_connection(conn)

    def _maybe_shutdown_guest(self, conn: Connection) -> None:
        """After the host's last byte reached the guest, tell it no more will come (5.10.6.6)."""
        if conn.host_eof and not conn.to_guest and not conn.shutdown_sent:
            conn.shutdown_sent = True
            self._send_control(conn, VIRTIO_VSOCK_OP_SHUTDOWN, VIRTIO_VSOCK_SHUTDOWN_F_SEND)
            self._finished(conn)

    def _finished(self, conn: Connection) -> bool:
        """Both directions done: guest said it sends no more (and it was forwarded), host said the same.

        Or the guest shut down both directions (it closed): either way the
        device closes the host socket and sends OP_RST, which is what a
        closing Linux guest waits for (5.10.6.6).
        """
        guest_done = conn.peer_shutdown & VIRTIO_VSOCK_SHUTDOWN_F_SEND and not conn.to_host
        host_done = conn.shutdown_sent or conn.peer_shutdown & VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE
        if guest_done and host_done:
            self._reset_connection(conn)
            return True
        return False

    def _reset_connection(self, conn: Connection) -> None:
        """Close the host socket and send OP_RST to the guest."""
        self._close_connection(conn)
        self._queue_control(self._reply(conn.local_port, conn.peer_port, VIRTIO_VSOCK_OP_RST), None)

    def _close_connection(self, conn: Connection) -> None:
        if self.connections.get(conn.key) is conn:
            del self.connections[conn.key]
        if conn.events:
            self._unwatch(conn.sock.fileno())
            conn.events = 0
        conn.sock.close()
        conn.to_guest.clear()
        conn.to_host.clear()

    def _drop_all(self, why: str) -> None:
        if self.connections or self._handshakes:
            log.info("%s: %s: closing %d host connections", self.label, why,
                     len(self.connections) + len(self._handshakes))
        for conn in list(self.connections.values()):
            self._close_connection(conn)
        for fd, (sock, _) in list(self._handshakes.items()):
            self._unwatch(fd)
            sock.close()
        self._handshakes.clear()
        self._control.clear()
        self._ready.clear()
        self._tx_stalled = False

    # -- packets to the guest (rx queue) ---------------------------------------------------------
    def _reply(self, src_port: int, dst_port: int, op: int, flags: int = 0) -> Header:
        return Header(VMADDR_CID_HOST, self.guest_cid, src_port, dst_port, 0, VIRTIO_VSOCK_TYPE_STREAM, op, flags)

    def _send_control(self, conn: Connection, op: int, flags: int = 0) -> None:
        self._queue_control(self._reply(conn.local_port, conn.peer_port, op, flags), conn)

    def _queue_control(self, hdr: Header, conn: Connection | None) -> None:
        self._control.append((hdr, conn))

    def _mark_ready(self, conn: Connection) -> None:
        if conn not in self._ready:
            self._ready.append(conn)

    def _next_packet(self, room: int) -> tuple[Header, bytes] | None:
        """The next packet for a receive buffer of ``room`` payload bytes: control packets first, then data."""
        while self._control:
            hdr, conn = self._control.popleft()
            if conn is not None:
                if hdr.op == VIRTIO_VSOCK_OP_CREDIT_UPDATE:
                    conn.credit_update_queued = False
                self._stamp(hdr, conn)
            return hdr, b""
        for _ in range(len(self._ready)):
            conn = self._ready.popleft()
            if self.connections.get(conn.key) is not conn or not conn.to_guest:
                continue
            if conn.peer_credit() == 0:
                if not conn.credit_requested:
                    conn.credit_requested = True
                    self._ready.append(conn)
                    hdr = self._reply(conn.local_port, conn.peer_port, VIRTIO_VSOCK_OP_CREDIT_REQUEST)
                    return self._stamp(hdr, conn), b""
                continue  # waits for the guest's credit update (it is marked ready again then)
            data = conn.take_for_guest(min(room, MAX_PKT_PAYLOAD))
            if conn.to_guest:
                self._ready.append(conn)
            hdr = self._reply(conn.local_port, conn.peer_port, VIRTIO_VSOCK_OP_RW)
            hdr.len = len(data)
            self._after_take(conn)
            return self._stamp(hdr, conn), data
        return None

    def _after_take(self, conn: Connection) -> None:
        self._maybe_shutdown_guest(conn)
        if self.connections.get(conn.key) is conn:
            self._set_events(conn)

    @staticmethod
    def _stamp(hdr: Header, conn: Connection) -> Header:
        """Every packet carries our current buffer space (5.10.6.3)."""
        hdr.buf_alloc = BUF_ALLOC
        hdr.fwd_cnt = conn.fwd_cnt
        conn.fwd_cnt_sent = conn.fwd_cnt
        return hdr

    def _has_rx_work(self) -> bool:
        """Whether :meth:`_next_packet` has a packet: a receive buffer is taken only then."""
        if self._control:
            return True
        return any(self.connections.get(c.key) is c and c.to_guest and (c.peer_credit() or not c.credit_requested)
                   for c in self._ready)

    def _flush_rx(self) -> None:
        queue = self.queues[RX_QUEUE]
        if queue is None or not self.enabled[RX_QUEUE] or self.needs_reset:
            return
        used = 0
        while self._has_rx_work():
            chain = queue.pop()
            if chain is None:
                break
            room = chain.writable_len - HDR_SIZE
            if room < 0:
                # 5.10.6.3.1: a receive buffer holds at least a header; this one cannot.
                log.warning("%s: rx buffer of %d bytes cannot hold a %d-byte header; returned unused",
                            self.label, chain.writable_len, HDR_SIZE)
                queue.push(chain.head, 0)
                used += 1
                continue
            packet = self._next_packet(room)
            assert packet is not None, "_has_rx_work promised a packet"
            hdr, data = packet
            written = write_chain(queue.memory, chain, hdr.pack() + data)
            queue.push(chain.head, written)
            used += 1
        if used:
            self.signal(RX_QUEUE)

    def _flush_events(self) -> None:
        queue = self.queues[EVENT_QUEUE]
        if queue is None or not self.enabled[EVENT_QUEUE] or self.needs_reset:
            return
        used = 0
        while self.pending_events:
            chain = queue.pop()
            if chain is None:
                break
            event = self.pending_events.popleft()
            queue.push(chain.head, write_chain(queue.memory, chain, EVENT.pack(event)))
            used += 1
        if used:
            self.signal(EVENT_QUEUE)

    # -- packets from the guest (tx queue) ---------------------------------------------------------
    def _process_tx(self) -> None:
        queue = self.queues[TX_QUEUE]
        if queue is None or not self.enabled[TX_QUEUE]:
            return
        used = 0
        self._tx_stalled = False
        while True:
            if len(self._control) >= MAX_CONTROL_BACKLOG:
                self._tx_stalled = True  # replies wait for rx buffers: the guest's packets wait too
                break
            chain = queue.pop()
            if chain is None:
                break
            self._tx_packet(queue, chain)
            queue.push(chain.head, 0)
            used += 1
        if used:
            self.signal(TX_QUEUE)

    def _tx_packet(self, queue: SplitQueue, chain: DescChain) -> None:
        total = chain.readable_len
        if total < HDR_SIZE:
            log.warning("%s: tx packet of %d bytes is shorter than the %d-byte header; dropped",
                        self.label, total, HDR_SIZE)
            return
        hdr = Header.unpack(read_chain(queue.memory, chain, HDR_SIZE))
        if hdr.src_cid != self.guest_cid:
            # Nobody to answer: the packet does not come from this guest's address (vhost's rule too).
            log.warning("%s: tx packet %s: src_cid is not the guest's CID %d; dropped", self.label, hdr, self.guest_cid)
            return
        problem = self._header_problem(hdr, total - HDR_SIZE)
        if problem:
            log.warning("%s: tx packet %s: %s; RST", self.label, hdr, problem)
            self._refuse(hdr)
            return
        conn = self.connections.get((hdr.dst_port, hdr.src_port))
        if hdr.op == VIRTIO_VSOCK_OP_REQUEST:
            self._guest_connect(hdr, conn)
            return
        if conn is None:
            if hdr.op != VIRTIO_VSOCK_OP_RST:  # never answer an RST with an RST
                log.info("%s: tx packet %s for no connection; RST", self.label, hdr)
                self._refuse(hdr)
            return
        conn.update_peer_credit(hdr.buf_alloc, hdr.fwd_cnt)
        if conn.to_guest:
            self._mark_ready(conn)
        if hdr.op == VIRTIO_VSOCK_OP_RW:
            payload = read_chain(queue.memory, chain, HDR_SIZE + hdr.len)[HDR_SIZE:]
            self._guest_data(conn, hdr, payload)
        elif hdr.op == VIRTIO_VSOCK_OP_RESPONSE:
            self._guest_accepted(conn, hdr)
        elif hdr.op == VIRTIO_VSOCK_OP_RST:
            log.info("%s: %s reset by the guest", self.label, conn)
            self._close_connection(conn)
        elif hdr.op == VIRTIO_VSOCK_OP_SHUTDOWN:
            self._guest_shutdown(conn, hdr.flags)
        elif hdr.op == VIRTIO_VSOCK_OP_CREDIT_REQUEST:
            if not conn.credit_update_queued:
                conn.credit_update_queued = True
                self._send_control(conn, VIRTIO_VSOCK_OP_CREDIT_UPDATE)
        # VIRTIO_VSOCK_OP_CREDIT_UPDATE: the credit fields above were all it carried.

    def _header_problem(self, hdr: Header, payload: int) -> str:
        if hdr.dst_cid != VMADDR_CID_HOST:
            return f"dst_cid {hdr.dst_cid} is not the host (CID {VMADDR_CID_HOST})"
        if hdr.type != VIRTIO_VSOCK_TYPE_STREAM:
            return f"unknown type {hdr.type}"
        if not self.streams:
            return "a stream packet, but the driver negotiated NO_IMPLIED_STREAM without STREAM"
        if not VIRTIO_VSOCK_OP_REQUEST <= hdr.op <= VIRTIO_VSOCK_OP_CREDIT_REQUEST:
            return f"unknown op {hdr.op}"
        if hdr.len > MAX_PKT_PAYLOAD:
            return f"len {hdr.len} above the {MAX_PKT_PAYLOAD}-byte maximum"
        if hdr.len > payload:
            return f"len {hdr.len} but the buffer holds {payload} bytes after the header"
        if hdr.len and hdr.op != VIRTIO_VSOCK_OP_RW:
            return f"len {hdr.len} on an op without payload"
        return ""

    def _refuse(self, hdr: Header) -> None:
        """Answer ``hdr`` with OP_RST, resetting its connection if it has one (never RST an RST)."""
        conn = self.connections.get((hdr.dst_port, hdr.src_port))
        if conn is not None:
            self._reset_connection(conn)
        elif hdr.op != VIRTIO_VSOCK_OP_RST:
            self._queue_control(self._reply(hdr.dst_port, hdr.src_port, VIRTIO_VSOCK_OP_RST), None)

    def _guest_connect(self, hdr: Header, conn: Connection | None) -> None:
        if conn is not None:
            log.warning("%s: OP_REQUEST for the open %s; RST", self.label, conn)
            self._refuse(hdr)
            return
        if len(self.connections) + len(self._handshakes) >= MAX_CONNECTIONS:
            log.warning("%s: guest connect to port %d refused: %d connections already",
                        self.label, hdr.dst_port, MAX_CONNECTIONS)
            self._refuse(hdr)
            return
        path = f"{self.uds}_{hdr.dst_port}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            sock.connect(path)  # UNIX sockets connect at once or fail (EAGAIN: the listener's backlog is full)
        except OSError as exc:
            sock.close()
            log.info("%s: guest connect to port %d: %s: %s; RST", self.label, hdr.dst_port, path,
                     exc.strerror or exc)
            self._refuse(hdr)
            return
        conn = Connection(hdr.dst_port, hdr.src_port, sock, State.ESTABLISHED)
        conn.update_peer_credit(hdr.buf_alloc, hdr.fwd_cnt)
        self.connections[conn.key] = conn
        self._send_control(conn, VIRTIO_VSOCK_OP_RESPONSE)
        self._set_events(conn)

    def _guest_accepted(self, conn: Connection, hdr: Header) -> None:
        if conn.state is not State.REQUESTED:
            log.warning("%s: OP_RESPONSE on the established %s; RST", self.label, conn)
            self._reset_connection(conn)
            return
        line = f"OK {conn.local_port}\n".encode()
        try:
            # A fresh socket's buffer takes a dozen bytes at once; anything else means the peer is gone.
            if conn.sock.send(line) != len(line):
                raise OSError("short write of the OK line")
        except OSError as exc:
            self._host_vanished(conn, f"OK line not sent: {exc.strerror or exc}")
            return
        conn.state = State.ESTABLISHED
        self._set_events(conn)

    def _guest_data(self, conn: Connection, hdr: Header, payload: bytes) -> None:
        if conn.state is not State.ESTABLISHED or conn.peer_shutdown & VIRTIO_VSOCK_SHUTDOWN_F_SEND:
            log.warning("%s: OP_RW on %s, which takes no data now; RST", self.label, conn)
            self._reset_connection(conn)
            return
        if len(payload) > conn.own_free():
            # 5.10.6.3.1: the driver MUST NOT send more than the device's buffer space allows.
            log.warning("%s: %s: credit violation: %d bytes sent, %d free of the advertised %d; RST",
                        self.label, conn, len(payload), conn.own_free(), BUF_ALLOC)
            self._reset_connection(conn)
            return
        conn.rx_cnt = (conn.rx_cnt + len(payload)) & U32
        conn.to_host += payload
        self._write_host(conn)

    def _guest_shutdown(self, conn: Connection, flags: int) -> None:
        if flags & ~VIRTIO_VSOCK_SHUTDOWN_MASK:
            log.warning("%s: OP_SHUTDOWN on %s with unknown flags %#x; RST", self.label, conn, flags)
            self._reset_connection(conn)
            return
        conn.peer_shutdown |= flags
        if flags & VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE:
            conn.to_guest.clear()  # the guest takes no more: what the host still sends is dropped
        if conn.state is State.REQUESTED:
            self._reset_connection(conn)
            return
        self._write_host(conn)  # forwards SHUT_WR once the data before it is out, or finishes


def _connect_port(text: bytes) -> int | None:
    """The port of a ``CONNECT P`` line (``None`` if it is not one)."""
    words = text.strip().split()
    if len(words) != 2 or words[0].upper() != b"CONNECT" or not words[1].isdigit():
        return None
    port = int(words[1])
    return port if port <= 0xFFFFFFFF else None


def _listen(path: str) -> socket.socket:
    _unlink_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    try:
        sock.bind(path)
        sock.listen(64)
    except OSError as exc:
        sock.close()
        raise VsockConfigError(f"cannot listen on {path}: {exc.strerror or exc}") from None
    return sock


def _unlink_socket(path: str) -> None:
    """Remove a stale socket file at ``path`` (and nothing else)."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
