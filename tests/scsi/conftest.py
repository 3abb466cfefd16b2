"""Fixtures: virtio-scsi devices on fresh images, and a guest driving them in-process."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from iovirt.virtio.scsi.device import VirtioScsi  # noqa: E402

from scsi_guest import ScsiGuest, make_image  # noqa: E402


@pytest.fixture
def images(tmp_path):
    return [make_image(tmp_path / "lun0.img", fill=os.urandom(64 * 512)), make_image(tmp_path / "lun1.img", 1 << 20)]


@pytest.fixture
def dev(images):
    device = VirtioScsi(images, label="scsi0")
    yield device
    device.close()


@pytest.fixture
def guest(dev):
    return ScsiGuest(dev)


@pytest.fixture
def ro_guest(images):
    device = VirtioScsi(images[:1], read_only=True, label="scsi-ro")
    yield ScsiGuest(device)
    device.close()
