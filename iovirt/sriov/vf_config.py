"""A VF's config space as Linux's PCI core presents it to the driver that binds.

A VF's own Vendor ID, Device ID and BARs read 0xFFFF / 0 (PCIe §9.3.4.1).
Linux never shows a driver those: ``pci_iov_add_virtfn`` fills the
``pci_dev`` with the PF's Vendor ID and the VF Device ID, and its resources
with ``VF BARn + k * size`` from the PF's capability.  :class:`VfConfig`
answers reads of those registers the same way and passes every other access
to the VF through ECAM, so an unmodified driver (the platform's
:class:`~iovirt.platform.virtio_driver.VirtioPciDriver`) binds to a VF.
"""

from __future__ import annotations

from iovirt.pci.host import PciHost
from iovirt.pci.regs import PCI_BASE_ADDRESS_0, PCI_BASE_ADDRESS_MEM_TYPE_64, PCI_VENDOR_ID
from iovirt.platform.config_access import EcamConfig
from iovirt.sriov.driver import EnumeratedVf

_BARS_END = PCI_BASE_ADDRESS_0 + 6 * 4


class VfConfig(EcamConfig):
    """ECAM access to an added VF with the IDs and BARs Linux's ``pci_dev`` holds."""

    def __init__(self, host: PciHost, vf: EnumeratedVf) -> None:
        super().__init__(host, vf.bus, vf.device, vf.fn)
        self.vf = vf
        shadow = bytearray(_BARS_END)
        shadow[PCI_VENDOR_ID : PCI_VENDOR_ID + 4] = (vf.vendor_id | vf.device_id << 16).to_bytes(4, "little")
        for index, res in vf.bars.items():
            low = PCI_BASE_ADDRESS_0 + 4 * index
            value = res.address | (PCI_BASE_ADDRESS_MEM_TYPE_64 if res.is64 else 0)
            shadow[low : low + (8 if res.is64 else 4)] = value.to_bytes(8 if res.is64 else 4, "little")
        self._shadow = bytes(shadow)

    def read(self, offset: int, size: int) -> int:
        """IDs and BARs from the ``pci_dev``; the rest from the VF."""
        if offset < 4 or PCI_BASE_ADDRESS_0 <= offset < _BARS_END:
            return int.from_bytes(self._shadow[offset : offset + size], "little")
        return super().read(offset, size)
