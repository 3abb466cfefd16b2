"""Random legacy-mode translation tables for area ``vtd-dma``, and the DMA probes aimed at them.

The guest-physical layout both sides share (64 MiB of RAM):

- :data:`TABLES` -- the root table, one context table per bus and the
  second-level page tables (VT-d spec 9.1, 9.3, 9.8), one 4 KiB page each;
- :data:`RINGS` -- per device, its virtqueue (desc, avail, used) and a sink
  buffer, one page each, mapped at IOVA == GPA so that the queue works in
  every translation type (pass-through included);
- :data:`WINDOW` -- every leaf of the random tables points into it, so every
  write a translation allows lands where a read of the window sees it.

Random parts, per sequence: the root entry (present, reserved bits, a context
table outside RAM), each device's context entry (present, FPD, TT 0-3, AW
0-4, domain id, reserved bits, SLPTPTR outside RAM), and for each domain a
3- or 4-level table whose entries are absent, R, W or RW, point down a level,
are 2 MiB or 1 GiB superpages, carry reserved or ignored bits, or point at a
table outside RAM.  The path of the ring pages is always a valid RW one, so a
device can reach its queue whenever its context entry allows.

Probes (:class:`Probe`) are aimed by what the generator built (no walk): most
inside a leaf, at an offset whose translation stays in the window (inside a
superpage only the window's part is probed: the rest of it is the tables and
rings), some at unmapped IOVAs and some above the domain's address width.
No IOVA falls in 0xFEEx_xxxx: a request there is an interrupt, not DMA (VT-d
spec 3.14).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from iovirt.vtd.regs import PAGE_SIZE
from iovirt.vtd.tables import (
    AW_39,
    AW_48,
    CTX_P,
    CTX_FPD,
    CTX_TT_SHIFT,
    PTE_PS,
    PTE_R,
    PTE_TM,
    PTE_W,
    ROOT_P,
    TT_DEVICE_TLB,
    TT_MULTI_LEVEL,
    TT_PASS_THROUGH,
    levels_width,
)

GUEST_RAM = 64 << 20
TABLES = 0x10_0000
TABLE_PAGES = 0x80
RINGS = 0x20_0000
RING_PAGES = 4  # desc, avail, used, sink
WINDOW = 0x30_0000
WINDOW_PAGES = 16
WINDOW_SIZE = WINDOW_PAGES * PAGE_SIZE
SUPERPAGE_2M_BASE = 0x20_0000
"""2 MiB leaves map [2 MiB, 4 MiB), which holds the rings and the window."""
SUPERPAGE_1G_BASE = 0
OUTSIDE_RAM = 0x1_0000_0000 + 0x40_0000 * 0x10
"""A page-aligned address no RAM backs (above 4 GiB; the machine has 64 MiB below it)."""
INTERRUPT_RANGE = (0xFEE0_0000, 0xFEF0_0000)

_RING_IOVA_TOP = RINGS  # the ring pages live at IOVA 2 MiB: top-level index 0, level-2 index 1
_IGNORED_BITS = (52, 55, 58, 61, 63)
"""Second-level entry bits 61:52 and 63 are ignored by hardware (spec 9.8)."""
_RESERVED_PTE_BITS = (7, 11, 47, 48, 51)
"""Bits that are reserved in some second-level entries: PS at levels 1 and 4 (7, as a leaf flag of a 4 KiB entry
it is ignored), SNP (11, ECAP.SC=0), address bits at or above HAW 48 (48-51); 47 is an address bit (outside RAM)."""


def ring_base(device: int) -> int:
    """GPA (and IOVA) of device ``device``'s desc page; avail, used and sink follow."""
    return RINGS + device * RING_PAGES * PAGE_SIZE


@dataclass(frozen=True)
class Leaf:
    """A leaf the generator wrote: IOVA ``[iova, iova + size)`` maps to ``gpa`` (window-aimed probes use it)."""

    iova: int
    size: int
    gpa: int


@dataclass
class Domain:
    """One domain: its table depth, top table and the leaves written below it."""

    did: int
    levels: int
    top: int
    leaves: list[Leaf] = field(default_factory=list)


@dataclass(frozen=True)
class Context:
    """What the generator gave a device's context entry (the parts probe aiming needs)."""

    tt: int
    domain: Domain


class TableBuilder:
    """Builds one sequence's tables as ``(gpa, qword)`` writes; ``writes`` in the order made."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.writes: list[tuple[int, int]] = []
        self._next_page = TABLES

    def page(self) -> int:
        """A fresh table page (the table region is cleared before each sequence)."""
        page = self._next_page
        self._next_page += PAGE_SIZE
        if self._next_page > TABLES + TABLE_PAGES * PAGE_SIZE:
            raise AssertionError("table region exhausted")
        return page

    def write(self, gpa: int, value: int) -> None:
        """A qword of a table."""
        if value:
            self.writes.append((gpa, value))

    def _perm(self) -> int:
        return self.rng.choices((PTE_R | PTE_W, PTE_R, PTE_W, 0), (8, 1.5, 1.5, 0.5))[0]

    def _flags(self) -> int:
        """Occasionally an ignored bit, rarely a reserved one."""
        extra = 0
        if self.rng.random() < 0.08:
            extra |= 1 << self.rng.choice(_IGNORED_BITS)
        if self.rng.random() < 0.04:
            extra |= 1 << self.rng.choice(_RESERVED_PTE_BITS)
        if self.rng.random() < 0.02:
            extra |= PTE_TM
        return extra

    # -- second-level tables (spec 9.8) -------------------------------------------

    def domain(self, did: int, levels: int, devices: list[int]) -> Domain:
        """A ``levels``-deep table for domain ``did``, the ring pages of ``devices`` mapped RW at IOVA == GPA."""
        domain = Domain(did, levels, self.page())
        tables = [domain.top]
        # The ring path: index 0 down to level 2, then index 1 (IOVA 2 MiB) at level 2, one level-1 table.
        for _level in range(levels, 2, -1):
            below = self.page()
            self.write(tables[-1], below | PTE_R | PTE_W)
            tables.append(below)
        ring_l1 = self.page()
        self.write(tables[-1] + 8 * (_RING_IOVA_TOP >> 21), ring_l1 | PTE_R | PTE_W)
        for device in devices:
            for k in range(RING_PAGES):
                gpa = ring_base(device) + k * PAGE_SIZE
                self.write(ring_l1 + 8 * ((gpa >> 12) & 0x1FF), gpa | PTE_R | PTE_W)
        # Random subtrees: top-level slots 1..3, and more entries beside the ring path one level down.
        for index in range(1, 4):
            if self.rng.random() < 0.85:
                self._entry(domain, domain.top, levels, index, index << (12 + 9 * (levels - 1)))
        if levels > 2:
            beside = tables[1]
            for index in self.rng.sample(range(2, 512), 2):  # index 1 of a 3-level domain's is the ring path
                self._entry(domain, beside, levels - 1, index, index << (12 + 9 * (levels - 2)))
        return domain

    def _entry(self, domain: Domain, table: int, level: int, index: int, iova: int) -> None:
        """Fill entry ``index`` of ``table`` (at ``level``), which translates IOVAs from ``iova``."""
        rng = self.rng
        if iova <= INTERRUPT_RANGE[0] < iova + (1 << (12 + 9 * level)) and level <= 2:
            return  # nothing mapped over the interrupt range
        size = 1 << (12 + 9 * (level - 1))
        perm = self._perm()
        pick = rng.random()
        if level == 1:
            gpa = WINDOW + rng.randrange(WINDOW_PAGES) * PAGE_SIZE
            self.write(table + 8 * index, gpa | perm | self._flags())
            domain.leaves.append(Leaf(iova, size, gpa))
            return
        if level == 2 and pick < 0.25:
            self.write(table + 8 * index, SUPERPAGE_2M_BASE | perm | PTE_PS | self._flags()
                       | (rng.choice((0x1000, 0x10_0000)) if rng.random() < 0.05 else 0))
            domain.leaves.append(Leaf(iova, size, SUPERPAGE_2M_BASE))
            return
        if level == 3 and pick < 0.15:
            self.write(table + 8 * index, SUPERPAGE_1G_BASE | perm | PTE_PS | self._flags()
                       | (rng.choice((0x20_0000, 0x1000)) if rng.random() < 0.05 else 0))
            domain.leaves.append(Leaf(iova, size, SUPERPAGE_1G_BASE))
            return
        if level == 4 and pick < 0.03:
            self.write(table + 8 * index, perm | PTE_PS)  # PS is reserved at level 4
            return
        if pick > 0.97:
            self.write(table + 8 * index, OUTSIDE_RAM | perm)  # a table no memory backs
            domain.leaves.append(Leaf(iova, size, -1))
            return
        below = self.page()
        self.write(table + 8 * index, below | perm | self._flags())
        for sub in rng.sample(range(512), rng.randint(1, 3)):
            self._entry(domain, below, level - 1, sub, iova | sub << (12 + 9 * (level - 2)))

    # -- root and context entries (spec 9.1, 9.3) ---------------------------------

    def root(self, root_table: int, bus: int, context_table: int) -> None:
        """Root entry ``bus``: mostly present and well-formed."""
        rng = self.rng
        lo = context_table | ROOT_P
        pick = rng.random()
        if pick < 0.04:
            lo &= ~ROOT_P
        elif pick < 0.07:
            lo |= 1 << rng.choice((1, 5, 11, 50))
        elif pick < 0.08:
            self.write(root_table + 16 * bus + 8, 1 << rng.randrange(64))
        elif pick < 0.09:
            lo = OUTSIDE_RAM | ROOT_P
        self.write(root_table + 16 * bus, lo)

    def context(self, context_table: int, devfn: int, domain: Domain) -> Context:
        """Context entry ``devfn`` for ``domain``: mostly a valid multi-level one."""
        rng = self.rng
        tt = rng.choices((TT_MULTI_LEVEL, TT_DEVICE_TLB, TT_PASS_THROUGH, 3), (14, 2, 2, 0.4))[0]
        aw = AW_39 if domain.levels == 3 else AW_48
        if tt == TT_PASS_THROUGH and rng.random() < 0.5:
            aw = AW_48 if rng.random() < 0.5 else AW_39
        if rng.random() < 0.03:
            aw = rng.choice((0, 3, 4, 7))
        lo = domain.top | tt << CTX_TT_SHIFT | CTX_P
        hi = aw | domain.did << 8
        if rng.random() < 0.1:
            lo |= CTX_FPD
        pick = rng.random()
        if pick < 0.04:
            lo &= ~CTX_P
        elif pick < 0.07:
            lo |= 1 << rng.choice((4, 7, 11, 50))
        elif pick < 0.09:
            hi |= 1 << rng.choice((3, 6, 7, 24, 40))  # 6:3 ignored, 7 and 63:24 reserved
        elif pick < 0.10:
            lo = lo & 0xFFF | OUTSIDE_RAM
        self.write(context_table + 16 * devfn, lo)
        self.write(context_table + 16 * devfn + 8, hi)
        return Context(tt, domain)


@dataclass(frozen=True)
class Probe:
    """One DMA request: ``length`` bytes at ``iova``, written by the device when ``write``."""

    iova: int
    length: int
    write: bool


def probe(rng: random.Random, context: Context) -> Probe:
    """A request aimed by what was built: in a leaf (window part), unmapped, or above the width."""
    write = rng.random() < 0.6
    length = 8 * rng.choice((1, 2, 4, 8))
    pick = rng.random()
    domain = context.domain
    if context.tt == TT_PASS_THROUGH:
        # Untranslated: the IOVA is the GPA.
        return Probe(WINDOW + rng.randrange(0, WINDOW_SIZE - length, 8), length, write)
    if pick < 0.75 and domain.leaves:
        leaf = rng.choice(domain.leaves)
        if leaf.size == PAGE_SIZE:
            offset = rng.randrange(0, PAGE_SIZE, 8)
        else:
            # Inside a superpage only the window's part: the rest maps the tables and the rings.
            offset = WINDOW - leaf.gpa + rng.randrange(0, WINDOW_SIZE - PAGE_SIZE, 8) if leaf.gpa >= 0 else 0
        return _within_2m(Probe(leaf.iova + offset, length, write))
    width = levels_width(domain.levels)
    if pick < 0.9 or width >= 48:
        iova = rng.randrange(1 << 30, 1 << width, 8)
    else:
        iova = rng.randrange(1 << width, 1 << 48, 8)
    if INTERRUPT_RANGE[0] - length < iova < INTERRUPT_RANGE[1]:
        iova = INTERRUPT_RANGE[1]
    # An unmapped-looking IOVA may fall inside a leaf: aim it into the window as above.
    for leaf in domain.leaves:
        if leaf.iova <= iova < leaf.iova + leaf.size and leaf.size > PAGE_SIZE and leaf.gpa >= 0:
            iova = leaf.iova + WINDOW - leaf.gpa + (iova & (PAGE_SIZE - 8))
    return _within_2m(Probe(iova, length, write))


def _within_2m(p: Probe) -> Probe:
    """``p`` moved back so that it does not cross a 2 MiB boundary.

    Past one, the next IOVA page may be a superpage, whose start maps the tables or the rings.
    """
    if (p.iova + p.length - 1) >> 21 != p.iova >> 21:
        return Probe(p.iova - p.length, p.length, p.write)
    return p

