"""Config-space access the way a guest kernel makes it: through the host bridge's ECAM window."""

from __future__ import annotations

from iovirt.pci.host import PciHost
from iovirt.pci.regs import PCI_HEADER_TYPE, PCI_HEADER_TYPE_MULTI_FUNCTION, PCI_VENDOR_ID


class EcamConfig:
    """Config reads and writes of one ``bus:device.fn`` through ECAM (PCIe 7.2.2).

    The guest-facing window never raises: an absent function reads all-ones.
    """

    def __init__(self, host: PciHost, bus: int, device: int, fn: int) -> None:
        self.host = host
        self.bus, self.device, self.fn = bus, device, fn
        self.base = bus << 20 | device << 15 | fn << 12

    @property
    def requester_id(self) -> int:
        """``bus << 8 | device << 3 | fn``."""
        return self.bus << 8 | self.device << 3 | self.fn

    def read(self, offset: int, size: int) -> int:
        """Config read of ``size`` bytes at ``offset``."""
        return self.host.ecam_read(self.base | offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        """Config write of ``size`` bytes at ``offset``."""
        self.host.ecam_write(self.base | offset, size, value)


def scan(host: PciHost, bus: int = 0) -> list[EcamConfig]:
    """Every function present on ``bus`` (vendor ID not 0xFFFF), as Linux's ``pci_scan_slot`` finds them."""
    found = []
    for device in range(32):
        for fn in range(8):
            cfg = EcamConfig(host, bus, device, fn)
            if cfg.read(PCI_VENDOR_ID, 2) == 0xFFFF:
                if fn == 0:
                    break
                continue
            found.append(cfg)
            if fn == 0 and not cfg.read(PCI_HEADER_TYPE, 1) & PCI_HEADER_TYPE_MULTI_FUNCTION:
                break  # not multi-function
    return found
