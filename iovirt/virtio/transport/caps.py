"""The virtio structure PCI capabilities (virtio 1.2 section 4.1.4), both sides.

Device side: :class:`VirtioPciCap` is a vendor-specific capability (ID 0x09)
holding ``struct virtio_pci_cap`` (plus ``notify_off_multiplier`` for the
notify capability); :class:`VirtioPciCfgCap` is ``struct virtio_pci_cfg_cap``,
the PCI_CFG access window whose ``pci_cfg_data`` reads and writes are
forwarded to a BAR (4.1.4.9).

Driver side: :func:`find_virtio_caps` walks a function's capability list
through config reads, as Linux's ``virtio_pci_find_capability`` does, and
returns the first structure of each ``cfg_type`` (4.1.4.1: the driver SHOULD
use the first instance of each type it supports).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from iovirt.pci.capability import ConfigReader, walk_capabilities
from iovirt.pci.regs import PCI_CAP_ID_VNDR
from iovirt.pci.vendor import VendorCapability
from iovirt.virtio.transport.defs import (
    VIRTIO_PCI_CAP_BAR,
    VIRTIO_PCI_CAP_CFG_TYPE,
    VIRTIO_PCI_CAP_ID,
    VIRTIO_PCI_CAP_LENGTH,
    VIRTIO_PCI_CAP_NOTIFY_CFG,
    VIRTIO_PCI_CAP_OFFSET,
    VIRTIO_PCI_CAP_PCI_CFG,
    VIRTIO_PCI_CFG_CAP_DATA,
    VIRTIO_PCI_NOTIFY_CAP_MULT,
)

if TYPE_CHECKING:
    from iovirt.pci.bar import Bar
    from iovirt.pci.function import PciFunction

log = logging.getLogger(__name__)

_MAX_BAR = 5  # 4.1.4: bar values 0x0-0x5; others are reserved


def _payload(cfg_type: int, bar: int, offset: int, length: int, cap_id: int, extra: bytes) -> bytes:
    # struct virtio_pci_cap after cap_vndr, cap_next, cap_len.
    return (
        bytes([cfg_type, bar, cap_id, 0, 0])
        + offset.to_bytes(4, "little")
        + length.to_bytes(4, "little")
        + extra
    )


class VirtioPciCap(VendorCapability):
    """``struct virtio_pci_cap``: where a virtio structure lives (read-only for the driver).

    ``VirtioPciCap(cfg_type, bar, offset, length, *, cap_id=0, notify_off_multiplier=None)``;
    a notify capability (cfg_type 2) carries ``notify_off_multiplier``.
    """

    def __init__(
        self,
        cfg_type: int,
        bar: int,
        offset: int,
        length: int,
        *,
        cap_id: int = 0,
        notify_off_multiplier: int | None = None,
    ) -> None:
        extra = b""
        if cfg_type == VIRTIO_PCI_CAP_NOTIFY_CFG:
            if notify_off_multiplier is None:
                raise ValueError("a notify capability needs notify_off_multiplier")
            extra = notify_off_multiplier.to_bytes(4, "little")
        super().__init__(_payload(cfg_type, bar, offset, length, cap_id, extra))
        self.cfg_type = cfg_type
        self.bar = bar
        self.struct_offset = offset
        self.length = length


class VirtioPciCfgCap(VendorCapability):
    """``struct virtio_pci_cfg_cap``: an access window into the BARs through config space.

    ``bar``, ``offset``, ``length`` and ``pci_cfg_data`` are writable
    (4.1.4.9); a read of ``pci_cfg_data`` performs a BAR read of ``length``
    bytes at ``offset`` and a write performs the BAR write.  A window the
    driver set up wrongly (length not 1/2/4, unaligned offset, outside the BAR,
    no such BAR) is a driver bug: it is logged and the access does nothing.
    """

    def __init__(self) -> None:
        wmask = bytes([0, 0xFF, 0, 0, 0]) + b"\xff" * 4 + b"\xff" * 4 + b"\xff" * 4
        super().__init__(_payload(VIRTIO_PCI_CAP_PCI_CFG, 0, 0, 0, 0, bytes(4)), wmask)

    def install(self, function: PciFunction, offset: int) -> None:
        super().install(function, offset)
        function.config.add_hook(offset + VIRTIO_PCI_CFG_CAP_DATA, 4, self)

    def _window(self, level: int) -> tuple[Bar, int, int] | None:
        function = self.function
        assert function is not None
        cfg = function.config
        bar_index = cfg.get(self.offset + VIRTIO_PCI_CAP_BAR, 1)
        offset = cfg.get(self.offset + VIRTIO_PCI_CAP_OFFSET, 4)
        length = cfg.get(self.offset + VIRTIO_PCI_CAP_LENGTH, 4)
        bar = function.bars[bar_index] if bar_index <= _MAX_BAR else None
        if length not in (1, 2, 4) or offset % length or bar is None or offset + length > bar.size:
            log.log(
                level,
                "%r: virtio pci_cfg window bar %d offset %#x length %d is not a valid BAR access; ignored",
                function, bar_index, offset, length,
            )
            return None
        return bar, offset, length

    def config_read(self, offset: int, size: int) -> int:
        """A read of ``pci_cfg_data``: fetch from the BAR, then read the stored bytes."""
        function = self.function
        assert function is not None
        data_at = self.offset + VIRTIO_PCI_CFG_CAP_DATA
        # A config dump (lspci -xxx) reads this too: not worth a warning.
        window = self._window(logging.DEBUG)
        if window is not None:
            bar, bar_offset, length = window
            value = bar.mmio_read(bar_offset, length)
            function.config.set(data_at, 4, value)
        return function.config.get(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        """A write of ``pci_cfg_data``: store it, then write its first ``length`` bytes to the BAR."""
        function = self.function
        assert function is not None
        function.config.default_write(offset, size, value)
        window = self._window(logging.WARNING)
        if window is not None:
            bar, bar_offset, length = window
            data = function.config.get(self.offset + VIRTIO_PCI_CFG_CAP_DATA, 4)
            bar.mmio_write(bar_offset, length, data & ((1 << (8 * length)) - 1))


@dataclass(frozen=True)
class VirtioCapInfo:
    """One virtio structure as a driver finds it: where its capability is and what it says."""

    cap_offset: int
    cfg_type: int
    bar: int
    offset: int
    length: int
    cap_id: int
    notify_off_multiplier: int = 0


def find_virtio_caps(read: ConfigReader) -> dict[int, VirtioCapInfo]:
    """The first virtio structure of each ``cfg_type``, found through config reads ``read``.

    Capabilities with a reserved ``bar`` are ignored (4.1.4.1).
    """
    found: dict[int, VirtioCapInfo] = {}
    for cap, offset in walk_capabilities(read):
        if cap != PCI_CAP_ID_VNDR:
            continue
        cfg_type = read(offset + VIRTIO_PCI_CAP_CFG_TYPE, 1)
        bar = read(offset + VIRTIO_PCI_CAP_BAR, 1)
        if bar > _MAX_BAR or cfg_type in found:
            continue
        multiplier = read(offset + VIRTIO_PCI_NOTIFY_CAP_MULT, 4) if cfg_type == VIRTIO_PCI_CAP_NOTIFY_CFG else 0
        found[cfg_type] = VirtioCapInfo(
            cap_offset=offset,
            cfg_type=cfg_type,
            bar=bar,
            offset=read(offset + VIRTIO_PCI_CAP_OFFSET, 4),
            length=read(offset + VIRTIO_PCI_CAP_LENGTH, 4),
            cap_id=read(offset + VIRTIO_PCI_CAP_ID, 1),
            notify_off_multiplier=multiplier,
        )
    return found
