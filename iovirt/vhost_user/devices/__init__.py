"""The vhost-user adapters of iovirt's device types, by virtio device ID.

:func:`vhost_user_device` puts a :class:`~iovirt.vhost_user.device.VhostUserDevice`
in front of a virtio device: the adapter registered for its device ID, or the
default one, which fits any device that needs nothing special.
"""

from __future__ import annotations

from iovirt.vhost_user.device import VhostUserDevice
from iovirt.vhost_user.devices.blk import BlkAdapter
from iovirt.vhost_user.devices.input import InputAdapter
from iovirt.vhost_user.devices.net import NetAdapter
from iovirt.vhost_user.devices.rng import RngAdapter
from iovirt.vhost_user.devices.scsi import ScsiAdapter
from iovirt.vhost_user.devices.vsock import VsockAdapter
from iovirt.virtio.blk.defs import VIRTIO_ID_BLOCK
from iovirt.virtio.device import VirtioDevice
from iovirt.virtio.input.defs import VIRTIO_ID_INPUT
from iovirt.virtio.net.defs import VIRTIO_ID_NET
from iovirt.virtio.rng.defs import VIRTIO_ID_ENTROPY
from iovirt.virtio.scsi.defs import VIRTIO_ID_SCSI
from iovirt.virtio.vsock.defs import VIRTIO_ID_VSOCK

_ADAPTERS: dict[int, type[VhostUserDevice]] = {
    VIRTIO_ID_NET: NetAdapter, VIRTIO_ID_BLOCK: BlkAdapter, VIRTIO_ID_ENTROPY: RngAdapter, VIRTIO_ID_INPUT: InputAdapter,
    VIRTIO_ID_VSOCK: VsockAdapter, VIRTIO_ID_SCSI: ScsiAdapter,
}


def register(device_id: int, adapter: type[VhostUserDevice]) -> None:
    """Serve devices of virtio ``device_id`` through ``adapter``."""
    _ADAPTERS[device_id] = adapter


def vhost_user_device(device: VirtioDevice) -> VhostUserDevice:
    """``device`` behind the adapter registered for its device ID (the default one otherwise)."""
    return _ADAPTERS.get(device.device_id, VhostUserDevice)(device)
