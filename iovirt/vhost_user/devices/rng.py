"""virtio-rng over vhost-user (QEMU ``vhost-user-rng-pci``).

The entropy device has no configuration space (virtio 1.2 section 5.4.4),
so VHOST_USER_PROTOCOL_F_CONFIG is not offered.  VIRTIO_F_IN_ORDER is
offered (virtio 1.2 2.7.9, 2.8.8): requests are filled one at a time in the
order they were popped, and one the device cannot fill yet is given back
(rewound) before anything after it is taken.
"""

from __future__ import annotations

from iovirt.vhost_user.device import COMMON_PROTOCOL_FEATURES, VhostUserDevice
from iovirt.vhost_user.messages import ProtocolFeature as PF, feature_mask
from iovirt.virtio.rng.device import VirtioRng


class RngAdapter(VhostUserDevice):
    """A :class:`~iovirt.virtio.rng.device.VirtioRng` served over vhost-user."""

    protocol_features = COMMON_PROTOCOL_FEATURES & ~feature_mask(PF.VHOST_USER_PROTOCOL_F_CONFIG)
    in_order = True
    device: VirtioRng
