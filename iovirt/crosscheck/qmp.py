"""A minimal QMP client: the commands a qtest connection cannot send (``set_link``).

QEMU started with ``-qmp unix:PATH,server=on,wait=off`` listens on PATH;
the client connects, reads the greeting, leaves capabilities negotiation
mode (``qmp_capabilities``) and then sends one command at a time, skipping
asynchronous ``event`` messages until the command's ``return``.  QEMU runs a
command's handler to completion before it answers, so what the handler did
(an interrupt message written to guest memory) is done when
:meth:`QmpClient.execute` returns.
"""

from __future__ import annotations

import json
import socket
from typing import Any

from iovirt.crosscheck.qtest import QtestError

_TIMEOUT = 30.0


class QmpClient:
    """One QMP connection to a running QEMU."""

    def __init__(self, path: str) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(_TIMEOUT)
        self._sock.connect(path)
        self._buf = b""
        self.events: list[dict[str, Any]] = []
        self._message()  # greeting
        self.execute("qmp_capabilities")

    def _message(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise QtestError("QEMU closed the QMP connection")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        message: dict[str, Any] = json.loads(line)
        return message

    def execute(self, command: str, **arguments: object) -> object:
        """Run ``command``; returns its ``return`` value, raises :class:`QtestError` on ``error``."""
        request: dict[str, object] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            message = self._message()
            if "return" in message:
                return message["return"]
            if "error" in message:
                raise QtestError(f"QMP error {message['error']}", command)
            if "event" in message:
                self.events.append(message)

    def wait_event(self, name: str) -> dict[str, Any]:
        """The first event ``name`` seen (during a command or after it); earlier events are dropped."""
        while self.events:
            message = self.events.pop(0)
            if message["event"] == name:
                return message
        while True:
            message = self._message()
            if message.get("event") == name:
                return message

    def close(self) -> None:
        """Close the connection."""
        self._sock.close()
