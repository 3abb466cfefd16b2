"""Area ``vtd-linux``: tables built by a real Linux, walked by iovirt, compared with QEMU's translations.

A guest runs Linux's intel-iommu driver on QEMU's intel-iommu with traffic on devices
behind it (:mod:`~iovirt.crosscheck.linux_guest` runs it).  QEMU's trace says which
(requester, IOVA) it translated, to what and with which permission
(:mod:`~iovirt.crosscheck.vtd_trace`); the guest is then paused and its memory written to an
ELF core.  :func:`compare_core` loads the core into a :class:`~iovirt.memory.GuestMemory`,
points an iovirt :class:`~iovirt.vtd.unit.VtdUnit` at the same root table through its
registers (RTADDR, GCMD.SRTP, GCMD.TE, as the guest driver did) and translates every
fill still in force through it.  Both ends of QEMU's page are translated, so the whole
range QEMU's entry covers must map the same way; the permission is found by a read and a write request (spec 3.7.1: a
request without the right is a read or write fault, 7.2).

A fill whose page iovirt finds not present (read and write faults) is skipped as
unmapped: Linux clears the leaf at unmap and, in lazy mode, invalidates later.  Any other
result differing from QEMU's is a mismatch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from iovirt.memory import Access, GuestMemory
from iovirt.crosscheck.vtd_trace import Fill, VtdTrace, parse_trace
from iovirt.vtd import regs as R
from iovirt.vtd.faults import FR_READ, FR_WRITE, DmarFault
from iovirt.vtd.tables import PTE_R, PTE_W
from iovirt.vtd.unit import VtdUnit

AREA = "vtd-linux"

_PERM_ACCESS = ((PTE_R, Access.READ, FR_READ), (PTE_W, Access.WRITE, FR_WRITE))


@dataclass(frozen=True)
class Walked:
    """iovirt's answer for one page: the addresses of its first and last byte and the permission.

    ``fault`` is the fault reason of a non-permission fault (the walk failed), else 0.
    """

    first: int | None
    last: int | None
    perm: int
    fault: int = 0


@dataclass(frozen=True)
class LinuxTableMismatch:
    """A page QEMU translated one way and iovirt another."""

    fill: Fill
    walked: Walked

    def __str__(self) -> str:
        f, w = self.fill, self.walked
        sid = f"{f.source_id >> 8:02x}:{f.source_id >> 3 & 0x1F:02x}.{f.source_id & 7}"
        qemu = f"{f.addr:#x}..{f.addr | f.mask:#x} perm {f.perm}"
        ours = f"fault {w.fault:#x}" if w.fault else (
            f"{w.first:#x}..{w.last:#x} perm {w.perm}" if w.first is not None and w.last is not None
            else f"perm {w.perm}")
        return f"{sid} iova {f.iova:#x} (trace line {f.line}): qemu {qemu}, iovirt {ours}"


@dataclass
class LinuxTablesResult:
    """Counts of one comparison: pages compared, skipped (and why), mismatches."""

    root_table: int
    fills: int
    compared: int = 0
    mismatches: list[LinuxTableMismatch] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    by_perm: dict[int, int] = field(default_factory=dict)
    requesters: set[int] = field(default_factory=set)

    def as_json(self) -> dict[str, object]:
        """``{"compared": N, "mismatches": M, "expected_differences": 0, "skipped": {...}, ...}``."""
        return {
            "compared": self.compared,
            "mismatches": len(self.mismatches),
            "expected_differences": 0,
            "root_table": self.root_table,
            "fills": self.fills,
            "skipped": dict(self.skipped),
            "compared_by_perm": {str(p): n for p, n in sorted(self.by_perm.items())},
            "requesters": [f"{sid:#06x}" for sid in sorted(self.requesters)],
            "mismatch_details": [str(m) for m in self.mismatches],
        }

    def summary(self) -> str:
        """A few lines for the command's output."""
        skipped = ", ".join(f"{n} {why}" for why, n in self.skipped.items()) or "none"
        lines = [
            f"{AREA}: root table {self.root_table:#x}, {self.fills} IOTLB fills, "
            f"{len(self.requesters)} requesters: {self.compared} pages compared, "
            f"{len(self.mismatches)} mismatches; skipped: {skipped}"
        ]
        lines += [f"{AREA}: mismatch: {m}" for m in self.mismatches]
        return "\n".join(lines)


def vtd_unit_at(memory: GuestMemory, root_table: int) -> VtdUnit:
    """An iovirt VT-d unit over ``memory`` with the root table set and translation on, as a driver does it."""
    unit = VtdUnit(memory)
    unit.mmio_write(R.RTADDR, 8, root_table)
    unit.mmio_write(R.GCMD, 4, R.SRTP)  # spec 10.4.4: latch RTADDR
    unit.mmio_write(R.GCMD, 4, R.TE)
    if unit.mmio_read(R.GSTS, 4) & R.TE == 0:
        raise AssertionError("iovirt's unit did not enable translation")
    return unit


def walk_page(unit: VtdUnit, source_id: int, iova: int, mask: int) -> Walked:
    """Translate the first and last byte of the page ``[iova, iova|mask]`` for a read and for a write.

    A byte a request may not reach (a read or write fault) gives ``None``; the
    permission has the bit of each access both bytes allow.
    """
    perm = 0
    seen: set[tuple[int | None, int | None]] = set()
    for bit, access, denied in _PERM_ACCESS:
        ends: list[int | None] = []
        for addr in (iova, iova | mask):
            try:
                ends.append(unit.translate(source_id, addr, 1, access)[0][0])
            except DmarFault as fault:
                if fault.fault_reason != denied:
                    return Walked(None, None, 0, fault.fault_reason)
                ends.append(None)
        first, last = ends
        if first is not None and last is not None:
            perm |= bit
        if (first, last) != (None, None):
            seen.add((first, last))
    if len(seen) > 1:  # a read and a write reaching different bytes: no single answer to show
        return Walked(None, None, perm)
    first, last = seen.pop() if seen else (None, None)
    return Walked(first, last, perm)


def compare_memory(trace: VtdTrace, memory: GuestMemory) -> LinuxTablesResult:
    """Translate every fill of ``trace`` still in force through iovirt over ``memory``; compare."""
    result = LinuxTablesResult(trace.check_comparable(), trace.fills)
    if trace.invalidated:
        result.skipped["invalidated after the fill (mapping may have changed)"] = trace.invalidated
    if trace.unpaired:
        result.skipped["fill without its translation line"] = trace.unpaired
    unit = vtd_unit_at(memory, result.root_table)
    # Every unmapped page is a recorded fault; the fault log's overflow warnings say nothing here.
    faults_log = logging.getLogger("iovirt.vtd.faults")
    level = faults_log.level
    faults_log.setLevel(logging.ERROR)
    try:
        for fill in trace.current.values():
            walked = walk_page(unit, fill.source_id, fill.iova, fill.mask)
            if walked == Walked(None, None, 0):
                key = "unmapped at dump (leaf cleared, invalidation not yet issued)"
                result.skipped[key] = result.skipped.get(key, 0) + 1
                continue
            result.compared += 1
            result.requesters.add(fill.source_id)
            result.by_perm[fill.perm] = result.by_perm.get(fill.perm, 0) + 1
            if walked != Walked(fill.addr, fill.addr | fill.mask, fill.perm):
                result.mismatches.append(LinuxTableMismatch(fill, walked))
    finally:
        faults_log.setLevel(level)
    return result


def compare_core(trace_path: str | Path, core_path: str | Path) -> LinuxTablesResult:
    """Parse QEMU's trace at ``trace_path``, read the ELF core at ``core_path``, compare."""
    with open(trace_path, errors="replace") as f:
        trace = parse_trace(f)
    memory = GuestMemory.from_elf_core(str(core_path))
    try:
        return compare_memory(trace, memory)
    finally:
        memory.close()
