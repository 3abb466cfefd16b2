"""virtio-input over vhost-user (QEMU ``vhost-user-input-pci``).

QEMU's vhost-user-input reads the whole ``virtio_input_config`` with
GET_CONFIG and writes ``select``/``subsel`` with SET_CONFIG (the whole
structure at offset 0), so VHOST_USER_PROTOCOL_F_CONFIG must be offered:
it is among the common protocol features, and this adapter changes nothing
else.  Events injected from other threads reach the rings through the
device's wake-up eventfd, which the session watches.  VIRTIO_F_IN_ORDER is
offered (virtio 1.2 2.7.9, 2.8.8): an eventq buffer is popped only when an
event is there to write and pushed at once, and statusq buffers likewise.
"""

from __future__ import annotations

from iovirt.vhost_user.device import VhostUserDevice
from iovirt.virtio.input.device import VirtioInput


class InputAdapter(VhostUserDevice):
    """A :class:`~iovirt.virtio.input.device.VirtioInput` served over vhost-user."""

    in_order = True
    device: VirtioInput
