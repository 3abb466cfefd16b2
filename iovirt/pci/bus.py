"""A PCI bus: 32 devices of up to 8 functions, and type 1 routing below it.

The root bus has a fixed number (0 by default); a bus behind a
:class:`~iovirt.pci.bridge.PciBridge` takes its number from the bridge's
Secondary Bus Number register, so renumbering by firmware or a guest moves
it.  Config routing follows the PCI-to-PCI Bridge Architecture §3.2.5.3-5: a
bridge claims a bus number N when ``secondary <= N <= subordinate``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from iovirt.pci.errors import PciTopologyError

if TYPE_CHECKING:
    from iovirt.pci.bridge import PciBridge
    from iovirt.pci.function import PciFunction
    from iovirt.pci.host import PciHost
    from iovirt.pci.msi import MsiSink

MAX_DEVICES = 32
MAX_FUNCTIONS = 8


class PciBus:
    """A bus.  ``PciBus(number=0)`` for a root bus; bridges make their own secondary bus."""

    def __init__(self, number: int = 0, parent: PciBridge | None = None) -> None:
        self._number = number
        self.parent = parent
        self.host: PciHost | None = None
        self._msi_sink: MsiSink | None = None
        self._devfn: list[PciFunction | None] = [None] * (MAX_DEVICES * MAX_FUNCTIONS)

    @property
    def number(self) -> int:
        """Bus number: fixed for a root bus, the Secondary Bus Number behind a bridge."""
        if self.parent is not None:
            return self.parent.secondary_bus_number
        return self._number

    @property
    def msi_sink(self) -> MsiSink | None:
        """Where functions on this bus send MSIs (the root bus's sink)."""
        if self.parent is not None:
            parent_bus = self.parent.bus
            return parent_bus.msi_sink if parent_bus is not None else None
        return self._msi_sink

    @msi_sink.setter
    def msi_sink(self, sink: MsiSink | None) -> None:
        if self.parent is not None:
            raise PciTopologyError("set the MsiSink on the root bus")
        self._msi_sink = sink

    def add_function(self, function: PciFunction, device: int, fn: int = 0) -> PciFunction:
        """Place ``function`` at ``device.fn``; a device with several functions becomes multi-function."""
        if not 0 <= device < MAX_DEVICES or not 0 <= fn < MAX_FUNCTIONS:
            raise PciTopologyError(f"device {device} / function {fn} out of range (0-31 / 0-7)")
        devfn = device << 3 | fn
        if self._devfn[devfn] is not None:
            raise PciTopologyError(f"{device:02x}.{fn} is already occupied")
        if function.bus is not None:
            raise PciTopologyError(f"{function!r} is already on a bus")
        function.bus = self
        function.devfn = devfn
        self._devfn[devfn] = function
        siblings = [f for f in self._devfn[device << 3 : (device + 1) << 3] if f is not None]
        for sibling in siblings:
            sibling.set_multifunction(len(siblings) > 1)
        self.decode_changed()
        return function

    def remove_function(self, function: PciFunction) -> None:
        """Take ``function`` off this bus (hot-unplug, or SR-IOV VFs going away)."""
        if function.bus is not self or self._devfn[function.devfn] is not function:
            raise PciTopologyError(f"{function!r} is not on bus {self.number}")
        device = function.devfn >> 3
        self._devfn[function.devfn] = None
        function.bus = None
        siblings = [f for f in self._devfn[device << 3 : (device + 1) << 3] if f is not None]
        for sibling in siblings:
            sibling.set_multifunction(len(siblings) > 1)
        self.decode_changed()

    def function(self, device: int, fn: int = 0) -> PciFunction | None:
        """The function at ``device.fn`` or ``None``."""
        return self._devfn[device << 3 | fn]

    def functions(self) -> list[PciFunction]:
        """This bus's functions in device/function order."""
        return [f for f in self._devfn if f is not None]

    def bridges(self) -> list[PciBridge]:
        """The bridges on this bus."""
        from iovirt.pci.bridge import PciBridge

        return [f for f in self._devfn if isinstance(f, PciBridge)]

    def route(self, number: int) -> PciBus | None:
        """The bus that config accesses to bus ``number`` reach from here, if any."""
        if number == self.number:
            return self
        for bridge in self.bridges():
            secondary = bridge.secondary_bus_number
            if secondary and secondary <= number <= bridge.subordinate_bus_number:
                return bridge.secondary_bus.route(number)
        return None

    def walk(self) -> Iterator[PciFunction]:
        """Every function on this bus and, depth first, behind its bridges."""
        for function in self.functions():
            yield function
            secondary = getattr(function, "secondary_bus", None)
            if secondary is not None:
                yield from secondary.walk()

    def decode_changed(self) -> None:
        """Some BAR, window or Command changed: invalidate the host's address map."""
        bus: PciBus | None = self
        while bus is not None and bus.parent is not None:
            bus = bus.parent.bus
        if bus is not None and bus.host is not None:
            bus.host.invalidate()

    def reset(self) -> None:
        """Reset every function on the bus (bridges reset their secondary bus too)."""
        for function in self.functions():
            function.reset()
