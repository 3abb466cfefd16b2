"""What iovirt's back-end offers per device type, on top of the device's own features.

Protocol features (vhost-user.rst "Protocol features"): MQ, REPLY_ACK,
BACKEND_REQ, CONFIG, STATUS, CONFIGURE_MEM_SLOTS and RESET_DEVICE for every
device; MTU and RARP for net; INFLIGHT_SHMFD for blk.  (QEMU refuses a
device behind a vIOMMU unless both REPLY_ACK and BACKEND_REQ are offered:
IOTLB misses travel on the back-end channel.)  (QEMU's vhost-user-blk requires
CONFIG; its net does not use it and logs a warning that it is offered, but
other front-ends read the net config space through it.)

Extra virtio features: a vhost-user front-end always serves the net control
queue itself (QEMU, DPDK virtio-user), so the back-end offers CTRL_VQ, which
keeps MQ's dependency satisfied (virtio 1.2 5.1.3.1, 2.2.2) without ever
seeing that queue.

VIRTIO_F_ACCESS_PLATFORM (virtio 1.2 6) is offered on request
(``iommu=True``; ``iovirt serve`` always asks): behind a vIOMMU the device's
addresses are IOVAs, translated through the device IOTLB
(:mod:`iovirt.vhost_user.iotlb`).  QEMU accepts it only with
``iommu_platform=on``; a front-end that accepts whatever is offered without
an IOMMU would get a device waiting for IOTLB entries that never come, which
is why it is opt-in (as DPDK's ``RTE_VHOST_USER_IOMMU_SUPPORT``).
"""

from __future__ import annotations

from iovirt.vhost_user.messages import ProtocolFeature as PF
from iovirt.virtio.blk.device import VirtioBlk
from iovirt.virtio.defs import VIRTIO_F_ACCESS_PLATFORM
from iovirt.virtio.device import VirtioDevice
from iovirt.virtio.net.defs import VIRTIO_NET_F_CTRL_VQ
from iovirt.virtio.net.device import VirtioNet

COMMON_PROTOCOL = (
    PF.VHOST_USER_PROTOCOL_F_MQ,
    PF.VHOST_USER_PROTOCOL_F_REPLY_ACK,
    PF.VHOST_USER_PROTOCOL_F_BACKEND_REQ,
    PF.VHOST_USER_PROTOCOL_F_CONFIG,
    PF.VHOST_USER_PROTOCOL_F_STATUS,
    PF.VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS,
    PF.VHOST_USER_PROTOCOL_F_RESET_DEVICE,
)
NET_PROTOCOL = sum(1 << f for f in COMMON_PROTOCOL + (PF.VHOST_USER_PROTOCOL_F_MTU, PF.VHOST_USER_PROTOCOL_F_RARP))
BLK_PROTOCOL = sum(1 << f for f in COMMON_PROTOCOL + (PF.VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD,))
NET_EXTRA_FEATURES = 1 << VIRTIO_NET_F_CTRL_VQ
IOMMU_FEATURES = 1 << VIRTIO_F_ACCESS_PLATFORM


def protocol_features(device: VirtioDevice) -> int:
    """The protocol features offered for ``device``."""
    if isinstance(device, VirtioNet):
        return NET_PROTOCOL
    if isinstance(device, VirtioBlk):
        return BLK_PROTOCOL
    return sum(1 << f for f in COMMON_PROTOCOL)


def extra_features(device: VirtioDevice, iommu: bool = False) -> int:
    """Virtio feature bits the back-end offers beyond the device's own (``iommu``: ACCESS_PLATFORM too)."""
    extra = NET_EXTRA_FEATURES if isinstance(device, VirtioNet) else 0
    return extra | (IOMMU_FEATURES if iommu else 0)
