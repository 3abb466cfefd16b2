"""The legacy virtio-pci register layout of a function, as the group owner's legacy commands reach it (virtio 1.4 2.12.1.1).

A VF has no I/O BAR with the legacy interface (4.1.4.10); its owner (the PF)
offers the same accesses through administration commands (a hypervisor
forwards a legacy guest driver's I/O port accesses there).
:class:`LegacyInterface` is that view of a :class:`~iovirt.virtio.transport.pci.VirtioPciFunction`,
on the same state as its modern common configuration (one device, one
status, one set of queues).  Layout (4.1.4.10, little-endian):

======  ====  ======================================================
offset  size  field
======  ====  ======================================================
0       4     device features bits 0-31 (read-only)
4       4     driver features bits 0-31: taken at once, as a legacy device does,
              until DRIVER_OK
8       4     queue address: page frame number of the selected queue; the legacy
              ring layout (2.7, 4096-byte alignment) at PFN * 4096 starts the
              queue at its maximum size; 0 stops it
12      2     queue size (read-only: the maximum)
14      2     queue select
16      2     queue notify: the 16-bit index written notifies that queue
18      1     device status: 0 resets; bits are added (NEEDS_RESET is the
              device's); DRIVER_OK without FEATURES_OK (legacy)
19      1     ISR status (read clears it)
20      2     config_msix_vector   } only while MSI-X is enabled
22      2     queue_msix_vector    }
======  ====  ======================================================

The device-specific configuration follows the common part (at 20, or 24
with MSI-X enabled) and is reached by its own commands, offsets from 0.
An access that is not within a single field, or not within the structure,
is refused (``None``/``False``): the owner fails the command
(2.12.1.1.6).  Accesses within one field (a byte of the MAC, a word of
the features) are allowed, as the legacy interface allows them.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from iovirt.errors import IovirtError
from iovirt.virtio.defs import VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_NEEDS_RESET
from iovirt.virtio.transport.common_cfg import VirtqueueConfig
from iovirt.virtio.transport.defs import VIRTIO_PCI_COMMON_MSIX, VIRTIO_PCI_COMMON_Q_MSIX

if TYPE_CHECKING:
    from iovirt.virtio.transport.pci import VirtioPciFunction

log = logging.getLogger(__name__)

VIRTIO_PCI_HOST_FEATURES = 0
VIRTIO_PCI_GUEST_FEATURES = 4
VIRTIO_PCI_QUEUE_PFN = 8
VIRTIO_PCI_QUEUE_NUM = 12
VIRTIO_PCI_QUEUE_SEL = 14
VIRTIO_PCI_QUEUE_NOTIFY = 16
VIRTIO_PCI_STATUS = 18
VIRTIO_PCI_ISR = 19
VIRTIO_MSI_CONFIG_VECTOR = 20
VIRTIO_MSI_QUEUE_VECTOR = 22

VIRTIO_PCI_QUEUE_ADDR_SHIFT = 12
VIRTIO_PCI_VRING_ALIGN = 4096

LEGACY_FIELDS = {
    VIRTIO_PCI_HOST_FEATURES: 4, VIRTIO_PCI_GUEST_FEATURES: 4, VIRTIO_PCI_QUEUE_PFN: 4, VIRTIO_PCI_QUEUE_NUM: 2,
    VIRTIO_PCI_QUEUE_SEL: 2, VIRTIO_PCI_QUEUE_NOTIFY: 2, VIRTIO_PCI_STATUS: 1, VIRTIO_PCI_ISR: 1,
}
LEGACY_MSIX_FIELDS = {VIRTIO_MSI_CONFIG_VECTOR: 2, VIRTIO_MSI_QUEUE_VECTOR: 2}


def legacy_ring(pfn: int, size: int) -> tuple[int, int, int]:
    """``(desc, avail, used)`` of a legacy split ring of ``size`` entries at page frame ``pfn`` (2.7, 4.1.4.10)."""
    desc = pfn << VIRTIO_PCI_QUEUE_ADDR_SHIFT
    avail = desc + 16 * size
    used = (avail + 6 + 2 * size + VIRTIO_PCI_VRING_ALIGN - 1) & ~(VIRTIO_PCI_VRING_ALIGN - 1)
    return desc, avail, used


def field_of(fields: dict[int, int], offset: int, size: int) -> int | None:
    """The offset of the one field ``[offset, offset+size)`` lies in, or None."""
    for start, width in fields.items():
        if start <= offset and offset + size <= start + width and size > 0:
            return start
    return None


class LegacyInterface:
    """The legacy common and device-specific configuration of ``function``."""

    def __init__(self, function: "VirtioPciFunction") -> None:
        self.function = function

    @property
    def common_fields(self) -> dict[int, int]:
        """The common part's fields: the MSI-X vectors only while MSI-X is enabled (4.1.4.10)."""
        msix = self.function.msix
        return {**LEGACY_FIELDS, **LEGACY_MSIX_FIELDS} if msix is not None and msix.enabled else LEGACY_FIELDS

    # -- common part ---------------------------------------------------------------------
    def common_read(self, offset: int, size: int) -> int | None:
        """Read ``size`` bytes at ``offset``; None when that is not within a single field."""
        start = field_of(self.common_fields, offset, size)
        if start is None:
            return None
        value = self._read_field(start)
        return value >> 8 * (offset - start) & ((1 << 8 * size) - 1)

    def common_write(self, offset: int, size: int, value: int) -> bool:
        """Write ``size`` bytes at ``offset``; False when that is not within a single field."""
        fields = self.common_fields
        start = field_of(fields, offset, size)
        if start is None:
            return False
        if size != fields[start]:  # a part of the field: merge it into the rest
            shift, mask = 8 * (offset - start), (1 << 8 * size) - 1
            value = self._read_field(start) & ~(mask << shift) | (value & mask) << shift
        self._write_field(start, value)
        return True

    def _read_field(self, start: int) -> int:
        common = self.function.common
        queue = self._queue()
        if start == VIRTIO_PCI_HOST_FEATURES:
            return self.function.offered_features() & 0xFFFFFFFF
        if start == VIRTIO_PCI_GUEST_FEATURES:
            return common.driver_features & 0xFFFFFFFF
        if start == VIRTIO_PCI_QUEUE_PFN:
            return queue.desc >> VIRTIO_PCI_QUEUE_ADDR_SHIFT if queue is not None and queue.enabled else 0
        if start == VIRTIO_PCI_QUEUE_NUM:
            return queue.size if queue is not None else 0
        if start == VIRTIO_PCI_QUEUE_SEL:
            return common.queue_select
        if start == VIRTIO_PCI_QUEUE_NOTIFY:
            return 0
        if start == VIRTIO_PCI_STATUS:
            return common.status
        if start == VIRTIO_PCI_ISR:
            return self.function.read_isr()
        if start == VIRTIO_MSI_CONFIG_VECTOR:
            return common.read(VIRTIO_PCI_COMMON_MSIX, 2)
        return common.read(VIRTIO_PCI_COMMON_Q_MSIX, 2)

    def _write_field(self, start: int, value: int) -> None:
        common = self.function.common
        if start == VIRTIO_PCI_GUEST_FEATURES:
            self._write_features(value)
        elif start == VIRTIO_PCI_QUEUE_PFN:
            self._write_pfn(value)
        elif start == VIRTIO_PCI_QUEUE_SEL:
            common.queue_select = value
        elif start == VIRTIO_PCI_QUEUE_NOTIFY:
            common.notify(value)
        elif start == VIRTIO_PCI_STATUS:
            self._write_status(value)
        elif start == VIRTIO_MSI_CONFIG_VECTOR:
            common.write(VIRTIO_PCI_COMMON_MSIX, 2, value)
        elif start == VIRTIO_MSI_QUEUE_VECTOR:
            common.write(VIRTIO_PCI_COMMON_Q_MSIX, 2, value)
        else:
            log.warning("%s: legacy write of %#x to read-only field at %d ignored", common.device.label, value, start)

    def _queue(self) -> VirtqueueConfig | None:
        common = self.function.common
        index = common.queue_select
        return common.queues[index] if index < common.device.num_queues else None

    def _write_features(self, value: int) -> None:
        """A legacy device takes the driver's features when written; bits it did not offer are dropped."""
        common = self.function.common
        if common.driver_ok:
            log.warning("%s: legacy driver features %#x written while the device is live (DRIVER_OK); ignored",
                        common.device.label, value)
            return
        offered = self.function.offered_features() & 0xFFFFFFFF
        if value & ~offered:
            log.warning("%s: legacy driver features %#x include unoffered bits %#x; dropped",
                        common.device.label, value, value & ~offered)
        features = value & offered
        try:
            common.device.set_features(features & ~self.function.transport_mask())
        except IovirtError as exc:
            log.warning("%s: legacy driver features %#x refused: %s", common.device.label, features, exc)
            return
        common.driver_features = features

    def _write_pfn(self, pfn: int) -> None:
        common = self.function.common
        index = common.queue_select
        queue = self._queue()
        if queue is None:
            log.warning("%s: legacy queue address for queue %d, which does not exist; ignored", common.device.label, index)
            return
        if queue.enabled:
            common.stop_queue(index)
        if not pfn:
            return  # 0 takes the queue down (Linux's legacy del_vq)
        queue = common.queues[index]
        queue.desc, queue.driver, queue.device = legacy_ring(pfn, queue.size)
        common.start_queue(index)

    def _write_status(self, value: int) -> None:
        common = self.function.common
        if not value:
            common.reset()
            return
        old = common.status
        common.status = old | value & ~VIRTIO_CONFIG_S_NEEDS_RESET  # the device's bit; a driver never sets it
        if value & ~old & VIRTIO_CONFIG_S_DRIVER_OK:
            common.go_live()

    # -- device-specific part ---------------------------------------------------------------
    def device_fields(self) -> dict[int, int]:
        """The device configuration's fields (offset -> size); one field per byte range the device names."""
        device = self.function.device
        return dict(device.config_fields()) or {0: len(device.config_space())}

    def device_read(self, offset: int, size: int) -> bytes | None:
        """Read ``size`` bytes of the device configuration; None when not within a single field."""
        if field_of(self.device_fields(), offset, size) is None:
            return None
        return self.function.device.read_config(offset, size)

    def device_write(self, offset: int, data: bytes) -> bool:
        """Write the device configuration; False when not within a single field (a read-only field ignores it)."""
        if field_of(self.device_fields(), offset, len(data)) is None:
            return False
        self.function.device.write_config(offset, data)
        return True
