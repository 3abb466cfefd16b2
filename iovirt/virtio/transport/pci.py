"""The virtio-pci modern transport (virtio 1.2 section 4.1): a virtio device as a PCI function.

Layout, as QEMU's ``virtio-*-pci`` (non-transitional) lays it out:

- identity: vendor 0x1AF4, device 0x1040 + virtio device id, revision 1,
  subsystem 0x1AF4:0x1100, class per device type (4.1.2);
- BAR1: 4 KiB 32-bit memory with the MSI-X table (at 0) and PBA (at 0x800);
  one vector for configuration changes and one per queue;
- BAR4: 16 KiB 64-bit prefetchable memory with the virtio structures:
  common configuration at 0x0000, ISR status at 0x1000, device-specific
  configuration at 0x2000, notifications at 0x3000 (``notify_off_multiplier``
  4, ``queue_notify_off`` = queue index);
- capabilities: PCI Express (endpoint), MSI-X, then the virtio vendor
  capabilities COMMON, NOTIFY, ISR, DEVICE and the PCI_CFG window (4.1.4).

With an :class:`~iovirt.virtio.admin.vq.AdminVirtqueue` (a group owner,
e.g. an SR-IOV PF: :mod:`iovirt.sriov.admin`) the function offers
VIRTIO_F_ADMIN_VQ, its common configuration grows to ``admin_queue_index``
and ``admin_queue_num`` (0x40 bytes) and the MSI-X table gets a vector for
the administration virtqueue, which comes after the device's queues.

Every function also has a legacy notification address (``LEGACY_NOTIFY_OFFSET``
in the notification area): the 16-bit queue index written there notifies
that queue.  An owner hands it out with VIRTIO_ADMIN_CMD_LEGACY_NOTIFY_INFO
(virtio 1.4 2.12.1.1); :attr:`VirtioPciFunction.legacy` is the legacy
register view its legacy commands reach (:mod:`iovirt.virtio.transport.legacy`).

Interrupts (4.1.5.3-4.1.5.4): with MSI-X enabled a used-buffer notification
raises the queue's vector and a configuration change raises
``config_msix_vector`` (after setting ISR bit 1); with MSI-X disabled the ISR
bits are set and INTx asserted until the driver reads ISR status.

The device is any :class:`~iovirt.virtio.device.VirtioDevice`, the same
object the vhost-user backend serves.
"""

from __future__ import annotations

import logging
from typing import Protocol, Sequence

from iovirt.memory import GuestMemory, Translator
from iovirt.pci.bar import Bar, BarKind
from iovirt.pci.function import PciFunction
from iovirt.pci.msix import MsixCapability
from iovirt.pci.capability import Capability
from iovirt.pci.pcie import PcieCapability, PciePortType
from iovirt.pci.pm import PmCapability
from iovirt.virtio.admin.vq import AdminVirtqueue
from iovirt.virtio.defs import VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_ADMIN_VQ, VIRTIO_F_RING_RESET
from iovirt.virtio.device import VirtioDevice
from iovirt.virtio.net.defs import VIRTIO_ID_NET, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MQ
from iovirt.virtio.transport.caps import VirtioPciCap, VirtioPciCfgCap
from iovirt.virtio.transport.common_cfg import TRANSPORT_FEATURES, CommonCfg
from iovirt.virtio.transport.legacy import LegacyInterface
from iovirt.virtio.transport.defs import (
    CLASS_OTHERS,
    VIRTIO_CLASS_CODES,
    VIRTIO_MSI_NO_VECTOR,
    VIRTIO_PCI_CAP_COMMON_CFG,
    VIRTIO_PCI_CAP_DEVICE_CFG,
    VIRTIO_PCI_CAP_ISR_CFG,
    VIRTIO_PCI_CAP_NOTIFY_CFG,
    VIRTIO_PCI_COMMON_ADMIN_Q_NUM,
    VIRTIO_PCI_COMMON_CFG_SIZE,
    VIRTIO_PCI_ISR_CONFIG,
    VIRTIO_PCI_ISR_QUEUE,
    VIRTIO_PCI_MODERN_DEVICE_BASE,
    VIRTIO_PCI_MODERN_REVISION,
    VIRTIO_PCI_SUBSYSTEM_ID,
    VIRTIO_PCI_VENDOR_ID,
)

log = logging.getLogger(__name__)

MSIX_BAR = 1
MSIX_BAR_SIZE = 0x1000
MSIX_PBA_OFFSET = 0x800
VIRTIO_BAR = 4
VIRTIO_BAR_SIZE = 0x4000
COMMON_OFFSET = 0x0000
ISR_OFFSET = 0x1000
DEVICE_OFFSET = 0x2000
DEVICE_LENGTH = 0x1000
NOTIFY_OFFSET = 0x3000
NOTIFY_LENGTH = 0x1000
NOTIFY_OFF_MULTIPLIER = 4  # 4.1.4.4: an even power of 2
LEGACY_NOTIFY_OFFSET = NOTIFY_OFFSET + NOTIFY_LENGTH - NOTIFY_OFF_MULTIPLIER
"""The legacy notification address in the notification BAR: the value written names the queue (2-byte aligned)."""
ADMIN_COMMON_CFG_SIZE = VIRTIO_PCI_COMMON_ADMIN_Q_NUM + 2  # through admin_queue_num (4.1.4.3)

# Features a device offers that this transport cannot serve.  VIRTIO_NET_F_MQ
# needs the control virtqueue, which the net device leaves to a VMM in front
# (QEMU's vhost-user net); there is none here, so multiqueue is not offered,
# unless the device serves a control queue itself (it offers VIRTIO_NET_F_CTRL_VQ).
UNSERVED_FEATURES = {VIRTIO_ID_NET: 1 << VIRTIO_NET_F_MQ}
SERVED_WITH = {VIRTIO_ID_NET: 1 << VIRTIO_NET_F_CTRL_VQ}

CapabilityLayout = Sequence[tuple[str, "int | None"]]
"""``[(name, offset or None), …]`` in chain order; names are ``pcie``, ``pm``,
``msix``, ``common``, ``notify``, ``isr``, ``device`` and ``pci_cfg``."""

DEFAULT_LAYOUT: CapabilityLayout = (
    ("pcie", None), ("msix", None), ("common", None), ("notify", None),
    ("isr", None), ("device", None), ("pci_cfg", None),
)


class Iommu(Protocol):
    """Something that hands out a DMA translator per requester (a VT-d unit)."""

    def dma_translator(self, source_id: int) -> Translator:
        """The translator for DMA from requester ``source_id``."""
        ...


class VirtioPciFunction(PciFunction):
    """A virtio device behind the modern virtio-pci transport.

    ``VirtioPciFunction(device, memory, *, iommu=None)``: ``memory`` is
    guest-physical memory; with an ``iommu`` the device offers
    VIRTIO_F_ACCESS_PLATFORM and, when the driver accepts it, its DMA goes
    through ``iommu.dma_translator(requester_id)`` (virtio 6: without it the
    device uses physical addresses).  Put it on a bus with
    ``bus.add_function(fn, slot)``.  :meth:`config_changed` tells the driver
    the device-specific configuration changed.  ``capability_layout`` places
    the capabilities (chain order and offsets, e.g. another VMM's layout;
    ``pm`` adds a Power Management capability) and ``msix_vectors`` sizes the
    MSI-X table (default: one per queue plus the configuration vector).
    """

    queues_held = False
    """Never: only a stopped member's holding port holds queues (``transport/parts.py``)."""

    def __init__(
        self,
        device: VirtioDevice,
        memory: GuestMemory,
        *,
        iommu: Iommu | None = None,
        transport_features: int = 0,
        capability_layout: CapabilityLayout = DEFAULT_LAYOUT,
        msix_vectors: int | None = None,
        admin: AdminVirtqueue | None = None,
    ) -> None:
        super().__init__(
            VIRTIO_PCI_VENDOR_ID,
            VIRTIO_PCI_MODERN_DEVICE_BASE + device.device_id,
            VIRTIO_CLASS_CODES.get(device.device_id, CLASS_OTHERS),
            revision=VIRTIO_PCI_MODERN_REVISION,
            subsystem_vendor_id=VIRTIO_PCI_VENDOR_ID,
            subsystem_id=VIRTIO_PCI_SUBSYSTEM_ID,
            pcie=True,
            interrupt_pin=1,
        )
        queues = device.num_queues + (admin is not None)
        if NOTIFY_OFF_MULTIPLIER * queues > LEGACY_NOTIFY_OFFSET - NOTIFY_OFFSET:
            raise ValueError(f"{queues} queues do not fit the notify region")
        self.device = device
        self.memory = memory
        self.iommu = iommu
        # Transport bits this function offers besides ACCESS_PLATFORM (e.g. an SR-IOV
        # PF's VIRTIO_F_SR_IOV, virtio 1.2 6): never passed on to the device.
        self.transport_features = transport_features | (1 << VIRTIO_F_ADMIN_VQ if admin is not None else 0)
        self.isr_status = 0
        self.admin = admin
        self.common = CommonCfg(device, self, admin)
        self._legacy: LegacyInterface | None = None
        common_size = VIRTIO_PCI_COMMON_CFG_SIZE if admin is None else ADMIN_COMMON_CFG_SIZE

        self.add_bar(MSIX_BAR, Bar(MSIX_BAR_SIZE))
        bar = self.add_bar(VIRTIO_BAR, Bar(VIRTIO_BAR_SIZE, BarKind.MEM64, prefetchable=True))
        bar.map_region(COMMON_OFFSET, common_size, self.common.read, self.common.write)
        bar.map_region(ISR_OFFSET, 1, self._isr_read, self._isr_write)
        bar.map_region(DEVICE_OFFSET, DEVICE_LENGTH, self._device_cfg_read, self._device_cfg_write)
        bar.map_region(NOTIFY_OFFSET, NOTIFY_LENGTH, self._notify_read, self._notify_write)

        vectors = queues + 1 if msix_vectors is None else msix_vectors
        capabilities: dict[str, Capability] = {
            "pcie": PcieCapability(PciePortType.ENDPOINT),
            "pm": PmCapability(),
            "msix": MsixCapability(vectors, table_bar=MSIX_BAR, table_offset=0, pba_offset=MSIX_PBA_OFFSET),
            "common": VirtioPciCap(VIRTIO_PCI_CAP_COMMON_CFG, VIRTIO_BAR, COMMON_OFFSET, common_size),
            "notify": VirtioPciCap(
                VIRTIO_PCI_CAP_NOTIFY_CFG, VIRTIO_BAR, NOTIFY_OFFSET, NOTIFY_LENGTH,
                notify_off_multiplier=NOTIFY_OFF_MULTIPLIER,
            ),
            "isr": VirtioPciCap(VIRTIO_PCI_CAP_ISR_CFG, VIRTIO_BAR, ISR_OFFSET, 1),
            "device": VirtioPciCap(VIRTIO_PCI_CAP_DEVICE_CFG, VIRTIO_BAR, DEVICE_OFFSET, DEVICE_LENGTH),
            "pci_cfg": VirtioPciCfgCap(),
        }
        for name, offset in capability_layout:
            self.add_capability(capabilities[name], offset)

    # -- TransportPort (used by CommonCfg) --------------------------------------
    def offered_features(self) -> int:
        """The device's features minus what this transport cannot serve, plus its transport bits
        (RING_RESET, ACCESS_PLATFORM with an IOMMU, ``transport_features``)."""
        features = self.device.device_features()
        served_with = SERVED_WITH.get(self.device.device_id, 0)
        if not (served_with and features & served_with == served_with):
            features &= ~UNSERVED_FEATURES.get(self.device.device_id, 0)
        features |= self.transport_features | 1 << VIRTIO_F_RING_RESET  # queue_reset (common_cfg.py)
        if self.iommu is not None:
            features |= 1 << VIRTIO_F_ACCESS_PLATFORM
        return features

    def transport_mask(self) -> int:
        """The feature bits the transport serves itself, never passed on to the device."""
        return TRANSPORT_FEATURES | self.transport_features

    @property
    def legacy(self) -> LegacyInterface:
        """The legacy register view of this function, as a group owner's legacy commands reach it."""
        if self._legacy is None:
            self._legacy = LegacyInterface(self)
        return self._legacy

    def vector_valid(self, vector: int) -> bool:
        """``vector`` is an entry of the MSI-X table."""
        assert self.msix is not None
        return 0 <= vector < self.msix.vectors

    def dma_memory(self, access_platform: bool) -> GuestMemory:
        """Guest memory as the device's DMA sees it."""
        if access_platform and self.iommu is not None:
            return self.memory.with_translator(self.iommu.dma_translator(self.requester_id))
        return self.memory

    def queue_interrupt(self, index: int) -> None:
        """Used-buffer notification of queue ``index`` (4.1.5.4)."""
        self._interrupt(self.common.queues[index].msix_vector, VIRTIO_PCI_ISR_QUEUE)

    def config_interrupt(self) -> None:
        """Configuration change notification (4.1.5.3): ISR bit 1 is set first in every case."""
        self.isr_status |= VIRTIO_PCI_ISR_CONFIG
        self._interrupt(self.common.config_msix_vector, VIRTIO_PCI_ISR_CONFIG)

    def _interrupt(self, vector: int, isr_bit: int) -> None:
        msix = self.msix
        assert msix is not None
        if msix.enabled:
            if vector != VIRTIO_MSI_NO_VECTOR:
                msix.notify(vector)
            return
        self.isr_status |= isr_bit
        self.raise_interrupt()  # INTx: Status.Interrupt Status until ISR is read

    # -- device side API ----------------------------------------------------------
    def config_changed(self) -> None:
        """The device-specific configuration changed: new ``config_generation`` and a notification."""
        self.common.config_changed()

    def reset(self) -> None:
        """Conventional reset (or FLR) resets the virtio device as well."""
        super().reset()
        self.common.reset()
        self.isr_status = 0

    # -- BAR regions ---------------------------------------------------------------
    def _isr_read(self, offset: int, size: int) -> int:
        return self.read_isr()

    def read_isr(self) -> int:
        """Read ISR status: 4.1.4.5, reading clears it and deasserts the interrupt."""
        value = self.isr_status
        self.isr_status = 0
        self.lower_intx()
        return value

    def _isr_write(self, offset: int, size: int, value: int) -> None:
        log.warning("%r: write of %#x to read-only ISR status ignored", self, value)

    def _device_cfg_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.device.read_config(offset, size), "little")

    def _device_cfg_write(self, offset: int, size: int, value: int) -> None:
        self.device.write_config(offset, value.to_bytes(size, "little"))

    def _notify_read(self, offset: int, size: int) -> int:
        return 0

    def _notify_write(self, offset: int, size: int, value: int) -> None:
        if offset == LEGACY_NOTIFY_OFFSET - NOTIFY_OFFSET and size == 2:
            self.common.notify(value)  # the legacy notification address: the value names the queue
            return
        # Without VIRTIO_F_NOTIFICATION_DATA the address names the queue (4.1.5.2).
        index, within = divmod(offset, NOTIFY_OFF_MULTIPLIER)
        if within or size != 2:
            log.warning("%r: notify write of %d byte(s) at %#x is not a queue's 16-bit notify; ignored",
                        self, size, offset)
            return
        self.common.notify(index)
