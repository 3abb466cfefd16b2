"""A real ``VhostUserServer`` in a thread with its control socket: two net ports on a switch, one blk device."""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

import pytest

from iovirt.control.wiring import serve_control
from iovirt.vhost_user.server import VhostUserServer
from iovirt.virtio.blk.device import VirtioBlk
from iovirt.virtio.net.device import VirtioNet
from iovirt.virtio.net.switch import LearningSwitch

sys.path.insert(0, str(Path(__file__).parent.parent / "backend"))
sys.path.insert(0, str(Path(__file__).parent.parent))


class ControlledBackend:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.switch = LearningSwitch()
        self.server = VhostUserServer()
        self.net = [VirtioNet(bytes([0x52, 0x54, 0, 0x10, 0, i + 1]), self.switch, label=f"net{i}") for i in range(2)]
        self.net_paths = [str(tmp / f"net{i}.sock") for i in range(2)]
        for dev, path in zip(self.net, self.net_paths):
            self.server.add_socket(path, dev, name=f"{dev.label} ({path})")
        self.blk = VirtioBlk(str(tmp / "disk.img"), size=1 << 20, label="blk0")
        self.blk_path = str(tmp / "blk.sock")
        self.server.add_socket(self.blk_path, self.blk, name="blk0")
        self.control_path = str(tmp / "control.sock")
        args = argparse.Namespace(control=self.control_path, control_mode=0o600, require_sealed_memory=False,
                                  queues=1, mtu=1500)
        self.control = serve_control(self.server, self.switch, args)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()
        self.control.close()
        self.blk.close()


@pytest.fixture
def backend(tmp_path):
    b = ControlledBackend(tmp_path)
    yield b
    b.stop()


@pytest.fixture
def controlled_backend():
    """The class, for a test that adds its own devices before the loop starts."""
    return ControlledBackend
