"""A PCI function with a type 0 header: identity, Command/Status, BARs, capabilities.

The header layout and the writability of each field follow PCI 3.0 §6.2 and,
for a PCI Express function, PCIe §7.5.1 (Latency Timer hardwired to 0, the
legacy Command bits hardwired to 0).  :class:`~iovirt.pci.bridge.PciBridge`
derives from this class for the type 1 header.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Sequence, TypedDict

from iovirt.pci.bar import PCI_ROM_SLOT, Bar, BarDecoder, BarKind
from iovirt.pci.capability import Capability, ExtendedCapability, place
from iovirt.pci.config import ConfigSpace
from iovirt.pci.errors import PciLayoutError
from iovirt.pci.regs import (
    PCI_BASE_ADDRESS_0,
    PCI_CACHE_LINE_SIZE,
    PCI_CAP_MIN_OFFSET,
    PCI_CAPABILITY_LIST,
    PCI_CFG_SPACE_EXP_SIZE,
    PCI_CFG_SPACE_SIZE,
    PCI_CLASS_PROG,
    PCI_COMMAND,
    PCI_COMMAND_INTX_DISABLE,
    PCI_COMMAND_MASTER,
    PCI_COMMAND_WRITABLE,
    PCI_DEVICE_ID,
    PCI_EXT_CAP_START,
    PCI_HEADER_TYPE,
    PCI_HEADER_TYPE_MULTI_FUNCTION,
    PCI_HEADER_TYPE_NORMAL,
    PCI_INTERRUPT_LINE,
    PCI_INTERRUPT_PIN,
    PCI_LATENCY_TIMER,
    PCI_REVISION_ID,
    PCI_ROM_ADDRESS,
    PCI_STATUS,
    PCI_STATUS_CAP_LIST,
    PCI_STATUS_INTERRUPT,
    PCI_STATUS_W1C,
    PCI_SUBSYSTEM_ID,
    PCI_SUBSYSTEM_VENDOR_ID,
    PCI_VENDOR_ID,
)

if TYPE_CHECKING:
    from iovirt.pci.bus import PciBus
    from iovirt.pci.msi import MsiCapability, MsiSink
    from iovirt.pci.msix import MsixCapability

log = logging.getLogger(__name__)

class _CommandStatusHook:
    """Command/Status dword: mask semantics, then tell the bus if decoding changed."""

    def __init__(self, function: PciFunction) -> None:
        self.function = function

    def config_read(self, offset: int, size: int) -> int:
        return self.function.config.get(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        cfg = self.function.config
        before = cfg.get(PCI_COMMAND, 2)
        cfg.default_write(offset, size, value)
        if cfg.get(PCI_COMMAND, 2) != before:
            self.function.decode_changed()


class FunctionOptions(TypedDict, total=False):
    """The keyword arguments of :class:`PciFunction`, for subclasses that pass them on."""

    revision: int
    subsystem_vendor_id: int
    subsystem_id: int
    pcie: bool
    interrupt_pin: int


class PciFunction:
    """One PCI function (type 0 header).

    ``PciFunction(vendor_id, device_id, class_code, *, revision=0,
    subsystem_vendor_id=0, subsystem_id=0, pcie=False, interrupt_pin=0)``;
    ``class_code`` is the 24-bit Class Code (base class << 16 | sub-class << 8
    | prog-if).  ``pcie=True`` gives the 4 KiB config space; add a
    :class:`~iovirt.pci.pcie.PcieCapability` to make it a PCI Express function.

    Host-side accesses: :meth:`config_read` / :meth:`config_write` (raising
    :class:`~iovirt.pci.errors.PciConfigAccessError` on bad accesses).
    Device side: :meth:`raise_interrupt` signals a vector through MSI-X, MSI
    or INTx, whichever the driver enabled.
    """

    header_type = PCI_HEADER_TYPE_NORMAL
    bar_count = 6
    rom_register = PCI_ROM_ADDRESS

    def __init__(
        self,
        vendor_id: int,
        device_id: int,
        class_code: int,
        *,
        revision: int = 0,
        subsystem_vendor_id: int = 0,
        subsystem_id: int = 0,
        pcie: bool = False,
        interrupt_pin: int = 0,
    ) -> None:
        self.pcie = pcie
        self.config = ConfigSpace(PCI_CFG_SPACE_EXP_SIZE if pcie else PCI_CFG_SPACE_SIZE)
        self.bars: list[Bar | None] = [None] * self.bar_count
        self.rom: Bar | None = None
        self.capabilities: list[Capability] = []
        self.extended_capabilities: list[ExtendedCapability] = []
        self.msi: MsiCapability | None = None
        self.msix: MsixCapability | None = None
        self.bus: PciBus | None = None
        self.devfn = 0
        self.msi_sink: MsiSink | None = None
        """Overrides the bus's sink (a function used without a bus)."""

        cfg = self.config
        cfg.init(PCI_VENDOR_ID, 2, vendor_id)
        cfg.init(PCI_DEVICE_ID, 2, device_id)
        cfg.init(PCI_COMMAND, 2, 0, PCI_COMMAND_WRITABLE)
        cfg.init(PCI_STATUS, 2, 0, 0, PCI_STATUS_W1C)
        cfg.init(PCI_REVISION_ID, 1, revision)
        cfg.init(PCI_CLASS_PROG, 3, class_code)
        cfg.init(PCI_CACHE_LINE_SIZE, 1, 0, 0xFF)
        # PCIe §7.5.1.3: the Latency Timer does not apply and is hardwired to 0.
        cfg.init(PCI_LATENCY_TIMER, 1, 0, 0 if pcie else 0xFF)
        cfg.init(PCI_HEADER_TYPE, 1, self.header_type)
        cfg.init(PCI_INTERRUPT_LINE, 1, 0, 0xFF)
        cfg.init(PCI_INTERRUPT_PIN, 1, interrupt_pin)
        cfg.add_hook(PCI_COMMAND, 4, _CommandStatusHook(self))
        self._init_header(subsystem_vendor_id, subsystem_id)

    def _init_header(self, subsystem_vendor_id: int, subsystem_id: int) -> None:
        """Type-specific header fields (overridden by the bridge)."""
        self.config.init(PCI_SUBSYSTEM_VENDOR_ID, 2, subsystem_vendor_id)
        self.config.init(PCI_SUBSYSTEM_ID, 2, subsystem_id)

    # -- identity ----------------------------------------------------------

    @property
    def vendor_id(self) -> int:
        """Vendor ID."""
        return self.config.get(PCI_VENDOR_ID, 2)

    @property
    def device_id(self) -> int:
        """Device ID."""
        return self.config.get(PCI_DEVICE_ID, 2)

    @property
    def class_code(self) -> int:
        """24-bit Class Code."""
        return self.config.get(PCI_CLASS_PROG, 3)

    @property
    def revision(self) -> int:
        """Revision ID."""
        return self.config.get(PCI_REVISION_ID, 1)

    @property
    def requester_id(self) -> int:
        """Routing/requester ID ``bus << 8 | dev << 3 | fn`` (0 bus when not on a bus)."""
        bus = self.bus
        return ((bus.number << 8) if bus is not None else 0) | self.devfn

    @property
    def command(self) -> int:
        """Current Command register."""
        return self.config.get(PCI_COMMAND, 2)

    def set_multifunction(self, on: bool) -> None:
        """Set the Multi-Function bit of Header Type (done by the bus)."""
        value = self.header_type | (PCI_HEADER_TYPE_MULTI_FUNCTION if on else 0)
        self.config.set_default(PCI_HEADER_TYPE, 1, value)

    # -- building ----------------------------------------------------------

    def add_bar(self, index: int, bar: Bar) -> Bar:
        """Install ``bar`` as BAR ``index`` (a 64-bit BAR takes ``index`` and ``index+1``)."""
        if bar.kind is BarKind.ROM:
            raise PciLayoutError("use add_rom() for an expansion ROM BAR")
        if bar.function is not None:
            raise PciLayoutError("BAR is already installed on a function")
        slots = 2 if bar.kind is BarKind.MEM64 else 1
        if not 0 <= index <= self.bar_count - slots:
            raise PciLayoutError(f"BAR index {index} out of range for {self.bar_count} BARs")
        for i in range(index, index + slots):
            if self.bars[i] is not None:
                raise PciLayoutError(f"BAR slot {i} is already used")
        bar.install(self, index, PCI_BASE_ADDRESS_0 + 4 * index)
        for i in range(index, index + slots):
            self.bars[i] = bar
        return bar

    def add_rom(self, bar: Bar) -> Bar:
        """Install the expansion ROM BAR (``Bar(size, BarKind.ROM)``)."""
        if bar.kind is not BarKind.ROM or self.rom is not None:
            raise PciLayoutError("expected one Bar of kind ROM")
        bar.install(self, PCI_ROM_SLOT, self.rom_register)
        self.rom = bar
        return bar

    def add_capability(self, cap: Capability, offset: int | None = None) -> int:
        """Append ``cap`` to the capability list; returns its offset.

        ``offset=None`` places it after the last capability.  Raises
        :class:`PciLayoutError` if it is misaligned, below 0x40, past 0xFF or
        overlaps another capability.
        """
        if cap.function is not None:
            raise PciLayoutError("capability is already installed on a function")
        existing = [(c.offset, c.size) for c in self.capabilities]
        offset = place(existing, offset, cap.size, PCI_CAP_MIN_OFFSET, PCI_CFG_SPACE_SIZE)
        # Install first: if the capability rejects its layout, the chain is untouched.
        cap.install(self, offset)
        cfg = self.config
        cfg.init(offset, 1, cap.cap_id)
        cfg.init(offset + 1, 1, 0)
        if self.capabilities:
            cfg.init(self.capabilities[-1].offset + 1, 1, offset)
        else:
            cfg.init(PCI_CAPABILITY_LIST, 1, offset)
            # PCI 3.0 §6.2.3: Capabilities List is set iff the pointer is valid.
            cfg.set_default(PCI_STATUS, 2, cfg.get(PCI_STATUS, 2) | PCI_STATUS_CAP_LIST)
        self.capabilities.append(cap)
        return offset

    def add_extended_capability(self, cap: ExtendedCapability, offset: int | None = None) -> int:
        """Append ``cap`` to the extended list at 0x100; returns its offset.

        Needs the 4 KiB config space (``pcie=True``).
        """
        if not self.pcie:
            raise PciLayoutError("extended capabilities need a PCI Express (4 KiB) config space")
        if cap.function is not None:
            raise PciLayoutError("capability is already installed on a function")
        existing = [(c.offset, c.size) for c in self.extended_capabilities]
        if not existing and offset not in (None, PCI_EXT_CAP_START):
            raise PciLayoutError("the first extended capability must be at 0x100", offset)
        offset = place(existing, offset, cap.size, PCI_EXT_CAP_START, PCI_CFG_SPACE_EXP_SIZE)
        cap.install(self, offset)
        cfg = self.config
        cfg.init(offset, 4, cap.cap_id | cap.version << 16)
        if self.extended_capabilities:
            prev = self.extended_capabilities[-1].offset
            cfg.init(prev, 4, cfg.get(prev, 4) | offset << 20)
        self.extended_capabilities.append(cap)
        return offset

    # -- host side ---------------------------------------------------------

    def config_read(self, offset: int, size: int) -> int:
        """A CPU config read (hooks apply); raises on a bad access."""
        return self.config.read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        """A CPU config write (masks and hooks apply); raises on a bad access."""
        self.config.write(offset, size, value)

    def decode_changed(self) -> None:
        """Command or a BAR changed: the host's address map is stale."""
        if self.bus is not None:
            self.bus.decode_changed()

    def iter_bars(self) -> Sequence[BarDecoder]:
        """The installed BARs (each once) and the ROM, in index order: where this function decodes."""
        bars: list[Bar] = []
        for bar in self.bars:
            if bar is not None and bar not in bars:
                bars.append(bar)
        if self.rom is not None:
            bars.append(self.rom)
        return bars

    def reset(self) -> None:
        """Conventional reset: registers to defaults, BARs unassigned, MSI/MSI-X state cleared."""
        self.config.reset()
        for bar in self.iter_bars():
            bar.reset()
        for cap in self.capabilities:
            cap.reset()
        for ext in self.extended_capabilities:
            ext.reset()
        self.decode_changed()

    # -- interrupts --------------------------------------------------------

    def raise_interrupt(self, vector: int = 0) -> None:
        """Signal ``vector``: MSI-X if enabled, else MSI if enabled, else INTx.

        INTx is modelled as the Status Interrupt Status bit (PCI 3.0 §6.2.3),
        set unless Interrupt Disable is set; :meth:`lower_intx` clears it.
        """
        if self.msix is not None and self.msix.enabled:
            self.msix.notify(vector)
        elif self.msi is not None and self.msi.enabled:
            self.msi.notify(vector)
        elif self.config.get(PCI_INTERRUPT_PIN, 1):
            status = self.config.get(PCI_STATUS, 2)
            self.config.set(PCI_STATUS, 2, status | PCI_STATUS_INTERRUPT)
            if self.command & PCI_COMMAND_INTX_DISABLE:
                log.debug("%s: INTx pending but disabled by Command.Interrupt Disable", self)
        else:
            log.debug("%s: vector %d raised with no interrupt mechanism enabled", self, vector)

    def lower_intx(self) -> None:
        """Deassert INTx (clear Status.Interrupt Status)."""
        status = self.config.get(PCI_STATUS, 2)
        self.config.set(PCI_STATUS, 2, status & ~PCI_STATUS_INTERRUPT)

    def deliver_msi(self, address: int, data: int) -> None:
        """Send an MSI/MSI-X memory write to the bus's :class:`MsiSink`.

        An MSI is a memory write, so it is dropped when Bus Master Enable is
        clear (PCI 3.0 §6.8: a function must not generate MSIs without it).
        """
        if not self.config.get(PCI_COMMAND, 2) & PCI_COMMAND_MASTER:
            log.debug("%s: MSI %#x/%#x dropped: Bus Master disabled", self, address, data)
            return
        sink = self.msi_sink
        if sink is None and self.bus is not None:
            sink = self.bus.msi_sink
        if sink is None:
            log.warning("%s: MSI %#x/%#x dropped: no MsiSink connected", self, address, data)
            return
        sink.deliver_msi(self.requester_id, address, data)

    def __repr__(self) -> str:
        rid = self.requester_id
        return (
            f"{type(self).__name__}({rid >> 8:02x}:{(rid >> 3) & 0x1F:02x}.{rid & 7} "
            f"{self.vendor_id:04x}:{self.device_id:04x})"
        )
