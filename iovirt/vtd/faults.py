"""Fault reasons, primary fault logging and the fault event.

VT-d spec 7.2 (fault conditions and reasons, appendix "Non-recoverable
fault reason encodings"), 7.3.1 (primary fault logging) and 7.4 (fault
event).  Faults are recorded in the fault recording registers (FRCD) in
round-robin order starting at FSTS.FRI; a fault that finds its record still
holding an unserviced fault sets FSTS.PFO and is dropped, as is every fault
while PFO stays set.  A fault event interrupt goes out only when no earlier
condition is still pending (PPF, PFO, IQE, ICE, ITE all clear).
"""

from __future__ import annotations

import logging
import threading

from iovirt.memory import Access, TranslationFault
from iovirt.vtd.events import EventInterrupt
from iovirt.vtd.regfile import RegisterFile
from iovirt.vtd.regs import (
    FRCD,
    FRCD_HI_F,
    FRCD_HI_FR_SHIFT,
    FRCD_HI_T,
    FSTS,
    FSTS_EVENT_CONDITIONS,
    FSTS_FRI_MASK,
    FSTS_FRI_SHIFT,
    FSTS_PFO,
    FSTS_PPF,
    PAGE_MASK,
)

log = logging.getLogger(__name__)

# -- DMA-remapping fault reasons ------------------------------------------------
FR_ROOT_NOT_PRESENT = 0x1
FR_CONTEXT_NOT_PRESENT = 0x2
FR_CONTEXT_INVALID = 0x3  # AW not in SAGAW, or the SLPTPTR table not accessible
FR_ADDR_BEYOND_AW = 0x4
FR_WRITE = 0x5
FR_READ = 0x6
FR_PAGING_ENTRY_INVALID = 0x7  # a paging entry could not be read
FR_ROOT_TABLE_INVALID = 0x8
FR_CONTEXT_TABLE_INVALID = 0x9
FR_ROOT_RSVD = 0xA
FR_CONTEXT_RSVD = 0xB
FR_PAGING_ENTRY_RSVD = 0xC
FR_CONTEXT_TT = 0xD  # translation type reserved or not supported
# -- interrupt-remapping fault reasons -----------------------------------------------
FR_IR_REQ_RSVD = 0x20
FR_IR_INDEX_OVER = 0x21
FR_IR_ENTRY_NOT_PRESENT = 0x22
FR_IR_ROOT_INVALID = 0x23
FR_IR_IRTE_RSVD = 0x24
FR_IR_COMPAT_BLOCKED = 0x25
FR_IR_SID_INVALID = 0x26

FAULT_NAMES = {
    FR_ROOT_NOT_PRESENT: "root-entry-not-present",
    FR_CONTEXT_NOT_PRESENT: "context-entry-not-present",
    FR_CONTEXT_INVALID: "context-entry-invalid",
    FR_ADDR_BEYOND_AW: "address-beyond-width",
    FR_WRITE: "write-denied",
    FR_READ: "read-denied",
    FR_PAGING_ENTRY_INVALID: "paging-entry-inaccessible",
    FR_ROOT_TABLE_INVALID: "root-table-inaccessible",
    FR_CONTEXT_TABLE_INVALID: "context-table-inaccessible",
    FR_ROOT_RSVD: "root-entry-reserved-bits",
    FR_CONTEXT_RSVD: "context-entry-reserved-bits",
    FR_PAGING_ENTRY_RSVD: "paging-entry-reserved-bits",
    FR_CONTEXT_TT: "translation-type-blocked",
    FR_IR_REQ_RSVD: "ir-request-reserved-bits",
    FR_IR_INDEX_OVER: "ir-index-beyond-table",
    FR_IR_ENTRY_NOT_PRESENT: "irte-not-present",
    FR_IR_ROOT_INVALID: "ir-table-inaccessible",
    FR_IR_IRTE_RSVD: "irte-reserved-bits",
    FR_IR_COMPAT_BLOCKED: "compatibility-interrupt-blocked",
    FR_IR_SID_INVALID: "ir-source-id-invalid",
}

#: Faults the FPD bit of a context entry / IRTE may suppress ("qualified"
#: faults, spec 7.2.1); the others are always recorded.
QUALIFIED_FAULTS = frozenset({
    FR_CONTEXT_NOT_PRESENT, FR_CONTEXT_INVALID, FR_ADDR_BEYOND_AW, FR_WRITE, FR_READ,
    FR_PAGING_ENTRY_INVALID, FR_PAGING_ENTRY_RSVD, FR_CONTEXT_TT,
    FR_IR_ENTRY_NOT_PRESENT, FR_IR_IRTE_RSVD, FR_IR_SID_INVALID,
})


class DmarFault(TranslationFault):
    """A DMA request the remapping hardware blocked.

    Attributes beyond :class:`~iovirt.memory.TranslationFault`: ``source_id``
    (bus<<8 | devfn), ``fault_reason`` (the spec's FR code), ``fault_addr``
    (the address whose translation failed) and ``recorded`` (False when FPD
    suppressed the record or the fault log had overflowed).
    """

    def __init__(
        self,
        addr: int,
        length: int,
        access: Access,
        source_id: int,
        fault_reason: int,
        fault_addr: int,
        recorded: bool,
    ) -> None:
        super().__init__(
            addr, length, access,
            f"{FAULT_NAMES[fault_reason]} (fault reason {fault_reason:#x}) at {fault_addr:#x} "
            f"for source id {source_id:#06x}",
        )
        self.source_id = source_id
        self.fault_reason = fault_reason
        self.fault_addr = fault_addr
        self.recorded = recorded


class FaultRecorder:
    """Primary fault logging into the FRCD registers and FSTS, with the fault event."""

    def __init__(self, regs: RegisterFile, num_records: int, event: EventInterrupt) -> None:
        self._regs = regs
        self.num_records = num_records
        self.event = event
        self._next = 0
        # Faults are recorded from data-plane threads as well as from MMIO.
        self.lock = threading.RLock()

    def reset(self) -> None:
        """Forget the round-robin position (the registers are reset by their owner)."""
        self._next = 0

    def record(self, source_id: int, fault_reason: int, fi: int, is_read: bool, fpd: bool = False) -> bool:
        """Log a fault; returns whether a record was written.

        ``fi`` is the fault information field (the page address for DMA
        faults; the interrupt index in bits 63:48 for interrupt faults).
        """
        if fpd and fault_reason in QUALIFIED_FAULTS:
            log.debug("VT-d fault %#x from %#06x suppressed by FPD", fault_reason, source_id)
            return False
        regs = self._regs
        with self.lock:
            fsts = regs[FSTS]
            if fsts & FSTS_PFO:
                log.debug("VT-d fault %#x from %#06x dropped: PFO set", fault_reason, source_id)
                return False
            index = self._next
            lo_off = FRCD + 16 * index
            if regs[lo_off + 8] & FRCD_HI_F:
                # Spec 7.3.1: the next record still holds an unserviced fault.
                log.warning("VT-d fault log overflow: fault %#x from %#06x dropped", fault_reason, source_id)
                self._raise(FSTS_PFO)
                return False
            regs[lo_off] = fi & PAGE_MASK & ((1 << 64) - 1)
            regs[lo_off + 8] = (
                FRCD_HI_F
                | (FRCD_HI_T if is_read else 0)
                | fault_reason << FRCD_HI_FR_SHIFT
                | (source_id & 0xFFFF)
            )
            self._next = (index + 1) % self.num_records
            log.info("VT-d fault %s (%#x) from %#06x, info %#x recorded in FRCD%d",
                     FAULT_NAMES.get(fault_reason, "?"), fault_reason, source_id, fi, index)
            if not fsts & FSTS_PPF:
                # FRI names the first pending record (spec 11.4.9.1).
                regs[FSTS] = (fsts & ~FSTS_FRI_MASK) | FSTS_PPF | index << FSTS_FRI_SHIFT
                if not fsts & FSTS_EVENT_CONDITIONS:
                    self.event.fire()
            return True

    def raise_status(self, bit: int) -> None:
        """Set an FSTS error condition (IQE, ICE, ITE) and raise the fault event if it is new."""
        with self.lock:
            self._raise(bit)

    def _raise(self, bit: int) -> None:
        fsts = self._regs[FSTS]
        self._regs[FSTS] = fsts | bit
        if not fsts & FSTS_EVENT_CONDITIONS:
            self.event.fire()

    def serviced(self) -> None:
        """Software wrote FSTS or an FRCD: recompute PPF and drop IP when nothing is pending."""
        regs = self._regs
        with self.lock:
            pending = any(regs[FRCD + 16 * i + 8] & FRCD_HI_F for i in range(self.num_records))
            fsts = regs[FSTS]
            fsts = (fsts | FSTS_PPF) if pending else (fsts & ~FSTS_PPF)
            regs[FSTS] = fsts
            if not fsts & FSTS_EVENT_CONDITIONS:
                self.event.clear_pending()
