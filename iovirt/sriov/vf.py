"""A virtual function: a PCI function whose identity and BARs belong to its PF.

PCIe §9.3.4 (SR-IOV VF configuration space), as QEMU ``pcie_sriov.c``
models it:

- Vendor ID and Device ID read 0xFFFF (§9.3.4.1.1-2); software takes the
  PF's Vendor ID and the PF's VF Device ID instead.  :attr:`vendor_id` and
  :attr:`device_id` return those (what Linux shows), the config bytes stay
  0xFFFF.
- Command: only Bus Master Enable is writable; a VF's memory decoding is
  governed by the PF's VF MSE bit, and I/O Space, Interrupt Disable and the
  rest are read-only 0 (§9.3.4.1.3).  VFs have no INTx: Interrupt Line and
  Pin read 0 (§9.3.4.1.14-15).
- The BARs and the expansion ROM of the header read 0 (§9.3.4.1.10-12).
  The BARs a VF builder adds are the VF's *decoders*: VF ``k`` decodes its
  BAR ``n`` at ``PF VF BARn + k * VF BARn size`` (§9.3.3.14), exposed to the
  host's address map by :meth:`VirtualFunction.iter_bars`.
- Header Type's Multi-Function bit stays 0: VFs are found through the PF,
  never by scanning.

:class:`VfRole` carries these rules and combines with any function class
(``class VirtioPciVf(VfRole, VirtioPciFunction)``), so a VF can be a full
virtio-pci function built by the same code as its PF; :class:`VirtualFunction`
is the generic VF that a builder adds BARs and capabilities to.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from iovirt.pci.bar import Bar, BarKind
from iovirt.pci.errors import PciLayoutError
from iovirt.pci.function import PciFunction
from iovirt.pci.regs import (
    PCI_CLASS_PROG,
    PCI_COMMAND,
    PCI_COMMAND_MASTER,
    PCI_DEVICE_ID,
    PCI_INTERRUPT_LINE,
    PCI_INTERRUPT_PIN,
    PCI_SUBSYSTEM_ID,
    PCI_SUBSYSTEM_VENDOR_ID,
    PCI_VENDOR_ID,
)

if TYPE_CHECKING:
    from iovirt.sriov.capability import SriovCapability

VF_ID = 0xFFFF


class VfBarWindow:
    """Where VF ``k``'s BAR ``n`` decodes: the host address map's view of it.

    Offers what the address map reads of a :class:`~iovirt.pci.bar.Bar`
    (``kind``, ``size``, ``address``, ``decoding()``, ``mmio_read``,
    ``mmio_write``, ``reset``), computed from the PF's SR-IOV capability;
    accesses go to the VF's own :class:`Bar` and its regions.
    """

    def __init__(self, vf: VfRole, bar: Bar) -> None:
        self.vf = vf
        self.bar = bar
        self.kind = bar.kind
        self.index = bar.index
        self.prefetchable = bar.prefetchable

    @property
    def size(self) -> int:
        """The VF BAR size: the VF's BAR rounded up to the System Page Size."""
        return self.vf.sriov.vf_bar_size(self.index)

    @property
    def address(self) -> int:
        """``VF BARn base + k * size``, or 0 while VF BARn is unassigned."""
        base = self.vf.sriov.vf_bar_base(self.index)
        return base + self.vf.vf_index * self.size if base else 0

    def decoding(self) -> bool:
        """Decodes while the VF exists, the PF's VF MSE is set and VF BARn is assigned."""
        sriov = self.vf.sriov
        return self.vf.bus is not None and sriov.vf_memory_enabled and bool(sriov.vf_bar_base(self.index))

    def mmio_read(self, offset: int, size: int) -> int:
        """Read through the VF's BAR (bytes past its own size read 0)."""
        return self.bar.mmio_read(offset, size)

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        """Write through the VF's BAR."""
        self.bar.mmio_write(offset, size, value)

    def reset(self) -> None:
        """Reset the underlying BAR (the window itself keeps no state)."""
        self.bar.reset()

    def __repr__(self) -> str:
        return f"VfBarWindow(vf={self.vf.vf_index}, index={self.index}, address={self.address:#x})"


class VfRole(PciFunction):
    """What makes a PCI function a VF; put it first among the bases of a function class.

    ``class SomeVf(VfRole, SomeFunction)`` is constructed with
    ``(sriov, vf_index, *base_args, **base_kwargs)``: ``SomeFunction`` builds
    the function (BARs, capabilities, device model) as it would for any
    function, then the VF header rules of the module docstring are applied.
    :class:`VirtualFunction` is the generic one.
    """

    def __init__(self, sriov: SriovCapability, vf_index: int, *args: Any, **kwargs: Any) -> None:
        # Set before the base constructor runs: its add_bar calls come here.
        self.sriov = sriov
        self.pf = sriov.pf
        self.vf_index = vf_index
        self._windows: list[VfBarWindow] = []
        super().__init__(*args, **kwargs)
        cfg = self.config
        cfg.init(PCI_VENDOR_ID, 2, VF_ID)
        cfg.init(PCI_DEVICE_ID, 2, VF_ID)
        cfg.init(PCI_CLASS_PROG, 3, self.pf.class_code)
        cfg.init(PCI_SUBSYSTEM_VENDOR_ID, 2, self.pf.config.get(PCI_SUBSYSTEM_VENDOR_ID, 2))
        cfg.init(PCI_COMMAND, 2, 0, PCI_COMMAND_MASTER)
        cfg.init(PCI_INTERRUPT_LINE, 1, 0)
        cfg.init(PCI_INTERRUPT_PIN, 1, 0)

    @property
    def vendor_id(self) -> int:
        """The PF's Vendor ID (the VF's own register reads 0xFFFF)."""
        return self.pf.vendor_id

    @property
    def device_id(self) -> int:
        """The PF's VF Device ID (the VF's own register reads 0xFFFF)."""
        return self.sriov.vf_device_id

    def set_multifunction(self, on: bool) -> None:
        """VFs keep Multi-Function clear: software finds them through the PF, not by scanning."""

    def add_bar(self, index: int, bar: Bar) -> Bar:
        """Add a decoder; its header register reads 0 and ignores writes (§9.3.4.1.10)."""
        if bar.kind not in (BarKind.MEM32, BarKind.MEM64):
            raise PciLayoutError(f"a VF BAR must be a memory BAR, not {bar.kind.value} (SR-IOV §9.3.3.14)")
        super().add_bar(index, bar)
        # The Bar stays the hook of its register; with value and mask 0 it
        # reads 0 and treats every write as a sizing probe that moves nothing.
        self.config.init(bar.register, 8 if bar.kind is BarKind.MEM64 else 4, 0)
        self._windows.append(VfBarWindow(self, bar))
        self._windows.sort(key=lambda w: w.index)
        return bar

    def add_rom(self, bar: Bar) -> Bar:
        """VFs have no expansion ROM (§9.3.4.1.12: the register is read-only 0)."""
        raise PciLayoutError("a VF has no expansion ROM BAR")

    def iter_bars(self) -> Sequence[VfBarWindow]:
        """Where this VF decodes: one window per VF BAR, placed by the PF."""
        return list(self._windows)

    def own_bars(self) -> list[Bar]:
        """The VF's BARs as its builder added them (each once, in index order)."""
        return [w.bar for w in self._windows]


class VirtualFunction(VfRole):
    """A generic VF: an empty function to add BARs and capabilities to.

    ``VirtualFunction(sriov, vf_index, *, revision=None, subsystem_id=None)``;
    ``revision`` and ``subsystem_id`` may differ from the PF's (§9.3.4.1.4,
    .13) and default to the PF's.
    """

    def __init__(
        self, sriov: SriovCapability, vf_index: int, *, revision: int | None = None, subsystem_id: int | None = None
    ) -> None:
        pf = sriov.pf
        super().__init__(
            sriov,
            vf_index,
            VF_ID,
            VF_ID,
            pf.class_code,
            revision=pf.revision if revision is None else revision,
            subsystem_id=pf.config.get(PCI_SUBSYSTEM_ID, 2) if subsystem_id is None else subsystem_id,
            pcie=True,
        )
