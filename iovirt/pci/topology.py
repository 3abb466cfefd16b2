"""The default in-process PCI topology, and builders for its kinds of function.

The PCI part is: a host bridge at 00:00.0, a PCI-to-PCI bridge at 00:01.0
with a conventional endpoint (01:00.0) behind it, and a two-function PCI
Express endpoint with PM, PCIe, MSI-X and an extended capability at
00:02.0-1.  :func:`build_default_host` takes an ``add_devices`` callback:
the in-process platform (:class:`iovirt.platform.Platform`, which
``iovirt lspci`` builds) puts virtio-net at 00:03.0 and virtio-blk at 00:04.0
on the root bus through it before resources are assigned, so this layer
stays free of virtio.
"""

from __future__ import annotations

from typing import Callable

from iovirt.pci.bar import Bar, BarKind, BytesRegion
from iovirt.pci.bridge import PciBridge
from iovirt.pci.capability import ExtendedCapability
from iovirt.pci.bus import PciBus
from iovirt.pci.firmware import assign_resources
from iovirt.pci.function import PciFunction
from iovirt.pci.host import PciHost
from iovirt.pci.msi import MsiCapability, MsiSink
from iovirt.pci.msix import MsixCapability
from iovirt.pci.pcie import PcieCapability, PciePortType
from iovirt.pci.pm import PmCapability
from iovirt.pci.regs import PCI_EXT_CAP_ID_VNDR

REDHAT_QEMU_VENDOR = 0x1B36
QEMU_PCI_BRIDGE = 0x0001
QEMU_TEST_DEVICE = 0x0005
QEMU_PCIE_HOST = 0x0008
CLASS_HOST_BRIDGE = 0x060000
CLASS_PCI_BRIDGE = 0x060400
CLASS_UNCLASSIFIED_OTHER = 0x00FF00


def make_host_bridge() -> PciFunction:
    """A host bridge function (no BARs, no capabilities)."""
    return PciFunction(REDHAT_QEMU_VENDOR, QEMU_PCIE_HOST, CLASS_HOST_BRIDGE)


def make_pci_bridge() -> PciBridge:
    """A conventional PCI-to-PCI bridge."""
    return PciBridge(REDHAT_QEMU_VENDOR, QEMU_PCI_BRIDGE, CLASS_PCI_BRIDGE)


def make_conventional_endpoint() -> PciFunction:
    """A conventional endpoint: 4 KiB memory BAR (RAM-like), 32-byte I/O BAR, ROM, MSI."""
    function = PciFunction(
        REDHAT_QEMU_VENDOR, QEMU_TEST_DEVICE, CLASS_UNCLASSIFIED_OTHER,
        revision=1, subsystem_vendor_id=REDHAT_QEMU_VENDOR, subsystem_id=0x1100, interrupt_pin=1,
    )
    mem = function.add_bar(0, Bar(0x1000))
    ram = BytesRegion(bytes(0x1000))
    mem.map_region(0, 0x1000, ram.read, ram.write)
    io = function.add_bar(1, Bar(32, BarKind.IO))
    ports = BytesRegion(bytes(32))
    io.map_region(0, 32, ports.read, ports.write)
    rom = function.add_rom(Bar(0x10000, BarKind.ROM))
    image = BytesRegion(b"\x55\xaa" + bytes(0x10000 - 2), writable=False)
    rom.map_region(0, 0x10000, image.read, image.write)
    function.add_capability(MsiCapability(4, addr64=True, per_vector_mask=True))
    return function


def make_msix_endpoint(vectors: int = 8) -> PciFunction:
    """A PCI Express endpoint: MSI-X table/PBA in BAR0, 64-bit prefetchable BAR2, PM, PCIe.

    It also carries a vendor-specific extended capability (ID 0x000B) at 0x100.
    """
    function = PciFunction(
        REDHAT_QEMU_VENDOR, QEMU_TEST_DEVICE, CLASS_UNCLASSIFIED_OTHER,
        revision=2, subsystem_vendor_id=REDHAT_QEMU_VENDOR, subsystem_id=0x1100,
        pcie=True, interrupt_pin=1,
    )
    function.add_bar(0, Bar(0x4000))
    buffer = function.add_bar(2, Bar(0x100000, BarKind.MEM64, prefetchable=True))
    ram = BytesRegion(bytes(0x1000))
    buffer.map_region(0, 0x1000, ram.read, ram.write)
    function.add_capability(PmCapability())
    function.add_capability(PcieCapability(PciePortType.ENDPOINT))
    function.add_capability(MsixCapability(vectors, table_bar=0, table_offset=0, pba_offset=0x2000))
    # Vendor-Specific Extended Capability (PCIe §7.9.5): VSEC ID 1, rev 1, length 12.
    vsec_header = (1 | 1 << 16 | 12 << 20).to_bytes(4, "little")
    function.add_extended_capability(ExtendedCapability(PCI_EXT_CAP_ID_VNDR, 1, vsec_header + bytes(4)))
    return function


def build_default_host(
    msi_sink: MsiSink | None = None,
    add_devices: Callable[[PciBus], None] | None = None,
    assign: bool = True,
) -> PciHost:
    """Build the default topology; ``add_devices(root_bus)`` adds more (device 3 upwards).

    With ``assign`` (the default) buses are numbered and BARs placed as
    firmware would (:func:`~iovirt.pci.firmware.assign_resources`).
    """
    host = PciHost(msi_sink=msi_sink)
    root = host.root_bus
    root.add_function(make_host_bridge(), 0)
    bridge = make_pci_bridge()
    root.add_function(bridge, 1)
    bridge.secondary_bus.add_function(make_conventional_endpoint(), 0)
    root.add_function(make_msix_endpoint(), 2, 0)
    root.add_function(make_msix_endpoint(4), 2, 1)
    if add_devices is not None:
        add_devices(root)
    if assign:
        assign_resources(host)
    return host
