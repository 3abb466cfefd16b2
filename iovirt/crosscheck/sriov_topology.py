"""The SR-IOV topology both sides are given: QEMU's nvme PF with VFs behind a PCIe root port.

QEMU (q35): ``pcie-root-port`` at 00:1c.0 and ``nvme`` (with an ``nvme-subsys``
and ``sriov_max_vfs``) on its secondary bus at 01:00.0.  The SR-IOV capability
is an extended capability (offset 0x100 or above) and a VF's configuration
space is reached at its routing ID, so everything here goes through ECAM
(PCIe §7.2.2).  No firmware runs: q35's PCIEXBAR (MCH config register 0x60,
64-bit: bit 0 enable, bits 2:1 length, 00b = 256 MiB) is programmed with
:data:`ECAM_BASE` first, then the root port's bus numbers, both through
configuration mechanism #1.

iovirt: a :class:`~iovirt.pci.host.PciHost` with a :class:`~iovirt.pci.bridge.PciBridge`
at 00:1c.0 and a PF behind it whose SR-IOV capability
(:class:`~iovirt.sriov.capability.SriovCapability`) has what QEMU's has, read
from QEMU first (:func:`discover`): TotalVFs, First VF Offset and VF Stride
for every NumVFs and ARI setting, VF Device ID, Supported Page Sizes, the VF
BARs (by sizing them), and the VFs' capability layout (by enabling one VF
once).  Where the spec leaves a register's value to the device, iovirt's VF
is given QEMU's choice (:data:`~iovirt.crosscheck.topology.DEVICE_CHOICES`
for the PCI Express capability, the PM capability's fields, the ARI
capability's Next Function Number).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from iovirt.crosscheck.qtest import QtestClient
from iovirt.crosscheck.topology import (
    DEVICE_CHOICES,
    QEMU_ROOT_PORT_IDS,
    ROOT_PORT_BDF,
    ROOT_PORT_BUSES,
    ROOT_PORT_SLOT,
    ENDPOINT_BUS,
    iovirt_config_write,
    qemu_config_write,
)
from iovirt.errors import IovirtError
from iovirt.pci.bar import Bar, BarKind
from iovirt.pci.bridge import PciBridge
from iovirt.pci.capability import ExtendedCapability, walk_capabilities, walk_extended_capabilities
from iovirt.pci.function import PciFunction
from iovirt.pci.host import PciHost
from iovirt.pci.msix import MsixCapability
from iovirt.pci.pcie import PcieCapability, PciePortType
from iovirt.pci.pm import PmCapability
from iovirt.pci.regs import (
    PCI_BASE_ADDRESS_MEM_PREFETCH,
    PCI_BASE_ADDRESS_MEM_TYPE_64,
    PCI_BASE_ADDRESS_SPACE_IO,
    PCI_CAP_ID_EXP,
    PCI_CAP_ID_MSIX,
    PCI_CAP_ID_PM,
    PCI_CLASS_PROG,
    PCI_DEVICE_ID,
    PCI_EXT_CAP_ID_ARI,
    PCI_INTERRUPT_PIN,
    PCI_MSIX_FLAGS_QSIZE,
    PCI_MSIX_PBA,
    PCI_MSIX_TABLE,
    PCI_PM_CTRL,
    PCI_PM_CTRL_NO_SOFT_RESET,
    PCI_PRIMARY_BUS,
    PCI_REVISION_ID,
    PCI_SUBSYSTEM_ID,
    PCI_SUBSYSTEM_VENDOR_ID,
    PCI_VENDOR_ID,
)
from iovirt.sriov.capability import SriovCapability, attach_pf
from iovirt.sriov.regs import (
    PCI_EXT_CAP_ID_SRIOV,
    PCI_SRIOV_BAR,
    PCI_SRIOV_CTRL,
    PCI_SRIOV_CTRL_ARI,
    PCI_SRIOV_CTRL_VFE,
    PCI_SRIOV_INITIAL_VF,
    PCI_SRIOV_NUM_BARS,
    PCI_SRIOV_NUM_VF,
    PCI_SRIOV_SUP_PGSIZE,
    PCI_SRIOV_TOTAL_VF,
    PCI_SRIOV_VF_DID,
    PCI_SRIOV_VF_OFFSET,
    PCI_SRIOV_VF_STRIDE,
)
from iovirt.sriov.vf import VirtualFunction

ECAM_BASE = 0xB000_0000
MCH_BDF = 0  # 00:00.0, q35's host bridge (MCH)
MCH_PCIEXBAR = 0x60
PCIEXBAR_ENABLE = 1  # bits 2:1 (length) 00b: 256 MiB, buses 0-255
PF_DEVFN = 0
PF_BDF = ENDPOINT_BUS << 8 | PF_DEVFN  # 01:00.0

QEMU_DEVICE_ARGS = (
    "-device", f"pcie-root-port,id=rp0,bus=pcie.0,addr={ROOT_PORT_SLOT:#x}.0,chassis=1",
    "-device", "nvme-subsys,id=s0",
    "-device", "nvme,bus=rp0,addr=0,subsys=s0,serial=x,sriov_max_vfs=4,sriov_vq_flexible=8,"
               "sriov_vi_flexible=4,max_ioqpairs=13,msix_qsize=6",
)
"""The command line known to start on QEMU 7.2 (the nvme needs a subsystem for SR-IOV)."""

_ARI_NEXT_FUNCTION = 0xFF00  # ARI Capability register bits 15:8 (PCIe §7.8.8.2)


class SriovTopologyError(IovirtError):
    """QEMU's device is not laid out in a way iovirt's model can be configured to."""


def ecam_offset(bus: int, devfn: int, reg: int) -> int:
    """Offset into the ECAM window of register ``reg`` of ``bus:devfn`` (PCIe §7.2.2)."""
    return bus << 20 | devfn << 12 | reg


def qemu_read(qemu: QtestClient, bdf: int, reg: int, size: int) -> int:
    """One ECAM read on QEMU."""
    return int(qemu.batch([QtestClient.read_cmd(ECAM_BASE + (bdf << 12 | reg), size)])[0], 16)


def qemu_write(qemu: QtestClient, bdf: int, reg: int, size: int, value: int) -> None:
    """One ECAM write on QEMU."""
    qemu.batch([QtestClient.write_cmd(ECAM_BASE + (bdf << 12 | reg), size, value)])


def start_qemu() -> QtestClient:
    """QEMU with the root port and the nvme PF, ECAM on and the root port's buses programmed."""
    qemu = QtestClient(QEMU_DEVICE_ARGS)
    try:
        qemu_config_write(qemu, MCH_BDF, MCH_PCIEXBAR, 4, ECAM_BASE | PCIEXBAR_ENABLE)
        qemu_config_write(qemu, MCH_BDF, MCH_PCIEXBAR + 4, 4, 0)
        qemu_config_write(qemu, ROOT_PORT_BDF, PCI_PRIMARY_BUS, 4, ROOT_PORT_BUSES)
    except BaseException:
        qemu.close()
        raise
    return qemu


@dataclass(frozen=True)
class VfBarInfo:
    """A VF BAR as sizing it in QEMU's SR-IOV capability shows (PCI 3.0 §6.2.5.1)."""

    index: int
    size: int
    is64: bool
    prefetchable: bool


@dataclass
class SriovLayout:
    """What iovirt's PF and VFs are configured with, all of it read from QEMU."""

    vendor_id: int
    device_id: int
    class_code: int
    revision: int
    subsystem_vendor_id: int
    subsystem_id: int
    interrupt_pin: int
    pf_ext_caps: list[tuple[int, int, int, bytes]]
    """The PF's extended capabilities before SR-IOV: ``(id, version, offset, payload)``."""
    sriov: int
    total_vfs: int
    vf_device_id: int
    supported_page_sizes: int
    routing: dict[tuple[int, bool], tuple[int, int]]
    vf_bars: list[VfBarInfo]
    vf_caps: list[tuple[int, int]]
    """The VF's capability list, ``(id, offset)`` in chain order."""
    vf_ext_caps: list[tuple[int, int, int]]
    vf_regs: dict[int, int] = field(default_factory=dict)
    """Device-chosen VF register values by offset (dwords): MSI-X, PM and ARI fields."""

    def routing_policy(self, num_vfs: int, ari: bool) -> tuple[int, int]:
        """QEMU's First VF Offset and VF Stride for this NumVFs and ARI setting."""
        return self.routing[(num_vfs, ari)]

    def vf_devfns(self) -> list[int]:
        """Every devfn (on the PF's bus) a VF may take, and the one after the last."""
        rids: set[int] = set()
        for (num_vfs, _), (offset, stride) in self.routing.items():
            rids.update(PF_DEVFN + offset + stride * n for n in range(max(num_vfs, 1) + 1))
        return sorted(rid for rid in rids if rid <= 0xFF)


def _vf_bars(qemu: QtestClient, sriov: int) -> list[VfBarInfo]:
    bars = []
    index = 0
    while index < PCI_SRIOV_NUM_BARS:
        reg = sriov + PCI_SRIOV_BAR + 4 * index
        qemu_write(qemu, PF_BDF, reg, 4, 0xFFFFFFFF)
        low = qemu_read(qemu, PF_BDF, reg, 4)
        qemu_write(qemu, PF_BDF, reg, 4, 0)
        if low & PCI_BASE_ADDRESS_SPACE_IO:
            raise SriovTopologyError(f"VF BAR{index} is an I/O BAR (SR-IOV §9.3.3.14 allows memory only)")
        is64 = bool(low & PCI_BASE_ADDRESS_MEM_TYPE_64)
        mask = low & ~0xF
        if is64:
            qemu_write(qemu, PF_BDF, reg + 4, 4, 0xFFFFFFFF)
            mask |= qemu_read(qemu, PF_BDF, reg + 4, 4) << 32
            qemu_write(qemu, PF_BDF, reg + 4, 4, 0)
        if mask:
            width = 64 if is64 else 32
            size = ((~mask) & ((1 << width) - 1)) + 1
            bars.append(VfBarInfo(index, size, is64, bool(low & PCI_BASE_ADDRESS_MEM_PREFETCH)))
        index += 2 if is64 else 1
    return bars


def discover(qemu: QtestClient) -> SriovLayout:
    """Read everything iovirt's PF and VFs are configured with from QEMU (restored afterwards)."""
    def pf(reg: int, size: int) -> int:
        return qemu_read(qemu, PF_BDF, reg, size)

    ext = walk_extended_capabilities(pf)
    sriov = next((off for cap_id, _, off in ext if cap_id == PCI_EXT_CAP_ID_SRIOV), None)
    if sriov is None:
        raise SriovTopologyError("QEMU's PF has no SR-IOV capability")
    pf_ext_caps = []
    for cap_id, version, off in ext:
        if off >= sriov:
            break
        if cap_id != PCI_EXT_CAP_ID_ARI:
            raise SriovTopologyError(f"extended capability {cap_id:#x} before SR-IOV is not modelled")
        pf_ext_caps.append((cap_id, version, off, pf(off + 4, 4).to_bytes(4, "little")))
    total = pf(sriov + PCI_SRIOV_TOTAL_VF, 2)
    if pf(sriov + PCI_SRIOV_INITIAL_VF, 2) != total:
        # iovirt has no VF Migration, so InitialVFs is TotalVFs (§9.3.3.8).
        raise SriovTopologyError("QEMU's InitialVFs differs from TotalVFs; iovirt's model cannot match it")
    routing: dict[tuple[int, bool], tuple[int, int]] = {}
    for ari in (False, True):
        qemu_write(qemu, PF_BDF, sriov + PCI_SRIOV_CTRL, 2, PCI_SRIOV_CTRL_ARI if ari else 0)
        for num_vfs in range(total + 1):
            qemu_write(qemu, PF_BDF, sriov + PCI_SRIOV_NUM_VF, 2, num_vfs)
            routing[(num_vfs, ari)] = (pf(sriov + PCI_SRIOV_VF_OFFSET, 2), pf(sriov + PCI_SRIOV_VF_STRIDE, 2))
    layout = SriovLayout(
        vendor_id=pf(PCI_VENDOR_ID, 2),
        device_id=pf(PCI_DEVICE_ID, 2),
        class_code=pf(PCI_CLASS_PROG, 4) & 0xFFFFFF,
        revision=pf(PCI_REVISION_ID, 1),
        subsystem_vendor_id=pf(PCI_SUBSYSTEM_VENDOR_ID, 2),
        subsystem_id=pf(PCI_SUBSYSTEM_ID, 2),
        interrupt_pin=pf(PCI_INTERRUPT_PIN, 1),
        pf_ext_caps=pf_ext_caps,
        sriov=sriov,
        total_vfs=total,
        vf_device_id=pf(sriov + PCI_SRIOV_VF_DID, 2),
        supported_page_sizes=pf(sriov + PCI_SRIOV_SUP_PGSIZE, 4),
        routing=routing,
        vf_bars=_vf_bars(qemu, sriov),
        vf_caps=[],
        vf_ext_caps=[],
    )
    # One VF, once, to read the VFs' capability layout.
    qemu_write(qemu, PF_BDF, sriov + PCI_SRIOV_CTRL, 2, 0)
    qemu_write(qemu, PF_BDF, sriov + PCI_SRIOV_NUM_VF, 2, 1)
    qemu_write(qemu, PF_BDF, sriov + PCI_SRIOV_CTRL, 2, PCI_SRIOV_CTRL_VFE)
    offset, _ = routing[(1, False)]
    vf_bdf = PF_BDF + offset

    def vf(reg: int, size: int) -> int:
        return qemu_read(qemu, vf_bdf, reg, size)

    layout.vf_caps = walk_capabilities(vf)
    layout.vf_ext_caps = walk_extended_capabilities(vf)
    for cap_id, off in layout.vf_caps:
        regs: tuple[int, ...]
        if cap_id == PCI_CAP_ID_MSIX:
            regs = (off, off + PCI_MSIX_TABLE, off + PCI_MSIX_PBA)
        elif cap_id == PCI_CAP_ID_PM:
            regs = (off, off + PCI_PM_CTRL)
        elif cap_id == PCI_CAP_ID_EXP:
            regs = ()
        else:
            raise SriovTopologyError(f"VF capability {cap_id:#x} is not modelled")
        layout.vf_regs.update({reg: vf(reg, 4) for reg in regs})
    for cap_id, _, off in layout.vf_ext_caps:
        if cap_id != PCI_EXT_CAP_ID_ARI:
            raise SriovTopologyError(f"VF extended capability {cap_id:#x} is not modelled")
        layout.vf_regs[off + 4] = vf(off + 4, 4)
    qemu_write(qemu, PF_BDF, sriov + PCI_SRIOV_CTRL, 2, 0)
    qemu_write(qemu, PF_BDF, sriov + PCI_SRIOV_NUM_VF, 2, 0)
    return layout


def _make_vf_builder(layout: SriovLayout) -> Callable[[SriovCapability, int], VirtualFunction]:
    pcie_choices = [c for c in DEVICE_CHOICES if c.cap == "pcie"]

    def make_vf(sriov: SriovCapability, k: int) -> VirtualFunction:
        vf = VirtualFunction(sriov, k)
        for bar in layout.vf_bars:
            vf.add_bar(bar.index, Bar(bar.size, BarKind.MEM64 if bar.is64 else BarKind.MEM32,
                                      prefetchable=bar.prefetchable))
        regs = layout.vf_regs
        for cap_id, off in layout.vf_caps:
            if cap_id == PCI_CAP_ID_MSIX:
                vectors = (regs[off] >> 16 & PCI_MSIX_FLAGS_QSIZE) + 1
                table, pba = regs[off + PCI_MSIX_TABLE], regs[off + PCI_MSIX_PBA]
                vf.add_capability(MsixCapability(vectors, table & 7, table & ~7, pba & 7, pba & ~7), off)
            elif cap_id == PCI_CAP_ID_PM:
                # PMC's D1/D2/PME_Support and PMCSR's No_Soft_Reset are the device's (PCI PM 1.2 §3.2.3-4).
                pmc = regs[off] >> 16
                vf.add_capability(PmCapability(d1=bool(pmc & 0x200), d2=bool(pmc & 0x400), pme_support=pmc >> 11,
                                               no_soft_reset=bool(regs[off + PCI_PM_CTRL] & PCI_PM_CTRL_NO_SOFT_RESET)),
                                  off)
            else:
                vf.add_capability(PcieCapability(PciePortType.ENDPOINT), off)
                for choice in pcie_choices:
                    vf.config.set_default(off + choice.offset, choice.size, choice.value)
        for _, version, off in layout.vf_ext_caps:
            # ARI Capability: Next Function Number is the device's; MFVC/ACS function groups unsupported.
            ari = regs[off + 4] & _ARI_NEXT_FUNCTION
            vf.add_extended_capability(ExtendedCapability(PCI_EXT_CAP_ID_ARI, version, ari.to_bytes(4, "little")), off)
        return vf

    return make_vf


def build_iovirt(layout: SriovLayout) -> tuple[PciHost, PciFunction, SriovCapability]:
    """iovirt's root port and PF with its SR-IOV capability configured as QEMU's, bus numbers programmed."""
    host = PciHost()
    root_port = PciBridge(*QEMU_ROOT_PORT_IDS, pcie=True)
    root_port.add_capability(PcieCapability(PciePortType.ROOT_PORT, slot=True))
    host.root_bus.add_function(root_port, ROOT_PORT_SLOT)
    pf = PciFunction(
        layout.vendor_id, layout.device_id, layout.class_code, revision=layout.revision,
        subsystem_vendor_id=layout.subsystem_vendor_id, subsystem_id=layout.subsystem_id,
        pcie=True, interrupt_pin=layout.interrupt_pin,
    )
    pf.add_capability(PcieCapability())
    for cap_id, version, off, payload in layout.pf_ext_caps:
        pf.add_extended_capability(ExtendedCapability(cap_id, version, payload), off)
    sriov = SriovCapability(
        layout.total_vfs, layout.vf_device_id, _make_vf_builder(layout),
        supported_page_sizes=layout.supported_page_sizes, routing=layout.routing_policy,
    )
    pf.add_extended_capability(sriov, layout.sriov)
    attach_pf(root_port.secondary_bus, pf, PF_DEVFN >> 3, PF_DEVFN & 7)
    iovirt_config_write(host, ROOT_PORT_BDF, PCI_PRIMARY_BUS, 4, ROOT_PORT_BUSES)
    return host, pf, sriov

