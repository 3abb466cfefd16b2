"""virtio-scsi over vhost-user (QEMU's ``vhost-user-scsi-pci``).

VIRTIO_SCSI_F_CHANGE is offered on top of the device's features: QEMU's
vhost-user-scsi passes its own ``param_change`` bit (on by default) to
SET_FEATURES whatever the back-end offered, and a back-end that refuses it
leaves the guest without a disk.  Offering it promises nothing the device
must do: it may report parameter changes on the event queue (5.6.6.3.3),
and iovirt's LUNs have none to report.

GET_QUEUE_NUM answers every virtqueue (control, event and the request
queues), as QEMU's vhost-user-scsi counts them.  Protocol feature CONFIG is
not offered by default: QEMU builds the virtio-scsi config space itself and
warns "vhost-user backend supports VHOST_USER_PROTOCOL_F_CONFIG but QEMU
does not" when it is offered.  :class:`ScsiConfigAdapter` offers it, for
front-ends that read the config space over vhost-user (iovirt's own
front-end and conformance suite; ``iovirt serve --scsi SOCKET,IMAGE,config=on``,
``iovirt vhost-user-scsi --offer-config``).
"""

from __future__ import annotations

from iovirt.vhost_user.device import COMMON_PROTOCOL_FEATURES, VhostUserDevice
from iovirt.vhost_user.messages import ProtocolFeature as PF, feature_mask
from iovirt.virtio.scsi.defs import VIRTIO_SCSI_F_CHANGE
from iovirt.virtio.scsi.device import VirtioScsi


class ScsiAdapter(VhostUserDevice):
    """A :class:`~iovirt.virtio.scsi.device.VirtioScsi` host adapter served over vhost-user."""

    extra_features = 1 << VIRTIO_SCSI_F_CHANGE
    protocol_features = COMMON_PROTOCOL_FEATURES & ~feature_mask(PF.VHOST_USER_PROTOCOL_F_CONFIG)
    device: VirtioScsi


class ScsiConfigAdapter(ScsiAdapter):
    """:class:`ScsiAdapter` that also offers VHOST_USER_PROTOCOL_F_CONFIG (GET_CONFIG/SET_CONFIG on the scsi config space)."""

    protocol_features = ScsiAdapter.protocol_features | feature_mask(PF.VHOST_USER_PROTOCOL_F_CONFIG)
