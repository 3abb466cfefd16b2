"""A small QMP client: QEMU's JSON machine protocol on a UNIX socket.

QMP (QEMU's docs/interop/qmp-spec.rst) is line-delimited JSON. On connect
QEMU sends a greeting (``{"QMP": {...}}``) and accepts nothing but
``qmp_capabilities`` until it has been sent. Then each command
``{"execute": NAME, "arguments": {...}}`` gets exactly one answer,
``{"return": ...}`` or ``{"error": {"class": ..., "desc": ...}}``, while
asynchronous events (``{"event": NAME, "data": ..., "timestamp": ...}``)
may arrive at any time, before or between answers. Events are kept and can
be waited for, e.g. ``MIGRATION`` with ``data.status == "completed"``.

Typical use::

    with QMPClient.connect(path, timeout=30) as qmp:
        qmp.execute("migrate", uri="unix:/tmp/m.sock")
        qmp.wait_event("MIGRATION", lambda d: d["status"] == "completed", timeout=120)
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Callable

from iovirt.guest.errors import GuestKitError


class QMPError(GuestKitError):
    """QEMU answered a command with an error: ``error_class`` and ``desc`` are QEMU's."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"QMP {command}: {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class QMPTimeout(GuestKitError):
    """No answer, event or connection within the time allowed."""


class QMPClient:
    """A connected, capabilities-negotiated QMP session (use :meth:`connect`).

    Not thread-safe: one thread drives it. ``events`` holds every event not
    yet consumed by :meth:`wait_event`, oldest first.
    """

    def __init__(self, sock: socket.socket, greeting: dict[str, Any]) -> None:
        self._sock = sock
        self._buf = b""
        self.greeting = greeting
        self.events: list[dict[str, Any]] = []

    @classmethod
    def connect(cls, path: str | Path, timeout: float = 30.0) -> QMPClient:
        """Connect to QEMU's ``-qmp unix:PATH,server=on,wait=off``, retrying until it listens.

        Reads the greeting and negotiates capabilities (none are asked for).
        """
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                sock.close()
                if time.monotonic() > deadline:
                    raise QMPTimeout(f"QMP socket {path} not accepting within {timeout:g} s: {exc}") from exc
                time.sleep(0.05)
        client = cls(sock, {})
        try:
            greeting = client._read(deadline)
            if "QMP" not in greeting:
                raise GuestKitError(f"QMP {path}: expected a greeting, got {greeting!r}")
            client.greeting = greeting
            client.execute("qmp_capabilities", timeout=max(1.0, deadline - time.monotonic()))
        except BaseException:
            client.close()
            raise
        return client

    def close(self) -> None:
        """Close the socket (QEMU keeps running)."""
        self._sock.close()

    def __enter__(self) -> QMPClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _read(self, deadline: float) -> dict[str, Any]:
        """The next JSON message, whatever it is."""
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QMPTimeout("no QMP message within the time allowed")
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(65536)
            except socket.timeout as exc:
                raise QMPTimeout("no QMP message within the time allowed") from exc
            if not chunk:
                raise GuestKitError("QEMU closed the QMP socket")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        message: dict[str, Any] = json.loads(line)
        return message

    def _next_answer(self, deadline: float) -> dict[str, Any]:
        """The next message that is not an event (events are kept in :attr:`events`)."""
        while True:
            message = self._read(deadline)
            if "event" in message:
                self.events.append(message)
            else:
                return message

    def execute(self, command: str, timeout: float = 30.0, **arguments: Any) -> Any:
        """Run ``command`` with ``arguments`` (QMP names with ``-`` are passed as ``_``).

        Returns QEMU's ``return`` value; raises :class:`QMPError` with
        QEMU's error class and description, :class:`QMPTimeout` after ``timeout``.
        """
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = {k.replace("_", "-"): v for k, v in arguments.items()}
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        answer = self._next_answer(time.monotonic() + timeout)
        if "error" in answer:
            error = answer["error"]
            raise QMPError(command, error.get("class", "?"), error.get("desc", "?"))
        if "return" not in answer:
            raise GuestKitError(f"QMP {command}: unexpected answer {answer!r}")
        return answer["return"]

    def wait_event(self, name: str, match: Callable[[dict[str, Any]], bool] | None = None,
                   timeout: float = 60.0) -> dict[str, Any]:
        """Wait for event ``name`` whose ``data`` satisfies ``match``; return (and consume) it.

        Events received earlier count too.
        """
        deadline = time.monotonic() + timeout
        while True:
            for i, event in enumerate(self.events):
                if event["event"] == name and (match is None or match(event.get("data", {}))):
                    return self.events.pop(i)
            try:
                message = self._read(deadline)
            except QMPTimeout as exc:
                raise QMPTimeout(f"no QMP event {name} within {timeout:g} s") from exc
            if "event" in message:
                self.events.append(message)
