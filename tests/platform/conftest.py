"""Fixtures for the virtio-pci transport tests: a platform with virtio-net and virtio-blk."""

from __future__ import annotations

import pytest

from iovirt.platform.testing import RecordingPort, fake_clock_platform
from iovirt.virtio import device as device_mod
from iovirt.virtio.blk.device import VirtioBlk
from iovirt.virtio.net.device import VirtioNet
from iovirt.virtio.net.switch import LearningSwitch

MAC = bytes.fromhex("525400000001")


@pytest.fixture
def ring_impl(queue_cls, monkeypatch):
    """Devices started through the transport use ``queue_cls`` (python or cython)."""
    monkeypatch.setattr(device_mod, "SplitQueue", queue_cls)
    return queue_cls


@pytest.fixture
def switch():
    return LearningSwitch()


@pytest.fixture
def recorder(switch):
    port = RecordingPort()
    switch.attach(port)
    return port


@pytest.fixture
def make_platform(tmp_path, switch):
    """``make_platform(iommu=False)``: a platform with virtio-net (00:03.0) and virtio-blk (00:04.0)."""
    made = []

    def make(**kwargs):
        net = VirtioNet(MAC, switch)
        blk = VirtioBlk(str(tmp_path / f"disk{len(made)}.img"), size=1 << 20)
        platform = fake_clock_platform([net, blk], **kwargs)
        made.append((platform, blk))
        return platform

    yield make
    for platform, blk in made:
        platform.close()
        blk.close()
