"""The PCI Express capability (PCIe Base Specification §7.5.3), version 2.

Models what a virtual device needs: the Device/Port Type, device and link
capabilities of a x1 2.5 GT/s link that is up, writable control fields,
RW1C status bits, Function Level Reset for endpoints (§6.6.2: Initiate FLR
resets the function), and slot/root registers for root ports.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from iovirt.pci.capability import Capability
from iovirt.pci.regs import PCI_CAP_ID_EXP

if TYPE_CHECKING:
    from iovirt.pci.function import PciFunction

PCI_EXP_FLAGS = 0x02
PCI_EXP_DEVCAP = 0x04
PCI_EXP_DEVCTL = 0x08
PCI_EXP_DEVSTA = 0x0A
PCI_EXP_LNKCAP = 0x0C
PCI_EXP_LNKCTL = 0x10
PCI_EXP_LNKSTA = 0x12
PCI_EXP_SLTCAP = 0x14
PCI_EXP_SLTCTL = 0x18
PCI_EXP_SLTSTA = 0x1A
PCI_EXP_RTCTL = 0x1C
PCI_EXP_RTCAP = 0x1E
PCI_EXP_RTSTA = 0x20
PCI_EXP_DEVCAP2 = 0x24
PCI_EXP_DEVCTL2 = 0x28
PCI_EXP_LNKCAP2 = 0x2C
PCI_EXP_LNKCTL2 = 0x30

PCI_EXP_FLAGS_VERS2 = 0x0002
PCI_EXP_FLAGS_SLOT = 0x0100
PCI_EXP_DEVCAP_RBER = 1 << 15
PCI_EXP_DEVCAP_FLR = 1 << 28
# Error reporting enables, Relaxed Ordering, No Snoop, Max Read Request.
# Max_Payload_Size is hardwired to 128 bytes, the only size Device
# Capabilities advertises (software must not be able to set a larger one);
# Extended Tag, Phantom Functions and Aux Power PM Enable are hardwired to 0
# because their capabilities are not advertised (PCIe 3.0 §7.8.4).
PCI_EXP_DEVCTL_WRITABLE = 0x781F
# Relaxed Ordering, No Snoop, 512-byte Max Read Request: the reset values.
PCI_EXP_DEVCTL_DEFAULT = 0x2810
PCI_EXP_DEVSTA_W1C = 0x000F
PCI_EXP_LNKCAP_DLLLARC = 1 << 20
PCI_EXP_LNKCTL_ENDPOINT_WRITABLE = 0x00CB  # ASPM, RCB, Common Clock, Extended Synch
PCI_EXP_LNKCTL_LD = 0x0010
PCI_EXP_LNKSTA_DLLLA = 0x2000
PCI_EXP_SLTCTL_WRITABLE = 0x1FFF
PCI_EXP_SLTSTA_W1C = 0x011F
PCI_EXP_SLTSTA_PDS = 0x0040
PCI_EXP_RTCTL_WRITABLE = 0x001F
PCI_EXP_RTSTA_PME = 0x00010000
PCI_EXP_DEVCAP2_ARI = 0x0020
PCI_EXP_DEVCTL2_COMP_TMOUT_DIS = 0x0010
PCI_EXP_DEVCTL2_ARI = 0x0020


class PciePortType(enum.IntEnum):
    """Device/Port Type field of PCI Express Capabilities (§7.5.3.2)."""

    ENDPOINT = 0x0
    LEGACY_ENDPOINT = 0x1
    ROOT_PORT = 0x4
    UPSTREAM_PORT = 0x5
    DOWNSTREAM_PORT = 0x6
    PCIE_TO_PCI_BRIDGE = 0x7
    PCI_TO_PCIE_BRIDGE = 0x8
    RC_INTEGRATED_ENDPOINT = 0x9
    RC_EVENT_COLLECTOR = 0xA


_PORTS = (PciePortType.ROOT_PORT, PciePortType.DOWNSTREAM_PORT)
_ENDPOINTS = (
    PciePortType.ENDPOINT,
    PciePortType.LEGACY_ENDPOINT,
    PciePortType.RC_INTEGRATED_ENDPOINT,
)


class PcieCapability(Capability):
    """The PCI Express capability (60 bytes, version 2).

    ``PcieCapability(port_type=PciePortType.ENDPOINT, *, link_speed=1,
    link_width=1, port_number=0, slot=False, flr=True)``: ``link_speed`` is
    the Supported Link Speeds index (1 = 2.5 GT/s); ``slot`` adds a slot to a
    root or downstream port; ``flr`` advertises Function Level Reset on an
    endpoint.  Root-complex integrated endpoints have no link registers.
    """

    cap_id = PCI_CAP_ID_EXP
    size = 0x3C

    def __init__(
        self,
        port_type: PciePortType = PciePortType.ENDPOINT,
        *,
        link_speed: int = 1,
        link_width: int = 1,
        port_number: int = 0,
        slot: bool = False,
        flr: bool = True,
    ) -> None:
        super().__init__()
        self.port_type = PciePortType(port_type)
        self.link_speed = link_speed
        self.link_width = link_width
        self.port_number = port_number
        self.slot = slot and self.port_type in _PORTS
        self.flr = flr and self.port_type in _ENDPOINTS

    def install(self, function: PciFunction, offset: int) -> None:
        super().install(function, offset)
        cfg = function.config
        port = self.port_type in _PORTS
        has_link = self.port_type != PciePortType.RC_INTEGRATED_ENDPOINT

        flags = PCI_EXP_FLAGS_VERS2 | self.port_type << 4
        cfg.init(offset + PCI_EXP_FLAGS, 2, flags | (PCI_EXP_FLAGS_SLOT if self.slot else 0))
        devcap = PCI_EXP_DEVCAP_RBER | (PCI_EXP_DEVCAP_FLR if self.flr else 0)
        cfg.init(offset + PCI_EXP_DEVCAP, 4, devcap)
        cfg.init(offset + PCI_EXP_DEVCTL, 2, PCI_EXP_DEVCTL_DEFAULT, PCI_EXP_DEVCTL_WRITABLE)
        cfg.init(offset + PCI_EXP_DEVSTA, 2, 0, 0, PCI_EXP_DEVSTA_W1C)
        if has_link:
            lnkcap = self.link_speed | self.link_width << 4 | self.port_number << 24
            cfg.init(offset + PCI_EXP_LNKCAP, 4, lnkcap | (PCI_EXP_LNKCAP_DLLLARC if port else 0))
            lnkctl_wmask = PCI_EXP_LNKCTL_ENDPOINT_WRITABLE | (PCI_EXP_LNKCTL_LD if port else 0)
            cfg.init(offset + PCI_EXP_LNKCTL, 2, 0, lnkctl_wmask)
            lnksta = self.link_speed | self.link_width << 4
            cfg.init(offset + PCI_EXP_LNKSTA, 2, lnksta | (PCI_EXP_LNKSTA_DLLLA if port else 0))
            # Supported Link Speeds Vector: every speed up to the maximum.
            cfg.init(offset + PCI_EXP_LNKCAP2, 4, (1 << (self.link_speed + 1)) - 2)
            cfg.init(offset + PCI_EXP_LNKCTL2, 2, self.link_speed, 0x000F)
        if self.slot:
            cfg.init(offset + PCI_EXP_SLTCAP, 4, 0)
            cfg.init(offset + PCI_EXP_SLTCTL, 2, 0, PCI_EXP_SLTCTL_WRITABLE)
            cfg.init(offset + PCI_EXP_SLTSTA, 2, PCI_EXP_SLTSTA_PDS, 0, PCI_EXP_SLTSTA_W1C)
        if self.port_type == PciePortType.ROOT_PORT:
            cfg.init(offset + PCI_EXP_RTCTL, 2, 0, PCI_EXP_RTCTL_WRITABLE)
            cfg.init(offset + PCI_EXP_RTSTA, 4, 0, 0, PCI_EXP_RTSTA_PME)
        # Ports forward ARI (needed by SR-IOV VFs beyond device 0 behind them).
        cfg.init(offset + PCI_EXP_DEVCAP2, 4, PCI_EXP_DEVCAP2_ARI if port else 0)
        devctl2_wmask = PCI_EXP_DEVCTL2_COMP_TMOUT_DIS | (PCI_EXP_DEVCTL2_ARI if port else 0)
        cfg.init(offset + PCI_EXP_DEVCTL2, 2, 0, devctl2_wmask)
        if self.flr:
            cfg.add_hook(offset + PCI_EXP_DEVCTL, 4, self)

    # ConfigHook on Device Control/Status (only with FLR).
    def config_read(self, offset: int, size: int) -> int:
        """Read as stored; Initiate FLR always reads 0."""
        assert self.function is not None
        return self.function.config.get(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        """Masked write; writing 1 to Initiate Function Level Reset resets the function."""
        function = self.function
        assert function is not None
        function.config.default_write(offset, size, value)
        # Bit 15 of Device Control, located within this access (if it is).
        bit = (self.offset + PCI_EXP_DEVCTL - offset) * 8 + 15
        if 0 <= bit < size * 8 and value >> bit & 1:
            function.reset()
