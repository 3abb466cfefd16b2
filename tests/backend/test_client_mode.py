"""Client mode (issue 14): the back-end dials a listening VMM socket, backs off, and reconnects."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

import pytest

from iovirt.vhost_user.frontend import VhostUserFrontend
from iovirt.vhost_user.messages import FrontendRequest as R
from iovirt.vhost_user.server import RETRY_MAX_S, VhostUserServer
from iovirt.virtio.net.device import VirtioNet
from iovirt.virtio.net.switch import LearningSwitch


@pytest.fixture
def client_server(tmp_path):
    """A server with one net device in client mode, dialling ``tmp_path/vmm.sock``; yields (server, path)."""
    server = VhostUserServer()
    path = str(tmp_path / "vmm.sock")
    server.add_client(path, VirtioNet(b"\x52\x54\x00\x00\x00\x01", LearningSwitch(), label="net0"), name="net0")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, path
    server.stop()
    thread.join(timeout=10)
    assert not thread.is_alive()


def _listener(path: str) -> socket.socket:
    vmm = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    vmm.bind(path)
    vmm.listen(4)
    vmm.settimeout(10)
    return vmm


def _get_features(sock: socket.socket) -> int:
    fe = VhostUserFrontend(sock)
    reply = fe.call(R.VHOST_USER_GET_FEATURES)
    return reply.payload.value


def test_client_connects_once_the_vmm_listens_and_after_it_restarts(caplog, client_server):
    caplog.set_level(logging.INFO, logger="iovirt")
    _server, path = client_server
    time.sleep(0.5)  # the socket is absent: the back-end retries meanwhile
    vmm = _listener(path)
    conn, _ = vmm.accept()
    assert _get_features(conn)
    # The VMM restarts: the connection and the listener go away, a new one listens.
    conn.close()
    vmm.close()
    os.unlink(path)
    time.sleep(0.3)
    vmm = _listener(path)
    conn, _ = vmm.accept()  # dialled again within RETRY_MAX_S
    assert _get_features(conn)
    conn.close()
    vmm.close()
    assert "answers again" in caplog.text  # the failures before it were logged, once


def test_client_backs_off_from_a_vmm_that_accepts_and_closes_at_once(client_server):
    _server, path = client_server
    vmm = _listener(path)
    vmm.settimeout(0.2)
    attempts = []
    deadline = time.monotonic() + 6.0
    while time.monotonic() < deadline:
        try:
            conn, _ = vmm.accept()
        except TimeoutError:
            continue
        attempts.append(time.monotonic())
        conn.close()
    vmm.close()
    # 0.1 + 0.2 + 0.4 + 0.8 + 1.6 s, then one per RETRY_MAX_S: about 7 in 6 s, never a busy loop.
    assert 3 <= len(attempts) <= 10, attempts
    gaps = [b - a for a, b in zip(attempts, attempts[1:])]
    assert max(gaps) >= RETRY_MAX_S * 0.8, gaps


def test_client_backs_off_while_the_socket_refuses(client_server, tmp_path):
    _server, path = client_server
    # A socket file nobody listens on (a killed VMM leaves one): ECONNREFUSED.
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()
    time.sleep(3.5)
    os.unlink(path)
    vmm = _listener(path)
    start = time.monotonic()
    conn, _ = vmm.accept()
    # The retry delay is capped: the back-end dials again within RETRY_MAX_S (plus scheduling slack).
    assert time.monotonic() - start <= RETRY_MAX_S + 1.0
    assert _get_features(conn)
    conn.close()
    vmm.close()


def test_net_offers_protocol_config_only_when_asked():
    from iovirt.vhost_user.devices.blk import BlkAdapter
    from iovirt.vhost_user.devices.net import NetAdapter, NetConfigAdapter
    from iovirt.vhost_user.messages import ProtocolFeature as PF

    config = 1 << PF.VHOST_USER_PROTOCOL_F_CONFIG
    # QEMU's vhost-user net warns about CONFIG when it is offered: off by default.
    assert not NetAdapter.protocol_features & config
    assert NetConfigAdapter.protocol_features == NetAdapter.protocol_features | config
    assert BlkAdapter.protocol_features & config  # vhost-user-blk-pci reads its config space through it


def test_scsi_offers_protocol_config_only_when_asked():
    from iovirt.vhost_user.devices.scsi import ScsiAdapter, ScsiConfigAdapter
    from iovirt.vhost_user.messages import ProtocolFeature as PF

    config = 1 << PF.VHOST_USER_PROTOCOL_F_CONFIG
    # QEMU's vhost-user-scsi builds its config space itself and warns when CONFIG is offered: off by default.
    assert not ScsiAdapter.protocol_features & config
    assert ScsiConfigAdapter.protocol_features == ScsiAdapter.protocol_features | config
