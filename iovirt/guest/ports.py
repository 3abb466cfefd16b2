"""Host TCP ports for ``-netdev socket`` links between guests."""

from __future__ import annotations

import socket
import time

from iovirt.guest.errors import GuestKitError

_TCP_LISTEN = "0A"  # TCP_LISTEN in include/net/tcp_states.h, as /proc/net/tcp prints it


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
