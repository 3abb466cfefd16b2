"""The APIC bus of one VM: destination decoding and delivery to its vLAPICs.

Inter-processor interrupts (ICR writes) and MSIs end here.  Destination
matching is SDM 11.6.2 (physical, logical flat/cluster, x2APIC cluster,
broadcast); lowest-priority delivery picks among the matching APICs with the
lowest processor priority, ties broken as KVM's vector hashing does
(``kvm_vector_to_index``: the ``vector % n``-th candidate).
"""

from __future__ import annotations

import logging

from iovirt.timer.config import ApicConfig
from iovirt.timer.lapic import PendingCallback, ServiceRoutine, VirtualLapic
from iovirt.timer.mux import TimerMultiplexer
from iovirt.timer.regs import (
    APIC_DEST_LOGICAL,
    APIC_INT_LEVELTRIG,
    APIC_SHORT_SHIFT,
    APIC_VECTOR_MASK,
    DM_FIXED,
    DM_LOWEST,
    DM_NMI,
    ESR_SEND_ILLEGAL_VECTOR,
    MIN_VALID_VECTOR,
    SHORTHAND_ALL_BUT_SELF,
    SHORTHAND_ALL_INC_SELF,
    SHORTHAND_NONE,
    SHORTHAND_SELF,
)

log = logging.getLogger(__name__)


class ApicBus:
    """The vLAPICs of one VM (one per vCPU, APIC ID = vCPU index) and their bus.

    Every vLAPIC's timer is armed on the shared ``mux``, so all VMs built on
    one multiplexer share its single host timer.
    """

    def __init__(
        self,
        mux: TimerMultiplexer,
        num_vcpus: int,
        config: ApicConfig | None = None,
        service_routine: ServiceRoutine | None = None,
        on_pending: PendingCallback | None = None,
    ) -> None:
        self.mux = mux
        self.config = config if config is not None else ApicConfig()
        self.lapics = [VirtualLapic(i, self, service_routine, on_pending) for i in range(num_vcpus)]
        self.undeliverable = 0  # messages that matched no APIC or used an unmodelled mode

    def deliver(
        self,
        dest: int,
        logical: bool,
        delivery_mode: int,
        vector: int,
        level: bool = False,
        x2apic_format: bool = False,
        lowest_priority: bool = False,
    ) -> int:
        """Deliver an interrupt message; return how many APICs accepted it.

        ``x2apic_format`` means a 32-bit destination (x2APIC ICR) rather than
        8 bits (xAPIC ICR, MSI).  ``lowest_priority`` forces lowest-priority
        arbitration, as an MSI's redirection hint does.
        """
        targets = [
            lapic
            for lapic in self.lapics
            if lapic.hw_enabled
            and (lapic.matches_logical(dest, x2apic_format) if logical
                 else lapic.matches_physical(dest, x2apic_format))
        ]
        return self._deliver_to(targets, delivery_mode, vector, level, lowest_priority)

    def send_ipi(self, source: VirtualLapic, icr: int, dest: int, x2apic_format: bool) -> int:
        """Send the IPI described by ICR bits 31:0 from ``source`` (SDM 11.6.1)."""
        vector = icr & APIC_VECTOR_MASK
        mode = (icr >> 8) & 7
        if mode in (DM_FIXED, DM_LOWEST) and vector < MIN_VALID_VECTOR:
            source.record_error(ESR_SEND_ILLEGAL_VECTOR)
            return 0
        level = bool(icr & APIC_INT_LEVELTRIG)
        shorthand = (icr >> APIC_SHORT_SHIFT) & 3
        if shorthand == SHORTHAND_NONE:
            return self.deliver(dest, bool(icr & APIC_DEST_LOGICAL), mode, vector, level, x2apic_format)
        if shorthand == SHORTHAND_SELF:
            targets = [source]
        elif shorthand == SHORTHAND_ALL_INC_SELF:
            targets = [lapic for lapic in self.lapics if lapic.hw_enabled]
        else:
            assert shorthand == SHORTHAND_ALL_BUT_SELF
            targets = [lapic for lapic in self.lapics if lapic.hw_enabled and lapic is not source]
        return self._deliver_to(targets, mode, vector, level, False)

    def _deliver_to(
        self,
        targets: list[VirtualLapic],
        mode: int,
        vector: int,
        level: bool,
        lowest_priority: bool,
    ) -> int:
        if not targets:
            self.undeliverable += 1
            log.info("interrupt vector %#x (mode %d) matched no vLAPIC; dropped", vector, mode)
            return 0
        if mode == DM_LOWEST or (lowest_priority and mode == DM_FIXED):
            lowest = min(lapic.ppr & 0xF0 for lapic in targets)
            candidates = [lapic for lapic in targets if lapic.ppr & 0xF0 == lowest]
            targets = [candidates[vector % len(candidates)]]
            mode = DM_FIXED
        if mode == DM_FIXED:
            return sum(lapic.accept_irq(vector, level) for lapic in targets)
        if mode == DM_NMI:
            for lapic in targets:
                lapic.nmi_pending += 1
            return len(targets)
        self.undeliverable += 1
        log.info("interrupt delivery mode %d (SMI/INIT/SIPI/ExtINT) is not modelled; dropped", mode)
        return 0
