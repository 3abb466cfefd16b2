"""virtio-vsock over vhost-user.

The defaults fit: the config space (``guest_cid``) is read with GET_CONFIG,
so VHOST_USER_PROTOCOL_F_CONFIG stays offered (QEMU's vhost-user-vsock
needs it).  What the adapter adds is the device's host side: its UNIX
sockets are served by the data plane (:func:`attach`), the thread that
serves the queue kicks, under the same lock, so a host socket event and a
guest notification never run at once.
"""

from __future__ import annotations

from typing import Callable

from iovirt.vhost_user.dataplane import DataPlane
from iovirt.vhost_user.device import VhostUserDevice
from iovirt.virtio.vsock.device import VirtioVsock


class VsockAdapter(VhostUserDevice):
    """A :class:`~iovirt.virtio.vsock.device.VirtioVsock` served over vhost-user."""

    device: VirtioVsock


def attach(dataplane: DataPlane, device: VirtioVsock) -> Callable[[], None]:
    """Serve ``device``'s host sockets from ``dataplane``; returns the call that detaches and closes them."""
    dataplane.add_fd(device.fileno(), device.on_host_events)

    def detach() -> None:
        with dataplane.lock:
            dataplane.remove(device.fileno())
            device.close()

    return detach
