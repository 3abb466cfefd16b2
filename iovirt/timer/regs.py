"""Local APIC register offsets, bit fields and write masks.

Offsets are the xAPIC MMIO offsets of the Intel SDM vol. 3A table 11-1 (they
mirror Linux ``asm/apicdef.h``); the x2APIC MSR of a register is
``0x800 + (offset >> 4)`` (SDM 11.12.1.2).  Write masks follow the SDM's
field layouts; where KVM (``arch/x86/kvm/lapic.c``) chooses a behaviour the SDM
leaves open, the comment says so.
"""

from __future__ import annotations

# --- register offsets (xAPIC MMIO) -------------------------------------------
APIC_ID = 0x20
APIC_LVR = 0x30
APIC_TPR = 0x80
APIC_ARBPRI = 0x90
APIC_PPR = 0xA0
APIC_EOI = 0xB0
APIC_RRR = 0xC0
APIC_LDR = 0xD0
APIC_DFR = 0xE0
APIC_SVR = 0xF0
APIC_ISR = 0x100  # 8 banks, 0x10 apart
APIC_TMR = 0x180
APIC_IRR = 0x200
APIC_ESR = 0x280
APIC_LVTCMCI = 0x2F0
APIC_ICR = 0x300
APIC_ICR2 = 0x310
APIC_LVTT = 0x320
APIC_LVTTHMR = 0x330
APIC_LVTPC = 0x340
APIC_LVT0 = 0x350
APIC_LVT1 = 0x360
APIC_LVTERR = 0x370
APIC_TMICT = 0x380
APIC_TMCCT = 0x390
APIC_TDCR = 0x3E0
APIC_SELF_IPI = 0x3F0  # x2APIC only

APIC_MMIO_SIZE = 0x1000
APIC_DEFAULT_BASE = 0xFEE00000

# --- MSRs ---------------------------------------------------------------------
MSR_IA32_APICBASE = 0x1B
MSR_IA32_TSCDEADLINE = 0x6E0
X2APIC_MSR_BASE = 0x800
X2APIC_MSR_LAST = 0x8FF
MSR_X2APIC_ICR = X2APIC_MSR_BASE + (APIC_ICR >> 4)  # 0x830, 64 bits wide
MSR_X2APIC_SELF_IPI = X2APIC_MSR_BASE + (APIC_SELF_IPI >> 4)  # 0x83F

APICBASE_BSP = 1 << 8
APICBASE_EXTD = 1 << 10  # x2APIC mode
APICBASE_EN = 1 << 11
# Bits 12..(MAXPHYADDR-1) hold the base; MAXPHYADDR 36 here, as qemu64.
APICBASE_ADDR_MASK = 0xF_FFFF_F000
APICBASE_RESERVED = ~(APICBASE_BSP | APICBASE_EXTD | APICBASE_EN | APICBASE_ADDR_MASK) & (2**64 - 1)

# --- LVT entries -----------------------------------------------------------------
LVT_TIMER, LVT_THERMAL, LVT_PERFMON, LVT_LINT0, LVT_LINT1, LVT_ERROR, LVT_CMCI = range(7)
LVT_OFFSETS = {
    APIC_LVTT: LVT_TIMER,
    APIC_LVTTHMR: LVT_THERMAL,
    APIC_LVTPC: LVT_PERFMON,
    APIC_LVT0: LVT_LINT0,
    APIC_LVT1: LVT_LINT1,
    APIC_LVTERR: LVT_ERROR,
    APIC_LVTCMCI: LVT_CMCI,
}
NR_LVT = 7
# LVR: version 0x14 (integrated APIC) | (max LVT entry) << 16, as KVM with CMCI.
APIC_VERSION = 0x14 | ((NR_LVT - 1) << 16)

APIC_VECTOR_MASK = 0xFF
APIC_MODE_MASK = 0x700  # delivery mode, bits 10:8
APIC_SEND_PENDING = 1 << 12  # delivery status, read-only
APIC_INPUT_POLARITY = 1 << 13
APIC_LVT_REMOTE_IRR = 1 << 14  # read-only
APIC_LVT_LEVEL_TRIGGER = 1 << 15
APIC_LVT_MASKED = 1 << 16
APIC_LVT_TIMER_MODE_MASK = 3 << 17
APIC_LVT_TIMER_ONESHOT = 0 << 17
APIC_LVT_TIMER_PERIODIC = 1 << 17
APIC_LVT_TIMER_TSCDEADLINE = 2 << 17

# Writable bits per LVT entry (SDM figure 11-8).  Unlike KVM's apic_lvt_mask[]
# the read-only delivery-status and remote-IRR bits are not writable.
_LVT_BASE = APIC_LVT_MASKED | APIC_VECTOR_MASK
LVT_WRITE_MASK = (
    _LVT_BASE | APIC_LVT_TIMER_MODE_MASK,  # timer: no delivery mode field
    _LVT_BASE | APIC_MODE_MASK,  # thermal
    _LVT_BASE | APIC_MODE_MASK,  # perfmon
    _LVT_BASE | APIC_MODE_MASK | APIC_INPUT_POLARITY | APIC_LVT_LEVEL_TRIGGER,  # LINT0
    _LVT_BASE | APIC_MODE_MASK | APIC_INPUT_POLARITY | APIC_LVT_LEVEL_TRIGGER,  # LINT1
    _LVT_BASE,  # error: fixed delivery only
    _LVT_BASE | APIC_MODE_MASK,  # CMCI
)

# --- SVR, TPR, LDR, DFR, TDCR -------------------------------------------------------
APIC_SVR_ENABLE = 1 << 8
APIC_SVR_WRITE_MASK = 0x3FF  # vector, enable, focus; directed EOI not offered
APIC_SVR_RESET = 0xFF
APIC_TPR_WRITE_MASK = 0xFF
APIC_LDR_WRITE_MASK = 0xFF000000
APIC_DFR_RESERVED_ONES = 0x0FFFFFFF  # bits 27:0 read as 1 (KVM: val | 0x0FFFFFFF)
APIC_DFR_FLAT = 0xFFFFFFFF
APIC_DFR_CLUSTER = 0x0FFFFFFF
APIC_TDCR_WRITE_MASK = 0xB

# --- ICR ----------------------------------------------------------------------------
APIC_ICR_WRITE_MASK = 0x000CCFFF  # vector, mode, dest mode, level, trigger, shorthand
APIC_ICR2_WRITE_MASK = 0xFF000000
APIC_DEST_LOGICAL = 1 << 11
APIC_INT_ASSERT = 1 << 14
APIC_INT_LEVELTRIG = 1 << 15
APIC_SHORT_SHIFT = 18
SHORTHAND_NONE, SHORTHAND_SELF, SHORTHAND_ALL_INC_SELF, SHORTHAND_ALL_BUT_SELF = range(4)

# Delivery modes (ICR, MSI data, LVT bits 10:8).
DM_FIXED = 0
DM_LOWEST = 1
DM_SMI = 2
DM_NMI = 4
DM_INIT = 5
DM_STARTUP = 6
DM_EXTINT = 7

APIC_BROADCAST = 0xFF
X2APIC_BROADCAST = 0xFFFFFFFF

# --- ESR bits (SDM 11.5.3) --------------------------------------------------------------
ESR_SEND_ILLEGAL_VECTOR = 1 << 5
ESR_RECV_ILLEGAL_VECTOR = 1 << 6
ESR_ILLEGAL_REGISTER = 1 << 7

# Vectors 0-15 are reserved for exceptions; an APIC never delivers them (SDM 11.5.2).
MIN_VALID_VECTOR = 16


def tdcr_to_divisor(tdcr: int) -> int:
    """Decode a TDCR value (bits 0, 1, 3) into the divisor 1..128 (SDM figure 11-10).

    Codes 0x0, 0x1, 0x2, 0x3, 0x8, 0x9, 0xA, 0xB mean 2, 4, 8, 16, 32, 64, 128, 1;
    the same bit shuffle as KVM's ``update_divide_count`` and Xen's ``vlapic_set_tdcr``.
    """
    t = ((tdcr & 3) | ((tdcr & 8) >> 1)) + 1
    return 1 << (t & 7)


def x2apic_msr_to_offset(msr: int) -> int:
    """The xAPIC MMIO offset a x2APIC MSR (0x800..0x8FF) stands for."""
    return (msr - X2APIC_MSR_BASE) << 4


def x2apic_ldr(apic_id: int) -> int:
    """The read-only x2APIC logical ID: cluster in 31:16, one bit in 15:0 (SDM 11.12.10.2)."""
    return ((apic_id >> 4) << 16) | (1 << (apic_id & 0xF))
