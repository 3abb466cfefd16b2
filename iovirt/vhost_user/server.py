"""The vhost-user socket server: the only code that touches the UNIX sockets.

One control loop (a ``selectors`` loop on the calling thread) serves every
device socket of the process: it accepts a front-end per socket, reads each
message with ``socket.recv_fds`` in bounded pieces (``bytes_needed``, so every
fd stays with its message), feeds the sans-I/O
:class:`~iovirt.vhost_user.protocol.BackendConnection`, applies requests
through a :class:`~iovirt.vhost_user.backend.BackendSession` and queues the
replies.  A broken or malicious front-end gets its request NACKed, or its
connection closed; the process goes on serving its other devices.

What one front-end cannot do to the others (issue 12):

* connect at all unless its credentials pass the server's
  :class:`~iovirt.vhost_user.peers.AccessPolicy` (``SO_PEERCRED``);
* hold fds: the kernel delivers ``SCM_RIGHTS`` with the first byte of the
  ``sendmsg`` that carried them, and front-ends send a message's fds with its
  header (vhost-user.rst "Communication"; QEMU and libvhost-user read them
  there), at most :data:`MAX_FDS_PER_MESSAGE`.  Fds on a later piece of a
  message are closed at once, and the connection too; a message sent with
  more is refused (the kernel already closed the extra ones); the fds of an
  unfinished message are closed whenever its connection ends;
* stall the loop by not reading its replies: replies go into a per-connection
  output queue written without blocking (``EVENT_WRITE`` while it is not
  empty), and a connection with more than :data:`MAX_PENDING_REPLY_BYTES`
  unsent is closed;
* end the loop by exhausting fds: a failing ``accept`` pauses accepting for
  :data:`ACCEPT_BACKOFF_S` and the loop goes on.

Client mode (issue 14; QEMU's ``-chardev socket,server=on``, libvirt's
``<source mode='server'/>``, OVS's ``dpdkvhostuserclient``): the VMM listens
and the back-end connects, through :meth:`VhostUserServer.add_client`.  A
client endpoint has no listener; the loop dials it from a timer, and again
whenever its connection ends, so a VMM that restarts (or a back-end that
restarts) finds its peer again.  Failed dials and connections that end
within :data:`RETRY_MAX_S` double the delay from :data:`RETRY_MIN_S` up to
:data:`RETRY_MAX_S`: a VMM socket that accepts and closes at once is dialled
at most about once every :data:`RETRY_MAX_S`, never in a busy loop.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import selectors
import signal
import socket
import stat
import threading
import time
from dataclasses import dataclass, field
from typing import Callable
from iovirt.vhost_user.backend import BackendSession, RequestRefused
from iovirt.vhost_user.device import VhostUserDevice
from iovirt.vhost_user.devices import vhost_user_device
from iovirt.vhost_user.dataplane import DataPlane
from iovirt.vhost_user.workers import WorkerPool
from iovirt.vhost_user.errors import VhostUserError
from iovirt.vhost_user.fds import close_fds
from iovirt.vhost_user.messages import VHOST_MEMORY_BASELINE_NREGIONS
from iovirt.vhost_user.peers import AccessPolicy, peer_credentials
from iovirt.vhost_user.protocol import (
    BackendConnection,
    ConnectionClosed,
    ProtocolFailure,
    RejectedRequest,
)
from iovirt.vhost_user.framing import ConnectionState
from iovirt.vhost_user.requests import Request
from iovirt.virtio.defs import VIRTIO_F_ACCESS_PLATFORM
from iovirt.virtio.device import VirtioDevice

log = logging.getLogger("iovirt.vhost_user")

MAX_FDS_PER_MESSAGE = VHOST_MEMORY_BASELINE_NREGIONS
"""The most fds one message carries: SET_MEM_TABLE's one per region, at most
VHOST_MEMORY_BASELINE_NREGIONS (vhost-user.rst "Memory regions description")."""

MAX_PENDING_REPLY_BYTES = 1 << 20
"""Unsent reply bytes after which a front-end that does not read is cut off."""

ACCEPT_BACKOFF_S = 0.1
"""How long accepting pauses after ``accept`` fails for want of fds or memory."""

RETRY_MIN_S = 0.1
"""Client mode: the first delay before dialling the VMM again."""

RETRY_MAX_S = 2.0
"""Client mode: the longest delay between dials; a connection that lasted this long resets the delay."""

_ACCEPT_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


@dataclass
class Endpoint:
    """One device socket: the device (behind its adapter), and its current front-end."""

    name: str
    device: VhostUserDevice
    listener: socket.socket | None
    worker: DataPlane
    """The data-plane worker serving the device's rings, for every front-end it gets."""
    path: str | None = None
    extra_features: int = 0
    require_sealed_memory: bool = False
    connection: "Connection | None" = None
    connections_served: int = 0
    dial: "Dial | None" = None
    """Client mode: the VMM socket this endpoint connects to (None: it listens or was handed an fd)."""


@dataclass
class Dial:
    """Client mode: where an endpoint connects, and when it tries next."""

    path: str
    delay: float = RETRY_MIN_S
    next_at: float | None = 0.0
    """Monotonic time of the next attempt (None while connected)."""
    connected_at: float = 0.0
    failing: str = ""
    """The last failure logged, so a VMM that stays away is logged once, not at every attempt."""


@dataclass
class Connection:
    """A connected front-end, with its queue of unsent replies (bytes, fds to send with their first byte)."""

    endpoint: Endpoint
    sock: socket.socket
    proto: BackendConnection
    session: BackendSession
    peer: str = ""
    out: collections.deque[tuple[memoryview, list[int]]] = field(default_factory=collections.deque)
    out_bytes: int = 0
    message_offset: int = 0
    """Bytes of the current message read so far (0: the next read starts a message)."""
    fds_truncated: bool = False
    """The current message came with more than MAX_FDS_PER_MESSAGE fds."""
    writing: bool = False


class VhostUserServer:
    """Serves vhost-user devices on UNIX sockets until :meth:`stop` is called.

    ``access`` says which peers may connect and the mode of the socket files
    (default: :meth:`AccessPolicy.owner`, mode 0600).  ``workers`` data-plane
    threads serve the devices, each device's rings on one of them
    (:mod:`iovirt.vhost_user.workers`); a ``dataplane`` given is the only one.
    """

    def __init__(
        self,
        dataplane: DataPlane | None = None,
        access: AccessPolicy | None = None,
        poll_us: float = 0,
        workers: int = 1,
    ) -> None:
        self.dataplane = WorkerPool(workers, poll_us) if dataplane is None else WorkerPool(planes=[dataplane])
        self._owns_dataplane = dataplane is None
        self.access = access or AccessPolicy.owner()
        self.selector = selectors.DefaultSelector()
        self.endpoints: list[Endpoint] = []
        self._stop_r, self._stop_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.selector.register(self._stop_r, selectors.EVENT_READ, ("stop", None))
        self._stopping = False
        self._accept_paused_until: float | None = None
        self._accept_failing = False

    # -- endpoints -------------------------------------------------------------------
    def add_socket(
        self,
        path: str,
        device: VirtioDevice,
        name: str = "",
        iommu: bool = False,
        adapter: type[VhostUserDevice] | None = None,
        require_sealed_memory: bool = False,
    ) -> Endpoint:
        """Listen on UNIX socket ``path`` for a front-end of ``device``.

        The device is served through ``adapter``, by default the one
        registered for its device type (:mod:`iovirt.vhost_user.devices`).
        VIRTIO_F_ACCESS_PLATFORM (virtio 1.2 section 6) is offered when
        ``iommu``: behind a vIOMMU the device's addresses are IOVAs.  It is
        opt-in (as DPDK's ``RTE_VHOST_USER_IOMMU_SUPPORT``): a front-end that
        accepts whatever is offered without an IOMMU would get a device
        waiting for IOTLB entries that never come.  ``require_sealed_memory``
        is handed to every :class:`BackendSession` of the socket.

        The socket file gets the mode of :attr:`access` before it listens,
        so no peer connects while it is still open to all.  A stale socket
        file left by a dead process is replaced; anything else at ``path`` is
        an error.
        """
        if os.path.lexists(path):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise VhostUserError(f"{path} exists and is not a socket")
            os.unlink(path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            listener.bind(path)
            os.chmod(path, self.access.socket_mode)
            listener.listen(1)
        except BaseException:
            listener.close()
            raise
        endpoint = self._endpoint(name or path, device, adapter, iommu, path, require_sealed_memory)
        return self._add_listener(listener, endpoint)

    def add_fd(
        self,
        fd: int,
        device: VirtioDevice,
        name: str = "",
        iommu: bool = False,
        adapter: type[VhostUserDevice] | None = None,
        require_sealed_memory: bool = False,
    ) -> Endpoint:
        """Serve ``device`` on an inherited fd: a listening socket or an already connected one.

        This is the ``--fd=FDNUM`` convention of vhost-user.rst ("Backend
        program conventions").  The other arguments as in :meth:`add_socket`;
        a connected peer is checked against :attr:`access` like an accepted one.
        """
        sock = socket.socket(fileno=fd)
        endpoint = self._endpoint(name or f"fd {fd}", device, adapter, iommu, None, require_sealed_memory)
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return self._add_listener(sock, endpoint)
        self.endpoints.append(endpoint)
        if self._admitted(endpoint, sock):
            self._open(endpoint, sock)
        return endpoint

    def _endpoint(
        self,
        name: str,
        device: VirtioDevice,
        adapter: type[VhostUserDevice] | None,
        iommu: bool,
        path: str | None,
        require_sealed_memory: bool,
    ) -> Endpoint:
        served = vhost_user_device(device) if adapter is None else adapter(device)
        extra = (1 << VIRTIO_F_ACCESS_PLATFORM) if iommu else 0
        return Endpoint(name, served, None, self.dataplane.assign(), path, extra, require_sealed_memory)

    def _add_listener(self, listener: socket.socket, endpoint: Endpoint) -> Endpoint:
        listener.setblocking(False)
        endpoint.listener = listener
        self.endpoints.append(endpoint)
        if self._accept_paused_until is None:
            self.selector.register(listener, selectors.EVENT_READ, ("accept", endpoint))
        log.info("%s: listening for a vhost-user front-end (%s)", endpoint.name, endpoint.device.device.name)
        return endpoint

    def remove_socket_files(self) -> None:
        """Unlink the socket files of every endpoint (safe from any thread: touches no socket)."""
        for endpoint in list(self.endpoints):
            if endpoint.path:
                try:
                    if stat.S_ISSOCK(os.lstat(endpoint.path).st_mode):
                        os.unlink(endpoint.path)
                except OSError:
                    pass

    def remove_socket(self, endpoint: Endpoint) -> None:
        """Stop serving ``endpoint`` (control thread only): its front-end is disconnected, its socket removed.

        The connection is closed as a front-end's disconnect is (its rings
        stopped under the data-path lock, so removing a device in the middle
        of I/O is safe); the device itself is the caller's to dispose of.
        """
        self._shut(endpoint, "device removed")
        self.endpoints = [e for e in self.endpoints if e is not endpoint]
        log.info("%s: removed", endpoint.name)

    def _shut(self, endpoint: Endpoint, reason: str) -> None:
        """Close ``endpoint``'s connection (for ``reason``) and listener; unlink its socket file."""
        if endpoint.connection is not None:
            self._close(endpoint.connection, reason)
        if endpoint.listener is not None:
            try:
                self.selector.unregister(endpoint.listener)
            except (KeyError, ValueError):
                pass
            endpoint.listener.close()
            endpoint.listener = None
            # Only a socket: whatever else now stands at the path is not ours to remove.
            if endpoint.path and os.path.lexists(endpoint.path) and stat.S_ISSOCK(os.lstat(endpoint.path).st_mode):
                os.unlink(endpoint.path)

    # -- loop ----------------------------------------------------------------------------
    def serve_forever(self) -> None:
        """Run the control loop (and the data plane) until :meth:`stop`.

        Nothing a peer does ends the loop: a failure while serving one
        connection closes that connection.
        """
        if self._owns_dataplane:
            self.dataplane.start()
        previous_wakeup = self._wake_on_signals()
        try:
            while not self._stopping:
                for key, mask in self.selector.select(timeout=self._select_timeout()):
                    kind, obj = key.data
                    if kind == "stop":
                        os.read(self._stop_r, 64)
                    elif kind == "accept":
                        self._accept(obj)
                    elif kind == "conn":
                        self._connection_event(obj, mask)
                    elif kind == "reader":
                        self._run_reader(obj)
                self._resume_accepting()
                self._dial_due()
        finally:
            if previous_wakeup is not None:
                signal.set_wakeup_fd(previous_wakeup)
            self.close()

    def _wake_on_signals(self) -> int | None:
        """In the main thread, make every signal wake the loop, so that its Python handler runs at once.

        The kernel may deliver a signal to any thread that does not block it,
        a data-plane worker too; CPython then only flags the main thread, which
        runs the handler when it next runs Python code.  Blocked in ``select``
        with no deadline, it did not for as long as nothing else happened: a
        SIGTERM went unserved (tests/cli/test_serve_signals.py).  The signal
        numbers written to the stop pipe wake ``select``; the loop discards
        them.  Returns the wake-up fd it replaced, or ``None`` off the main
        thread (where Python runs no signal handler).
        """
        if threading.current_thread() is not threading.main_thread():
            return None
        return signal.set_wakeup_fd(self._stop_w, warn_on_full_buffer=False)

    def add_reader(self, fd: int, handler: Callable[[], object]) -> None:
        """Run ``handler`` in the control loop whenever ``fd`` is readable.

        This is how other event sources share the back-end's loop and clock,
        e.g. the timer multiplexer of the virtual LAPICs
        (``server.add_reader(mux.fileno(), mux.on_host_timer)``): guest timers
        and device requests are then served by one thread.
        """
        self.selector.register(fd, selectors.EVENT_READ, ("reader", handler))

    def remove_reader(self, fd: int) -> None:
        """Stop watching ``fd``."""
        try:
            self.selector.unregister(fd)
        except (KeyError, ValueError):
            pass

    @staticmethod
    def _run_reader(handler: Callable[[], object]) -> None:
        try:
            handler()
        except Exception:  # one event source's bug must not stop the back-end
            log.exception("control-loop reader %r failed", handler)

    def stop(self) -> None:
        """Ask the loop to return (safe from a signal handler or another thread)."""
        self._stopping = True
        try:
            os.write(self._stop_w, b"x")
        except OSError:
            pass

    def close(self) -> None:
        """Close every connection and listener, stop the data plane, remove socket files."""
        for endpoint in self.endpoints:
            self._shut(endpoint, "server stopping")
        self.endpoints = []
        if self._owns_dataplane:
            self.dataplane.stop()
        self.selector.close()
        for fd in (self._stop_r, self._stop_w):
            try:
                os.close(fd)
            except OSError:
                pass

    # -- accepting -------------------------------------------------------------------------
    def _accept(self, endpoint: Endpoint) -> None:
        assert endpoint.listener is not None
        try:
            sock, _ = endpoint.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno in _ACCEPT_RESOURCE_ERRORS:
                self._pause_accepting(endpoint, exc)
            else:  # e.g. ECONNABORTED: that peer is gone, the next one may come
                log.warning("%s: accept failed: %s", endpoint.name, exc)
            return
        if self._accept_failing:
            self._accept_failing = False
            log.info("%s: accepting front-ends again", endpoint.name)
        if not self._admitted(endpoint, sock):
            return
        if endpoint.connection is not None:
            # vhost-user is one front-end per device socket.
            log.warning("%s: refusing a second front-end while one is connected", endpoint.name)
            sock.close()
            return
        self._open(endpoint, sock)

    def _admitted(self, endpoint: Endpoint, sock: socket.socket) -> bool:
        """Check the peer against :attr:`access`; close ``sock`` and log if it is refused."""
        peer = peer_credentials(sock)
        if self.access.allows(peer):
            return True
        who = str(peer) if peer is not None else "a peer whose credentials cannot be read"
        log.warning("%s: refused a front-end (%s): allowed are %s", endpoint.name, who, self.access.describe())
        sock.close()
        return False

    def _pause_accepting(self, endpoint: Endpoint, exc: OSError) -> None:
        # Out of fds or memory: the pending connection stays in the backlog and
        # the listener stays readable, so stop watching listeners for a while
        # instead of spinning; connections in progress go on being served.
        if not self._accept_failing:  # once per episode, not every ACCEPT_BACKOFF_S
            self._accept_failing = True
            log.warning("%s: cannot accept a front-end: %s; accepting paused for %.1f s at a time until it works",
                        endpoint.name, exc, ACCEPT_BACKOFF_S)
        if self._accept_paused_until is None:
            for other in self.endpoints:
                if other.listener is not None:
                    try:
                        self.selector.unregister(other.listener)
                    except (KeyError, ValueError):
                        pass
        self._accept_paused_until = time.monotonic() + ACCEPT_BACKOFF_S

    def _select_timeout(self) -> float | None:
        deadlines = [e.dial.next_at for e in self.endpoints if e.dial is not None and e.dial.next_at is not None]
        if self._accept_paused_until is not None:
            deadlines.append(self._accept_paused_until)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def _resume_accepting(self) -> None:
        if self._accept_paused_until is None or time.monotonic() < self._accept_paused_until:
            return
        self._accept_paused_until = None
        for endpoint in self.endpoints:
            if endpoint.listener is not None:
                self.selector.register(endpoint.listener, selectors.EVENT_READ, ("accept", endpoint))

    # -- connections -----------------------------------------------------------------------
    def _open(self, endpoint: Endpoint, sock: socket.socket) -> None:
        sock.setblocking(False)
        peer = peer_credentials(sock)
        proto = BackendConnection(supported_protocol_features=endpoint.device.protocol_features)
        session = BackendSession(
            endpoint.device, endpoint.worker, endpoint.name, endpoint.extra_features,
            require_sealed_memory=endpoint.require_sealed_memory,
        )
        conn = Connection(endpoint, sock, proto, session, str(peer) if peer is not None else "peer unknown")
        endpoint.connection = conn
        endpoint.connections_served += 1
        self.selector.register(sock, selectors.EVENT_READ, ("conn", conn))
        log.info("%s: front-end connected (%s)", endpoint.name, conn.peer)

    def _connection_event(self, conn: Connection, mask: int) -> None:
        try:
            if mask & selectors.EVENT_WRITE and not self._flush(conn):
                return
            if mask & selectors.EVENT_READ and conn.endpoint.connection is conn:
                self._readable(conn)
        except Exception:  # a bug here must cost this connection, not the process
            log.exception("%s: internal error serving the front-end", conn.endpoint.name)
            self._close(conn, "internal error")

    def _readable(self, conn: Connection) -> None:
        try:
            data, fds, flags, _addr = socket.recv_fds(conn.sock, conn.proto.bytes_needed, MAX_FDS_PER_MESSAGE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._close(conn, f"socket error: {exc}")
            return
        if (fds or flags & socket.MSG_CTRUNC) and conn.message_offset:
            # fds that did not come with the message's header: a front-end
            # trickling a message to make us hold fds.
            close_fds(fds)
            self._close(conn, f"protocol error: fds sent with byte {conn.message_offset} of a message "
                              f"(they come with its header, at most {MAX_FDS_PER_MESSAGE})")
            return
        if flags & socket.MSG_CTRUNC:
            # The kernel closed the fds past MAX_FDS_PER_MESSAGE; the message is refused once whole.
            conn.fds_truncated = True
        if not data:
            close_fds(fds)
            event = conn.proto.feed_eof()
            close_fds(event.fds)
            if isinstance(event, ProtocolFailure):
                self._close(conn, f"front-end disconnected mid-message: {event.error}")
            else:
                self._close(conn, "front-end disconnected")
            return
        events = conn.proto.feed(data, fds)
        # One read never goes past the end of a message (bytes_needed), so
        # any event ends the message it belongs to.
        conn.message_offset = 0 if events else conn.message_offset + len(data)
        for event in events:
            if isinstance(event, Request) and conn.fds_truncated:
                conn.fds_truncated = False
                close_fds(event.fds)
                log.warning("%s: rejected %s: more than %d fds sent with it",
                            conn.endpoint.name, event.request.name, MAX_FDS_PER_MESSAGE)
                if not self._send(conn, conn.proto.nack(event), [], f"{event.request.name} failed"):
                    return
                continue
            conn.fds_truncated = False
            if not self._dispatch(conn, event):
                return

    def _dispatch(self, conn: Connection, event: object) -> bool:
        """Handle one protocol event; False once the connection is closed."""
        name = conn.endpoint.name
        if isinstance(event, Request):
            try:
                payload, reply_fds = conn.session.handle(event)
            except RequestRefused as exc:
                log.warning("%s: rejected %s", name, exc)
                return self._send(conn, conn.proto.nack(event), [], f"{event.request.name} failed")
            except VhostUserError as exc:
                log.warning("%s: rejected %s: %s", name, event.request.name, exc)
                return self._send(conn, conn.proto.nack(event), [], f"{event.request.name} failed")
            except Exception:  # a bug here must cost this connection, not the process
                log.exception("%s: internal error handling %s", name, event.request.name)
                close_fds(event.fds)
                self._close(conn, "internal error")
                return False
            if payload is not None:
                out = conn.proto.reply(event, payload)  # type: ignore[arg-type]
            else:
                out = conn.proto.ack(event)
            return self._send(conn, out, reply_fds, "")
        if isinstance(event, RejectedRequest):
            close_fds(event.fds)
            log.warning("%s: rejected request %s: %s", name, event.request, event.error)
            return self._send(conn, conn.proto.nack(event), [], "malformed request")
        if isinstance(event, ProtocolFailure):
            close_fds(event.fds)
            self._close(conn, f"protocol error: {event.error}")
            return False
        if isinstance(event, ConnectionClosed):
            close_fds(event.fds)
            self._close(conn, "front-end disconnected")
            return False
        return True

    # -- replies -------------------------------------------------------------------------
    def _send(self, conn: Connection, out: bytes | None, fds: list[int], failure: str) -> bool:
        """Queue a reply and its fds (the queue owns them from here) and write what the socket takes."""
        if out is None:
            close_fds(fds)
            # A failed request whose reply cannot carry a failure: close (spec).
            self._close(conn, f"{failure}; its reply cannot report an error")
            return False
        if not out:
            close_fds(fds)
            return True
        conn.out.append((memoryview(out), list(fds)))
        conn.out_bytes += len(out)
        if conn.out_bytes > MAX_PENDING_REPLY_BYTES:
            self._close(conn, f"the front-end does not read its replies ({conn.out_bytes} bytes unsent, "
                              f"at most {MAX_PENDING_REPLY_BYTES})")
            return False
        return self._flush(conn)

    def _flush(self, conn: Connection) -> bool:
        """Write queued replies until the socket would block; False once the connection is closed."""
        while conn.out:
            data, fds = conn.out[0]
            try:
                # SCM_RIGHTS goes with the first byte of its reply.
                sent = socket.send_fds(conn.sock, [data], fds) if fds else conn.sock.send(data)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._close(conn, f"cannot send reply: {exc}")
                return False
            close_fds(fds)  # the peer has its own copies now
            conn.out_bytes -= sent
            if sent < len(data):
                conn.out[0] = (data[sent:], [])
                break
            conn.out.popleft()
        writing = bool(conn.out)
        if writing != conn.writing:
            conn.writing = writing
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if writing else 0)
            self.selector.modify(conn.sock, events, ("conn", conn))
        return True

    def _close(self, conn: Connection, reason: str) -> None:
        endpoint = conn.endpoint
        if endpoint.connection is not conn:
            return
        endpoint.connection = None
        try:
            self.selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
        # The fds of a message cut short (reset, protocol error, stop) and of
        # unsent replies are ours to close.
        if conn.proto.state is ConnectionState.OPEN:
            close_fds(conn.proto.feed_eof().fds)
        for _data, fds in conn.out:
            close_fds(fds)
        conn.out.clear()
        conn.session.close()
        log.info("%s: connection closed: %s", endpoint.name, reason)
        if endpoint.dial is not None:
            self._dial_later(endpoint)

    # -- client mode -------------------------------------------------------------------------
    def add_client(
        self,
        path: str,
        device: VirtioDevice,
        name: str = "",
        iommu: bool = False,
        adapter: type[VhostUserDevice] | None = None,
        require_sealed_memory: bool = False,
    ) -> Endpoint:
        """Serve ``device`` to a VMM listening on UNIX socket ``path``: connect, and reconnect for ever.

        The arguments as in :meth:`add_socket`.  The first attempt is made by
        the loop; while ``path`` is absent or refuses, attempts back off from
        :data:`RETRY_MIN_S` to :data:`RETRY_MAX_S`.  The VMM is checked against
        :attr:`access` like an accepting front-end (its credentials are those
        it had when it called ``listen``).  ``path`` is the VMM's: it is never
        created or removed here.
        """
        endpoint = self._endpoint(name or path, device, adapter, iommu, None, require_sealed_memory)
        endpoint.dial = Dial(path)
        self.endpoints.append(endpoint)
        log.info("%s: connecting to the VMM at %s (%s)", endpoint.name, path, device.name)
        return endpoint

    def _dial_due(self) -> None:
        now = time.monotonic()
        for endpoint in list(self.endpoints):
            dial = endpoint.dial
            if dial is not None and dial.next_at is not None and now >= dial.next_at and not self._stopping:
                self._dial(endpoint, dial)

    def _dial(self, endpoint: Endpoint, dial: Dial) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            # A UNIX connect does not go in progress: it succeeds, or fails at
            # once (ENOENT, ECONNREFUSED, EAGAIN when the VMM's backlog is full).
            sock.connect(dial.path)
        except OSError as exc:
            sock.close()
            self._dial_failed(endpoint, dial, exc.strerror or str(exc))
            return
        dial.next_at = None
        if not self._admitted(endpoint, sock):
            self._dial_failed(endpoint, dial, "the VMM was refused")
            return
        if dial.failing:
            log.info("%s: %s answers again", endpoint.name, dial.path)
            dial.failing = ""
        dial.connected_at = time.monotonic()
        self._open(endpoint, sock)

    def _dial_failed(self, endpoint: Endpoint, dial: Dial, why: str) -> None:
        if why != dial.failing:
            log.warning("%s: cannot connect to %s: %s; retrying every %.1f s at most",
                        endpoint.name, dial.path, why, RETRY_MAX_S)
            dial.failing = why
        self._backoff(dial)

    def _dial_later(self, endpoint: Endpoint) -> None:
        """The connection ended: dial again, soon if it had lasted, later if it ended at once."""
        assert endpoint.dial is not None
        dial = endpoint.dial
        if time.monotonic() - dial.connected_at >= RETRY_MAX_S:
            dial.delay = RETRY_MIN_S
        self._backoff(dial)

    @staticmethod
    def _backoff(dial: Dial) -> None:
        dial.next_at = time.monotonic() + dial.delay
        dial.delay = min(dial.delay * 2, RETRY_MAX_S)

