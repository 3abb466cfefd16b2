"""A real ``VhostUserServer`` in a thread, serving two net ports and a blk device on UNIX sockets."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from iovirt.vhost_user.devices.net import NetConfigAdapter
from iovirt.vhost_user.server import VhostUserServer
from iovirt.virtio.blk.device import VirtioBlk
from iovirt.virtio.net.device import VirtioNet
from iovirt.virtio.net.switch import LearningSwitch


class Backend:
    def __init__(self, tmp: Path, image_size: int = 1 << 20) -> None:
        self.switch = LearningSwitch()
        self.server = VhostUserServer()
        self.net = [
            VirtioNet(bytes([0x52, 0x54, 0, 0, 0, i]), self.switch, queue_pairs=2, label=f"net{i}") for i in range(2)
        ]
        self.net_paths = [str(tmp / f"net{i}.sock") for i in range(2)]
        for dev, path in zip(self.net, self.net_paths):
            # config=on: the tests read the net config space with GET_CONFIG.
            self.server.add_socket(path, dev, name=dev.label, adapter=NetConfigAdapter)
        self.image = tmp / "disk.img"
        self.blk = VirtioBlk(str(self.image), size=image_size, num_queues=2, label="blk0")
        self.blk_path = str(tmp / "blk.sock")
        self.server.add_socket(self.blk_path, self.blk, name="blk0")
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()
        self.blk.close()


@pytest.fixture
def backend(tmp_path):
    b = Backend(tmp_path)
    yield b
    b.stop()


@pytest.fixture
def logs(caplog):
    """caplog at INFO for iovirt's loggers."""
    import logging

    caplog.set_level(logging.INFO, logger="iovirt")
    return caplog


@pytest.fixture
def logs_info(logs):
    """The same as ``logs`` (the net tests' name for it)."""
    return logs
