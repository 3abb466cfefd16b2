"""The control socket's line protocol: one JSON object per line in each direction.

In the spirit of QMP (QEMU's ``docs/interop/qmp-spec.rst``) and DPDK
telemetry: a request is ``{"command": NAME, "args": {...}}`` (``args``
optional), a reply is ``{"return": VALUE}`` or ``{"error": {"class": CLASS,
"desc": TEXT}}``.  Sans-I/O: :class:`LineReader` takes bytes and returns
lines; :func:`parse_request` validates one; the socket is the server's.
"""

from __future__ import annotations

import json
from typing import Any

MAX_REQUEST_BYTES = 64 * 1024
"""The longest request line (its newline included); a longer one closes the connection."""

# Error classes (QMP's names where one fits).
GENERIC_ERROR = "GenericError"
COMMAND_NOT_FOUND = "CommandNotFound"
DEVICE_NOT_FOUND = "DeviceNotFound"
BAD_REQUEST = "BadRequest"


class ControlError(Exception):
    """A request that cannot be served: ``error_class`` and a description, sent back as the error reply."""

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(desc)
        self.error_class = error_class
        self.desc = desc


class LineTooLong(Exception):
    """The peer sent more than :data:`MAX_REQUEST_BYTES` without a newline."""


class LineReader:
    """Splits a byte stream into lines of at most ``limit`` bytes (newline included)."""

    def __init__(self, limit: int = MAX_REQUEST_BYTES) -> None:
        self.limit = limit
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data``; return the complete lines (without newline).  Raises :class:`LineTooLong`."""
        self._buf += data
        lines = []
        while True:
            end = self._buf.find(b"\n")
            if end < 0:
                break
            if end + 1 > self.limit:
                raise LineTooLong(f"request of more than {self.limit} bytes")
            lines.append(bytes(self._buf[:end]))
            del self._buf[: end + 1]
        if len(self._buf) >= self.limit:
            raise LineTooLong(f"request of more than {self.limit} bytes without a newline")
        return lines


def parse_request(line: bytes) -> tuple[str, dict[str, Any]]:
    """``(command, args)`` of one request line; :class:`ControlError` (BadRequest) if it is not one."""
    try:
        request = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ControlError(BAD_REQUEST, f"not a JSON object: {exc}") from None
    if not isinstance(request, dict):
        raise ControlError(BAD_REQUEST, f"a request is a JSON object, got {type(request).__name__}")
    unknown = set(request) - {"command", "args"}
    if unknown:
        raise ControlError(BAD_REQUEST, f"unknown request members {sorted(unknown)} (expected command, args)")
    command = request.get("command")
    if not isinstance(command, str) or not command:
        raise ControlError(BAD_REQUEST, "'command' must be a non-empty string")
    args = request.get("args", {})
    if not isinstance(args, dict):
        raise ControlError(BAD_REQUEST, "'args' must be a JSON object")
    return command, args


def encode_return(value: Any) -> bytes:
    """The reply line for a served request."""
    return json.dumps({"return": value}, separators=(",", ":")).encode() + b"\n"


def encode_error(error_class: str, desc: str) -> bytes:
    """The reply line for a refused request."""
    return json.dumps({"error": {"class": error_class, "desc": desc}}, separators=(",", ":")).encode() + b"\n"


def encode_request(command: str, args: dict[str, Any] | None = None) -> bytes:
    """A request line (the client's side)."""
    request: dict[str, Any] = {"command": command}
    if args:
        request["args"] = args
    return json.dumps(request, separators=(",", ":")).encode() + b"\n"
