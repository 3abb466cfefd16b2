"""vhost-user message framing, for both roles, without I/O.

QEMU's ``docs/interop/vhost-user.rst`` ("Message Specification") frames every
message, in both directions and on both channels, the same way: a 12-byte
header (request u32, flags u32, size u32, native byte order) and ``size``
payload bytes; file descriptors travel as ``SCM_RIGHTS`` ancillary data.
This module is the only place that packs or parses that header:

* :func:`build_message` makes a message's bytes (front-end requests,
  back-end requests on the back-end channel) and :func:`build_reply` a
  reply's (the REPLY bit set);
* :class:`Framer` cuts a byte stream into :class:`Message` objects, each
  with the fds that came with it.

What a message *means* (payload type, fd count, reply rules) is role
business: :class:`~iovirt.vhost_user.protocol.BackendConnection` and
:class:`~iovirt.vhost_user.protocol.FrontendConnection` both sit on a
:class:`Framer`.

Fatal framing errors
--------------------
A header whose version bits are not 1 is fatal: the spec defines only version
1, and a different version may frame its messages differently, so nothing
after it can be trusted.  A ``size`` above :data:`MAX_PAYLOAD_SIZE` is fatal
(no spec message is that large; it is a broken peer, not one bad message).
So is an end of file in the middle of a message.  Each ends the framer in
``ERROR`` state with a :class:`ProtocolFailure`; every other rule is checked
by the role on a whole :class:`Message`, so an error there rejects one
message and the stream goes on.

File descriptors
----------------
Fds handed to :meth:`Framer.feed` belong to the message the first byte of
that feed belongs to: the message in progress, or the next one to start.
This is exact when the reader never reads past the end of the current
message, which :attr:`Framer.bytes_needed` makes easy (QEMU and
libvhost-user read the header, then the payload, the same way): the kernel
delivers ``SCM_RIGHTS`` with the ``sendmsg`` that carried the header.  No fd
is ever dropped: each comes out in a :class:`Message`, a
:class:`ProtocolFailure` or a :class:`ConnectionClosed`.  If
:meth:`~Framer.feed` raises (the stream already failed or closed) the fds
passed stay the caller's.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import Sequence

from iovirt.vhost_user.errors import (
    BadVersionError,
    LocalProtocolError,
    PayloadSizeError,
    PayloadTooLargeError,
    TruncatedMessageError,
    VhostUserProtocolError,
)
from iovirt.vhost_user.messages import (
    VHOST_USER_NEED_REPLY_MASK,
    VHOST_USER_REPLY_MASK,
    VHOST_USER_VERSION,
    VHOST_USER_VERSION_MASK,
    Payload,
)

HEADER = struct.Struct("=III")
"""request u32, flags u32, size u32."""
HEADER_SIZE = HEADER.size

MAX_PAYLOAD_SIZE = 0x1000
"""Largest payload accepted.  The largest spec payload is a config message
(12 + 256 bytes); rust-vmm uses the same 4 KiB bound.  A larger ``size`` means
the peer is broken, and buffering it would let a peer make us allocate 4 GiB."""


@dataclass(frozen=True)
class Header:
    """The 12-byte message header ("Header")."""

    request: int
    flags: int
    size: int

    def pack(self) -> bytes:
        """The header's 12 bytes."""
        return HEADER.pack(self.request, self.flags, self.size)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> "Header":
        """Parse exactly 12 bytes (no validation: any values are representable)."""
        if len(data) != HEADER_SIZE:
            raise PayloadSizeError(None, len(data), f"{HEADER_SIZE} header bytes")
        return cls(*HEADER.unpack(data))

    @property
    def version(self) -> int:
        """The version bits (must be 1)."""
        return self.flags & VHOST_USER_VERSION_MASK

    @property
    def need_reply(self) -> bool:
        """The need_reply bit (bit 3), see the spec's REPLY_ACK section."""
        return bool(self.flags & VHOST_USER_NEED_REPLY_MASK)

    @property
    def is_reply(self) -> bool:
        """The reply bit (bit 2), set on every reply."""
        return bool(self.flags & VHOST_USER_REPLY_MASK)


def build_message(request: int, flags: int, payload: Payload | bytes | None = None) -> bytes:
    """Header plus payload bytes, with ``size`` computed from the payload.

    ``payload`` may be a payload object, raw bytes (deliberately malformed
    messages) or ``None`` (no payload).  ``flags`` are sent as given.
    """
    if payload is None:
        body = b""
    elif isinstance(payload, (bytes, bytearray, memoryview)):
        body = bytes(payload)
    else:
        body = payload.pack()
    return Header(request, flags, len(body)).pack() + body


def request_flags(need_reply: bool = False) -> int:
    """The flags of a request: version 1, and need_reply when asked ("Header")."""
    return VHOST_USER_VERSION | (VHOST_USER_NEED_REPLY_MASK if need_reply else 0)


def build_reply(request: int, body: bytes) -> bytes:
    """A reply to ``request``: version 1 and the REPLY bit, then ``body``."""
    return build_message(request, VHOST_USER_VERSION | VHOST_USER_REPLY_MASK, body)


@dataclass(frozen=True)
class Message:
    """One framed message: its header, its ``header.size`` payload bytes and the fds it came with."""

    header: Header
    body: bytes
    fds: tuple[int, ...] = ()


@dataclass(frozen=True)
class ProtocolFailure:
    """The byte stream can no longer be framed; close the connection and ``fds``."""

    error: VhostUserProtocolError
    fds: tuple[int, ...]


@dataclass(frozen=True)
class ConnectionClosed:
    """The peer closed the connection between messages; close ``fds`` (normally none)."""

    fds: tuple[int, ...] = ()


class ConnectionState(enum.Enum):
    """The stream's state (h11 style: one error ends it)."""

    OPEN = "open"
    ERROR = "error"
    CLOSED = "closed"


@dataclass
class Framer:
    """Cuts one direction of a vhost-user stream into messages."""

    state: ConnectionState = field(default=ConnectionState.OPEN, init=False)
    _buffer: bytearray = field(default_factory=bytearray, init=False, repr=False)
    _header: Header | None = field(default=None, init=False, repr=False)
    _fds: list[int] = field(default_factory=list, init=False, repr=False)

    @property
    def bytes_needed(self) -> int:
        """How many bytes complete the current header or message (read no more).

        Reading at most this many bytes per ``recvmsg`` keeps every fd with
        the message it was sent with.
        """
        if self._header is None:
            return HEADER_SIZE - len(self._buffer)
        return self._header.size - len(self._buffer)

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> list[Message | ProtocolFailure]:
        """Take bytes (and the fds received with them); return the messages they complete.

        A fatal framing error ends the list with a :class:`ProtocolFailure`
        and the framer in ``ERROR`` state.  Raises :class:`LocalProtocolError`
        if the stream has already failed or closed; the caller then still
        owns ``fds``.
        """
        self._check_open()
        self._fds.extend(fds)
        self._buffer += data
        out: list[Message | ProtocolFailure] = []
        while self.state is ConnectionState.OPEN:
            if self._header is None:
                if len(self._buffer) < HEADER_SIZE:
                    break
                header = Header.unpack(self._buffer[:HEADER_SIZE])
                del self._buffer[:HEADER_SIZE]
                error = _framing_error(header)
                if error is not None:
                    out.append(self._fail(error))
                    break
                self._header = header
            if len(self._buffer) < self._header.size:
                break
            header, self._header = self._header, None
            body = bytes(self._buffer[: header.size])
            del self._buffer[: header.size]
            fds_now, self._fds = tuple(self._fds), []
            out.append(Message(header, body, fds_now))
        return out

    def feed_eof(self) -> ConnectionClosed | ProtocolFailure:
        """The peer closed its end: :class:`ConnectionClosed`, or a failure mid-message."""
        self._check_open()
        if self._header is None and not self._buffer:
            self.state = ConnectionState.CLOSED
            fds, self._fds = tuple(self._fds), []
            return ConnectionClosed(fds)
        if self._header is None:
            error = TruncatedMessageError(None, len(self._buffer), HEADER_SIZE)
        else:
            error = TruncatedMessageError(
                self._header.request, HEADER_SIZE + len(self._buffer), HEADER_SIZE + self._header.size
            )
        return self._fail(error)

    def _check_open(self) -> None:
        if self.state is not ConnectionState.OPEN:
            raise LocalProtocolError(f"connection is {self.state.value}; it takes no more input")

    def _fail(self, error: VhostUserProtocolError) -> ProtocolFailure:
        self.state = ConnectionState.ERROR
        self._buffer.clear()
        self._header = None
        fds, self._fds = tuple(self._fds), []
        return ProtocolFailure(error, fds)


def _framing_error(header: Header) -> VhostUserProtocolError | None:
    if header.version != VHOST_USER_VERSION:
        return BadVersionError(header.request, header.flags)
    if header.size > MAX_PAYLOAD_SIZE:
        return PayloadTooLargeError(header.request, header.size, MAX_PAYLOAD_SIZE)
    return None
