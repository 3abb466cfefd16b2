"""virtio-blk over vhost-user.

Offers INFLIGHT_SHMFD on top of the common protocol features: requests a
back-end popped but had not completed when it died are resubmitted by the
next one (vhost-user.rst "Inflight I/O tracking"), so a disk write the guest
was waiting for is not lost across a back-end restart.
"""

from __future__ import annotations

from iovirt.vhost_user.device import COMMON_PROTOCOL_FEATURES, VhostUserDevice
from iovirt.vhost_user.messages import ProtocolFeature as PF, feature_mask


class BlkAdapter(VhostUserDevice):
    """A :class:`~iovirt.virtio.blk.device.VirtioBlk` served over vhost-user."""

    protocol_features = COMMON_PROTOCOL_FEATURES | feature_mask(PF.VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD)
