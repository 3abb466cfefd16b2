"""A vsock device served over vhost-user to iovirt's own front-end, with its host sockets in the data plane."""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass

import pytest

from iovirt.vhost_user.devices.vsock import attach
from iovirt.vhost_user.driver import VhostUserDriver
from iovirt.vhost_user.server import VhostUserServer
from iovirt.virtio.vsock.device import VirtioVsock
from iovirt.virtio.vsock.driver import VsockDriver

from vsock_helpers import GUEST_CID


@dataclass
class Served:
    """The running device and where to reach it."""

    device: VirtioVsock
    socket: str
    uds: str
    server: VhostUserServer

    def listen(self, port: int) -> socket.socket:
        """A host program listening on ``<uds>_port`` (where guest connects to ``port`` go)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(f"{self.uds}_{port}")
        sock.listen(16)
        sock.settimeout(5)
        return sock

    def connect(self, port: int) -> socket.socket:
        """A host program connecting to ``<uds>`` and asking for guest port ``port``."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5)
        sock.connect(self.uds)
        sock.sendall(f"CONNECT {port}\n".encode())
        return sock


@pytest.fixture
def served(tmp_path):
    uds = str(tmp_path / "v.sock")
    device = VirtioVsock(GUEST_CID, uds)
    server = VhostUserServer()
    server.add_socket(str(tmp_path / "vhost.sock"), device)
    detach = attach(server.dataplane, device)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield Served(device, str(tmp_path / "vhost.sock"), uds, server)
    server.stop()
    thread.join(timeout=10)
    detach()


@pytest.fixture
def guest(served):
    with VhostUserDriver(served.socket) as drv:
        yield VsockDriver(drv, GUEST_CID)
