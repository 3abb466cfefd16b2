"""MSI delivery into a VM's vLAPICs, optionally through an interrupt remapper.

Compatibility-format MSI (Intel SDM 11.11): address ``0xFEE`` in bits 31:20,
destination ID in 19:12, redirection hint bit 3, destination mode bit 2
(1 = logical); data: vector 7:0, delivery mode 10:8, trigger mode bit 15.
Remappable format (VT-d spec 5.1.2.2) has address bit 4 set.  With a
remapper (the VT-d model) in front, every MSI is handed to it, and it returns
a compatibility-format message or blocks it; without one, remappable MSIs
are dropped.
"""

from __future__ import annotations

import logging
from typing import Protocol

from iovirt.timer.bus import ApicBus

log = logging.getLogger(__name__)

MSI_ADDR_BASE_SHIFT = 20
MSI_ADDR_BASE = 0xFEE
MSI_ADDR_DEST_SHIFT = 12
MSI_ADDR_REMAPPABLE = 1 << 4
MSI_ADDR_REDIRECTION_HINT = 1 << 3
MSI_ADDR_DEST_LOGICAL = 1 << 2
MSI_DATA_LEVEL_TRIGGER = 1 << 15


class MsiRemapper(Protocol):
    """An interrupt remapping unit (VT-d IRTE lookup)."""

    def remap_msi(self, source_id: int, address: int, data: int) -> tuple[int, int] | None:
        """Translate an MSI (either format) to a compatibility-format ``(address, data)``,
        or return None when it is blocked (the remapper records the fault)."""
        ...


class InterruptRouter:
    """The platform's MSI sink for one VM: decodes MSIs and delivers them on its APIC bus.

    ``deliver_msi`` never raises: a malformed or blocked MSI is logged and
    counted in ``dropped`` / ``blocked``.
    """

    def __init__(self, bus: ApicBus, remapper: MsiRemapper | None = None) -> None:
        self.bus = bus
        self.remapper = remapper
        self.delivered = 0
        self.dropped = 0
        self.blocked = 0

    def deliver_msi(self, source_id: int, address: int, data: int) -> None:
        """Deliver the MSI a device with requester ID ``source_id`` wrote."""
        if address >> MSI_ADDR_BASE_SHIFT & 0xFFF != MSI_ADDR_BASE or address >> 32:
            self._drop(source_id, address, data, "address is outside 0xFEE00000-0xFEEFFFFF")
            return
        if self.remapper is not None:
            # Every MSI goes to the remapper: with interrupt remapping on and
            # compatibility format disallowed (GSTS.CFIS=0) a compatibility-format
            # MSI is blocked with fault 0x25 (VT-d 5.1.2.1); the remapper passes
            # it through when remapping is off or compatibility format is allowed.
            remapped = self.remapper.remap_msi(source_id, address, data)
            if remapped is None:
                self.blocked += 1
                return
            address, data = remapped
            if address >> MSI_ADDR_BASE_SHIFT & 0xFFF != MSI_ADDR_BASE or address & MSI_ADDR_REMAPPABLE:
                self._drop(source_id, address, data, "remapper returned a non-compatibility-format MSI")
                return
        elif address & MSI_ADDR_REMAPPABLE:
            self._drop(source_id, address, data, "remappable format but no interrupt remapper")
            return
        accepted = self.bus.deliver(
            dest=(address >> MSI_ADDR_DEST_SHIFT) & 0xFF,
            logical=bool(address & MSI_ADDR_DEST_LOGICAL),
            delivery_mode=(data >> 8) & 7,
            vector=data & 0xFF,
            level=bool(data & MSI_DATA_LEVEL_TRIGGER),
            # A set redirection hint makes the message lowest-priority (KVM kvm_set_msi_irq).
            lowest_priority=bool(address & MSI_ADDR_REDIRECTION_HINT),
        )
        if accepted:
            self.delivered += 1
        else:
            self.dropped += 1

    def _drop(self, source_id: int, address: int, data: int, why: str) -> None:
        self.dropped += 1
        log.warning("MSI from %#06x (address %#x, data %#x) dropped: %s", source_id, address, data, why)
