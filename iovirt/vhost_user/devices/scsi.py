"""virtio-scsi over vhost-user (QEMU's ``vhost-user-scsi-pci``).

VIRTIO_SCSI_F_CHANGE is offered on top of the device's features: QEMU's
vhost-user-scsi passes its own ``param_change`` bit (on by default) to
SET_FEATURES whatever the back-end offered, and a back-end that refuses it
leaves the guest without a disk.  Offering it promises nothing the device
must do: it may report parameter changes on the event queue (5.6.6.3.3),
and iovirt's LUNs have none to report.

The default hooks fit: GET_QUEUE_NUM answers every virtqueue (control,
event and the request queues), as QEMU's vhost-user-scsi counts them, and
the config space is offered over VHOST_USER_PROTOCOL_F_CONFIG for front-ends
that read it (iovirt's own and its conformance suite; QEMU builds the
virtio-scsi config space itself and does not acknowledge the feature).
"""

from __future__ import annotations

from iovirt.vhost_user.device import VhostUserDevice
from iovirt.virtio.scsi.defs import VIRTIO_SCSI_F_CHANGE
from iovirt.virtio.scsi.device import VirtioScsi


class ScsiAdapter(VhostUserDevice):
    """A :class:`~iovirt.virtio.scsi.device.VirtioScsi` host adapter served over vhost-user."""

    extra_features = 1 << VIRTIO_SCSI_F_CHANGE
    device: VirtioScsi
