"""The topology both sides are given: a virtio-net-pci endpoint behind a PCIe root port.

QEMU (q35): ``pcie-root-port`` at 00:1c.0 and ``virtio-net-pci,disable-legacy=on``
on its secondary bus.  Behind a root port QEMU makes the device a PCI Express
endpoint (PCI Express and Power Management capabilities), which is what the
PCIe registers of the comparison need; on the root bus it would be an
integrated device without them.  No firmware runs, so the root port's bus
numbers are programmed here, the same way on both sides, and the device is
reached at 01:00.0 through configuration mechanism #1 (0xCF8/0xCFC,
PCI 3.0 §3.2.2.3.2).  No ``-netdev`` is needed: the NIC without a peer only
draws a warning.

iovirt: a :class:`~iovirt.pci.host.PciHost` with a :class:`~iovirt.pci.bridge.PciBridge`
at 00:1c.0 and a :class:`~iovirt.virtio.transport.pci.VirtioPciFunction`
behind it, whose capability layout and MSI-X table size are read from
QEMU's device first (:func:`discover_layout`, :func:`rom_size`) so the two
differ in no offset.  Where the spec lets a device choose (an optional
feature, what it advertises) iovirt's endpoint is given QEMU's choice,
listed with the clause that allows it in :data:`DEVICE_CHOICES`; where QEMU
breaks a rule the difference is an expected one
(:mod:`iovirt.crosscheck.expected_table`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from iovirt.crosscheck.qtest import QtestClient
from iovirt.memory import GuestMemory
from iovirt.pci.bar import Bar, BarKind
from iovirt.pci.bridge import PciBridge
from iovirt.pci.capability import walk_capabilities
from iovirt.pci.host import CONFIG_ADDRESS_ENABLE, CONFIG_ADDRESS_PORT, CONFIG_DATA_PORT, PciHost
from iovirt.pci.pcie import (
    PCI_EXP_DEVCAP2,
    PCI_EXP_DEVCTL,
    PCI_EXP_DEVCTL2,
    PCI_EXP_LNKCAP,
    PCI_EXP_LNKCAP2,
    PCI_EXP_LNKCTL,
    PCI_EXP_LNKCTL2,
    PcieCapability,
    PciePortType,
)
from iovirt.pci.regs import (
    PCI_CAP_ID_EXP,
    PCI_CAP_ID_MSIX,
    PCI_CAP_ID_PM,
    PCI_CAP_ID_VNDR,
    PCI_MSIX_FLAGS,
    PCI_MSIX_FLAGS_QSIZE,
    PCI_PM_CTRL,
    PCI_PRIMARY_BUS,
    PCI_ROM_ADDRESS,
    PCI_ROM_ADDRESS_MASK,
)
from iovirt.virtio.net.device import VirtioNet
from iovirt.virtio.transport.defs import VIRTIO_PCI_CAP_CFG_TYPE, VIRTIO_PCI_CAP_LENGTH
from iovirt.virtio.transport.pci import CapabilityLayout, VirtioPciFunction

ROOT_PORT_SLOT = 0x1C
ENDPOINT_BUS = 1
ENDPOINT_BDF = ENDPOINT_BUS << 8  # 01:00.0
ROOT_PORT_BDF = ROOT_PORT_SLOT << 3  # 00:1c.0
# Primary 0, secondary 1, subordinate 1.
ROOT_PORT_BUSES = ENDPOINT_BUS << 8 | ENDPOINT_BUS << 16
QEMU_ROOT_PORT_IDS = (0x1B36, 0x000C)  # Red Hat PCIe root port
MAC = bytes.fromhex("525400123456")  # QEMU's default MAC
PCI_EXP_DEVCTL_BCR_FLR = 0x8000  # Initiate Function Level Reset (PCIe §7.5.3.4)

QEMU_DEVICE_ARGS = (
    "-device", f"pcie-root-port,id=rp0,bus=pcie.0,addr={ROOT_PORT_SLOT:#x}.0,chassis=1",
    "-device", "virtio-net-pci,id=nic0,disable-legacy=on,bus=rp0,addr=0",
)

_VIRTIO_NAMES = {1: "common", 2: "notify", 3: "isr", 4: "device", 5: "pci_cfg"}
_CAP_NAMES = {PCI_CAP_ID_EXP: "pcie", PCI_CAP_ID_PM: "pm", PCI_CAP_ID_MSIX: "msix"}


def config_address(bdf: int, offset: int) -> int:
    """CONFIG_ADDRESS for register ``offset`` of ``bdf`` (bus << 8 | devfn)."""
    return CONFIG_ADDRESS_ENABLE | bdf << 8 | (offset & 0xFC)


def config_commands(bdf: int, kind: str, offset: int, size: int, value: int = 0) -> list[str]:
    """The qtest commands of one config access through 0xCF8/0xCFC."""
    select = QtestClient.out_cmd(CONFIG_ADDRESS_PORT, 4, config_address(bdf, offset))
    port = CONFIG_DATA_PORT + (offset & 3)
    if kind == "r":
        return [select, QtestClient.in_cmd(port, size)]
    return [select, QtestClient.out_cmd(port, size, value)]


def qemu_config_read(qemu: QtestClient, bdf: int, offset: int, size: int) -> int:
    """One config read on QEMU."""
    return int(qemu.batch(config_commands(bdf, "r", offset, size))[1], 16)


def qemu_config_write(qemu: QtestClient, bdf: int, offset: int, size: int, value: int) -> None:
    """One config write on QEMU."""
    qemu.batch(config_commands(bdf, "w", offset, size, value))


def iovirt_config_read(host: PciHost, bdf: int, offset: int, size: int) -> int:
    """One config read through iovirt's host, the same ports."""
    host.io_write(CONFIG_ADDRESS_PORT, 4, config_address(bdf, offset))
    return host.io_read(CONFIG_DATA_PORT + (offset & 3), size)


def iovirt_config_write(host: PciHost, bdf: int, offset: int, size: int, value: int) -> None:
    """One config write through iovirt's host."""
    host.io_write(CONFIG_ADDRESS_PORT, 4, config_address(bdf, offset))
    host.io_write(CONFIG_DATA_PORT + (offset & 3), size, value)


def start_qemu(extra_args: Sequence[str] = ()) -> QtestClient:
    """QEMU with the root port and the endpoint, bus numbers programmed."""
    qemu = QtestClient([*QEMU_DEVICE_ARGS, *extra_args])
    try:
        qemu_config_write(qemu, ROOT_PORT_BDF, PCI_PRIMARY_BUS, 4, ROOT_PORT_BUSES)
    except BaseException:
        qemu.close()
        raise
    return qemu


def rom_size(qemu: QtestClient) -> int:
    """The size of QEMU's expansion ROM BAR (0 if none), by sizing it (PCI 3.0 §6.2.5.2); the BAR is restored."""
    old = qemu_config_read(qemu, ENDPOINT_BDF, PCI_ROM_ADDRESS, 4)
    qemu_config_write(qemu, ENDPOINT_BDF, PCI_ROM_ADDRESS, 4, PCI_ROM_ADDRESS_MASK)
    mask = qemu_config_read(qemu, ENDPOINT_BDF, PCI_ROM_ADDRESS, 4) & PCI_ROM_ADDRESS_MASK
    qemu_config_write(qemu, ENDPOINT_BDF, PCI_ROM_ADDRESS, 4, old)
    return (~mask + 1) & 0xFFFFFFFF if mask else 0


def discover_layout(qemu: QtestClient) -> tuple[CapabilityLayout, int]:
    """QEMU's capability chain as ``[(name, offset), …]`` and its MSI-X table size."""
    def read(offset: int, size: int) -> int:
        return qemu_config_read(qemu, ENDPOINT_BDF, offset, size)

    layout: list[tuple[str, int | None]] = []
    vectors = 0
    for cap_id, offset in walk_capabilities(read):
        if cap_id == PCI_CAP_ID_VNDR:
            name = _VIRTIO_NAMES[read(offset + VIRTIO_PCI_CAP_CFG_TYPE, 1)]
        else:
            name = _CAP_NAMES[cap_id]
        if name == "msix":
            vectors = (read(offset + PCI_MSIX_FLAGS, 2) & PCI_MSIX_FLAGS_QSIZE) + 1
        layout.append((name, offset))
    return layout, vectors


@dataclass(frozen=True)
class DeviceChoice:
    """A register where the spec leaves the device a choice and iovirt's endpoint is given QEMU's.

    ``value`` (and ``wmask``, if not None) of the ``size``-byte register at
    ``offset`` within capability ``cap``; ``why`` says which clause allows both.
    """

    cap: str
    offset: int
    size: int
    value: int
    wmask: int | None
    why: str


DEVICE_CHOICES = (
    DeviceChoice("pcie", PCI_EXP_DEVCTL, 2, 0, 0x000F,
                 "Device Control: Relaxed Ordering and No Snoop Enable may be hardwired to 0 by a function that "
                 "never sets those attributes, Max_Read_Request_Size may be RO 000b (PCIe 4.0 §7.5.3.4)"),
    DeviceChoice("pcie", PCI_EXP_LNKCAP, 4, 0x411, None,
                 "Link Capabilities: ASPM Support is the device's choice (PCIe 4.0 §7.5.3.6); QEMU advertises L0s"),
    DeviceChoice("pcie", PCI_EXP_LNKCTL, 2, 0, 0x00C3,
                 "Link Control: Read Completion Boundary is optional for endpoints and hardwired to 0 when not "
                 "implemented (§7.5.3.7); QEMU does not implement it"),
    DeviceChoice("pcie", PCI_EXP_DEVCAP2, 4, 0x00300000, None,
                 "Device Capabilities 2: Extended Fmt Field and End-End TLP Prefix support are optional (§7.5.3.15)"),
    DeviceChoice("pcie", PCI_EXP_DEVCTL2, 2, 0, 0x8000,
                 "Device Control 2: Completion Timeout Disable may be hardwired to 0 when its capability bit is "
                 "clear; End-End TLP Prefix Blocking is RW when End-End TLP Prefixes are supported (§7.5.3.16)"),
    DeviceChoice("pcie", PCI_EXP_LNKCAP2, 4, 0, None,
                 "Link Capabilities 2: a component of PCIe 2.x compliance at 2.5 GT/s reports no speed vector "
                 "(Max Link Speed 0001b then means 2.5 GT/s, §7.5.3.6)"),
    DeviceChoice("pcie", PCI_EXP_LNKCTL2, 2, 0, 0,
                 "Link Control 2: components that support only 2.5 GT/s may hardwire Target Link Speed to 0 (§7.5.3.19)"),
    DeviceChoice("pm", PCI_PM_CTRL, 2, 0, None,
                 "PMCSR No_Soft_Reset is the device's choice (PCI PM 1.2 §3.2.4); QEMU's endpoint clears it"),
    DeviceChoice("common", VIRTIO_PCI_CAP_LENGTH, 4, 0x1000, None,
                 "virtio_pci_cap.length may exceed the structure (virtio 1.2 §4.1.4); QEMU gives each a 4 KiB slot"),
    DeviceChoice("isr", VIRTIO_PCI_CAP_LENGTH, 4, 0x1000, None,
                 "virtio_pci_cap.length may exceed the structure (virtio 1.2 §4.1.4); QEMU gives each a 4 KiB slot"),
)


def build_iovirt(layout: CapabilityLayout, vectors: int, rom_size: int = 0) -> tuple[PciHost, VirtioPciFunction]:
    """iovirt's root port and endpoint, in QEMU's layout and :data:`DEVICE_CHOICES`, bus numbers programmed.

    ``rom_size`` adds an expansion ROM BAR of that size (QEMU's virtio-net-pci has one for iPXE).
    """
    host = PciHost()
    root_port = PciBridge(*QEMU_ROOT_PORT_IDS, pcie=True)
    root_port.add_capability(PcieCapability(PciePortType.ROOT_PORT, slot=True))
    host.root_bus.add_function(root_port, ROOT_PORT_SLOT)
    memory = GuestMemory.from_ranges([(0, 1 << 20)], backing="bytes")
    endpoint = VirtioPciFunction(VirtioNet(MAC), memory, capability_layout=layout, msix_vectors=vectors)
    if rom_size:
        endpoint.add_rom(Bar(rom_size, BarKind.ROM))
    offsets = dict(layout)
    cfg = endpoint.config
    for choice in DEVICE_CHOICES:
        base = offsets.get(choice.cap)
        if base is None:
            continue
        cfg.set_default(base + choice.offset, choice.size, choice.value)
        if choice.wmask is not None:
            cfg.set_wmask(base + choice.offset, choice.size, choice.wmask)
    root_port.secondary_bus.add_function(endpoint, 0)
    iovirt_config_write(host, ROOT_PORT_BDF, PCI_PRIMARY_BUS, 4, ROOT_PORT_BUSES)
    return host, endpoint


def flr_offset(layout: CapabilityLayout) -> int:
    """Where Device Control is: writing Initiate FLR there resets the endpoint on both sides."""
    pcie = dict(layout)["pcie"]
    assert pcie is not None
    return pcie + PCI_EXP_DEVCTL
