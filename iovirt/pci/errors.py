"""Errors raised by the PCI model.

The raising APIs are the host-side ones (:meth:`ConfigSpace.read`,
:meth:`PciFunction.config_read` …) and the build-time ones (adding BARs and
capabilities).  Guest-facing paths (ECAM, 0xCF8/0xCFC, BAR MMIO through
:class:`~iovirt.pci.host.PciHost`) catch these, log them and behave as hardware
does (all-ones reads, dropped writes).
"""

from __future__ import annotations

from iovirt.errors import IovirtError


class PciError(IovirtError):
    """Root of the PCI model's errors."""


class PciConfigAccessError(PciError):
    """A config-space access that is unaligned, of a bad width or out of range.

    Attributes: ``offset``, ``size`` (bytes) and ``space_size`` (256 or 4096).
    """

    def __init__(self, offset: int, size: int, space_size: int, reason: str) -> None:
        super().__init__(
            f"config access of {size} byte(s) at {offset:#x}: {reason} "
            f"(expected a 1, 2 or 4 byte access naturally aligned within "
            f"{space_size:#x} bytes)"
        )
        self.offset = offset
        self.size = size
        self.space_size = space_size


class PciConfigValueError(PciError):
    """A value written does not fit the access width.

    Attributes: ``offset``, ``size`` and ``value``.
    """

    def __init__(self, offset: int, size: int, value: int) -> None:
        super().__init__(
            f"config write at {offset:#x}: value {value:#x} does not fit in "
            f"{size} byte(s) (expected 0 <= value < {1 << (8 * size):#x})"
        )
        self.offset = offset
        self.size = size
        self.value = value


class PciLayoutError(PciError):
    """A device was built with an impossible layout.

    Raised at build time: a capability that is misaligned, overlaps another,
    lies outside its list's range or would loop; a BAR of a size that is not
    a power of two; an MMIO region overlapping another inside a BAR.
    Attributes: ``offset`` (where the problem is, or ``None``) and ``reason``.
    """

    def __init__(self, reason: str, offset: int | None = None) -> None:
        where = "" if offset is None else f" at {offset:#x}"
        super().__init__(f"bad PCI layout{where}: {reason}")
        self.offset = offset
        self.reason = reason


class PciCapabilityChainError(PciError):
    """Walking a (possibly guest- or dump-provided) capability chain failed.

    Attributes: ``offset`` of the offending pointer and ``reason`` (loop,
    misaligned pointer, pointer out of range).
    """

    def __init__(self, offset: int, reason: str) -> None:
        super().__init__(f"capability chain broken at {offset:#x}: {reason}")
        self.offset = offset
        self.reason = reason


class PciTopologyError(PciError):
    """A function or bus was placed where it cannot go.

    Attributes: ``reason``.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"bad PCI topology: {reason}")
        self.reason = reason
