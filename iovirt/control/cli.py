"""``iovirt ctl PATH COMMAND [ARGS]``: one request to a control socket, its reply printed.

Every command prints its reply as JSON except ``metrics``, which prints the
Prometheus text.  An error reply is printed to stderr and the exit status
is 1; a socket that cannot be reached, 2.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from typing import Any

from iovirt.control.protocol import MAX_REQUEST_BYTES, encode_request

TIMEOUT_S = 30.0
"""How long the client waits for a reply."""

MAX_REPLY_BYTES = 64 << 20


def request(path: str, command: str, args: dict[str, Any] | None = None, timeout: float = TIMEOUT_S) -> dict[str, Any]:
    """Send one request to control socket ``path``; the decoded reply (``{"return": ...}`` or ``{"error": ...}``)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(encode_request(command, args))
        data = bytearray()
        while not data.endswith(b"\n"):
            chunk = sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("the control socket closed without a reply")
            data += chunk
            if len(data) > MAX_REPLY_BYTES:
                raise ConnectionError(f"reply longer than {MAX_REPLY_BYTES} bytes")
    reply = json.loads(data)
    if not isinstance(reply, dict):
        raise ConnectionError("the reply is not a JSON object")
    return reply


def _limits(pairs: list[str]) -> dict[str, float]:
    limits = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"limit wants KEY=VALUE, got {pair!r}")
        try:
            limits[key] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"limit {key}: {value!r} is not a number") from None
    return limits


def _impairment(pairs: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` words as strings: the server checks them (the ``--net`` parser's rules)."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"impair wants KEY=VALUE, got {pair!r}")
        options[key] = value
    return options


def _blk_args(text: str) -> dict[str, Any]:
    parts = text.split(",")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1] or (len(parts) == 3 and parts[2] != "ro"):
        raise argparse.ArgumentTypeError(f"add-blk wants SOCKET,IMAGE[,ro], got {text!r}")
    return {"socket": parts[0], "image": parts[1], "read_only": len(parts) == 3}


def parse_command(words: list[str]) -> tuple[str, dict[str, Any]]:
    """``COMMAND [ARGS]`` words → ``(command, args)`` of the request (``argparse.ArgumentTypeError`` if malformed)."""
    if not words:
        raise argparse.ArgumentTypeError("give a COMMAND (devices, stats, fdb, add-net, add-blk, remove, "
                                         "log-level, limit, impair, metrics)")
    command, rest = words[0], words[1:]
    arity = {"devices": (0, 0), "fdb": (0, 0), "metrics": (0, 0), "commands": (0, 0), "stats": (0, 1),
             "add-net": (1, 1), "add-blk": (1, 1), "remove": (1, 1), "log-level": (1, 1), "counting": (2, 2),
             "limit": (2, 1 + 16), "impair": (1, 1 + 16)}
    low, high = arity.get(command, (0, len(rest)))
    if not low <= len(rest) <= high:
        raise argparse.ArgumentTypeError(f"{command} takes {low}..{high} arguments, got {len(rest)}")
    if command == "stats":
        return command, {"device": rest[0]} if rest else {}
    if command == "add-net":
        return command, {"socket": rest[0]}
    if command == "add-blk":
        return command, _blk_args(rest[0])
    if command == "remove":
        return command, {"device": rest[0]}
    if command == "log-level":
        return command, {"level": rest[0]}
    if command == "limit":
        return command, {"device": rest[0], "limits": _limits(rest[1:])}
    if command == "impair":
        return command, {"device": rest[0], "impairment": _impairment(rest[1:])}
    if command == "counting":
        if rest[1] not in ("on", "off"):
            raise argparse.ArgumentTypeError("counting wants DEVICE on|off")
        return command, {"device": rest[0], "enabled": rest[1] == "on"}
    return command, {}  # no arguments, or a command unknown here: the server says what it serves


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``ctl``."""
    ctl = sub.add_parser(
        "ctl",
        help="send a command to the control socket of 'iovirt serve --control PATH'",
        description=(
            "Commands: devices | stats [DEVICE] | fdb | add-net SOCKET | add-blk SOCKET,IMAGE[,ro] | "
            "remove DEVICE | log-level LEVEL | limit DEVICE KEY=VALUE... | impair DEVICE [KEY=VALUE...] | metrics | "
            "counting DEVICE on|off | "
            "commands. A DEVICE is its name (net0, blk0, ...) or its socket path. Every command prints JSON "
            f"except metrics (Prometheus text). Requests are at most {MAX_REQUEST_BYTES} bytes. See docs/control.md."
        ),
    )
    ctl.add_argument("path", metavar="PATH", help="the control socket")
    ctl.add_argument("words", metavar="COMMAND [ARGS]", nargs=argparse.REMAINDER)
    ctl.set_defaults(func=run_ctl)


def run_ctl(args: argparse.Namespace) -> int:
    """``iovirt ctl``."""
    try:
        command, request_args = parse_command(args.words)
    except argparse.ArgumentTypeError as exc:
        print(f"iovirt ctl: {exc}", file=sys.stderr)
        return 2
    try:
        reply = request(args.path, command, request_args)
    except (OSError, ValueError) as exc:
        print(f"iovirt ctl: {args.path}: {exc}", file=sys.stderr)
        return 2
    if "error" in reply:
        error = reply["error"]
        print(f"iovirt ctl: {error.get('class')}: {error.get('desc')}", file=sys.stderr)
        return 1
    value = reply.get("return")
    if command == "metrics" and isinstance(value, str):
        sys.stdout.write(value)
    else:
        print(json.dumps(value, indent=2))
    return 0
