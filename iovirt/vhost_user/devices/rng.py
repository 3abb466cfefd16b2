"""virtio-rng over vhost-user (QEMU ``vhost-user-rng-pci``).

The entropy device has no configuration space (virtio 1.2 section 5.4.4),
so VHOST_USER_PROTOCOL_F_CONFIG is not offered; everything else is the
default.
"""

from __future__ import annotations

from iovirt.vhost_user.device import COMMON_PROTOCOL_FEATURES, VhostUserDevice
from iovirt.vhost_user.messages import ProtocolFeature as PF, feature_mask
from iovirt.virtio.rng.device import VirtioRng


class RngAdapter(VhostUserDevice):
    """A :class:`~iovirt.virtio.rng.device.VirtioRng` served over vhost-user."""

    protocol_features = COMMON_PROTOCOL_FEATURES & ~feature_mask(PF.VHOST_USER_PROTOCOL_F_CONFIG)
    device: VirtioRng
