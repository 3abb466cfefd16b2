"""virtio-scsi over vhost-user (QEMU's ``vhost-user-scsi-pci``).

The default hooks fit: GET_QUEUE_NUM answers every virtqueue (control,
event and the request queues), as QEMU's vhost-user-scsi counts them, and
the config space is offered over VHOST_USER_PROTOCOL_F_CONFIG for front-ends
that read it (iovirt's own and its conformance suite; QEMU builds the
virtio-scsi config space itself and does not acknowledge the feature).
"""

from __future__ import annotations

from iovirt.vhost_user.device import VhostUserDevice
from iovirt.virtio.scsi.device import VirtioScsi


class ScsiAdapter(VhostUserDevice):
    """A :class:`~iovirt.virtio.scsi.device.VirtioScsi` host adapter served over vhost-user."""

    device: VirtioScsi
