"""The VT-d register file: values, access widths and write masks.

Spec 11.2: software accesses registers with 32- or 64-bit, naturally aligned
reads and writes; a 64-bit register may also be accessed as two 32-bit
halves.  Each register here has a writable mask and a write-1-to-clear mask;
what a write *does* (start an invalidation, latch a pointer) is the owner's
business: :meth:`RegisterFile.write` applies the masks and returns what
changed so that :class:`iovirt.vtd.unit.VtdUnit` can dispatch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable

log = logging.getLogger(__name__)

U32 = 0xFFFFFFFF
U64 = (1 << 64) - 1


@dataclass(frozen=True)
class RegSpec:
    """One register: where it is, how wide, its reset value and write masks."""

    name: str
    offset: int
    width: int  # 4 or 8 bytes
    reset: int = 0
    rw: int = 0  # bits software may write
    w1c: int = 0  # bits software clears by writing 1


@dataclass(frozen=True)
class RegWrite:
    """The outcome of one register write: the register, old and new value."""

    spec: RegSpec
    old: int
    new: int
    written: int  # mask of the bits this access covered


class RegisterFile:
    """Register values by offset, with spec-width access rules.

    The hardware side reads and sets values with ``regs[offset]``; the
    software side goes through :meth:`read` and :meth:`write`, which apply
    access-size rules and masks.  Accesses that are not 4- or 8-byte and
    naturally aligned, or hit no register, read 0 and are ignored on write
    (logged): a guest's bad access must not disturb the model.
    """

    def __init__(self, specs: Iterable[RegSpec]) -> None:
        self._specs: dict[int, RegSpec] = {}
        self._by_dword: dict[int, RegSpec] = {}
        self.values: dict[int, int] = {}
        for spec in specs:
            self._specs[spec.offset] = spec
            for off in range(spec.offset, spec.offset + spec.width, 4):
                self._by_dword[off] = spec
            self.values[spec.offset] = spec.reset

    def reset(self) -> None:
        """Every register back to its reset value."""
        for spec in self._specs.values():
            self.values[spec.offset] = spec.reset

    def redefine(self, spec: RegSpec) -> None:
        """Replace the register at ``spec.offset`` (same width) with ``spec``, at its reset value.

        For a unit configured to another implementation's choices where the
        spec allows several (a capability value, how many address bits a
        pointer register implements).
        """
        old = self._specs[spec.offset]
        if old.width != spec.width:
            raise ValueError(f"{spec.name} is {old.width} bytes wide, not {spec.width}")
        self._specs[spec.offset] = spec
        for off in range(spec.offset, spec.offset + spec.width, 4):
            self._by_dword[off] = spec
        self.values[spec.offset] = spec.reset

    def __getitem__(self, offset: int) -> int:
        return self.values[offset]

    def __setitem__(self, offset: int, value: int) -> None:
        self.values[offset] = value

    def spec(self, offset: int) -> RegSpec:
        """The register that starts at ``offset``."""
        return self._specs[offset]

    def read(self, offset: int, size: int) -> int:
        """A 32- or 64-bit read at ``offset`` (0 for a bad or unbacked access)."""
        if not self._valid_access(offset, size):
            return 0
        if size == 8:
            return self._read32(offset) | self._read32(offset + 4) << 32
        return self._read32(offset)

    def _read32(self, offset: int) -> int:
        spec = self._by_dword.get(offset)
        if spec is None:
            return 0
        return (self.values[spec.offset] >> ((offset - spec.offset) * 8)) & U32

    def write(self, offset: int, size: int, value: int) -> list[RegWrite]:
        """A 32- or 64-bit write; returns the registers it changed (with masks applied).

        A 64-bit write to a 64-bit register is one write; a 64-bit write over
        two 32-bit registers is two, in address order (spec 11.2).
        """
        if not self._valid_access(offset, size):
            return []
        value &= U64 if size == 8 else U32
        spec = self._by_dword.get(offset)
        if size == 8 and spec is not None and spec.width == 8 and spec.offset == offset:
            return [self._apply(spec, U64, value)]
        out = []
        for i in range(size // 4):
            dword = offset + 4 * i
            spec = self._by_dword.get(dword)
            if spec is None:
                log.debug("VT-d write to unimplemented register %#x ignored", dword)
                continue
            shift = (dword - spec.offset) * 8
            out.append(self._apply(spec, U32 << shift, ((value >> (32 * i)) & U32) << shift))
        return out

    def _apply(self, spec: RegSpec, covered: int, value: int) -> RegWrite:
        old = self.values[spec.offset]
        rw = spec.rw & covered
        new = (old & ~rw) | (value & rw)
        new &= ~(value & spec.w1c & covered)
        self.values[spec.offset] = new
        return RegWrite(spec, old, new, covered)

    @staticmethod
    def _valid_access(offset: int, size: int) -> bool:
        if size not in (4, 8) or offset % size:
            log.warning("VT-d register access of %d bytes at %#x is not an aligned "
                        "32/64-bit access; ignored (spec 11.2)", size, offset)
            return False
        return True
