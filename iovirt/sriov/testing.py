"""Test utilities shipped with the package: a generic SR-IOV PF whose VFs have a BAR and MSI-X.

Used by the SR-IOV tests and usable by anyone who needs VFs without a
virtio device behind them.
"""

from __future__ import annotations

from iovirt.pci import Bar, BarKind, BytesRegion, MsixCapability, PcieCapability, PciFunction
from iovirt.sriov.capability import SriovCapability, VfFactory
from iovirt.sriov.routing import VfRouting, default_routing
from iovirt.sriov.vf import VirtualFunction

VENDOR = 0x1AF4
PF_DEVICE = 0x10F0
VF_DEVICE = 0x10F1
CLASS_ETHERNET = 0x020000
VF_BAR_SIZE = 0x2000
MSIX_OFFSET = 0x1000


def build_generic_vf(sriov: SriovCapability, k: int) -> VirtualFunction:
    """A VF: PCIe capability, BAR0 (8 KiB 64-bit prefetchable: 256 bytes of RAM at 0, a
    2-vector MSI-X table at 0x1000) and BAR2 (4 KiB 32-bit, nothing mapped)."""
    vf = VirtualFunction(sriov, k)
    vf.add_capability(PcieCapability())
    bar0 = vf.add_bar(0, Bar(VF_BAR_SIZE, BarKind.MEM64, prefetchable=True))
    ram = BytesRegion(bytes(0x100))
    bar0.map_region(0, 0x100, ram.read, ram.write)
    vf.add_bar(2, Bar(0x1000))
    vf.add_capability(MsixCapability(2, table_bar=0, table_offset=MSIX_OFFSET))
    return vf


def make_generic_pf(
    total_vfs: int = 16, routing: VfRouting = default_routing, make_vf: VfFactory = build_generic_vf
) -> PciFunction:
    """A PCI Express Ethernet-class PF with an SR-IOV capability (VF Device ID :data:`VF_DEVICE`)."""
    pf = PciFunction(VENDOR, PF_DEVICE, CLASS_ETHERNET, pcie=True, subsystem_vendor_id=VENDOR, subsystem_id=1)
    pf.add_capability(PcieCapability())
    pf.add_extended_capability(SriovCapability(total_vfs, VF_DEVICE, make_vf, routing=routing))
    return pf
