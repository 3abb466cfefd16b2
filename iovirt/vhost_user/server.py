"""The vhost-user socket server: the only code that touches the UNIX sockets.

One control loop (a ``selectors`` loop on the calling thread) serves every
device socket of the process: it accepts a front-end per socket, reads each
message with ``socket.recv_fds`` in bounded pieces (``bytes_needed``, so every
fd stays with its message), feeds the sans-I/O
:class:`~iovirt.vhost_user.protocol.BackendConnection`, applies requests
through a :class:`~iovirt.vhost_user.backend.BackendSession` and sends the
replies.  A broken or malicious front-end gets its request NACKed, or its
connection closed; the process goes on serving its other devices.
"""

from __future__ import annotations

import errno
import logging
import os
import selectors
import socket
import stat
import struct
from dataclasses import dataclass
from typing import Callable
from iovirt.vhost_user.backend import BackendSession, RequestRefused
from iovirt.vhost_user.device import VhostUserDevice
from iovirt.vhost_user.devices import vhost_user_device
from iovirt.vhost_user.dataplane import DataPlane
from iovirt.vhost_user.errors import VhostUserError
from iovirt.vhost_user.fds import close_fds
from iovirt.vhost_user.messages import VHOST_MEMORY_BASELINE_NREGIONS
from iovirt.vhost_user.protocol import (
    BackendConnection,
    ConnectionClosed,
    ProtocolFailure,
    RejectedRequest,
)
from iovirt.vhost_user.requests import Request
from iovirt.virtio.defs import VIRTIO_F_ACCESS_PLATFORM
from iovirt.virtio.device import VirtioDevice

log = logging.getLogger("iovirt.vhost_user")

MAX_FDS_PER_MESSAGE = VHOST_MEMORY_BASELINE_NREGIONS


@dataclass
class Endpoint:
    """One device socket: the device (behind its adapter), and its current front-end."""

    name: str
    device: VhostUserDevice
    listener: socket.socket | None
    path: str | None = None
    extra_features: int = 0
    connection: "Connection | None" = None
    connections_served: int = 0


@dataclass
class Connection:
    """A connected front-end."""

    endpoint: Endpoint
    sock: socket.socket
    proto: BackendConnection
    session: BackendSession
    peer: str = ""


class VhostUserServer:
    """Serves vhost-user devices on UNIX sockets until :meth:`stop` is called."""

    def __init__(self, dataplane: DataPlane | None = None) -> None:
        self.dataplane = dataplane or DataPlane()
        self._owns_dataplane = dataplane is None
        self.selector = selectors.DefaultSelector()
        self.endpoints: list[Endpoint] = []
        self._stop_r, self._stop_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.selector.register(self._stop_r, selectors.EVENT_READ, ("stop", None))
        self._stopping = False

    # -- endpoints -------------------------------------------------------------------
    def add_socket(
        self,
        path: str,
        device: VirtioDevice,
        name: str = "",
        iommu: bool = False,
        adapter: type[VhostUserDevice] | None = None,
    ) -> Endpoint:
        """Listen on UNIX socket ``path`` for a front-end of ``device``.

        The device is served through ``adapter``, by default the one
        registered for its device type (:mod:`iovirt.vhost_user.devices`).
        VIRTIO_F_ACCESS_PLATFORM (virtio 1.2 section 6) is offered when
        ``iommu``: behind a vIOMMU the device's addresses are IOVAs.  It is
        opt-in (as DPDK's ``RTE_VHOST_USER_IOMMU_SUPPORT``): a front-end that
        accepts whatever is offered without an IOMMU would get a device
        waiting for IOTLB entries that never come.

        A stale socket file left by a dead process is replaced; anything else
        at ``path`` is an error.
        """
        if os.path.lexists(path):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise VhostUserError(f"{path} exists and is not a socket")
            os.unlink(path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        listener.bind(path)
        listener.listen(1)
        return self._add_listener(listener, _endpoint(name or path, device, adapter, iommu, path))

    def add_fd(
        self,
        fd: int,
        device: VirtioDevice,
        name: str = "",
        iommu: bool = False,
        adapter: type[VhostUserDevice] | None = None,
    ) -> Endpoint:
        """Serve ``device`` on an inherited fd: a listening socket or an already connected one.

        This is the ``--fd=FDNUM`` convention of vhost-user.rst ("Backend
        program conventions").  The other arguments as in :meth:`add_socket`.
        """
        sock = socket.socket(fileno=fd)
        endpoint = _endpoint(name or f"fd {fd}", device, adapter, iommu, None)
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return self._add_listener(sock, endpoint)
        self.endpoints.append(endpoint)
        self._open(endpoint, sock)
        return endpoint

    def _add_listener(self, listener: socket.socket, endpoint: Endpoint) -> Endpoint:
        listener.setblocking(False)
        endpoint.listener = listener
        self.endpoints.append(endpoint)
        self.selector.register(listener, selectors.EVENT_READ, ("accept", endpoint))
        log.info("%s: listening for a vhost-user front-end (%s)", endpoint.name, endpoint.device.device.name)
        return endpoint

    # -- loop ----------------------------------------------------------------------------
    def serve_forever(self) -> None:
        """Run the control loop (and the data plane) until :meth:`stop`."""
        if self._owns_dataplane:
            self.dataplane.start()
        try:
            while not self._stopping:
                for key, _ in self.selector.select(timeout=None):
                    kind, obj = key.data
                    if kind == "stop":
                        os.read(self._stop_r, 64)
                    elif kind == "accept":
                        self._accept(obj)
                    elif kind == "conn":
                        self._readable(obj)
                    elif kind == "reader":
                        self._run_reader(obj)
        finally:
            self.close()

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
            if endpoint.connection is not None:
                self._close(endpoint.connection, "server stopping")
            if endpoint.listener is not None:
                try:
                    self.selector.unregister(endpoint.listener)
                except (KeyError, ValueError):
                    pass
                endpoint.listener.close()
                endpoint.listener = None
                if endpoint.path and os.path.exists(endpoint.path):
                    os.unlink(endpoint.path)
        self.endpoints = []
        if self._owns_dataplane:
            self.dataplane.stop()
        self.selector.close()
        for fd in (self._stop_r, self._stop_w):
            try:
                os.close(fd)
            except OSError:
                pass

    # -- connections -----------------------------------------------------------------------
    def _accept(self, endpoint: Endpoint) -> None:
        assert endpoint.listener is not None
        try:
            sock, _ = endpoint.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        if endpoint.connection is not None:
            # vhost-user is one front-end per device socket.
            log.warning("%s: refusing a second front-end while one is connected", endpoint.name)
            sock.close()
            return
        self._open(endpoint, sock)

    def _open(self, endpoint: Endpoint, sock: socket.socket) -> None:
        sock.setblocking(False)
        peer = _peer_credentials(sock)
        proto = BackendConnection(supported_protocol_features=endpoint.device.protocol_features)
        session = BackendSession(endpoint.device, self.dataplane, endpoint.name, endpoint.extra_features)
        conn = Connection(endpoint, sock, proto, session, peer)
        endpoint.connection = conn
        endpoint.connections_served += 1
        self.selector.register(sock, selectors.EVENT_READ, ("conn", conn))
        log.info("%s: front-end connected (%s)", endpoint.name, peer)

    def _readable(self, conn: Connection) -> None:
        try:
            data, fds, _flags, _addr = socket.recv_fds(conn.sock, conn.proto.bytes_needed, MAX_FDS_PER_MESSAGE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._close(conn, f"socket error: {exc}")
            return
        if not data:
            close_fds(fds)
            event = conn.proto.feed_eof()
            close_fds(event.fds)
            if isinstance(event, ProtocolFailure):
                self._close(conn, f"front-end disconnected mid-message: {event.error}")
            else:
                self._close(conn, "front-end disconnected")
            return
        for event in conn.proto.feed(data, fds):
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
            ok = self._send(conn, out, reply_fds, "")
            close_fds(reply_fds)  # the peer has its own copies now
            return ok
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

    def _send(self, conn: Connection, out: bytes | None, fds: list[int], failure: str) -> bool:
        if out is None:
            # A failed request whose reply cannot carry a failure: close (spec).
            self._close(conn, f"{failure}; its reply cannot report an error")
            return False
        if not out:
            return True
        try:
            conn.sock.setblocking(True)
            conn.sock.settimeout(5.0)
            if fds:
                socket.send_fds(conn.sock, [out], fds)
            else:
                conn.sock.sendall(out)
        except OSError as exc:
            self._close(conn, f"cannot send reply: {exc}")
            return False
        finally:
            if conn.sock.fileno() >= 0:
                conn.sock.setblocking(False)
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
        conn.session.close()
        log.info("%s: connection closed: %s", endpoint.name, reason)


def _endpoint(
    name: str, device: VirtioDevice, adapter: type[VhostUserDevice] | None, iommu: bool, path: str | None
) -> Endpoint:
    served = vhost_user_device(device) if adapter is None else adapter(device)
    return Endpoint(name, served, None, path, (1 << VIRTIO_F_ACCESS_PLATFORM) if iommu else 0)


def _peer_credentials(sock: socket.socket) -> str:
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", creds)
        return f"pid {pid}, uid {uid}"
    except OSError as exc:
        if exc.errno == errno.ENOPROTOOPT:
            return "peer unknown"
        raise
