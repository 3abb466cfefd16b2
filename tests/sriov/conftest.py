"""Shared builders for the SR-IOV tests: a generic PF whose VFs have a BAR and MSI-X."""

from __future__ import annotations

from typing import Callable

import pytest

from iovirt.memory import BumpAllocator
from iovirt.pci import Bar, BarKind, BytesRegion, MsixCapability, PcieCapability, PciFunction, PciHost
from iovirt.pci.testing import RecordingMsiSink
from iovirt.sriov import SriovCapability, VirtualFunction, attach_pf, default_routing

VENDOR = 0x1AF4
PF_DEVICE = 0x10F0
VF_DEVICE = 0x10F1
CLASS_ETHERNET = 0x020000
PF_SLOT = 3
VF_BAR_SIZE = 0x2000
MSIX_OFFSET = 0x1000


def build_vf(sriov: SriovCapability, k: int) -> VirtualFunction:
    """A VF: PCIe capability, BAR0 (64-bit, RAM at 0 and MSI-X table at 0x1000), BAR2 (32-bit)."""
    vf = VirtualFunction(sriov, k)
    vf.add_capability(PcieCapability())
    bar0 = vf.add_bar(0, Bar(VF_BAR_SIZE, BarKind.MEM64, prefetchable=True))
    ram = BytesRegion(bytes(0x100))
    bar0.map_region(0, 0x100, ram.read, ram.write)
    vf.add_bar(2, Bar(0x1000))
    vf.add_capability(MsixCapability(2, table_bar=0, table_offset=MSIX_OFFSET))
    return vf


def make_pf(total_vfs: int = 16, routing=default_routing, builder=build_vf) -> PciFunction:
    pf = PciFunction(VENDOR, PF_DEVICE, CLASS_ETHERNET, pcie=True, subsystem_vendor_id=VENDOR, subsystem_id=1)
    pf.add_capability(PcieCapability())
    pf.add_extended_capability(SriovCapability(total_vfs, VF_DEVICE, builder, routing=routing))
    return pf


@pytest.fixture
def sink() -> RecordingMsiSink:
    return RecordingMsiSink()


@pytest.fixture
def host(sink: RecordingMsiSink) -> PciHost:
    return PciHost(msi_sink=sink)


@pytest.fixture
def pf_factory(host: PciHost) -> Callable[..., tuple[PciFunction, SriovCapability]]:
    """``pf_factory(total_vfs=16, routing=…, slot=3)`` -> (pf, cap) attached to the host's root bus."""

    def factory(total_vfs: int = 16, routing=default_routing, slot: int = PF_SLOT, builder=build_vf):
        pf = make_pf(total_vfs, routing, builder)
        attach_pf(host.root_bus, pf, slot)
        cap = pf.extended_capabilities[0]
        assert isinstance(cap, SriovCapability)
        return pf, cap

    return factory


@pytest.fixture
def allocator() -> BumpAllocator:
    return BumpAllocator(0xE000_0000, 1 << 26)
