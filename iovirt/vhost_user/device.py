"""What the vhost-user back-end needs from a device, with defaults: the one seam.

A :class:`~iovirt.virtio.device.VirtioDevice` knows nothing of vhost-user.
:class:`VhostUserDevice` stands between it and the back-end: queue count and
sizes, the virtio and protocol features offered, config access, and the
requests only some device types take (NET_SET_MTU, SEND_RARP).  Every
answer has a default that fits any virtio device; a device type whose
vhost-user behaviour differs gets one small adapter in
:mod:`iovirt.vhost_user.devices` that overrides what differs, registered by
its virtio device ID (virtio 1.2 section 5) with
:func:`iovirt.vhost_user.devices.register`.  The back-end talks only to
this class: it never probes the device it wraps.

Protocol features offered to every device (vhost-user.rst "Protocol
features"): MQ, LOG_SHMFD, REPLY_ACK, BACKEND_REQ, CONFIG, STATUS,
CONFIGURE_MEM_SLOTS and RESET_DEVICE.  QEMU refuses to migrate a guest whose
back-end lacks LOG_SHMFD (the dirty log is shared memory).  QEMU refuses a device behind a vIOMMU unless REPLY_ACK
and BACKEND_REQ are both offered, since IOTLB misses travel on the back-end
channel.

Virtio features offered to every device on top of its own
(:data:`RING_FEATURES`): VIRTIO_F_RING_PACKED (virtio 1.2 section 2.8).  The
ring layout belongs to the transport: the device keeps the queue API it has
with a split ring, and the back-end starts packed queues when the front-end
negotiates the bit (:mod:`iovirt.vhost_user.vrings`).

VIRTIO_F_IN_ORDER (2.7.9, 2.8.8: the device uses buffers in the order they
were made available) is offered only by the types whose adapters set
:attr:`VhostUserDevice.in_order`: a device that may complete requests out of
order must not offer it.  Its queues then refuse a used entry out of pop
order (:class:`~iovirt.virtio.errors.UsedOrderError`, the device fails).
Offered by net, rng and input (each completes in pop order, see their
adapters); not by blk (an asynchronous image engine finishes requests in
the disk's order, not the ring's), nor by scsi and vsock, whose devices are
not held to pop order (no reorder step stands before their used rings).
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

from iovirt.errors import IovirtError
from iovirt.memory import GuestMemory
from iovirt.vhost_user.messages import ProtocolFeature as PF, feature_mask
from iovirt.virtio.defs import VIRTIO_F_IN_ORDER, VIRTIO_F_RING_PACKED
from iovirt.virtio.device import Notify, VirtioDevice
from iovirt.virtio.kickjob import KickJob
from iovirt.virtio.queue import SplitQueue
from iovirt.virtio.state import QueueState

COMMON_PROTOCOL_FEATURES = feature_mask(
    PF.VHOST_USER_PROTOCOL_F_MQ,
    PF.VHOST_USER_PROTOCOL_F_LOG_SHMFD,
    PF.VHOST_USER_PROTOCOL_F_REPLY_ACK,
    PF.VHOST_USER_PROTOCOL_F_BACKEND_REQ,
    PF.VHOST_USER_PROTOCOL_F_CONFIG,
    PF.VHOST_USER_PROTOCOL_F_STATUS,
    PF.VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS,
    PF.VHOST_USER_PROTOCOL_F_RESET_DEVICE,
)

RING_FEATURES = 1 << VIRTIO_F_RING_PACKED
"""Ring layouts the back-end serves for every device type, beyond the split ring."""


class NotSupported(IovirtError):
    """A request this device type does not take (e.g. NET_SET_MTU to a block device)."""


class VhostUserDevice:
    """A virtio device as the vhost-user back-end serves it; every hook has a default.

    Subclass (in :mod:`iovirt.vhost_user.devices`) to change what a device
    type offers or how it takes the type-specific requests.
    """

    extra_features: ClassVar[int] = 0
    """Virtio feature bits the back-end offers beyond the device's own."""
    protocol_features: ClassVar[int] = COMMON_PROTOCOL_FEATURES
    """The vhost-user protocol features offered."""
    in_order: ClassVar[bool] = False
    """The device type always uses buffers in the order they were made available: offer VIRTIO_F_IN_ORDER."""

    def __init__(self, device: VirtioDevice) -> None:
        self.device = device
        self.ring_packed = False
        """VIRTIO_F_RING_PACKED was negotiated: the rings started from now on are packed."""
        self.ring_in_order = False
        """VIRTIO_F_IN_ORDER was negotiated: the rings started from now on hold the device to pop order."""

    @property
    def device_id(self) -> int:
        """The virtio device ID (virtio 1.2 section 5), which saved device state is tagged with."""
        return self.device.device_id

    @property
    def label(self) -> str:
        """The name log lines give the device."""
        return self.device.label

    # -- queues ----------------------------------------------------------------
    @property
    def num_queues(self) -> int:
        """The vrings a front-end may set up (vring indexes 0..num_queues-1)."""
        return self.device.num_queues

    @property
    def queue_num(self) -> int:
        """What GET_QUEUE_NUM answers: by default every queue."""
        return self.device.num_queues

    @property
    def queue_max_size(self) -> int:
        """The largest ring size SET_VRING_NUM may ask for."""
        return self.device.queue_max_size

    def start_queue(
        self,
        index: int,
        memory: GuestMemory,
        state: QueueState,
        notify: Notify,
        wrap: Callable[[SplitQueue], SplitQueue] | None = None,
    ) -> SplitQueue:
        """Hand ring ``index`` to the device (``wrap`` puts a queue wrapper in between).

        The ring is packed if VIRTIO_F_RING_PACKED was negotiated (:attr:`ring_packed`).
        """
        return self.device.start_queue(
            index, memory, state, notify, wrap, packed=self.ring_packed, in_order=self.ring_in_order
        )

    def stop_queue(self, index: int) -> QueueState | None:
        """Take ring ``index`` back; returns where it stopped."""
        return self.device.stop_queue(index)

    def queue(self, index: int) -> SplitQueue | None:
        """The running queue ``index``, if any."""
        return self.device.queues[index]

    def set_queue_enabled(self, index: int, enabled: bool) -> None:
        """SET_VRING_ENABLE."""
        self.device.set_queue_enabled(index, enabled)

    def kick(self, index: int) -> None:
        """The front-end (or the guest through it) notified ring ``index``."""
        self.device.kick(index)

    def kick_job(self, index: int) -> KickJob | None:
        """Ring ``index``'s kicks as a kick job for the worker's C loop, if the device offers one now."""
        return self.device.kick_job(index)

    @property
    def wake_fd(self) -> int | None:
        """The device's wake-up eventfd (:attr:`VirtioDevice.wake_fd`); the session kicks its rings on it."""
        return self.device.wake_fd

    # -- features and config ------------------------------------------------------
    def features(self) -> int:
        """The virtio features offered (GET_FEATURES, before the vhost-user bits)."""
        in_order = 1 << VIRTIO_F_IN_ORDER if self.in_order else 0
        return self.device.device_features() | self.extra_features | RING_FEATURES | in_order

    def set_features(self, features: int) -> None:
        """Accept the negotiated bits; the device sees only those it offered itself."""
        self.device.set_features(features & self.device.device_features())
        self.ring_packed = bool(features >> VIRTIO_F_RING_PACKED & 1)
        self.ring_in_order = bool(features >> VIRTIO_F_IN_ORDER & 1)

    def read_config(self, offset: int, size: int) -> bytes:
        """GET_CONFIG."""
        return self.device.read_config(offset, size)

    def write_config(self, offset: int, data: bytes) -> bool:
        """SET_CONFIG; False when refused."""
        return self.device.write_config(offset, data)

    # -- type-specific requests ------------------------------------------------------
    def set_mtu(self, mtu: int) -> None:
        """NET_SET_MTU; raises :class:`NotSupported` unless the device type takes it."""
        raise NotSupported("not a net device")

    def announce(self, mac: bytes) -> None:
        """SEND_RARP: announce ``mac`` after a migration; :class:`NotSupported` by default."""
        raise NotSupported("not a net device")

    # -- lifecycle --------------------------------------------------------------------
    def fail(self, error: Exception) -> None:
        """The ring cannot be served: the device needs a reset."""
        self.device.fail(error)

    def reset(self) -> None:
        """RESET_DEVICE, or the front-end went away."""
        self.device.reset()
        self.ring_packed = False
        self.ring_in_order = False

    def save_state(self) -> dict[str, Any]:
        """Device state beyond the rings and guest memory, as plain data (nothing by default).

        What SET_DEVICE_STATE_FD saves (:mod:`iovirt.vhost_user.devstate`);
        a type whose devices keep such state offers
        VHOST_USER_PROTOCOL_F_DEVICE_STATE and overrides this and :meth:`load_state`.
        """
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`save_state`'s data; untrusted input, checked by the device (``ValueError``)."""
