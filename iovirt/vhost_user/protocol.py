"""Sans-I/O vhost-user connections, back-end and front-end side (h11 style).

:class:`BackendConnection` takes the bytes and file descriptors a socket
delivered and returns typed events; it builds the bytes of replies.  It never
touches a socket: the server reads with ``socket.recv_fds`` and writes with
``socket.send_fds``.  The rules of QEMU's ``docs/interop/vhost-user.rst`` on top of
the shared framing (:mod:`iovirt.vhost_user.framing`) live here, in
:data:`REQUEST_RULES`: the payload each request carries, the fds it takes,
and the reply it gets.

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
* :class:`~iovirt.vhost_user.framing.ProtocolFailure` - the stream can no
  longer be framed (bad version, absurd size, EOF mid-message).  The
  connection is in ``ERROR`` state; the caller closes it.
* :class:`~iovirt.vhost_user.framing.ConnectionClosed` - clean EOF between messages.

What is recoverable (and why)
-----------------------------
Framing itself (header, version, size bound, fds per message, end of file)
is :mod:`iovirt.vhost_user.framing`'s, shared with the front-end role; its
fatal errors come out as :class:`ProtocolFailure`.  Everything else is
checked on a whole message, so the next message starts at a known offset and
the error only rejects one message: unknown request codes (the spec's
REPLY_ACK section lets the front-end ask for a reply to *any* request, so a
NACK is still due if NEED_REPLY was set), reserved or REPLY flag bits,
payload sizes and values, fd counts.

Not handled: VHOST_USER_PROTOCOL_F_XEN_MMAP (its memory regions are 40
bytes, not 32) - a back-end using this class must not offer it.

File descriptors
----------------
Fds are framed as :class:`~iovirt.vhost_user.framing.Framer` says: read at
most :attr:`BackendConnection.bytes_needed` bytes per ``recvmsg`` and every
fd stays with its message.  Every fd in an event is the caller's to keep or
close: ``Request.fds`` (the handler keeps or closes them),
``RejectedRequest.fds``, ``ProtocolFailure.fds`` and
``ConnectionClosed.fds`` (close them).  No fd is ever dropped.  If
:meth:`~BackendConnection.feed` raises (connection already failed or
closed) the fds passed stay the caller's.

Front-end role
--------------
:class:`FrontendConnection` is the same rules seen from the other end: it
builds request bytes, frames what the back-end sends, and checks a reply
against the request it answers (code, REPLY bit, and the payload type
:data:`REQUEST_RULES` and :func:`reply_kind` say is due).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable, Sequence

from iovirt.vhost_user.errors import (
    BadReplyError,
    FdCountError,
    FlagsError,
    LocalProtocolError,
    NackError,
    PayloadSizeError,
    UnknownRequestError,
    UnsupportedRequestError,
    VhostUserProtocolError,
)
from iovirt.vhost_user.framing import (
    ConnectionClosed,
    ConnectionState,
    Framer,
    Header,
    Message,
    ProtocolFailure,
    build_message,
    build_reply,
    request_flags,
)
from iovirt.vhost_user.messages import (
    VHOST_USER_DEVICE_STATE_NOFD,
    VHOST_USER_KNOWN_FLAGS,
    VHOST_USER_REPLY_MASK,
    Config,
    DeviceStateTransfer,
    FrontendRequest,
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

def rule_of(request: int) -> RequestRule | None:
    """The rule of request code ``request``, or ``None`` for a code iovirt does not parse."""
    try:
        return REQUEST_RULES.get(FrontendRequest(request))
    except ValueError:
        return None


def reply_kind(request: int, need_reply: bool, protocol_features: int) -> ReplyKind:
    """What the front-end waits for after ``request`` (spec "Communication", REPLY_ACK).

    A request with an explicit reply body gets it whatever need_reply says
    ("brings no behavioural change"); any other request, known or not, gets
    a u64 ack only if need_reply is set and REPLY_ACK was negotiated.
    """
    rule = rule_of(request)
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


Event = Request | RejectedRequest | ProtocolFailure | ConnectionClosed


class _Framed:
    """What both roles' connections read from their :class:`Framer`."""

    _framer: Framer

    @property
    def state(self) -> ConnectionState:
        """The stream's state: ``OPEN`` until a fatal framing error or the peer's EOF."""
        return self._framer.state

    @property
    def bytes_needed(self) -> int:
        """How many bytes complete the current header or message (read no more, see :class:`Framer`)."""
        return self._framer.bytes_needed


@dataclass
class BackendConnection(_Framed):
    """The back-end side of one vhost-user connection, without I/O.

    ``supported_protocol_features`` is the mask the back-end offers in
    GET_PROTOCOL_FEATURES; the negotiated mask (:attr:`protocol_features`)
    is what the front-end sets with SET_PROTOCOL_FEATURES, limited to it.
    It decides whether REPLY_ACK and LOG_SHMFD replies are due.
    """

    supported_protocol_features: int = 0
    protocol_features: int = field(default=0, init=False)
    _framer: Framer = field(default_factory=Framer, init=False, repr=False)

    # -- input ----------------------------------------------------------------
    def feed(self, data: bytes, fds: Sequence[int] = ()) -> list[Event]:
        """Take bytes (and the fds received with them); return the events they complete.

        Raises :class:`LocalProtocolError` if the connection has already
        failed or closed; the caller then still owns ``fds``.
        """
        return [
            framed if isinstance(framed, ProtocolFailure) else self._message(framed)
            for framed in self._framer.feed(data, fds)
        ]

    def feed_eof(self) -> Event:
        """The peer closed its end: :class:`ConnectionClosed`, or a failure mid-message."""
        return self._framer.feed_eof()

    def _message(self, message: Message) -> Request | RejectedRequest:
        header, body, fds = message.header, message.body, message.fds
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
        assert expected is not None  # a BODY reply has its payload class
        if not isinstance(payload, expected):
            raise LocalProtocolError(
                f"{event.request.name} replies with {expected.__name__}, not {type(payload).__name__}"
            )
        return build_reply(event.request, payload.pack())

    def ack(self, event: Request | RejectedRequest, status: int = 0) -> bytes:
        """The REPLY_ACK message (u64 ``status``: 0 success) if one is due, else ``b""``.

        Raises :class:`LocalProtocolError` for a ``BODY`` request: the
        front-end waits for the body, not an ack (spec REPLY_ACK section).
        """
        if event.reply is ReplyKind.BODY:
            raise LocalProtocolError(f"{_name(event.request)} needs its reply body, not an ack")
        if event.reply is ReplyKind.NONE:
            return b""
        return build_reply(event.request, U64(status).pack())

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
        return build_reply(event.request, rule.failure(status))


def _name(request: int) -> str:
    return request.name if isinstance(request, FrontendRequest) else f"request {request}"


# -- front-end role -------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """A checked reply from the back-end: its header, parsed payload and the fds it passed.

    ``payload`` is ``None`` for an empty reply (GET_CONFIG's failure).
    The fds are the caller's to close.
    """

    header: Header
    payload: Payload | None
    fds: tuple[int, ...]


@dataclass
class FrontendConnection(_Framed):
    """The front-end side of one vhost-user connection, without I/O.

    :meth:`request` builds a request's bytes; :meth:`feed` frames what the
    back-end sends (the same :class:`~iovirt.vhost_user.framing.Framer`
    and fd rules as :class:`BackendConnection`); :meth:`reply` checks a
    framed message as the reply to a request.  :attr:`protocol_features`
    is what SET_PROTOCOL_FEATURES sent: it takes effect at once, as on the
    back-end side, and decides which replies are due (:func:`reply_kind`).
    """

    protocol_features: int = field(default=0, init=False)
    _framer: Framer = field(default_factory=Framer, init=False, repr=False)

    # -- output ---------------------------------------------------------------
    def request(
        self, request: int, payload: Payload | bytes | None = None, *, need_reply: bool = False, flags: int | None = None
    ) -> bytes:
        """The bytes of one request; ``flags`` overrides version/need_reply (for bad input)."""
        if request == R.VHOST_USER_SET_PROTOCOL_FEATURES and isinstance(payload, U64):
            self.protocol_features = payload.value
        return build_message(request, request_flags(need_reply) if flags is None else flags, payload)

    def reply_due(self, request: int, need_reply: bool) -> ReplyKind:
        """What the back-end answers ``request`` sent with ``need_reply`` (see :func:`reply_kind`)."""
        return reply_kind(request, need_reply, self.protocol_features)

    # -- input ----------------------------------------------------------------
    def feed(self, data: bytes, fds: Sequence[int] = ()) -> list[Message | ProtocolFailure]:
        """Take bytes (and the fds received with them); return the messages they complete."""
        return self._framer.feed(data, fds)

    def feed_eof(self) -> ConnectionClosed | ProtocolFailure:
        """The back-end closed its end: :class:`ConnectionClosed`, or a failure mid-message."""
        return self._framer.feed_eof()

    def reply(self, message: Message, request: int) -> Reply:
        """Check ``message`` as the reply to ``request`` and parse its payload.

        The reply must carry the request's code and the REPLY bit, and the
        payload the spec says is due: the request's reply body (its
        :data:`REQUEST_RULES` type, when :func:`reply_kind` says ``BODY``),
        else a REPLY_ACK u64.  Only GET_CONFIG's reply may be empty ("zero
        length of payload to indicate an error").  Raises
        :class:`BadReplyError`; ``message.fds`` stay the caller's either way.
        """
        header = message.header
        if header.request != request:
            raise BadReplyError(request, f"reply is for request {header.request}")
        if not header.is_reply:
            raise BadReplyError(request, f"reply flags {header.flags:#x} lack version 1 and REPLY")
        rule = rule_of(request)
        body_due = self.reply_due(request, False) is ReplyKind.BODY
        payload_type: type[Payload] = U64
        if body_due and rule is not None and rule.reply is not None:
            payload_type = rule.reply
        try:
            payload = payload_type.unpack(message.body, request) if message.body else None
        except VhostUserProtocolError as exc:
            raise BadReplyError(request, str(exc)) from exc
        if payload is None and request != R.VHOST_USER_GET_CONFIG:
            raise BadReplyError(request, "empty reply payload")
        return Reply(header, payload, message.fds)

    @staticmethod
    def check_ack(request: int, reply: Reply) -> None:
        """Raise :class:`NackError` unless the REPLY_ACK ``reply`` says success (u64 0)."""
        assert isinstance(reply.payload, U64)
        if reply.payload.value != 0:
            raise NackError(request, reply.payload.value)
