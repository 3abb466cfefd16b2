"""The control socket: JSON lines on a UNIX socket, served from the vhost-user server's loop.

The listener and every client are readers of :meth:`VhostUserServer.add_reader`,
so commands run on the control-plane thread, between vhost-user requests.
Access control is the socket file's mode (0600 by default: the owner only),
set before the socket listens.  What a client cannot do to the process:

* send a request line longer than :data:`~iovirt.control.protocol.MAX_REQUEST_BYTES`:
  it gets an error reply and its connection is closed;
* send garbage or unknown commands: each gets an error reply, the
  connection stays usable;
* stall the loop by not reading replies: a reply is written without
  blocking into a socket buffer of :data:`SEND_BUFFER_BYTES`; one that does
  not fit closes the connection;
* keep more than :data:`MAX_CLIENTS` connections: further ones are closed at once;
* leak fds: a connection's socket is closed whatever way it ends.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from dataclasses import dataclass, field

from iovirt.control import commands
from iovirt.control.commands import ControlContext
from iovirt.control.protocol import (
    BAD_REQUEST,
    GENERIC_ERROR,
    ControlError,
    LineReader,
    LineTooLong,
    encode_error,
    encode_return,
    parse_request,
)
from iovirt.errors import IovirtError
from iovirt.vhost_user.server import VhostUserServer

log = logging.getLogger("iovirt.control")

DEFAULT_CONTROL_MODE = 0o600
"""The control socket's permission bits unless told otherwise: only the owner may connect."""

MAX_CLIENTS = 64
"""Control connections open at once; more are closed on accept."""

SEND_BUFFER_BYTES = 4 << 20
"""Socket send buffer asked for each client: every reply must fit in it at once."""

RECV_BYTES = 16 << 10
"""How much one read takes from a client."""


@dataclass(eq=False)
class _Client:
    sock: socket.socket
    reader: LineReader = field(default_factory=LineReader)


class ControlServer:
    """Serves :mod:`iovirt.control.commands` on UNIX socket ``path`` from ``ctx.server``'s loop."""

    def __init__(self, ctx: ControlContext, path: str, mode: int = DEFAULT_CONTROL_MODE) -> None:
        self.ctx = ctx
        self.path = path
        self.clients: dict[int, _Client] = {}
        if os.path.lexists(path):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise IovirtError(f"{path} exists and is not a socket")
            os.unlink(path)  # a stale socket of a dead process
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            self.listener.bind(path)
            os.chmod(path, mode)  # before listen: nobody connects while it is open to all
            self.listener.listen(16)
        except BaseException:
            self.listener.close()
            raise
        self._accepting = True
        ctx.server.add_reader(self.listener.fileno(), self._accept)
        log.info("control socket %s (mode %04o)", path, mode)

    @property
    def server(self) -> VhostUserServer:
        """The vhost-user server whose loop serves this socket."""
        return self.ctx.server

    def close(self) -> None:
        """Close every client and the listener, remove the socket file (idempotent)."""
        for client in list(self.clients.values()):
            self._drop(client, "")
        if self.listener.fileno() >= 0:
            self.server.remove_reader(self.listener.fileno())
            self.listener.close()
            try:
                if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                    os.unlink(self.path)
            except OSError:
                pass

    # -- accepting -----------------------------------------------------------------------
    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                # Out of fds: stop watching the listener (it would stay readable and
                # spin the loop) until a control connection ends and frees one.
                log.warning("control: cannot accept: %s; accepting paused until a control connection closes", exc)
                self.server.remove_reader(self.listener.fileno())
                self._accepting = False
            return
        if len(self.clients) >= MAX_CLIENTS:
            log.warning("control: refused a connection: %d are open already", MAX_CLIENTS)
            sock.close()
            return
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        except OSError:
            pass
        client = _Client(sock)
        self.clients[sock.fileno()] = client
        self.server.add_reader(sock.fileno(), lambda: self._readable(client))

    # -- requests ------------------------------------------------------------------------
    def _readable(self, client: _Client) -> None:
        try:
            data = client.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._drop(client, f"socket error: {exc}")
            return
        if not data:
            self._drop(client, "")
            return
        try:
            lines = client.reader.feed(data)
        except LineTooLong as exc:
            self._send(client, encode_error(BAD_REQUEST, f"{exc}; closing the connection"))
            self._drop(client, str(exc))
            return
        for line in lines:
            if not self._send(client, self._answer(line)):
                return

    def _answer(self, line: bytes) -> bytes:
        try:
            command, args = parse_request(line)
            return encode_return(commands.run(self.ctx, command, args))
        except ControlError as exc:
            log.info("control: refused a request: %s", exc.desc)
            return encode_error(exc.error_class, exc.desc)
        except Exception:  # a command's bug costs the request, never the process
            log.exception("control: internal error serving a request")
            return encode_error(GENERIC_ERROR, "internal error (see the back-end's log)")

    def _send(self, client: _Client, reply: bytes) -> bool:
        """Write ``reply`` without blocking; False (and the client closed) if it does not fit."""
        try:
            sent = client.sock.send(reply)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._drop(client, f"cannot send a reply: {exc}")
            return False
        if sent < len(reply):
            self._drop(client, f"the client does not read its replies ({len(reply) - sent} bytes unsent)")
            return False
        return True

    def _drop(self, client: _Client, reason: str) -> None:
        fd = client.sock.fileno()
        if self.clients.pop(fd, None) is None:
            return
        self.server.remove_reader(fd)
        client.sock.close()
        if reason:
            log.warning("control: connection closed: %s", reason)
        if not self._accepting:
            self._accepting = True
            self.server.add_reader(self.listener.fileno(), self._accept)

    def __repr__(self) -> str:
        return f"ControlServer({self.path!r})"


