"""A sans-I/O vhost-user connection, back-end side (h11 style).

:class:`BackendConnection` takes the bytes and file descriptors a socket
delivered and returns typed events; it builds the bytes of replies.  It never
touches a socket: the server reads with ``socket.recv_fds`` and writes with
``socket.send_fds``.  Every framing rule of QEMU's ``docs/interop/vhost-user.rst``
lives here, in :data:`REQUEST_RULES` and :meth:`BackendConnection.feed`:
the payload each request carries, the fds it takes, and the reply it gets.

Events
------
* a :class:`~iovirt.vhost_user.requests.Request` - a well-formed front-end
  request, as the typed class of its code (``SetVringNum(index, num)``,
  ``SetMemTable(regions)``, ...): the payload's fields, the header flags,
  attached fds, and the :class:`ReplyKind` the front-end waits for.
* :class:`RejectedRequest` - a whole message was read but breaks the rules
  (unknown or unsupported request, bad flags, wrong payload size or value,
  wrong fd count).  The stream is still framed, so the connection goes on;
  the caller logs it and sends :meth:`BackendConnection.nack`.
* :class:`ProtocolFailure` - the stream can no longer be framed (bad version,
  absurd size, EOF mid-message).  The connection is in ``ERROR`` state; the
  caller closes it.
* :class:`ConnectionClosed` - clean EOF between messages.

What is recoverable (and why)
-----------------------------
A header whose version bits are not 1 is fatal: the spec defines only version
1, and a different version may frame its messages differently, so nothing
after it can be trusted.  A ``size`` above :data:`MAX_PAYLOAD_SIZE` is fatal
(no spec message is that large; it is a broken peer, not one bad message).
Everything else is checked *after* the ``size`` bytes were consumed, so the
next message starts at a known offset and the error only rejects one message:
unknown request codes (the spec's REPLY_ACK section lets the front-end ask
for a reply to *any* request, so a NACK is still due if NEED_REPLY was set),
reserved or REPLY flag bits, payload sizes and values, fd counts.

Not handled: VHOST_USER_PROTOCOL_F_XEN_MMAP (its memory regions are 40
bytes, not 32) - a back-end using this class must not offer it.

File descriptors
----------------
Fds handed to :meth:`BackendConnection.feed` belong to the message the first
byte of that feed belongs to: the message in progress, or the next one to
start.  This is exact when the reader never reads past the end of the current
message, which :attr:`BackendConnection.bytes_needed` makes easy (QEMU and
libvhost-user read the header, then the payload, the same way): the kernel
delivers ``SCM_RIGHTS`` with the ``sendmsg`` that carried the header, and a
pending spec change ("fds only with the first ``recvmsg`` of a header")
makes it a rule.  Every fd in an event is the caller's to keep or close:
``Request.fds`` (the handler keeps or closes them), ``RejectedRequest.fds``,
``ProtocolFailure.fds`` and ``ConnectionClosed.fds`` (close them).  No fd
is ever dropped.  If :meth:`~BackendConnection.feed` raises (connection
already failed or closed) the fds passed stay the caller's.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable, Sequence

from iovirt.vhost_user.errors import (
    BadVersionError,
    FdCountError,
    FlagsError,
    LocalProtocolError,
    PayloadSizeError,
    PayloadTooLargeError,
    TruncatedMessageError,
    UnknownRequestError,
    UnsupportedRequestError,
    VhostUserProtocolError,
)
from iovirt.vhost_user.messages import (
    HEADER_SIZE,
    MAX_PAYLOAD_SIZE,
    VHOST_USER_DEVICE_STATE_NOFD,
    VHOST_USER_KNOWN_FLAGS,
    VHOST_USER_NEED_REPLY_MASK,
    VHOST_USER_REPLY_MASK,
    VHOST_USER_VERSION,
    Config,
    DeviceStateTransfer,
    FrontendRequest,
    Header,
    Inflight,
    IotlbMsg,
    Log,
    MemoryTable,
    Payload,
    ProtocolFeature,
    Rarp,
    SingleMemRegion,
    U64,
    VringAddr,
    VringFile,
    VringState,
)
from iovirt.vhost_user.requests import REQUEST_TYPES, ReplyKind, Request

R = FrontendRequest
F = ProtocolFeature


class FdRule(enum.Enum):
    """How many fds a request takes (spec "Communication", per-message text)."""

    NONE = "none"
    ONE = "exactly one"
    PER_REGION = "one per memory region"
    VRING_FILE = "one, or none with the invalid-fd bit (0x100) set"
    REM_MEM_REG = "none, or one that the back-end must close unused"


def _u64_status(status: int) -> bytes:
    return U64(status).pack()


def _device_state_status(status: int) -> bytes:
    # Bits 0-7 carry the error, bit 8 says "no fd"; an error never returns an fd.
    return U64((status & 0xFF or 1) | VHOST_USER_DEVICE_STATE_NOFD).pack()


def _empty_config(status: int) -> bytes:
    # GET_CONFIG: "back-end uses zero length of payload to indicate an error".
    return b""


@dataclass(frozen=True)
class RequestRule:
    """The framing of one front-end request.

    ``payload`` is the payload class (``None``: no payload, size 0).
    ``reply`` is the type of an explicit reply body, sent when
    ``reply_if`` (a protocol feature) is ``None`` or negotiated.
    ``failure`` encodes a failure status in that body, for the replies that
    can carry one; without it a failed request with a body reply cannot be
    reported and the connection has to be closed.
    """

    payload: type[Payload] | None
    fds: FdRule = FdRule.NONE
    reply: type[Payload] | None = None
    reply_if: ProtocolFeature | None = None
    failure: Callable[[int], bytes] | None = None


REQUEST_RULES: dict[FrontendRequest, RequestRule] = {
    R.VHOST_USER_GET_FEATURES: RequestRule(None, reply=U64),
    R.VHOST_USER_SET_FEATURES: RequestRule(U64),
    R.VHOST_USER_SET_OWNER: RequestRule(None),
    R.VHOST_USER_RESET_OWNER: RequestRule(None),
    R.VHOST_USER_SET_MEM_TABLE: RequestRule(MemoryTable, FdRule.PER_REGION),
    # The spec says "u64" but the size and offset of the shared log area
    # travel in the message: QEMU sends a 16-byte log description.
    R.VHOST_USER_SET_LOG_BASE: RequestRule(
        Log, FdRule.ONE, reply=U64, reply_if=F.VHOST_USER_PROTOCOL_F_LOG_SHMFD, failure=_u64_status
    ),
    R.VHOST_USER_SET_LOG_FD: RequestRule(None, FdRule.ONE),
    R.VHOST_USER_SET_VRING_NUM: RequestRule(VringState),
    R.VHOST_USER_SET_VRING_ADDR: RequestRule(VringAddr),
    R.VHOST_USER_SET_VRING_BASE: RequestRule(VringState),
    R.VHOST_USER_GET_VRING_BASE: RequestRule(VringState, reply=VringState),
    R.VHOST_USER_SET_VRING_KICK: RequestRule(VringFile, FdRule.VRING_FILE),
    R.VHOST_USER_SET_VRING_CALL: RequestRule(VringFile, FdRule.VRING_FILE),
    R.VHOST_USER_SET_VRING_ERR: RequestRule(VringFile, FdRule.VRING_FILE),
    R.VHOST_USER_GET_PROTOCOL_FEATURES: RequestRule(None, reply=U64),
    R.VHOST_USER_SET_PROTOCOL_FEATURES: RequestRule(U64),
    R.VHOST_USER_GET_QUEUE_NUM: RequestRule(None, reply=U64),
    R.VHOST_USER_SET_VRING_ENABLE: RequestRule(VringState),
    R.VHOST_USER_SEND_RARP: RequestRule(Rarp),
    R.VHOST_USER_NET_SET_MTU: RequestRule(U64),
    R.VHOST_USER_SET_BACKEND_REQ_FD: RequestRule(None, FdRule.ONE),
    R.VHOST_USER_IOTLB_MSG: RequestRule(IotlbMsg, reply=U64, failure=_u64_status),
    R.VHOST_USER_SET_VRING_ENDIAN: RequestRule(VringState),
    R.VHOST_USER_GET_CONFIG: RequestRule(Config, reply=Config, failure=_empty_config),
    R.VHOST_USER_SET_CONFIG: RequestRule(Config),
    R.VHOST_USER_GET_INFLIGHT_FD: RequestRule(Inflight, reply=Inflight),
    R.VHOST_USER_SET_INFLIGHT_FD: RequestRule(Inflight, FdRule.ONE),
    R.VHOST_USER_RESET_DEVICE: RequestRule(None),
    R.VHOST_USER_VRING_KICK: RequestRule(VringState),
    R.VHOST_USER_GET_MAX_MEM_SLOTS: RequestRule(None, reply=U64),
    R.VHOST_USER_ADD_MEM_REG: RequestRule(SingleMemRegion, FdRule.ONE),
    R.VHOST_USER_REM_MEM_REG: RequestRule(SingleMemRegion, FdRule.REM_MEM_REG),
    R.VHOST_USER_SET_STATUS: RequestRule(U64),
    R.VHOST_USER_GET_STATUS: RequestRule(None, reply=U64),
    R.VHOST_USER_SET_DEVICE_STATE_FD: RequestRule(
        DeviceStateTransfer, FdRule.ONE, reply=U64, failure=_device_state_status
    ),
    R.VHOST_USER_CHECK_DEVICE_STATE: RequestRule(None, reply=U64, failure=_u64_status),
}
"""Payload, fds and reply of every request iovirt parses."""

UNSUPPORTED_REQUESTS: dict[FrontendRequest, str] = {
    R.VHOST_USER_CREATE_CRYPTO_SESSION: "crypto sessions (VHOST_USER_PROTOCOL_F_CRYPTO_SESSION) are not offered",
    R.VHOST_USER_CLOSE_CRYPTO_SESSION: "crypto sessions (VHOST_USER_PROTOCOL_F_CRYPTO_SESSION) are not offered",
    R.VHOST_USER_POSTCOPY_ADVISE: "postcopy (VHOST_USER_PROTOCOL_F_PAGEFAULT) is not offered",
    R.VHOST_USER_POSTCOPY_LISTEN: "postcopy (VHOST_USER_PROTOCOL_F_PAGEFAULT) is not offered",
    R.VHOST_USER_POSTCOPY_END: "postcopy (VHOST_USER_PROTOCOL_F_PAGEFAULT) is not offered",
    R.VHOST_USER_GPU_SET_SOCKET: "iovirt has no vhost-user-gpu device",
    R.VHOST_USER_GET_SHARED_OBJECT: "shared objects (VHOST_USER_PROTOCOL_F_SHARED_OBJECT) are not offered",
}
"""Spec requests iovirt recognises but rejects; their features are never offered."""


def payload_of(request: Request) -> Payload | None:
    """The payload object ``request`` was parsed from (its class from :data:`REQUEST_RULES`)."""
    payload_type = REQUEST_RULES[request.code].payload
    return None if payload_type is None else payload_type(*request.values())  # type: ignore[call-arg]

def reply_kind(request: int, need_reply: bool, protocol_features: int) -> ReplyKind:
    """What the front-end waits for after ``request`` (spec "Communication", REPLY_ACK).

    A request with an explicit reply body gets it whatever need_reply says
    ("brings no behavioural change"); any other request, known or not, gets
    a u64 ack only if need_reply is set and REPLY_ACK was negotiated.
    """
    rule = REQUEST_RULES.get(request)  # type: ignore[call-overload]
    if rule is not None and rule.reply is not None:
        if rule.reply_if is None or protocol_features & (1 << rule.reply_if):
            return ReplyKind.BODY
    if need_reply and protocol_features & (1 << F.VHOST_USER_PROTOCOL_F_REPLY_ACK):
        return ReplyKind.ACK
    return ReplyKind.NONE


@dataclass(frozen=True)
class RejectedRequest:
    """A complete message that breaks a rule; the connection goes on.

    ``request`` is a :class:`FrontendRequest` when the code is known, else the
    raw code.  ``fds`` arrived with the message and must be closed by the
    caller.  Answer with :meth:`BackendConnection.nack`.
    """

    request: int
    flags: int
    error: VhostUserProtocolError
    fds: tuple[int, ...]
    reply: ReplyKind


@dataclass(frozen=True)
class ProtocolFailure:
    """The byte stream can no longer be framed; close the connection and ``fds``."""

    error: VhostUserProtocolError
    fds: tuple[int, ...]


@dataclass(frozen=True)
class ConnectionClosed:
    """The peer closed the connection between messages; close ``fds`` (normally none)."""

    fds: tuple[int, ...] = ()


Event = Request | RejectedRequest | ProtocolFailure | ConnectionClosed


class ConnectionState(enum.Enum):
    """The connection's state (h11 style: one error ends it)."""

    OPEN = "open"
    ERROR = "error"
    CLOSED = "closed"


@dataclass
class BackendConnection:
    """The back-end side of one vhost-user connection, without I/O.

    ``supported_protocol_features`` is the mask the back-end offers in
    GET_PROTOCOL_FEATURES; the negotiated mask (:attr:`protocol_features`)
    is what the front-end sets with SET_PROTOCOL_FEATURES, limited to it.
    It decides whether REPLY_ACK and LOG_SHMFD replies are due.
    """

    supported_protocol_features: int = 0
    protocol_features: int = field(default=0, init=False)
    state: ConnectionState = field(default=ConnectionState.OPEN, init=False)
    _buffer: bytearray = field(default_factory=bytearray, init=False, repr=False)
    _header: Header | None = field(default=None, init=False, repr=False)
    _fds: list[int] = field(default_factory=list, init=False, repr=False)

    # -- input ----------------------------------------------------------------
    @property
    def bytes_needed(self) -> int:
        """How many bytes complete the current header or message (read no more).

        Reading at most this many bytes per ``recvmsg`` keeps every fd with
        the message it was sent with.
        """
        if self._header is None:
            return HEADER_SIZE - len(self._buffer)
        return self._header.size - len(self._buffer)

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> list[Event]:
        """Take bytes (and the fds received with them); return the events they complete.

        Raises :class:`LocalProtocolError` if the connection has already
        failed or closed; the caller then still owns ``fds``.
        """
        self._check_open()
        self._fds.extend(fds)
        self._buffer += data
        events: list[Event] = []
        while self.state is ConnectionState.OPEN:
            if self._header is None:
                if len(self._buffer) < HEADER_SIZE:
                    break
                header = Header.unpack(self._buffer[:HEADER_SIZE])
                del self._buffer[:HEADER_SIZE]
                error = self._framing_error(header)
                if error is not None:
                    events.append(self._fail(error))
                    break
                self._header = header
            if len(self._buffer) < self._header.size:
                break
            header, self._header = self._header, None
            body = bytes(self._buffer[: header.size])
            del self._buffer[: header.size]
            message_fds, self._fds = tuple(self._fds), []
            events.append(self._message(header, body, message_fds))
        return events

    def feed_eof(self) -> Event:
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

    @staticmethod
    def _framing_error(header: Header) -> VhostUserProtocolError | None:
        if header.version != VHOST_USER_VERSION:
            return BadVersionError(header.request, header.flags)
        if header.size > MAX_PAYLOAD_SIZE:
            return PayloadTooLargeError(header.request, header.size, MAX_PAYLOAD_SIZE)
        return None

    def _fail(self, error: VhostUserProtocolError) -> ProtocolFailure:
        self.state = ConnectionState.ERROR
        self._buffer.clear()
        self._header = None
        fds, self._fds = tuple(self._fds), []
        return ProtocolFailure(error, fds)

    def _message(self, header: Header, body: bytes, fds: tuple[int, ...]) -> Request | RejectedRequest:
        code = header.request
        try:
            request = FrontendRequest(code)
        except ValueError:
            return self._reject(code, header, UnknownRequestError(code), fds)
        if header.flags & ~VHOST_USER_KNOWN_FLAGS:
            return self._reject(request, header, FlagsError(code, header.flags, "reserved bits set"), fds)
        if header.flags & VHOST_USER_REPLY_MASK:
            return self._reject(
                request, header, FlagsError(code, header.flags, "reply bit set on a front-end request"), fds
            )
        rule = REQUEST_RULES.get(request)
        if rule is None:
            return self._reject(request, header, UnsupportedRequestError(code, UNSUPPORTED_REQUESTS[request]), fds)
        try:
            payload = self._parse_payload(request, rule, body)
            self._check_fds(request, rule.fds, payload, len(fds))
        except VhostUserProtocolError as error:
            return self._reject(request, header, error, fds)
        if request is R.VHOST_USER_SET_PROTOCOL_FEATURES:
            # Takes effect at once, including for this request's own ack (as
            # rust-vmm does): REPLY_ACK applies when the handler answers it.
            assert isinstance(payload, U64)
            self.protocol_features = payload.value & self.supported_protocol_features
        return REQUEST_TYPES[request].from_payload(
            payload, header_flags=header.flags, fds=fds, reply=self._reply_kind(request, header)
        )

    @staticmethod
    def _parse_payload(request: FrontendRequest, rule: RequestRule, body: bytes) -> Payload | None:
        if rule.payload is None:
            if body:
                raise PayloadSizeError(request, len(body), "0 bytes (no payload)")
            return None
        return rule.payload.unpack(body, request)

    @staticmethod
    def _check_fds(request: FrontendRequest, rule: FdRule, payload: Payload | None, count: int) -> None:
        if rule is FdRule.NONE:
            expected = 0
        elif rule is FdRule.ONE:
            expected = 1
        elif rule is FdRule.PER_REGION:
            # "The size and ordering of the fds matches the number and
            # ordering of memory regions" (VHOST_USER_SET_MEM_TABLE).
            assert isinstance(payload, MemoryTable)
            expected = len(payload.regions)
        elif rule is FdRule.VRING_FILE:
            assert isinstance(payload, VringFile)
            expected = 0 if payload.invalid_fd else 1
        else:
            # REM_MEM_REG: "the back-end MAY accept messages with one file
            # descriptor"; the handler must close it unused.
            if count <= 1:
                return
            raise FdCountError(request, count, rule.value)
        if count != expected:
            raise FdCountError(request, count, f"{expected} ({rule.value})")

    def _reply_kind(self, request: int, header: Header) -> ReplyKind:
        return reply_kind(request, header.need_reply, self.protocol_features)

    def _reject(
        self, request: int, header: Header, error: VhostUserProtocolError, fds: tuple[int, ...]
    ) -> RejectedRequest:
        return RejectedRequest(request, header.flags, error, fds, self._reply_kind(request, header))

    # -- output ---------------------------------------------------------------
    def reply(self, event: Request, payload: Payload) -> bytes:
        """The reply message carrying ``payload`` for a request whose reply is ``BODY``.

        Replies that pass an fd (GET_INFLIGHT_FD, SET_DEVICE_STATE_FD) send it
        with these bytes.  Raises :class:`LocalProtocolError` when the request
        takes no reply body or ``payload`` has the wrong type.
        """
        if event.reply is not ReplyKind.BODY:
            raise LocalProtocolError(f"{event.request.name} takes no reply body here ({event.reply.value})")
        expected = REQUEST_RULES[event.request].reply
        if not isinstance(payload, expected):  # type: ignore[arg-type]
            raise LocalProtocolError(
                f"{event.request.name} replies with {expected.__name__}, not {type(payload).__name__}"  # type: ignore[union-attr]
            )
        return self._reply_bytes(event.request, payload.pack())

    def ack(self, event: Request | RejectedRequest, status: int = 0) -> bytes:
        """The REPLY_ACK message (u64 ``status``: 0 success) if one is due, else ``b""``.

        Raises :class:`LocalProtocolError` for a ``BODY`` request: the
        front-end waits for the body, not an ack (spec REPLY_ACK section).
        """
        if event.reply is ReplyKind.BODY:
            raise LocalProtocolError(f"{_name(event.request)} needs its reply body, not an ack")
        if event.reply is ReplyKind.NONE:
            return b""
        return self._reply_bytes(event.request, U64(status).pack())

    def nack(self, event: Request | RejectedRequest, status: int = 1) -> bytes | None:
        """What to send when ``event`` failed: a failure reply, ``b""`` (nothing due) or ``None``.

        ``None`` means the front-end waits for a reply body that has no way to
        say "failed" (GET_FEATURES, GET_VRING_BASE, GET_INFLIGHT_FD, ...): the
        spec leaves closing the connection as the only answer.
        """
        if status == 0:
            raise LocalProtocolError("a failure status must be non-zero")
        if event.reply is not ReplyKind.BODY:
            return self.ack(event, status)
        rule = REQUEST_RULES[FrontendRequest(event.request)]
        if rule.failure is None:
            return None
        return self._reply_bytes(event.request, rule.failure(status))

    @staticmethod
    def _reply_bytes(request: int, body: bytes) -> bytes:
        return Header(request, VHOST_USER_VERSION | VHOST_USER_REPLY_MASK, len(body)).pack() + body


def _name(request: int) -> str:
    return request.name if isinstance(request, FrontendRequest) else f"request {request}"
