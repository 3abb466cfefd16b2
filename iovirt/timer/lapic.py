"""A virtual local APIC: registers, interrupt acceptance, priority, EOI.

Register semantics follow the Intel SDM vol. 3A chapter 11 and KVM's
``kvm_lapic_reg_read``/``kvm_lapic_reg_write`` (``arch/x86/kvm/lapic.c``).
Guest accesses never raise:

* xAPIC MMIO writes that are not 4 bytes wide at a 16-byte-aligned offset are
  ignored (SDM 11.4.1, KVM ``apic_mmio_write``); reads may be 1, 2 or 4 bytes
  inside one 32-bit register, anything else reads 0.
* MMIO while the APIC is disabled or in x2APIC mode: reads are all ones,
  writes are ignored (KVM ``apic_mmio_read`` with the MMIO-hole quirk).
* Reserved offsets: ignored, and ESR bit 7 (illegal register address) is set.
* Vectors 0-15: not accepted; ESR receive (bit 6) or send (bit 5) illegal vector.
* x2APIC MSR accesses that the SDM makes #GP return ``None`` (rdmsr) or
  ``False`` (wrmsr) so the VMM injects #GP.

IRR, ISR and TMR are 256-bit Python ints, so "highest set vector" is
``bit_length() - 1``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable

from iovirt.timer.lapic_timer import LapicTimer
from iovirt.timer.regs import (
    APIC_ARBPRI,
    APIC_BROADCAST,
    APIC_DEFAULT_BASE,
    APIC_DFR,
    APIC_DFR_FLAT,
    APIC_DFR_RESERVED_ONES,
    APIC_EOI,
    APIC_ESR,
    APIC_ICR,
    APIC_ICR2,
    APIC_ICR2_WRITE_MASK,
    APIC_ICR_WRITE_MASK,
    APIC_ID,
    APIC_IRR,
    APIC_ISR,
    APIC_LDR,
    APIC_LDR_WRITE_MASK,
    APIC_LVR,
    APIC_LVT_MASKED,
    APIC_LVT_TIMER_MODE_MASK,
    APIC_MMIO_SIZE,
    APIC_PPR,
    APIC_RRR,
    APIC_SELF_IPI,
    APIC_SHORT_SHIFT,
    APIC_SVR,
    APIC_SVR_ENABLE,
    APIC_SVR_RESET,
    APIC_SVR_WRITE_MASK,
    APIC_TDCR,
    APIC_TMCCT,
    APIC_TMICT,
    APIC_TMR,
    APIC_TPR,
    APIC_TPR_WRITE_MASK,
    APIC_VECTOR_MASK,
    APIC_VERSION,
    APICBASE_BSP,
    APICBASE_EN,
    APICBASE_EXTD,
    APICBASE_RESERVED,
    DM_FIXED,
    DM_NMI,
    ESR_ILLEGAL_REGISTER,
    ESR_RECV_ILLEGAL_VECTOR,
    LVT_ERROR,
    LVT_OFFSETS,
    LVT_TIMER,
    LVT_WRITE_MASK,
    MIN_VALID_VECTOR,
    MSR_IA32_APICBASE,
    MSR_IA32_TSCDEADLINE,
    NR_LVT,
    SHORTHAND_SELF,
    X2APIC_BROADCAST,
    X2APIC_MSR_BASE,
    X2APIC_MSR_LAST,
    x2apic_ldr,
    x2apic_msr_to_offset,
)

if TYPE_CHECKING:
    from iovirt.timer.bus import ApicBus

log = logging.getLogger(__name__)

ServiceRoutine = Callable[["VirtualLapic", int], None]
PendingCallback = Callable[["VirtualLapic"], None]

_U32 = 0xFFFFFFFF
# Registers a guest may read in x2APIC mode (KVM kvm_lapic_readable_reg_mask);
# ARBPRI, DFR, ICR2, EOI, RRR and SELF_IPI are not among them.
_X2APIC_READABLE = frozenset(
    [APIC_ID, APIC_LVR, APIC_TPR, APIC_PPR, APIC_LDR, APIC_SVR, APIC_ESR, APIC_ICR,
     APIC_TMICT, APIC_TMCCT, APIC_TDCR]
    + [base + 0x10 * i for base in (APIC_ISR, APIC_TMR, APIC_IRR) for i in range(8)]
    + list(LVT_OFFSETS)
)
_X2APIC_INVALID = frozenset([APIC_ARBPRI, APIC_DFR, APIC_ICR2, APIC_RRR])


class VirtualLapic:
    """One vCPU's local APIC.

    ``service_routine`` is the VM's interrupt service routine, called as
    ``service_routine(lapic, vector)`` when the vCPU acknowledges an interrupt (:meth:`ack`).
    ``on_pending`` is the vCPU kick, called when an interrupt becomes
    deliverable (accepted above PPR, or unblocked by an EOI or TPR write).
    """

    def __init__(
        self,
        apic_id: int,
        bus: "ApicBus",
        service_routine: ServiceRoutine | None = None,
        on_pending: PendingCallback | None = None,
    ) -> None:
        self.apic_id = apic_id
        self.bus = bus
        self.service_routine = service_routine
        self.on_pending = on_pending
        self.timer = LapicTimer(self, bus.mux, bus.config)
        self.apic_base = APIC_DEFAULT_BASE | APICBASE_EN | (APICBASE_BSP if apic_id == 0 else 0)
        self.nmi_pending = 0
        self._power_on()

    def _power_on(self) -> None:
        """Register state after RESET or after the APIC is disabled (SDM 11.4.7.1)."""
        self.timer.reset()
        self.xapic_id = self.apic_id & 0xFF
        self.tpr = 0
        self.ppr = 0
        self.ldr = 0
        self.dfr = APIC_DFR_FLAT
        self.svr = APIC_SVR_RESET
        self.irr = 0
        self.isr = 0
        self.tmr = 0
        self.esr = 0
        self._esr_pending = 0
        self.icr = 0
        self.icr2 = 0
        self.lvt = [APIC_LVT_MASKED] * NR_LVT

    # --- modes -----------------------------------------------------------------------
    @property
    def hw_enabled(self) -> bool:
        """IA32_APIC_BASE.EN."""
        return bool(self.apic_base & APICBASE_EN)

    @property
    def x2apic(self) -> bool:
        """True in x2APIC mode (IA32_APIC_BASE.EXTD)."""
        return bool(self.apic_base & APICBASE_EXTD)

    @property
    def sw_enabled(self) -> bool:
        """SVR bit 8, the APIC software enable."""
        return bool(self.svr & APIC_SVR_ENABLE)

    def set_apic_base(self, value: int) -> bool:
        """Write IA32_APIC_BASE; False (#GP) on an illegal value or mode change.

        Reserved bits, EXTD without EN, x2APIC -> xAPIC, and disabled -> x2APIC
        are illegal (SDM 11.12.5, KVM ``kvm_apic_set_base``).  Disabling the
        APIC returns it to its power-on state.
        """
        if value & APICBASE_RESERVED:
            return False
        old_mode = self.apic_base & (APICBASE_EN | APICBASE_EXTD)
        new_mode = value & (APICBASE_EN | APICBASE_EXTD)
        if new_mode == APICBASE_EXTD:
            return False
        x2 = APICBASE_EN | APICBASE_EXTD
        if (old_mode == x2 and new_mode == APICBASE_EN) or (old_mode == 0 and new_mode == x2):
            return False
        self.apic_base = value
        if new_mode == 0 and old_mode != 0:
            self._power_on()
        elif new_mode == x2 and old_mode != x2:
            self.ldr = x2apic_ldr(self.apic_id)
        return True

    # --- interrupt acceptance and priority ---------------------------------------
    def accept_irq(self, vector: int, level: bool = False) -> bool:
        """Latch ``vector`` in IRR (TMR set for level-triggered); False if illegal.

        Vectors below 16 are never accepted: ESR receive-illegal-vector is set
        instead (SDM 11.5.3).
        """
        if vector < MIN_VALID_VECTOR or vector > APIC_VECTOR_MASK:
            self.record_error(ESR_RECV_ILLEGAL_VECTOR)
            return False
        bit = 1 << vector
        self.irr |= bit
        if level:
            self.tmr |= bit
        elif self.tmr & bit:
            self.tmr ^= bit
        if self.on_pending is not None and (vector & 0xF0) > self.ppr:
            self.on_pending(self)
        return True

    def highest_deliverable(self) -> int | None:
        """The vector :meth:`ack` would take, or None (KVM ``apic_has_interrupt_for_ppr``)."""
        irr = self.irr
        if not irr:
            return None
        vector = irr.bit_length() - 1
        return vector if (vector & 0xF0) > self.ppr else None

    def ack(self) -> int | None:
        """The vCPU takes the highest deliverable interrupt: IRR -> ISR, then the service routine."""
        vector = self.highest_deliverable()
        if vector is None:
            return None
        bit = 1 << vector
        self.irr ^= bit
        self.isr |= bit
        self._update_ppr()
        if self.service_routine is not None:
            self.service_routine(self, vector)
        return vector

    def eoi(self) -> int | None:
        """End of interrupt: clear the highest ISR bit; return its vector, or None."""
        isr = self.isr
        if not isr:
            return None
        vector = isr.bit_length() - 1
        self.isr = isr ^ (1 << vector)
        self._update_ppr()
        self._kick_if_deliverable()
        return vector

    def _update_ppr(self) -> None:
        # PPR = TPR if TPR[7:4] >= ISRV[7:4], else ISRV[7:4]:0 (SDM 11.8.3.1).
        isr = self.isr
        isrv_class = ((isr.bit_length() - 1) & 0xF0) if isr else 0
        tpr = self.tpr
        self.ppr = tpr if (tpr & 0xF0) >= isrv_class else isrv_class

    def _kick_if_deliverable(self) -> None:
        if self.on_pending is not None and self.highest_deliverable() is not None:
            self.on_pending(self)

    def deliver_lvt(self, index: int) -> None:
        """Raise the local interrupt of LVT entry ``index`` unless it is masked."""
        entry = self.lvt[index]
        if entry & APIC_LVT_MASKED:
            return
        mode = (entry >> 8) & 7
        if mode == DM_FIXED:
            self.accept_irq(entry & APIC_VECTOR_MASK, bool(entry & (1 << 15)))
        elif mode == DM_NMI:
            self.nmi_pending += 1
        else:
            log.info("vLAPIC %d: LVT %d delivery mode %d not modelled; dropped", self.apic_id, index, mode)

    def deliver_timer_interrupt(self) -> None:
        """The timer's expiry path: LVTT is fixed, edge-triggered (SDM figure 11-8)."""
        entry = self.lvt[LVT_TIMER]
        if not entry & APIC_LVT_MASKED:
            self.accept_irq(entry & APIC_VECTOR_MASK)

    def record_error(self, bit: int) -> None:
        """Latch an ESR error; a newly seen error raises the LVT error interrupt (SDM 11.5.3)."""
        if self._esr_pending & bit:
            return
        self._esr_pending |= bit
        self.deliver_lvt(LVT_ERROR)

    # --- xAPIC MMIO ---------------------------------------------------------------------
    def mmio_read(self, offset: int, size: int) -> int:
        """Read ``size`` bytes at ``offset`` in the 4 KiB xAPIC page."""
        if not self.hw_enabled or self.x2apic:
            return (1 << (8 * size)) - 1 if size in (1, 2, 4, 8) else 0
        align = offset & 0xF
        if size not in (1, 2, 4) or not 0 <= offset <= APIC_MMIO_SIZE - size or align + size > 4:
            log.info("vLAPIC %d: MMIO read of %d bytes at %#x is not inside one register; reads 0",
                     self.apic_id, size, offset)
            return 0
        value = self._read_reg(offset - align)
        if value is None:
            self.record_error(ESR_ILLEGAL_REGISTER)
            return 0
        return (value >> (8 * align)) & ((1 << (8 * size)) - 1)

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        """Write ``size`` bytes of ``value`` at ``offset`` in the xAPIC page."""
        if not self.hw_enabled or self.x2apic:
            return
        if size != 4 or offset & 0xF or not 0 <= offset < APIC_MMIO_SIZE:
            log.info("vLAPIC %d: MMIO write of %d bytes at %#x ignored: expected 4 bytes at a "
                     "16-byte-aligned offset", self.apic_id, size, offset)
            return
        if self._write_reg(offset, value & _U32) is None:
            self.record_error(ESR_ILLEGAL_REGISTER)

    # --- MSRs ---------------------------------------------------------------------------
    def rdmsr(self, msr: int) -> int | None:
        """RDMSR of an APIC-owned MSR; None means #GP."""
        if msr == MSR_IA32_APICBASE:
            return self.apic_base
        if msr == MSR_IA32_TSCDEADLINE:
            return self.timer.read_tscdeadline()
        if not X2APIC_MSR_BASE <= msr <= X2APIC_MSR_LAST or not self.x2apic:
            return None
        offset = x2apic_msr_to_offset(msr)
        if offset not in _X2APIC_READABLE:
            return None
        if offset == APIC_ICR:
            return self.icr | (self.icr2 << 32)
        return self._read_reg(offset)

    def wrmsr(self, msr: int, value: int) -> bool:
        """WRMSR of an APIC-owned MSR; False means #GP."""
        if not 0 <= value < 1 << 64:
            return False
        if msr == MSR_IA32_APICBASE:
            return self.set_apic_base(value)
        if msr == MSR_IA32_TSCDEADLINE:
            self.timer.write_tscdeadline(value)
            return True
        if not X2APIC_MSR_BASE <= msr <= X2APIC_MSR_LAST or not self.x2apic:
            return False
        offset = x2apic_msr_to_offset(msr)
        if offset == APIC_ICR:
            # One 64-bit register in x2APIC mode: the destination is bits 63:32.
            self.icr = value & APIC_ICR_WRITE_MASK
            self.icr2 = value >> 32
            self.bus.send_ipi(self, self.icr, self.icr2, x2apic_format=True)
            return True
        # Bits 63:32 are reserved in every other x2APIC register (KVM kvm_x2apic_msr_write).
        if value >> 32 or offset in _X2APIC_INVALID:
            return False
        if offset in (APIC_EOI, APIC_ESR) and value:
            return False  # SDM 11.12.1.3: only 0 may be written
        if offset == APIC_SELF_IPI:
            self.bus.send_ipi(self, (value & APIC_VECTOR_MASK) | (SHORTHAND_SELF << APIC_SHORT_SHIFT),
                              0, x2apic_format=True)
            return True
        return bool(self._write_reg(offset, value))

    # --- register file -------------------------------------------------------------------
    def _read_reg(self, reg: int) -> int | None:
        """The 32-bit value of register ``reg``; None for a reserved offset."""
        if APIC_ISR <= reg < APIC_IRR + 0x80:
            bank = (reg - APIC_ISR) >> 4
            bits = (self.isr, self.tmr, self.irr)[bank >> 3]
            return (bits >> (32 * (bank & 7))) & _U32
        if reg in LVT_OFFSETS:
            return self.lvt[LVT_OFFSETS[reg]]
        if reg == APIC_ID:
            return self.apic_id if self.x2apic else self.xapic_id << 24
        if reg == APIC_LVR:
            return APIC_VERSION
        if reg == APIC_TPR:
            return self.tpr
        if reg == APIC_PPR:
            return self.ppr
        if reg in (APIC_ARBPRI, APIC_EOI, APIC_RRR):
            return 0  # ARBPRI reads 0 in KVM; EOI is write-only; RRR is not implemented
        if reg == APIC_LDR:
            return self.ldr
        if reg == APIC_DFR:
            return self.dfr
        if reg == APIC_SVR:
            return self.svr
        if reg == APIC_ESR:
            return self.esr
        if reg == APIC_ICR:
            return self.icr
        if reg == APIC_ICR2:
            return self.icr2
        if reg == APIC_TMICT:
            return self.timer.tmict
        if reg == APIC_TMCCT:
            return self.timer.read_tmcct()
        if reg == APIC_TDCR:
            return self.timer.tdcr
        return None

    def _write_reg(self, reg: int, value: int) -> bool | None:
        """Apply a 32-bit write: True if applied, False if read-only, None if reserved."""
        if reg in LVT_OFFSETS:
            self._write_lvt(LVT_OFFSETS[reg], value)
        elif reg == APIC_TPR:
            self.tpr = value & APIC_TPR_WRITE_MASK
            self._update_ppr()
            self._kick_if_deliverable()
        elif reg == APIC_EOI:
            self.eoi()
        elif reg == APIC_SVR:
            self._write_svr(value)
        elif reg == APIC_TMICT:
            self.timer.write_tmict(value)
        elif reg == APIC_TDCR:
            self.timer.write_tdcr(value)
        elif reg == APIC_ICR:
            self.icr = value & APIC_ICR_WRITE_MASK  # delivery status always reads idle
            self.bus.send_ipi(self, self.icr, self.icr2 >> 24, x2apic_format=False)
        elif reg == APIC_ESR:
            # A write moves the errors latched since the last write into ESR (SDM 11.5.3).
            self.esr = self._esr_pending
            self._esr_pending = 0
        elif self.x2apic:
            return None if self._read_reg(reg) is None else False
        elif reg == APIC_ID:
            self.xapic_id = value >> 24
        elif reg == APIC_LDR:
            self.ldr = value & APIC_LDR_WRITE_MASK
        elif reg == APIC_DFR:
            self.dfr = value | APIC_DFR_RESERVED_ONES
        elif reg == APIC_ICR2:
            self.icr2 = value & APIC_ICR2_WRITE_MASK
        else:
            return None if self._read_reg(reg) is None else False
        return True

    def _write_lvt(self, index: int, value: int) -> None:
        # While software-disabled every LVT stays masked (SDM 11.4.7.2, KVM).
        if not self.sw_enabled:
            value |= APIC_LVT_MASKED
        value &= LVT_WRITE_MASK[index]
        self.lvt[index] = value
        if index == LVT_TIMER:
            self.timer.set_mode(value & APIC_LVT_TIMER_MODE_MASK)

    def _write_svr(self, value: int) -> None:
        self.svr = value & APIC_SVR_WRITE_MASK
        if not self.svr & APIC_SVR_ENABLE:
            self.lvt = [entry | APIC_LVT_MASKED for entry in self.lvt]

    # --- destination matching (used by ApicBus) -------------------------------------------
    def matches_physical(self, dest: int, x2apic_format: bool) -> bool:
        """Whether a physical-mode destination selects this APIC."""
        if dest == (X2APIC_BROADCAST if x2apic_format else APIC_BROADCAST):
            return True
        return dest == (self.apic_id if self.x2apic else self.xapic_id)

    def matches_logical(self, dest: int, x2apic_format: bool) -> bool:
        """Whether a logical-mode destination selects this APIC (SDM 11.6.2.2)."""
        if dest == (X2APIC_BROADCAST if x2apic_format else APIC_BROADCAST):
            return True
        if self.x2apic:
            # x2APIC: always cluster model, 16-bit cluster ID and 16-bit member mask.
            return (dest >> 16) == (self.ldr >> 16) and bool(dest & self.ldr & 0xFFFF)
        logical_id = self.ldr >> 24
        if self.dfr >> 28 == 0xF:  # flat model: 8-bit mask
            return bool(dest & logical_id)
        # cluster model: high nibble is the cluster, low nibble the member mask
        return (dest >> 4) == (logical_id >> 4) and bool(dest & logical_id & 0xF)
