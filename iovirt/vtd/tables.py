"""Legacy-mode translation structures: root entries, context entries, second-level PTEs.

VT-d spec 9.1 (root entry), 9.3 (context entry), 9.8 (second-level paging
entries).  Every structure is a pair of little-endian 64-bit words
``(lo, hi)`` (PTEs are one word).  The encoders here are used by the driver
helper and the tests; the decoders and reserved-bit masks by the hardware
side.  Table addresses are host-physical (guest-physical, for this model)
and limited to the host address width :data:`~iovirt.vtd.regs.HAW`.
"""

from __future__ import annotations

from typing import NamedTuple

from iovirt.vtd.regs import ADDR_MASK, HAW_MASK, PAGE_SIZE

U64 = (1 << 64) - 1
_ABOVE_HAW = U64 & ~HAW_MASK

ENTRY_SIZE = 16  # root and context entries
ROOT_ENTRIES = 256  # one per bus
CONTEXT_ENTRIES = 256  # one per devfn

# -- root entry (9.1) -------------------------------------------------------
ROOT_P = 1 << 0
ROOT_LO_RSVD = 0xFFE | _ABOVE_HAW  # bits 11:1 and above HAW
ROOT_HI_RSVD = U64  # upper context-table pointer exists only in scalable mode

# -- context entry (9.3) ------------------------------------------------------
CTX_P = 1 << 0
CTX_FPD = 1 << 1
CTX_TT_SHIFT = 2
CTX_TT_MASK = 0x3 << CTX_TT_SHIFT
TT_MULTI_LEVEL = 0  # untranslated requests walk the second-level table
TT_DEVICE_TLB = 1  # the same, and translation requests (ATS) are allowed
TT_PASS_THROUGH = 2  # untranslated requests pass with address unchanged
CTX_LO_RSVD = 0xFF0 | _ABOVE_HAW  # bits 11:4 and above HAW
CTX_HI_AW_MASK = 0x7
CTX_HI_DID_SHIFT = 8
CTX_HI_DID_MASK = 0xFFFF << CTX_HI_DID_SHIFT
CTX_HI_RSVD = (1 << 7) | (U64 & ~0xFFFFFF)  # bit 7 and bits 63:24 (6:3 are ignored)
AW_39 = 1  # 3-level table
AW_48 = 2  # 4-level table


def aw_levels(aw: int) -> int:
    """Second-level table depth for an AW encoding (AW 1 -> 3 levels, 2 -> 4)."""
    return aw + 2


def levels_width(levels: int) -> int:
    """Input-address width covered by a table of ``levels`` levels."""
    return 12 + 9 * levels


# -- second-level paging entries (9.8) -----------------------------------------
PTE_R = 1 << 0
PTE_W = 1 << 1
PTE_PS = 1 << 7  # page size: a 2 MiB (level 2) or 1 GiB (level 3) leaf
PTE_SNP = 1 << 11  # reserved: ECAP.SC = 0
PTE_TM = 1 << 62  # transient mapping; allowed in leaves only (ECAP.DT = 1)
PTE_PERM = PTE_R | PTE_W
PTES_PER_TABLE = PAGE_SIZE // 8
#: Bits 51:HAW are reserved; 61:52 and 63 are ignored (spec 9.8).
_PTE_RSVD_HIGH = ((1 << 52) - 1) & ~HAW_MASK
PTE_RSVD_LEAF_4K = PTE_SNP | _PTE_RSVD_HIGH
PTE_RSVD_NONLEAF = PTE_SNP | PTE_TM | _PTE_RSVD_HIGH
PTE_RSVD_LEAF_2M = PTE_RSVD_LEAF_4K | 0x1FF000  # address bits 20:12
PTE_RSVD_LEAF_1G = PTE_RSVD_LEAF_4K | 0x3FFFF000  # address bits 29:12


def root_entry(context_table: int, present: bool = True) -> tuple[int, int]:
    """Encode a root entry pointing at a 4 KiB context table."""
    return (context_table & ADDR_MASK) | (ROOT_P if present else 0), 0


def context_entry(
    slptptr: int,
    did: int,
    aw: int = AW_48,
    tt: int = TT_MULTI_LEVEL,
    fpd: bool = False,
    present: bool = True,
) -> tuple[int, int]:
    """Encode a legacy context entry."""
    lo = (slptptr & ADDR_MASK) | (tt << CTX_TT_SHIFT) | (CTX_FPD if fpd else 0) | (CTX_P if present else 0)
    hi = (aw & CTX_HI_AW_MASK) | (did & 0xFFFF) << CTX_HI_DID_SHIFT
    return lo, hi


def pte(addr: int, perm: int, large: bool = False) -> int:
    """Encode a second-level entry: a table pointer, a 4 KiB leaf or (``large``) a 2M/1G leaf."""
    return (addr & ADDR_MASK) | (perm & PTE_PERM) | (PTE_PS if large else 0)


class ContextEntry(NamedTuple):
    """A decoded legacy context entry (the fields the hardware uses)."""

    present: bool
    fpd: bool
    tt: int
    slptptr: int
    aw: int
    did: int


def decode_context(lo: int, hi: int) -> ContextEntry:
    """Decode the fields of a context entry (no validity checks)."""
    return ContextEntry(
        present=bool(lo & CTX_P),
        fpd=bool(lo & CTX_FPD),
        tt=(lo & CTX_TT_MASK) >> CTX_TT_SHIFT,
        slptptr=lo & ADDR_MASK,
        aw=hi & CTX_HI_AW_MASK,
        did=(hi & CTX_HI_DID_MASK) >> CTX_HI_DID_SHIFT,
    )
