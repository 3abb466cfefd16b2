"""Exceptions of the vhost-user layers.

Two families:

* :class:`VhostUserProtocolError` - the *peer* sent something the wire format
  or the framing rules of QEMU's ``docs/interop/vhost-user.rst`` do not
  allow.  Each carries the request code it was found on (``request``, or
  ``None`` when no header could be read) and says whether the byte stream can
  still be trusted (``fatal``).  The sans-I/O protocol reports these as
  events; :mod:`iovirt.vhost_user.messages` raises them from ``unpack``.
* :class:`LocalProtocolError` - *our own* code used the API wrongly (replied
  to a request that takes no reply, fed a closed connection).  A bug, raised.

:class:`FrontendError` and its subclasses are raised by the Python frontend
(:mod:`iovirt.vhost_user.frontend`) when a backend misbehaves or times out.
"""

from __future__ import annotations

from iovirt.errors import IovirtError


def _request_name(request: int | None) -> str:
    """The spec name of a request code, or its number when unknown."""
    if request is None:
        return "no request"
    # Imported late: messages imports this module.
    from iovirt.vhost_user.messages import FrontendRequest

    try:
        return FrontendRequest(request).name
    except ValueError:
        return f"request {request}"


class VhostUserError(IovirtError):
    """Root of the vhost-user exceptions."""


class RequestRefused(VhostUserError):
    """A well-formed request the back-end will not apply; the reason is logged and NACKed."""

    def __init__(self, request: int, reason: str) -> None:
        super().__init__(f"{_request_name(request)}: {reason}")
        self.request = request
        self.reason = reason


class VhostUserProtocolError(VhostUserError):
    """A message from the peer breaks the vhost-user wire format or framing.

    ``request`` is the request code of the offending message (``None`` if no
    header was read).  ``fatal`` is true when the byte stream can no longer
    be framed, so the connection must be closed; otherwise the message was
    consumed whole and the connection can go on (after a NACK if asked for).
    """

    fatal = False

    def __init__(self, message: str, request: int | None) -> None:
        super().__init__(f"{_request_name(request)}: {message}")
        self.request = request


class PayloadSizeError(VhostUserProtocolError):
    """The header's ``size`` is not the size this request's payload has."""

    def __init__(self, request: int | None, size: int, expected: str) -> None:
        super().__init__(f"payload is {size} bytes, expected {expected}", request)
        self.size = size
        self.expected = expected


class PayloadValueError(VhostUserProtocolError):
    """A payload field has a value its encoding does not allow (count, enum, reserved bits)."""

    def __init__(self, request: int | None, field: str, value: int, expected: str) -> None:
        super().__init__(f"{field} is {value:#x}, expected {expected}", request)
        self.field = field
        self.value = value
        self.expected = expected


class UnknownRequestError(VhostUserProtocolError):
    """The request code is not a front-end request the spec defines."""

    def __init__(self, request: int) -> None:
        super().__init__("unknown request code", request)


class UnsupportedRequestError(VhostUserProtocolError):
    """A spec request that iovirt does not implement (and never offers the feature for)."""

    def __init__(self, request: int, reason: str) -> None:
        super().__init__(f"not supported: {reason}", request)
        self.reason = reason


class FlagsError(VhostUserProtocolError):
    """Header flags with the REPLY bit or reserved bits set on a front-end request."""

    def __init__(self, request: int, flags: int, reason: str) -> None:
        super().__init__(f"flags {flags:#x}: {reason}", request)
        self.flags = flags


class FdCountError(VhostUserProtocolError):
    """The message came with a number of file descriptors its request does not take."""

    def __init__(self, request: int, count: int, expected: str) -> None:
        super().__init__(f"{count} file descriptor(s) attached, expected {expected}", request)
        self.count = count
        self.expected = expected


class BadVersionError(VhostUserProtocolError):
    """The header's version bits are not 0x1; the framing cannot be trusted."""

    fatal = True

    def __init__(self, request: int, flags: int) -> None:
        super().__init__(f"header version {flags & 0x3} (flags {flags:#x}), expected 1", request)
        self.flags = flags


class PayloadTooLargeError(VhostUserProtocolError):
    """The header announces a payload larger than any vhost-user message has."""

    fatal = True

    def __init__(self, request: int, size: int, limit: int) -> None:
        super().__init__(f"payload size {size} exceeds the {limit}-byte limit", request)
        self.size = size
        self.limit = limit


class TruncatedMessageError(VhostUserProtocolError):
    """The peer closed the connection in the middle of a message."""

    fatal = True

    def __init__(self, request: int | None, received: int, expected: int) -> None:
        super().__init__(
            f"connection closed after {received} of {expected} bytes of the message", request
        )
        self.received = received
        self.expected = expected


class LocalProtocolError(VhostUserError):
    """Our own code used the protocol API wrongly (a bug, not peer input)."""


class FrontendError(VhostUserError):
    """The backend did not answer as the spec requires (raised by the frontend)."""


class ReplyTimeoutError(FrontendError):
    """No (complete) reply arrived within the timeout."""

    def __init__(self, request: int | None, timeout: float) -> None:
        super().__init__(f"{_request_name(request)}: no reply within {timeout:g} s")
        self.request = request
        self.timeout = timeout


class BadReplyError(FrontendError):
    """A reply with the wrong request code, flags, version or size."""

    def __init__(self, request: int, reason: str) -> None:
        super().__init__(f"{_request_name(request)}: bad reply: {reason}")
        self.request = request
        self.reason = reason


class NackError(FrontendError):
    """The backend answered a request with a non-zero REPLY_ACK status."""

    def __init__(self, request: int, status: int) -> None:
        super().__init__(f"{_request_name(request)}: backend replied failure status {status:#x}")
        self.request = request
        self.status = status


class BackendClosedError(FrontendError):
    """The backend closed the connection."""

    def __init__(self, request: int | None) -> None:
        super().__init__(f"{_request_name(request)}: backend closed the connection")
        self.request = request
