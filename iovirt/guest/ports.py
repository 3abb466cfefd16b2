"""Host sockets the guests connect to: free TCP ports, and waiting until a backend listens."""

from __future__ import annotations

import os
import socket
import time

from iovirt.guest.errors import GuestKitError

_TCP_LISTEN = "0A"  # TCP_LISTEN in include/net/tcp_states.h, as /proc/net/tcp prints it
_SO_ACCEPTCON = 0x10000  # __SO_ACCEPTCON: the Flags column of a listening socket in /proc/net/unix


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A port that was free on ``host`` a moment ago (the kernel picked it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == _TCP_LISTEN:
                return True
    return False


def wait_tcp_listen(port: int, timeout: float = 10.0) -> None:
    """Wait until some socket listens on TCP ``port``.

    Reads /proc/net/tcp instead of connecting: a test connection would be
    the one connection QEMU's ``-netdev socket,listen=`` accepts.
    """
    deadline = time.monotonic() + timeout
    while not _listening(port):
        if time.monotonic() >= deadline:
            raise GuestKitError(f"nothing listens on TCP port {port} after {timeout:g} s; "
                                "expected the listening QEMU to have bound it")
        time.sleep(0.05)


def _unix_listening(path: str) -> bool:
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            fields = line.split(None, 7)
            if len(fields) == 8 and fields[7].rstrip("\n") == path and int(fields[3], 16) & _SO_ACCEPTCON:
                return True
    return False


def wait_unix_listen(path: str | os.PathLike[str], timeout: float = 10.0) -> None:
    """Wait until a UNIX socket listens at ``path`` (a vhost-user backend is ready for QEMU).

    Reads /proc/net/unix rather than connecting: a vhost-user backend takes
    a probe connection for a front-end that came and went.
    """
    path = os.path.abspath(path)
    deadline = time.monotonic() + timeout
    while not _unix_listening(path):
        if time.monotonic() >= deadline:
            raise GuestKitError(f"nothing listens on UNIX socket {path} after {timeout:g} s; "
                                "expected the backend to have bound it")
        time.sleep(0.05)
