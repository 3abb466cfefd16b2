"""Helpers shared by the control-socket tests: one request and its reply, success or error."""

from __future__ import annotations

from iovirt.control.cli import request

ALL = (1 << 64) - 1
MAC_A, MAC_B = bytes.fromhex("02000000000a"), bytes.fromhex("02000000000b")


def ok(path: str, command: str, args: dict | None = None):
    """The ``return`` of ``command`` on the control socket at ``path`` (which must succeed)."""
    reply = request(path, command, args, timeout=10)
    assert "return" in reply, reply
    return reply["return"]


def error(path: str, command: str, args: dict | None = None) -> dict:
    """The ``error`` of ``command`` on the control socket at ``path`` (which must fail)."""
    reply = request(path, command, args, timeout=10)
    assert "error" in reply, reply
    return reply["error"]
