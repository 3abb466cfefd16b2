"""Which BAR answers at which address: built from the tree, cached until it changes.

Built by walking the buses from the root: a BAR is in the map when it
decodes (Command Memory/IO Space set, an address assigned) and, behind
bridges, when every bridge on the way forwards it (its own Memory/IO Space
enabled and the BAR inside one of its windows, PCI-to-PCI Bridge 1.2 §4.1-4.3).
The host drops the map whenever a Command register, BAR, window or bus
number changes and rebuilds it on the next access, so accesses only bisect.
"""

from __future__ import annotations

import bisect
import logging
from typing import TYPE_CHECKING

from iovirt.pci.bar import BarDecoder, BarKind
from iovirt.pci.regs import PCI_COMMAND_IO, PCI_COMMAND_MEMORY

if TYPE_CHECKING:
    from iovirt.pci.bus import PciBus

log = logging.getLogger(__name__)

Window = tuple[int, int]  # inclusive (base, limit)


class AddressMap:
    """Sorted, non-overlapping ``[start, end)`` ranges of decoding BARs, for one space."""

    def __init__(self, entries: list[tuple[int, int, BarDecoder]]) -> None:
        entries.sort(key=lambda e: e[0])
        self.starts: list[int] = []
        self.entries: list[tuple[int, int, BarDecoder]] = []
        for entry in entries:
            if self.entries and entry[0] < self.entries[-1][1]:
                log.warning("%r overlaps %r; the first one decodes", entry[2], self.entries[-1][2])
                continue
            self.starts.append(entry[0])
            self.entries.append(entry)

    def lookup(self, addr: int, size: int) -> tuple[int, int, BarDecoder] | None:
        """The entry containing ``[addr, addr+size)``, if one does."""
        i = bisect.bisect_right(self.starts, addr) - 1
        if i >= 0:
            entry = self.entries[i]
            if addr + size <= entry[1]:
                return entry
        return None


def _inside(start: int, end: int, filters: list[list[Window]]) -> bool:
    return all(any(b <= start and end - 1 <= l for b, l in windows) for windows in filters)


def build_maps(root: PciBus) -> tuple[AddressMap, AddressMap]:
    """``(memory, io)`` address maps of everything reachable from ``root``."""
    memory: list[tuple[int, int, BarDecoder]] = []
    io: list[tuple[int, int, BarDecoder]] = []
    _collect(root, [], [], memory, io)
    return AddressMap(memory), AddressMap(io)


def _collect(
    bus: PciBus,
    mem_filters: list[list[Window]],
    io_filters: list[list[Window]],
    memory: list[tuple[int, int, BarDecoder]],
    io: list[tuple[int, int, BarDecoder]],
) -> None:
    from iovirt.pci.bridge import PciBridge

    for function in bus.functions():
        for bar in function.iter_bars():
            if not bar.decoding():
                continue
            start, end = bar.address, bar.address + bar.size
            if bar.kind is BarKind.IO:
                if _inside(start, end, io_filters):
                    io.append((start, end, bar))
            elif _inside(start, end, mem_filters):
                memory.append((start, end, bar))
        if isinstance(function, PciBridge):
            command = function.command
            windows = [function.memory_window(), function.prefetchable_window()]
            mem_windows = [w for w in windows if w[0] <= w[1]] if command & PCI_COMMAND_MEMORY else []
            io_window = function.io_window()
            io_windows = [io_window] if command & PCI_COMMAND_IO and io_window[0] <= io_window[1] else []
            _collect(
                function.secondary_bus,
                mem_filters + [mem_windows],
                io_filters + [io_windows],
                memory,
                io,
            )
