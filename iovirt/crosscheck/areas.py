"""The areas ``iovirt crosscheck`` knows, by name."""

from __future__ import annotations

from typing import Callable

from iovirt.crosscheck.area import Area
from iovirt.crosscheck.msix import MsixArea
from iovirt.crosscheck.pci_config import PciConfigArea
from iovirt.crosscheck.sriov import SriovArea
from iovirt.crosscheck.vtd_dma import VtdDmaArea
from iovirt.crosscheck.vtd_regs import VtdRegsArea

AREAS: dict[str, Callable[[], Area]] = {
    PciConfigArea.name: PciConfigArea,
    MsixArea.name: MsixArea,
    VtdRegsArea.name: VtdRegsArea,
    SriovArea.name: SriovArea,
    VtdDmaArea.name: VtdDmaArea,
}
