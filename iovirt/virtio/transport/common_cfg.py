"""The common configuration structure (virtio 1.2 section 4.1.4.3) and the device status machine.

:class:`CommonCfg` decodes driver accesses to ``struct virtio_pci_common_cfg``
and applies them to a :class:`~iovirt.virtio.device.VirtioDevice`:

- feature words through ``device_feature_select``/``driver_feature_select``;
- ``device_status`` (2.1, 3.1.1): bits are only ever added by the driver;
  FEATURES_OK is kept clear when the accepted features are not a subset of
  the offered ones (or lack VERSION_1: this device has no legacy interface);
  DRIVER_OK is refused without FEATURES_OK; writing 0 resets the device,
  synchronously, so the driver's wait for ``device_status`` to read 0 ends at
  once;
- with an administration virtqueue (VIRTIO_F_ADMIN_VQ, virtio 1.4 2.13 and
  4.1.4.3): ``admin_queue_index`` (= ``num_queues``: it comes after the
  device's queues) and ``admin_queue_num`` (1); the queue is selected,
  set up, reset and notified like the others, once the driver accepted
  VIRTIO_F_ADMIN_VQ, and is served by the transport's
  :class:`~iovirt.virtio.admin.vq.AdminVirtqueue`, never by the device;
- per-queue registers selected by ``queue_select``: ``queue_size`` (the
  driver may shrink it to a power of 2; other values are ignored),
  ``queue_msix_vector``, ``queue_enable`` (starts the queue on the device),
  the three ring addresses, ``queue_reset`` (with VIRTIO_F_RING_RESET, 2.6.1:
  writing 1 stops the queue and puts its registers back to their reset
  values, synchronously, so ``queue_reset`` and ``queue_enable`` read 0 at
  once; the driver may then set the queue up again, a new size included).

2.1.2: the device consumes no buffers and sends no used-buffer notifications
before DRIVER_OK, so an enabled queue is started on the device (its layout
checked) at once but only marked enabled, and kicked, from DRIVER_OK on.
Bad driver input never raises: an access of the wrong width or offset is
logged and ignored (reads give 0); rings outside guest memory set
DEVICE_NEEDS_RESET.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from iovirt.errors import IovirtError
from iovirt.memory import GuestMemory
from iovirt.virtio.admin.vq import ADMIN_QUEUE_SIZE, AdminVirtqueue
from iovirt.virtio.defs import (
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_ACCESS_PLATFORM,
    VIRTIO_F_ADMIN_VQ,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_RING_RESET,
    VIRTIO_F_VERSION_1,
    VIRTQ_MAX_SIZE,
)
from iovirt.virtio.device import VirtioDevice
from iovirt.virtio.state import QueueState
from iovirt.virtio.transport.defs import (
    VIRTIO_MSI_NO_VECTOR,
    VIRTIO_PCI_COMMON_ADMIN_Q_INDEX,
    VIRTIO_PCI_COMMON_ADMIN_Q_NUM,
    VIRTIO_PCI_COMMON_CFGGENERATION,
    VIRTIO_PCI_COMMON_DF,
    VIRTIO_PCI_COMMON_DFSELECT,
    VIRTIO_PCI_COMMON_GF,
    VIRTIO_PCI_COMMON_GFSELECT,
    VIRTIO_PCI_COMMON_MSIX,
    VIRTIO_PCI_COMMON_NUMQ,
    VIRTIO_PCI_COMMON_Q_AVAIL,
    VIRTIO_PCI_COMMON_Q_DESC,
    VIRTIO_PCI_COMMON_Q_ENABLE,
    VIRTIO_PCI_COMMON_Q_MSIX,
    VIRTIO_PCI_COMMON_Q_NDATA,
    VIRTIO_PCI_COMMON_Q_NOFF,
    VIRTIO_PCI_COMMON_Q_RESET,
    VIRTIO_PCI_COMMON_Q_SELECT,
    VIRTIO_PCI_COMMON_Q_SIZE,
    VIRTIO_PCI_COMMON_Q_USED,
    VIRTIO_PCI_COMMON_STATUS,
)

log = logging.getLogger(__name__)

U32 = 0xFFFFFFFF

# offset -> width of every field except the 64-bit queue addresses.
_FIELD_WIDTH = {
    VIRTIO_PCI_COMMON_DFSELECT: 4,
    VIRTIO_PCI_COMMON_DF: 4,
    VIRTIO_PCI_COMMON_GFSELECT: 4,
    VIRTIO_PCI_COMMON_GF: 4,
    VIRTIO_PCI_COMMON_MSIX: 2,
    VIRTIO_PCI_COMMON_NUMQ: 2,
    VIRTIO_PCI_COMMON_STATUS: 1,
    VIRTIO_PCI_COMMON_CFGGENERATION: 1,
    VIRTIO_PCI_COMMON_Q_SELECT: 2,
    VIRTIO_PCI_COMMON_Q_SIZE: 2,
    VIRTIO_PCI_COMMON_Q_MSIX: 2,
    VIRTIO_PCI_COMMON_Q_ENABLE: 2,
    VIRTIO_PCI_COMMON_Q_NOFF: 2,
    VIRTIO_PCI_COMMON_Q_NDATA: 2,
    VIRTIO_PCI_COMMON_Q_RESET: 2,
    VIRTIO_PCI_COMMON_ADMIN_Q_INDEX: 2,
    VIRTIO_PCI_COMMON_ADMIN_Q_NUM: 2,
}
_ADDRESS_FIELDS = {
    VIRTIO_PCI_COMMON_Q_DESC: "desc",
    VIRTIO_PCI_COMMON_Q_AVAIL: "driver",
    VIRTIO_PCI_COMMON_Q_USED: "device",
}


def _feature_word(features: int, select: int) -> int:
    """Feature bits ``32*select`` to ``32*select+31``; 0 for any select but 0 or 1 (4.1.4.3.1)."""
    return features >> (32 * select) & U32 if select < 2 else 0


class TransportPort(Protocol):
    """What the common configuration needs from the transport around it."""

    transport_features: int
    """Transport bits offered besides ACCESS_PLATFORM; never passed on to the device."""

    queues_held: bool
    """The function is stopped by its group owner (virtio 1.4 2.12.1.4, ``transport/parts.py``): a queue the
    driver enables is recorded, and started on the device only when the function resumes."""

    def offered_features(self) -> int:
        """Feature bits offered to the driver (device bits plus transport bits)."""
        ...

    def vector_valid(self, vector: int) -> bool:
        """Whether ``vector`` is an entry of the MSI-X table."""
        ...

    def dma_memory(self, access_platform: bool) -> GuestMemory:
        """The memory the device's DMA reaches (through the IOMMU when ``access_platform``)."""
        ...

    def queue_interrupt(self, index: int) -> None:
        """Send the used-buffer notification of queue ``index``."""
        ...

    def config_interrupt(self) -> None:
        """Send a configuration change notification."""
        ...


@dataclass
class VirtqueueConfig:
    """The per-queue registers of one virtqueue (4.1.4.3), at their reset values."""

    size: int
    msix_vector: int = VIRTIO_MSI_NO_VECTOR
    enabled: bool = False
    desc: int = 0
    driver: int = 0
    device: int = 0


# Feature bits the transport serves itself; the device never sees them.
TRANSPORT_FEATURES = 1 << VIRTIO_F_ACCESS_PLATFORM | 1 << VIRTIO_F_RING_RESET


class CommonCfg:
    """``struct virtio_pci_common_cfg`` of one device; ``read``/``write`` are its BAR region."""

    def __init__(self, device: VirtioDevice, port: TransportPort, admin: AdminVirtqueue | None = None) -> None:
        self.device = device
        self.port = port
        self.admin = admin
        self.admin_index = device.num_queues
        """``admin_queue_index``: the administration virtqueue comes after the device's queues (4.1.4.3.1)."""
        self.queue_max_size = min(device.queue_max_size, VIRTQ_MAX_SIZE)
        self.config_generation = 0
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.driver_features = 0
        self.config_msix_vector = VIRTIO_MSI_NO_VECTOR
        self.status = 0
        self.queue_select = 0
        self.queues = self._fresh_queues()
        self._config_notification_pending = False
        device.on_needs_reset = lambda _device, _error: self.set_needs_reset()
        if admin is not None:
            admin.on_error = lambda _error: self.set_needs_reset()

    def _fresh_queues(self) -> list[VirtqueueConfig]:
        """Every queue's registers at their reset values: the device's queues, then the administration virtqueue."""
        queues = [VirtqueueConfig(self.queue_max_size) for _ in range(self.device.num_queues)]
        if self.admin is not None:
            queues.append(VirtqueueConfig(ADMIN_QUEUE_SIZE))
        return queues

    def _max_size(self, index: int) -> int:
        return ADMIN_QUEUE_SIZE if self._is_admin(index) else self.queue_max_size

    def _is_admin(self, index: int) -> bool:
        return self.admin is not None and index == self.admin_index

    def _queue_exists(self, index: int) -> bool:
        """Queue ``index`` is there: a device queue, or the administration virtqueue once VIRTIO_F_ADMIN_VQ is accepted."""
        if self._is_admin(index):
            return bool(self.driver_features >> VIRTIO_F_ADMIN_VQ & 1)
        return index < self.device.num_queues

    # -- state ---------------------------------------------------------------------
    @property
    def driver_ok(self) -> bool:
        """DRIVER_OK is set: the device is live."""
        return bool(self.status & VIRTIO_CONFIG_S_DRIVER_OK)

    def reset(self) -> None:
        """Device reset (2.4): status 0, every vector unmapped, queues at their reset values."""
        self.device.reset()
        self.device_feature_select = self.driver_feature_select = 0
        self.driver_features = 0
        self.config_msix_vector = VIRTIO_MSI_NO_VECTOR
        self.status = 0
        self.queue_select = 0
        if self.admin is not None:
            self.admin.reset()
        self.queues = self._fresh_queues()
        self._config_notification_pending = False

    def set_needs_reset(self) -> None:
        """The device hit an error that needs a reset (2.1.2): NEEDS_RESET, then a config notification."""
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET
        self.config_changed(generation=False)

    def config_changed(self, generation: bool = True) -> None:
        """Tell the driver the configuration changed (a new ``config_generation``).

        The notification waits for DRIVER_OK if the driver is not there yet
        (2.1.2 requires it once DRIVER_OK is set).
        """
        if generation:
            self.config_generation = (self.config_generation + 1) & 0xFF
        if self.driver_ok:
            self.port.config_interrupt()
        else:
            self._config_notification_pending = True

    # -- register access -------------------------------------------------------------
    def _field(self, offset: int, size: int, write: bool) -> int | None:
        """The field offset an access hits, or None (logged) when it is not a proper access."""
        width = _FIELD_WIDTH.get(offset)
        if width == size:
            return offset
        base = offset & ~7
        if base in _ADDRESS_FIELDS and (size == 8 and offset == base or size == 4):
            return base
        log.warning(
            "%s: common cfg %s of %d byte(s) at %#x does not match a field; ignored",
            self.device.label, "write" if write else "read", size, offset,
        )
        return None

    def read(self, offset: int, size: int) -> int:
        """A driver read of ``size`` bytes at ``offset``."""
        field = self._field(offset, size, write=False)
        if field is None:
            return 0
        queue = self.queues[self.queue_select] if self._queue_exists(self.queue_select) else None
        if field in _ADDRESS_FIELDS:
            if queue is None:
                return 0
            value = getattr(queue, _ADDRESS_FIELDS[field])
            return (value >> 32 if offset != field else value) & ((1 << (8 * size)) - 1)
        if field == VIRTIO_PCI_COMMON_DFSELECT:
            return self.device_feature_select
        if field == VIRTIO_PCI_COMMON_DF:
            return _feature_word(self.port.offered_features(), self.device_feature_select)
        if field == VIRTIO_PCI_COMMON_GFSELECT:
            return self.driver_feature_select
        if field == VIRTIO_PCI_COMMON_GF:
            return _feature_word(self.driver_features, self.driver_feature_select)
        if field == VIRTIO_PCI_COMMON_MSIX:
            return self.config_msix_vector
        if field == VIRTIO_PCI_COMMON_NUMQ:
            return self.device.num_queues
        if field == VIRTIO_PCI_COMMON_ADMIN_Q_INDEX:
            return self.admin_index if self.admin is not None else 0
        if field == VIRTIO_PCI_COMMON_ADMIN_Q_NUM:
            return 1 if self.admin is not None else 0
        if field == VIRTIO_PCI_COMMON_STATUS:
            return self.status
        if field == VIRTIO_PCI_COMMON_CFGGENERATION:
            return self.config_generation
        if field == VIRTIO_PCI_COMMON_Q_SELECT:
            return self.queue_select
        if queue is None:
            # 4.1.4.3.2: an unavailable queue presents 0 in queue_size (and everything else).
            return 0
        if field == VIRTIO_PCI_COMMON_Q_SIZE:
            return queue.size
        if field == VIRTIO_PCI_COMMON_Q_MSIX:
            return queue.msix_vector
        if field == VIRTIO_PCI_COMMON_Q_ENABLE:
            return int(queue.enabled)
        if field in (VIRTIO_PCI_COMMON_Q_RESET, VIRTIO_PCI_COMMON_Q_NDATA):
            return 0  # a queue reset completes during the write (4.1.4.3.1); no notification data offered
        assert field == VIRTIO_PCI_COMMON_Q_NOFF
        return self.queue_select  # queue i notifies at offset i * notify_off_multiplier

    def write(self, offset: int, size: int, value: int) -> None:
        """A driver write of ``size`` bytes at ``offset``."""
        field = self._field(offset, size, write=True)
        if field is None:
            return
        if field in _ADDRESS_FIELDS:
            self._write_address(field, offset, size, value)
        elif field == VIRTIO_PCI_COMMON_DFSELECT:
            self.device_feature_select = value
        elif field == VIRTIO_PCI_COMMON_GFSELECT:
            self.driver_feature_select = value
        elif field == VIRTIO_PCI_COMMON_GF:
            self._write_driver_features(value)
        elif field == VIRTIO_PCI_COMMON_MSIX:
            self.config_msix_vector = self._map_vector(value)
        elif field == VIRTIO_PCI_COMMON_STATUS:
            self._write_status(value)
        elif field == VIRTIO_PCI_COMMON_Q_SELECT:
            self.queue_select = value
        elif field == VIRTIO_PCI_COMMON_Q_SIZE:
            self._write_queue_size(value)
        elif field == VIRTIO_PCI_COMMON_Q_MSIX:
            queue = self._selected("queue_msix_vector")
            if queue is not None:
                queue.msix_vector = self._map_vector(value)
        elif field == VIRTIO_PCI_COMMON_Q_ENABLE:
            self._write_queue_enable(value)
        elif field == VIRTIO_PCI_COMMON_Q_RESET:
            self._write_queue_reset(value)
        else:
            # 4.1.4.3.2: the driver MUST NOT write device_feature, num_queues,
            # config_generation or queue_notify_off.
            log.warning("%s: write of %#x to read-only common cfg field at %#x ignored",
                        self.device.label, value, offset)

    # -- features and status ----------------------------------------------------------
    def _write_driver_features(self, value: int) -> None:
        if self.status & VIRTIO_CONFIG_S_FEATURES_OK:
            log.warning("%s: driver_feature written after FEATURES_OK; ignored (3.1.1)", self.device.label)
            return
        select = self.driver_feature_select
        if select >= 2:
            log.warning("%s: driver_feature write with select %d ignored", self.device.label, select)
            return
        shift = 32 * select
        self.driver_features = (self.driver_features & ~(U32 << shift)) | (value << shift)

    def _write_status(self, value: int) -> None:
        if value == 0:
            self.reset()
            return
        old = self.status
        if value & ~old & VIRTIO_CONFIG_S_NEEDS_RESET or old & ~value & ~VIRTIO_CONFIG_S_NEEDS_RESET:
            # 2.1.2: the driver MUST NOT clear a status bit, and NEEDS_RESET is the device's.
            log.warning("%s: device_status %#x -> %#x clears bits or sets NEEDS_RESET; only new bits taken",
                        self.device.label, old, value)
        new = old | (value & ~VIRTIO_CONFIG_S_NEEDS_RESET)
        if new & ~old & VIRTIO_CONFIG_S_FEATURES_OK and not self._accept_features():
            new &= ~VIRTIO_CONFIG_S_FEATURES_OK
        if new & ~old & VIRTIO_CONFIG_S_DRIVER_OK and not new & VIRTIO_CONFIG_S_FEATURES_OK:
            log.warning("%s: DRIVER_OK without FEATURES_OK refused (3.1.1)", self.device.label)
            new &= ~VIRTIO_CONFIG_S_DRIVER_OK
        self.status = new
        if new & ~old & VIRTIO_CONFIG_S_DRIVER_OK:
            self.go_live()

    def _accept_features(self) -> bool:
        """FEATURES_OK: take the driver's features if the device can (3.1.1 step 5-6)."""
        features = self.driver_features
        offered = self.port.offered_features()
        if features & ~offered:
            log.warning("%s: driver accepted features %#x that were not offered (%#x); "
                        "FEATURES_OK stays clear", self.device.label, features & ~offered, offered)
            return False
        if not features >> VIRTIO_F_VERSION_1 & 1:
            log.warning("%s: driver did not accept VIRTIO_F_VERSION_1; FEATURES_OK stays clear",
                        self.device.label)
            return False
        try:
            self.device.set_features(features & ~(TRANSPORT_FEATURES | self.port.transport_features))
        except IovirtError as exc:
            log.warning("%s: %s; FEATURES_OK stays clear", self.device.label, exc)
            return False
        return True

    def go_live(self) -> None:
        """DRIVER_OK was set: enabled queues go live and are served; a held configuration notification goes out."""
        for index, queue in enumerate(self.queues):
            if queue.enabled:
                self._set_live(index, True)
                self.notify(index)
        if self._config_notification_pending:
            self._config_notification_pending = False
            self.port.config_interrupt()

    # -- queues ----------------------------------------------------------------------
    def _map_vector(self, vector: int) -> int:
        # 4.1.5.1.2.1: a mapping that fails reads back as NO_VECTOR.
        if vector == VIRTIO_MSI_NO_VECTOR or self.port.vector_valid(vector):
            return vector
        log.warning("%s: MSI-X vector %d is not in the table; mapped to NO_VECTOR", self.device.label, vector)
        return VIRTIO_MSI_NO_VECTOR

    def _selected(self, what: str, configurable: bool = False) -> VirtqueueConfig | None:
        """The selected queue, if it exists (and, with ``configurable``, is not enabled yet)."""
        index = self.queue_select
        if not self._queue_exists(index):
            log.warning("%s: %s write for queue %d, which does not exist; ignored", self.device.label, what, index)
            return None
        queue = self.queues[index]
        if configurable and queue.enabled:
            log.warning("%s: %s write for enabled queue %d ignored (4.1.4.3.2)", self.device.label, what, index)
            return None
        return queue

    def _write_queue_size(self, value: int) -> None:
        queue = self._selected("queue_size", configurable=True)
        if queue is None:
            return
        max_size = self._max_size(self.queue_select)
        if not 0 < value <= max_size or value & (value - 1):
            log.warning("%s: queue_size %d for queue %d is not a power of 2 in [1, %d]; ignored",
                        self.device.label, value, self.queue_select, max_size)
            return
        queue.size = value

    def _write_address(self, field: int, offset: int, size: int, value: int) -> None:
        queue = self._selected(f"queue address {field:#x}", configurable=True)
        if queue is None:
            return
        name = _ADDRESS_FIELDS[field]
        old = getattr(queue, name)
        if size == 8:
            new = value
        elif offset == field:
            new = (old & ~U32) | value
        else:
            new = (old & U32) | value << 32
        setattr(queue, name, new)

    def _write_queue_enable(self, value: int) -> None:
        index = self.queue_select
        queue = self._selected("queue_enable")
        if queue is None:
            return
        if value != 1:
            log.warning("%s: queue_enable %d for queue %d ignored (the driver MUST NOT write 0)",
                        self.device.label, value, index)
            return
        if queue.enabled:
            return
        if self.status & VIRTIO_CONFIG_S_NEEDS_RESET:
            return
        if self.port.queues_held:
            # 2.12.1.4.4.1: a stopped member initiates no transport request, so the device gets the queue only
            # when the member resumes (PciDeviceParts.resume starts every enabled queue).
            queue.enabled = True
            return
        self.start_queue(index)

    def start_queue(self, index: int) -> None:
        """Start queue ``index`` from its registers (enable it); live and served at once after DRIVER_OK."""
        queue = self.queues[index]
        state = QueueState(size=queue.size, desc_addr=queue.desc, avail_addr=queue.driver, used_addr=queue.device)
        memory = self.port.dma_memory(bool(self.driver_features >> VIRTIO_F_ACCESS_PLATFORM & 1))
        try:
            if self.admin is not None and self._is_admin(index):
                event_idx = bool(self.driver_features >> VIRTIO_F_EVENT_IDX & 1)
                state = QueueState(**{**state.to_dict(), "index": index, "event_idx": event_idx})
                self.admin.start_queue(memory, state, lambda: self.port.queue_interrupt(index))
            else:
                self.device.start_queue(index, memory, state, lambda: self.port.queue_interrupt(index))
        except IovirtError as exc:
            log.warning("%s: queue %d cannot be enabled: %s; device needs reset", self.device.label, index, exc)
            self.set_needs_reset()
            return
        queue.enabled = True
        if self.driver_ok:
            self._set_live(index, True)
            self.notify(index)

    def stop_queue(self, index: int) -> None:
        """Stop queue ``index`` (it serves and notifies nothing more) and put its registers back to reset values."""
        if self.queues[index].enabled:
            if self.admin is not None and self._is_admin(index):
                self.admin.stop_queue()
            else:
                self.device.set_queue_enabled(index, False)
                self.device.stop_queue(index)  # no request of it executed, no notification for it, from here on
        self.queues[index] = VirtqueueConfig(self._max_size(index))

    def _set_live(self, index: int, live: bool) -> None:
        if self.admin is not None and self._is_admin(index):
            self.admin.set_enabled(live)
        else:
            self.device.set_queue_enabled(index, live)

    def _write_queue_reset(self, value: int) -> None:
        """2.6.1.1: the driver resets one queue; the device stops using it and forgets its state."""
        index = self.queue_select
        queue = self._selected("queue_reset")
        if queue is None:
            return
        if not self.driver_features >> VIRTIO_F_RING_RESET & 1 or value != 1:
            log.warning("%s: queue_reset %d for queue %d ignored (VIRTIO_F_RING_RESET %s)", self.device.label,
                        value, index, "negotiated: only 1 resets" if self.driver_features >> VIRTIO_F_RING_RESET & 1
                        else "not negotiated")
            return
        self.stop_queue(index)

    def notify(self, index: int) -> None:
        """An available-buffer notification for queue ``index`` (4.1.5.2)."""
        if not self.driver_ok or not self._queue_exists(index) or not self.queues[index].enabled:
            log.debug("%s: notification for queue %d before DRIVER_OK or enable; ignored",
                      self.device.label, index)
            return
        if self.admin is not None and self._is_admin(index):
            self.admin.kick()
        else:
            self.device.kick(index)
