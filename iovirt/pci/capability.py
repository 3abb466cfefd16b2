"""Capability lists: the base classes, linking at build time, and walking.

The standard list (PCI 3.0 §6.7) starts at the Capabilities Pointer (0x34),
lives in 0x40-0xFF, has dword-aligned entries of ``ID, Next`` and ends with
Next = 0.  The extended list (PCIe §7.6.3) starts at 0x100 with a 32-bit
header ``ID 15:0, Version 19:16, Next 31:20`` and exists only in the 4 KiB
config space of a PCI Express function.

A function appends each capability it is given at the end of the chain (so
the chain order is the order of :meth:`PciFunction.add_capability` calls) and
checks alignment, range and overlap then, so a built chain can neither loop
nor overlap.  :func:`walk_capabilities` and
:func:`walk_extended_capabilities` walk a chain the way pciutils does and
raise :class:`PciCapabilityChainError` on a loop or a bad pointer: tests use
them on what a function reads back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from iovirt.pci.errors import PciCapabilityChainError, PciLayoutError
from iovirt.pci.regs import (
    PCI_CAP_MIN_OFFSET,
    PCI_CAPABILITY_LIST,
    PCI_CFG_SPACE_EXP_SIZE,
    PCI_CFG_SPACE_SIZE,
    PCI_EXT_CAP_START,
)

if TYPE_CHECKING:
    from iovirt.pci.function import PciFunction

ConfigReader = Callable[[int, int], int]
"""``read(offset, size) -> value``, e.g. ``function.config_read``."""


class Capability:
    """A capability in the standard list.

    Subclasses set :attr:`cap_id` and :attr:`size` (bytes, including the
    2-byte header) and override :meth:`install` to write their registers
    (``function.config.init(...)``) and, for registers with side effects,
    install a config hook (``function.config.add_hook(...)``) on their dwords.
    Added with ``function.add_capability(cap, offset=None)``.
    """

    cap_id: int = 0
    size: int = 0

    def __init__(self) -> None:
        self.offset = -1
        self.function: PciFunction | None = None

    def install(self, function: PciFunction, offset: int) -> None:
        """Write the registers after the header.  The ID and Next bytes are the list's."""
        self.function = function
        self.offset = offset

    def reset(self) -> None:
        """Reset state kept outside config space (registers are reset by the function)."""


class ExtendedCapability:
    """A capability in the extended list at 0x100 (PCIe §7.6).

    ``ExtendedCapability(cap_id, version=1, payload=b"", wmask=None)`` is a
    generic one whose registers after the 4-byte header are ``payload``
    (writable where ``wmask`` has bits).  Subclasses (SR-IOV, ID 0x10)
    override :meth:`install` like :class:`Capability`.  Added with
    ``function.add_extended_capability(cap, offset=None)``.
    """

    def __init__(
        self,
        cap_id: int,
        version: int = 1,
        payload: bytes = b"",
        wmask: bytes | None = None,
    ) -> None:
        if not 0 < cap_id <= 0xFFFF or not 0 <= version <= 0xF:
            raise PciLayoutError(f"extended capability ID {cap_id:#x} / version {version} out of range")
        if wmask is not None and len(wmask) != len(payload):
            raise PciLayoutError("extended capability wmask length differs from its payload")
        self.cap_id = cap_id
        self.version = version
        self.payload = bytes(payload)
        self.payload_wmask = bytes(wmask) if wmask is not None else bytes(len(payload))
        self.size = 4 + len(payload)
        self.offset = -1
        self.function: PciFunction | None = None

    def install(self, function: PciFunction, offset: int) -> None:
        """Write the payload after the header."""
        self.function = function
        self.offset = offset
        if self.payload:
            function.config.init(
                offset + 4,
                len(self.payload),
                int.from_bytes(self.payload, "little"),
                int.from_bytes(self.payload_wmask, "little"),
            )

    def reset(self) -> None:
        """Reset state kept outside config space."""


def place(
    existing: list[tuple[int, int]], offset: int | None, size: int, lo: int, hi: int
) -> int:
    """Choose or check the offset of a new capability of ``size`` bytes.

    ``existing`` holds ``(offset, size)`` of the list's capabilities; the new
    one must be dword aligned, inside ``[lo, hi)`` and overlap none of them.
    With ``offset=None`` it goes right after the last one (dword aligned).
    """
    if offset is None:
        offset = lo
        for start, length in existing:
            offset = max(offset, (start + length + 3) & ~3)
    if offset & 3:
        raise PciLayoutError("capability offset is not dword aligned", offset)
    if offset < lo or offset + size > hi:
        raise PciLayoutError(
            f"capability of {size:#x} bytes must lie in [{lo:#x}, {hi:#x})", offset
        )
    for start, length in existing:
        if offset < start + length and start < offset + size:
            raise PciLayoutError(
                f"capability overlaps the one at {start:#x} (+{length:#x})", offset
            )
    return offset


def walk_capabilities(read: ConfigReader) -> list[tuple[int, int]]:
    """Return ``[(cap_id, offset), …]`` of the standard list, as read through ``read``.

    Raises :class:`PciCapabilityChainError` when a pointer is misaligned,
    outside 0x40-0xFF, or the chain loops (pciutils: "chain looped").
    """
    result: list[tuple[int, int]] = []
    seen: set[int] = set()
    where = PCI_CAPABILITY_LIST
    pointer = read(PCI_CAPABILITY_LIST, 1)
    while pointer:
        if pointer & 3 or not PCI_CAP_MIN_OFFSET <= pointer <= PCI_CFG_SPACE_SIZE - 4:
            raise PciCapabilityChainError(where, f"pointer {pointer:#x} is misaligned or below 0x40")
        if pointer in seen:
            raise PciCapabilityChainError(where, f"chain loops back to {pointer:#x}")
        seen.add(pointer)
        result.append((read(pointer, 1), pointer))
        where = pointer + 1
        pointer = read(where, 1)
    return result


def walk_extended_capabilities(read: ConfigReader) -> list[tuple[int, int, int]]:
    """Return ``[(cap_id, version, offset), …]`` of the extended list.

    An all-zero or all-ones header at 0x100 means an empty list.  Raises
    :class:`PciCapabilityChainError` on a loop or a bad pointer.
    """
    result: list[tuple[int, int, int]] = []
    seen: set[int] = set()
    offset = PCI_EXT_CAP_START
    while True:
        header = read(offset, 4)
        if header in (0, 0xFFFFFFFF):
            return result
        if offset in seen:
            raise PciCapabilityChainError(offset, "extended chain loops")
        seen.add(offset)
        result.append((header & 0xFFFF, (header >> 16) & 0xF, offset))
        nxt = header >> 20
        if not nxt:
            return result
        if nxt & 3 or not PCI_EXT_CAP_START <= nxt <= PCI_CFG_SPACE_EXP_SIZE - 4:
            raise PciCapabilityChainError(offset, f"next pointer {nxt:#x} is misaligned or below 0x100")
        offset = nxt
