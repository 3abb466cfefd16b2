"""iovirt.pci: PCI/PCIe config space, BARs, capabilities, MSI/MSI-X, buses and host access.

Build a function, give it BARs and capabilities, put it on a bus behind a
host, and reach it the way a CPU does::

    host = PciHost(msi_sink=sink)
    fn = PciFunction(0x1AF4, 0x1041, 0x020000, pcie=True)
    bar = fn.add_bar(0, Bar(0x4000, BarKind.MEM64))
    bar.map_region(0x3000, 0x100, read, write)        # device registers
    fn.add_capability(PcieCapability())
    fn.add_capability(MsixCapability(3, table_bar=0, table_offset=0, pba_offset=0x800))
    host.root_bus.add_function(fn, 3)
    host.ecam_read(3 << 15, 4)                          # vendor/device
    fn.raise_interrupt(1)                               # -> sink.deliver_msi(rid, addr, data)
"""

from iovirt.pci.bar import PCI_ROM_SLOT, Bar, BarKind, BytesRegion, MmioRead, MmioWrite
from iovirt.pci.bridge import PciBridge
from iovirt.pci.bus import PciBus
from iovirt.pci.capability import (
    Capability,
    ExtendedCapability,
    walk_capabilities,
    walk_extended_capabilities,
)
from iovirt.pci.config import ConfigHook, ConfigSpace
from iovirt.pci.errors import (
    PciCapabilityChainError,
    PciConfigAccessError,
    PciConfigValueError,
    PciError,
    PciLayoutError,
    PciTopologyError,
)
from iovirt.pci.function import PciFunction
from iovirt.pci.host import PciHost
from iovirt.pci.msi import MsiCapability, MsiSink
from iovirt.pci.msix import MsixCapability
from iovirt.pci.pcie import PcieCapability, PciePortType
from iovirt.pci.pm import PmCapability
from iovirt.pci.vendor import VendorCapability

__all__ = [
    "PCI_ROM_SLOT",
    "Bar",
    "BarKind",
    "BytesRegion",
    "Capability",
    "ConfigHook",
    "ConfigSpace",
    "ExtendedCapability",
    "MmioRead",
    "MmioWrite",
    "MsiCapability",
    "MsiSink",
    "MsixCapability",
    "PciBridge",
    "PciBus",
    "PciCapabilityChainError",
    "PciConfigAccessError",
    "PciConfigValueError",
    "PciError",
    "PciFunction",
    "PciHost",
    "PciLayoutError",
    "PciTopologyError",
    "PcieCapability",
    "PciePortType",
    "PmCapability",
    "VendorCapability",
    "walk_capabilities",
    "walk_extended_capabilities",
]
