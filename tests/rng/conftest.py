"""A VhostUserServer in a thread, for the rng tests."""

from __future__ import annotations

import threading

import pytest

from iovirt.vhost_user.server import VhostUserServer


@pytest.fixture
def serve(tmp_path):
    """``serve(device)`` → the socket path of ``device`` served in a background thread."""
    servers = []

    def start(device):
        server = VhostUserServer()
        path = str(tmp_path / f"dev{len(servers)}.sock")
        server.add_socket(path, device)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        servers.append((server, thread))
        return path

    yield start
    for server, thread in servers:
        server.stop()
        thread.join(timeout=10)
