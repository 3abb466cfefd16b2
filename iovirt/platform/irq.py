"""The guest kernel's interrupt bookkeeping: vectors per vCPU, MSI messages, handlers.

:class:`IrqDomain` hands out ``(apic_id, vector)`` pairs round-robin over the
vCPUs (as Linux spreads device vectors), composes the MSI message a driver
programs into a device -- compatibility format (Intel SDM 11.11), or with
interrupt remapping on, a remappable-format message whose IRTE (VT-d 9.10)
it writes through the :class:`~iovirt.vtd.driver.VtdDriver`, as Linux's
``intel_irq_remapping`` does -- and runs the handler registered for a vector
when a vCPU acknowledges it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from iovirt.platform.errors import PlatformError
from iovirt.timer.bus import ApicBus
from iovirt.timer.lapic import VirtualLapic
from iovirt.timer.msi import MSI_ADDR_DEST_SHIFT
from iovirt.vtd.driver import VtdDriver
from iovirt.vtd.irq import SVT_SID, remappable_msi

log = logging.getLogger(__name__)

Handler = Callable[[], None]

MSI_ADDR_BASE = 0xFEE00000
FIRST_DEVICE_VECTOR = 0x30  # Linux's FIRST_EXTERNAL_VECTOR + legacy IRQs
LAST_DEVICE_VECTOR = 0xEF  # below the system vectors


@dataclass(frozen=True)
class IrqVector:
    """One allocated interrupt: where it lands and the MSI message that gets it there."""

    apic_id: int
    vector: int
    address: int
    data: int


class IrqDomain:
    """Vector allocation, MSI composition and dispatch for the vLAPICs of one VM."""

    def __init__(self, bus: ApicBus) -> None:
        self.bus = bus
        self.vtd: VtdDriver | None = None
        self._handlers: dict[tuple[int, int], Handler] = {}
        self._next = 0
        self._next_irte = 0
        for lapic in bus.lapics:
            lapic.service_routine = self._service

    def enable_remapping(self, vtd: VtdDriver) -> None:
        """Compose remappable-format messages from now on (the IRT must be set up)."""
        self.vtd = vtd

    def allocate(self, source_id: int, handler: Handler) -> IrqVector:
        """A new vector for a device with requester ID ``source_id``; ``handler`` runs when it is taken."""
        count = LAST_DEVICE_VECTOR - FIRST_DEVICE_VECTOR + 1
        n = self._next
        if n >= count * len(self.bus.lapics):
            raise PlatformError(f"all {count} device vectors of {len(self.bus.lapics)} vCPUs are allocated")
        self._next += 1
        apic_id = n % len(self.bus.lapics)
        vector = FIRST_DEVICE_VECTOR + n // len(self.bus.lapics)
        self._handlers[(apic_id, vector)] = handler
        if self.vtd is None:
            address, data = MSI_ADDR_BASE | apic_id << MSI_ADDR_DEST_SHIFT, vector
        else:
            index = self._next_irte
            self._next_irte += 1
            # Source-id validation on, as Linux sets it (SVT=1, SQ=0: the exact requester).
            self.vtd.set_irte(index, vector, apic_id, svt=SVT_SID, sid=source_id)
            address, data = remappable_msi(index)
        return IrqVector(apic_id, vector, address, data)

    def _service(self, lapic: VirtualLapic, vector: int) -> None:
        handler = self._handlers.get((lapic.apic_id, vector))
        if handler is None:
            log.warning("vCPU %d: spurious device vector %#x", lapic.apic_id, vector)
            return
        handler()

    def service(self) -> int:
        """Every vCPU takes (acknowledges, handles, EOIs) what is pending; returns how many."""
        taken = 0
        for lapic in self.bus.lapics:
            while lapic.ack() is not None:
                lapic.eoi()
                taken += 1
        return taken
