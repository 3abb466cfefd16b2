"""The Power Management capability (PCI Bus Power Management Interface 1.2 §3.2)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from iovirt.pci.capability import Capability
from iovirt.pci.regs import (
    PCI_CAP_ID_PM,
    PCI_PM_CTRL,
    PCI_PM_CTRL_NO_SOFT_RESET,
    PCI_PM_CTRL_PME_ENABLE,
    PCI_PM_CTRL_PME_STATUS,
    PCI_PM_CTRL_STATE_MASK,
    PCI_PM_PMC,
)

if TYPE_CHECKING:
    from iovirt.pci.function import PciFunction

log = logging.getLogger(__name__)

D0, D1, D2, D3HOT = 0, 1, 2, 3

_PMC_VERSION_1_2 = 3
_PMC_D1 = 1 << 9
_PMC_D2 = 1 << 10


class PmCapability(Capability):
    """Power Management: PMC and PMCSR (PowerState, No_Soft_Reset, PME).

    ``PmCapability(*, d1=False, d2=False, pme_support=0, no_soft_reset=True)``;
    ``pme_support`` is the 5-bit PME_Support field (bit 0 = D0 … bit 4 = D3cold).
    Writing an unsupported PowerState is discarded (PM 1.2 §3.2.4).
    """

    cap_id = PCI_CAP_ID_PM
    size = 8

    def __init__(
        self, *, d1: bool = False, d2: bool = False, pme_support: int = 0, no_soft_reset: bool = True
    ) -> None:
        super().__init__()
        self.d1 = d1
        self.d2 = d2
        self.pme_support = pme_support & 0x1F
        self.no_soft_reset = no_soft_reset

    def install(self, function: PciFunction, offset: int) -> None:
        super().install(function, offset)
        cfg = function.config
        pmc = _PMC_VERSION_1_2 | (self.pme_support << 11)
        pmc |= (_PMC_D1 if self.d1 else 0) | (_PMC_D2 if self.d2 else 0)
        cfg.init(offset + PCI_PM_PMC, 2, pmc)
        wmask = PCI_PM_CTRL_STATE_MASK | (PCI_PM_CTRL_PME_ENABLE if self.pme_support else 0)
        w1c = PCI_PM_CTRL_PME_STATUS if self.pme_support else 0
        cfg.init(
            offset + PCI_PM_CTRL, 2,
            PCI_PM_CTRL_NO_SOFT_RESET if self.no_soft_reset else 0, wmask, w1c,
        )
        # PMCSR_BSE and Data (bytes 6-7) are unimplemented and read 0.
        cfg.add_hook(offset + PCI_PM_CTRL, 4, self)

    @property
    def power_state(self) -> int:
        """Current PowerState (0 = D0 … 3 = D3hot)."""
        assert self.function is not None
        return self.function.config.get(self.offset + PCI_PM_CTRL, 2) & PCI_PM_CTRL_STATE_MASK

    def config_read(self, offset: int, size: int) -> int:
        """PMCSR reads as stored."""
        assert self.function is not None
        return self.function.config.get(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        """Masked write; an unsupported PowerState leaves the old state."""
        assert self.function is not None
        cfg = self.function.config
        old_state = self.power_state
        cfg.default_write(offset, size, value)
        state = self.power_state
        if (state == D1 and not self.d1) or (state == D2 and not self.d2):
            log.debug("%s: write of unsupported power state D%d discarded", self.function, state)
            pmcsr = self.offset + PCI_PM_CTRL
            cfg.set(pmcsr, 2, (cfg.get(pmcsr, 2) & ~PCI_PM_CTRL_STATE_MASK) | old_state)
