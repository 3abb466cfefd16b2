"""virtio-net over vhost-user.

- GET_QUEUE_NUM answers queue *pairs*: QEMU's vhost-user net compares it with
  its ``queues=``.
- CTRL_VQ is offered on top of the device's features: a vhost-user front-end
  serves the control queue itself (QEMU, DPDK virtio-user), which keeps MQ's
  dependency satisfied (virtio 1.2 5.1.3.1) without the back-end seeing it.
- Protocol features MTU and RARP: NET_SET_MTU sets the device's MTU, and
  SEND_RARP (sent after a migration) makes the port announce the guest's MAC.
- Protocol feature DEVICE_STATE: the port's configuration (MAC, MTU, link
  state, queue pairs) and counters move with a migration
  (:meth:`~iovirt.virtio.net.device.VirtioNet.state`).
- VIRTIO_F_IN_ORDER is offered (virtio 1.2 2.7.9, 2.8.8): transmit chains
  are returned in the order they were popped, and receive chains are
  written and returned in pop order (a frame that finds too few is given
  back by rewinding).  Transmit batches go back through one used entry per
  batch (``push_batch(coalesce=True)``); receive entries are written one per
  chain, since DPDK's in-order receive path reads every entry's ``len``.
- Protocol feature CONFIG is not offered by default: QEMU's vhost-user net
  does not use it and warns "vhost-user backend supports
  VHOST_USER_PROTOCOL_F_CONFIG but QEMU does not" for every device offering
  it.  :class:`NetConfigAdapter` offers it, for front-ends that read the net
  config space over vhost-user (iovirt's own front-end and conformance suite;
  ``iovirt serve --net SOCKET,config=on``).
"""

from __future__ import annotations

from typing import Any

from iovirt.vhost_user.device import COMMON_PROTOCOL_FEATURES, VhostUserDevice
from iovirt.vhost_user.messages import ProtocolFeature as PF, feature_mask
from iovirt.virtio.net.defs import VIRTIO_NET_F_CTRL_VQ
from iovirt.virtio.net.device import MAX_MTU, MIN_MTU, VirtioNet


class NetAdapter(VhostUserDevice):
    """A :class:`~iovirt.virtio.net.device.VirtioNet` port served over vhost-user."""

    extra_features = 1 << VIRTIO_NET_F_CTRL_VQ
    in_order = True
    protocol_features = (COMMON_PROTOCOL_FEATURES & ~feature_mask(PF.VHOST_USER_PROTOCOL_F_CONFIG)) | feature_mask(
        PF.VHOST_USER_PROTOCOL_F_MTU, PF.VHOST_USER_PROTOCOL_F_RARP, PF.VHOST_USER_PROTOCOL_F_DEVICE_STATE
    )
    device: VirtioNet

    @property
    def queue_num(self) -> int:
        """Queue pairs, as QEMU's vhost-user net expects."""
        return self.device.queue_pairs

    def set_mtu(self, mtu: int) -> None:
        """NET_SET_MTU: the MTU the guest was configured with."""
        if not MIN_MTU <= mtu <= MAX_MTU:
            raise ValueError(f"MTU {mtu} outside [{MIN_MTU}, {MAX_MTU}]")
        self.device.mtu = mtu

    def announce(self, mac: bytes) -> None:
        """SEND_RARP: the switch learns where ``mac`` now is."""
        self.device.announce(mac)

    def save_state(self) -> dict[str, Any]:
        """The port's configuration and counters."""
        return self.device.state()

    def load_state(self, state: dict[str, Any]) -> None:
        """Another port's configuration and counters; the queue pairs must match."""
        self.device.restore(state)


class NetConfigAdapter(NetAdapter):
    """:class:`NetAdapter` that also offers VHOST_USER_PROTOCOL_F_CONFIG (GET_CONFIG/SET_CONFIG on the net config space)."""

    protocol_features = NetAdapter.protocol_features | feature_mask(PF.VHOST_USER_PROTOCOL_F_CONFIG)
