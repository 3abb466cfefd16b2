"""Run ``iovirt serve`` as a child process: for the real-guest tests and the demo."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from iovirt.errors import IovirtError


class ServeProcess:
    """``python -m iovirt serve ARGS`` with its log in a file; a context manager.

    ``sockets`` are waited for after start.  ``prefix`` wraps the command
    (e.g. ``["ip", "netns", "exec", NS]``).
    """

    def __init__(self, args: Sequence[str], log_path: str | Path, sockets: Sequence[str | Path] = (),
                 prefix: Sequence[str] = ()) -> None:
        self.argv = [*prefix, sys.executable, "-m", "iovirt", "serve", *args]
        self.log_path = Path(log_path)
        self.sockets = [Path(s) for s in sockets]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> "ServeProcess":
        """Start and wait until every socket accepts connections (again, once stopped; never twice at once)."""
        if self.proc is not None and self.proc.poll() is None:
            raise IovirtError(f"iovirt serve is already running (pid {self.proc.pid}): a second start would leak it")
        for sock in self.sockets:
            if sock.exists():
                sock.unlink()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not all(s.exists() for s in self.sockets):
            if self.proc.poll() is not None:
                raise IovirtError(f"iovirt serve exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise IovirtError(f"iovirt serve did not create {self.sockets} within {timeout} s:\n{self.log()}")
            time.sleep(0.05)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Send ``sig`` and wait; SIGKILL if it does not exit in time. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: a crash, as far as the front-ends can tell."""
        self.stop(signal.SIGKILL)

    def log(self) -> str:
        """The serve log so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> "ServeProcess":
        # ``with ServeProcess(...).start() as p`` must not start a second process.
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
