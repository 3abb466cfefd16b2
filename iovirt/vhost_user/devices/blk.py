"""virtio-blk over vhost-user.

Offers INFLIGHT_SHMFD on top of the common protocol features: requests a
back-end popped but had not completed when it died are resubmitted by the
next one (vhost-user.rst "Inflight I/O tracking"), so a disk write the guest
was waiting for is not lost across a back-end restart.

Requests complete asynchronously: the back-end serves the device's
completion eventfd (:attr:`~iovirt.virtio.device.VirtioDevice.wake_fd`) on
the data plane, which pushes them there (:mod:`iovirt.virtio.blk.aio`).

Offers DEVICE_STATE: the counters move with a migration, and the disk's
capacity, read-only flag and serial are checked against the destination's
(:meth:`~iovirt.virtio.blk.device.VirtioBlk.restore`).
"""

from __future__ import annotations

from typing import Any

from iovirt.vhost_user.device import COMMON_PROTOCOL_FEATURES, VhostUserDevice
from iovirt.vhost_user.messages import ProtocolFeature as PF, feature_mask
from iovirt.virtio.blk.device import VirtioBlk


class BlkAdapter(VhostUserDevice):
    """A :class:`~iovirt.virtio.blk.device.VirtioBlk` served over vhost-user."""

    protocol_features = COMMON_PROTOCOL_FEATURES | feature_mask(
        PF.VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD, PF.VHOST_USER_PROTOCOL_F_DEVICE_STATE
    )
    device: VirtioBlk

    def __init__(self, device: VirtioBlk) -> None:
        super().__init__(device)
        device.complete_async = True

    def save_state(self) -> dict[str, Any]:
        """Counters, with the disk's identity for the destination to check."""
        return self.device.state()

    def load_state(self, state: dict[str, Any]) -> None:
        """Another device's counters, refused unless it served the same disk (capacity, read-only, serial)."""
        self.device.restore(state)
