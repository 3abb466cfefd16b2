"""Shared fixtures: every ring test runs against both queue implementations."""

from __future__ import annotations

import os
import threading

import pytest

from iovirt import _accel
from iovirt.vhost_user.server import VhostUserServer
from iovirt.virtio import queue as queue_mod

IMPLS = queue_mod.implementations()


def pytest_report_header(config):
    return (
        f"iovirt queue implementations: {sorted(IMPLS)}; default: {queue_mod.IMPLEMENTATION}; "
        f"IOVIRT_NO_EXTENSIONS={os.environ.get('IOVIRT_NO_EXTENSIONS', '')!r}"
    )


@pytest.fixture(params=["python", "cython"])
def queue_cls(request):
    """A ``SplitQueue`` class; the cython parameter fails if the extension did not load."""
    name = request.param
    if name == "cython" and "cython" not in IMPLS:
        if _accel.NO_EXTENSIONS:
            pytest.skip("IOVIRT_NO_EXTENSIONS set: pure Python run")
        pytest.fail("the Cython queue extension did not load (build it: pip install -e .)")
    return IMPLS[name]


@pytest.fixture
def serve(tmp_path):
    """``serve(device)`` → the socket path of ``device`` served over vhost-user in a background thread."""
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
