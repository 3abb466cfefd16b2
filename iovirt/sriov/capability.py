"""The SR-IOV extended capability (PCIe Base Specification §9.3.3) and the VF lifecycle.

Register model after QEMU ``hw/pci/pcie_sriov.c``, acceptance test after
Linux ``drivers/pci/iov.c``.  What a driver writes is never raised; every
rule below is applied, and a rejected write is logged once:

- NumVFs is writable only while VF Enable is clear (§9.3.3.7; QEMU makes
  its write mask 0).  A value above TotalVFs is ignored and NumVFs keeps its
  value (the spec leaves it undefined), so NumVFs never exceeds TotalVFs.
- VF Enable is RW (§9.3.3.3.1) and reads back what was written, NumVFs 0
  included: exactly NumVFs VFs become visible when it is set, so with NumVFs
  0 none do (the bit stays set, as QEMU keeps it).  It stays clear only when
  the VFs cannot be placed on the PF's bus, which :func:`attach_pf` rules out.
- First VF Offset and VF Stride are recomputed whenever NumVFs or ARI
  Capable Hierarchy changes (§9.3.3.9-10), from the device's
  :data:`~iovirt.sriov.routing.VfRouting`.  They are checked at build time
  for every NumVFs in 1..TotalVFs and both ARI settings: Offset is never 0,
  Stride never 0 when NumVFs > 1 (Linux ``sriov_init`` fails with -EIO
  otherwise).
- ARI Capable Hierarchy and System Page Size cannot change while VF Enable
  is set (results undefined by the spec; the write is ignored).  A System
  Page Size without exactly one bit, or with a bit Supported Page Sizes does
  not offer, is ignored (§9.3.3.13: software must write one supported size).
- VF BARn (§9.3.3.14) sizes like a BAR; its size is the VF's BAR rounded up
  to the System Page Size, so each VF's BAR is a whole number of pages.  VF
  ``k`` decodes BAR ``n`` at ``VF BARn + k * size``, and only while VF MSE is
  set (§9.3.3.3.4).
- Setting VF Enable puts NumVFs VFs on the PF's bus at ``PF RID + Offset +
  n * Stride``; clearing it takes them off and resets them.  A PF reset
  (FLR) clears VF Enable (§9.3.3.3.1) and so removes the VFs too.
- VF Migration is not supported: VF Migration Capable is 0, InitialVFs
  equals TotalVFs (§9.3.3.8), the migration control and status bits are
  read-only 0, VF Migration State Array Offset is 0.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from iovirt.pci.bar import BarKind
from iovirt.pci.capability import ExtendedCapability
from iovirt.pci.errors import PciLayoutError
from iovirt.pci.regs import PCI_BASE_ADDRESS_MEM_PREFETCH, PCI_BASE_ADDRESS_MEM_TYPE_64
from iovirt.sriov.errors import SriovLayoutError
from iovirt.sriov.regs import (
    DEFAULT_SUPPORTED_PAGE_SIZES,
    PCI_EXT_CAP_ID_SRIOV,
    PCI_EXT_CAP_SRIOV_SIZEOF,
    PCI_SRIOV_BAR,
    PCI_SRIOV_CTRL,
    PCI_SRIOV_CTRL_ARI,
    PCI_SRIOV_CTRL_MSE,
    PCI_SRIOV_CTRL_VFE,
    PCI_SRIOV_FUNC_LINK,
    PCI_SRIOV_INITIAL_VF,
    PCI_SRIOV_NUM_BARS,
    PCI_SRIOV_NUM_VF,
    PCI_SRIOV_SUP_PGSIZE,
    PCI_SRIOV_SYS_PGSIZE,
    PCI_SRIOV_TOTAL_VF,
    PCI_SRIOV_VERSION,
    PCI_SRIOV_VF_DID,
    PCI_SRIOV_VF_OFFSET,
    PCI_SRIOV_VF_STRIDE,
    SRIOV_PAGE_SHIFT,
)
from iovirt.sriov.routing import VfRouting, default_routing, vf_routing_id
from iovirt.sriov.slots import attach_vf, detach_vf
from iovirt.sriov.vf import VfRole

if TYPE_CHECKING:
    from iovirt.pci.bus import PciBus
    from iovirt.pci.function import PciFunction

log = logging.getLogger(__name__)

VfFactory = Callable[["SriovCapability", int], VfRole]
"""``make_vf(sriov, vf_index)`` builds VF ``vf_index`` (BARs, capabilities, device model).

It returns a :class:`~iovirt.sriov.vf.VfRole` function made for ``sriov`` and
``vf_index``: a :class:`~iovirt.sriov.vf.VirtualFunction` it filled in, or an
instance of ``class SomeVf(VfRole, SomeFunction)``.  Called once per
VF when the capability is installed.
"""

_CTRL_WRITABLE = PCI_SRIOV_CTRL_VFE | PCI_SRIOV_CTRL_MSE | PCI_SRIOV_CTRL_ARI
_MIN_SUPPORTED_PAGE_SIZES = 0x553  # §9.3.3.12: 4K, 8K, 64K, 256K, 1M and 4M are required


@dataclass(frozen=True)
class VfBarLayout:
    """One VF BAR as the VFs' builder declared it: index, kind, size, prefetchable."""

    index: int
    kind: BarKind
    size: int
    prefetchable: bool


def patch_register(current: int, reg: int, reg_size: int, offset: int, size: int, value: int) -> int | None:
    """What register ``[reg, reg+reg_size)`` would hold if every bit took this write; None if missed."""
    lo, hi = max(reg, offset), min(reg + reg_size, offset + size)
    if lo >= hi:
        return None
    for byte in range(lo, hi):
        shift = 8 * (byte - reg)
        current = current & ~(0xFF << shift) | ((value >> (8 * (byte - offset))) & 0xFF) << shift
    return current


class SriovCapability(ExtendedCapability):
    """The SR-IOV capability of a PF, owning its VFs.

    ``SriovCapability(total_vfs, vf_device_id, make_vf, *,
    supported_page_sizes=0x553, routing=default_routing)``.  Installing it on
    a PCI Express function (with ``pf.add_extended_capability``) builds the
    TotalVFs VFs with ``make_vf`` (a :data:`VfFactory`), as QEMU creates
    every VF at PF realize; the VF BARs of the capability are the BARs the
    VFs have.  Place the PF with :func:`attach_pf` so the VFs'
    routing IDs are checked against its bus.
    """

    def __init__(
        self,
        total_vfs: int,
        vf_device_id: int,
        make_vf: VfFactory,
        *,
        supported_page_sizes: int = DEFAULT_SUPPORTED_PAGE_SIZES,
        routing: VfRouting = default_routing,
    ) -> None:
        super().__init__(PCI_EXT_CAP_ID_SRIOV, PCI_SRIOV_VERSION, bytes(PCI_EXT_CAP_SRIOV_SIZEOF - 4))
        if not 1 <= total_vfs <= 0xFFFF:
            raise SriovLayoutError(f"TotalVFs {total_vfs} is not in 1-65535 (Linux needs at least 1)")
        if not 0 <= vf_device_id <= 0xFFFF:
            raise SriovLayoutError(f"VF Device ID {vf_device_id:#x} does not fit 16 bits")
        if supported_page_sizes & _MIN_SUPPORTED_PAGE_SIZES != _MIN_SUPPORTED_PAGE_SIZES:
            raise SriovLayoutError(
                f"Supported Page Sizes {supported_page_sizes:#x} lacks a required size "
                f"(expected at least {_MIN_SUPPORTED_PAGE_SIZES:#x})"
            )
        self.total_vfs = total_vfs
        self.vf_device_id = vf_device_id
        self.make_vf = make_vf
        self.supported_page_sizes = supported_page_sizes & 0xFFFFFFFF
        self.routing = routing
        self.vfs: list[VfRole] = []
        self.vf_bars: dict[int, VfBarLayout] = {}
        self._bases = [0] * PCI_SRIOV_NUM_BARS
        self._check_routing_policy()

    # -- build time --------------------------------------------------------

    @property
    def pf(self) -> PciFunction:
        """The physical function the capability is installed on."""
        if self.function is None:
            raise SriovLayoutError("the SR-IOV capability is not installed on a PF")
        return self.function

    def _check_routing_policy(self) -> None:
        for ari in (False, True):
            for num_vfs in range(1, self.total_vfs + 1):
                offset, stride = self.routing(num_vfs, ari)
                if not 0 < offset <= 0xFFFF or not 0 <= stride <= 0xFFFF or (num_vfs > 1 and not stride):
                    raise SriovLayoutError(
                        f"routing gives First VF Offset {offset} / VF Stride {stride} for "
                        f"NumVFs {num_vfs} (ARI {ari}); Linux needs Offset > 0 and Stride > 0 "
                        "when NumVFs > 1, both 16-bit"
                    )

    def install(self, function: PciFunction, offset: int) -> None:
        """Write the registers, create and build the VFs, hook the capability's dwords."""
        if not function.pcie:
            raise SriovLayoutError("SR-IOV needs a PCI Express PF (4 KiB config space)")
        super().install(function, offset)
        self.vfs = []
        for k in range(self.total_vfs):
            vf = self.make_vf(self, k)
            if not isinstance(vf, VfRole) or vf.sriov is not self or vf.vf_index != k:
                raise SriovLayoutError(f"make_vf(sriov, {k}) did not return VF {k} of this capability")
            self.vfs.append(vf)
        self.vf_bars = self._vf_bar_layout()
        cfg = function.config
        cfg.init(offset + PCI_SRIOV_CTRL, 2, 0, _CTRL_WRITABLE)
        cfg.init(offset + PCI_SRIOV_INITIAL_VF, 2, self.total_vfs)
        cfg.init(offset + PCI_SRIOV_TOTAL_VF, 2, self.total_vfs)
        cfg.init(offset + PCI_SRIOV_NUM_VF, 2, 0, 0xFFFF)
        first, stride = self.routing(0, False)
        cfg.init(offset + PCI_SRIOV_VF_OFFSET, 2, first)
        cfg.init(offset + PCI_SRIOV_VF_STRIDE, 2, stride)
        cfg.init(offset + PCI_SRIOV_VF_DID, 2, self.vf_device_id)
        cfg.init(offset + PCI_SRIOV_SUP_PGSIZE, 4, self.supported_page_sizes)
        # §9.3.3.13: System Page Size defaults to 1 (4 KiB).
        cfg.init(offset + PCI_SRIOV_SYS_PGSIZE, 4, 1, self.supported_page_sizes)
        for bar in self.vf_bars.values():
            bits = PCI_BASE_ADDRESS_MEM_PREFETCH if bar.prefetchable else 0
            if bar.kind is BarKind.MEM64:
                bits |= PCI_BASE_ADDRESS_MEM_TYPE_64
            cfg.init(self._bar_register(bar.index), 4, bits)
        self._set_bar_masks()
        cfg.add_hook(offset + 4, PCI_EXT_CAP_SRIOV_SIZEOF - 4, self)

    def _vf_bar_layout(self) -> dict[int, VfBarLayout]:
        layouts = []
        for vf in self.vfs:
            layouts.append({b.index: VfBarLayout(b.index, b.kind, b.size, b.prefetchable) for b in vf.own_bars()})
        if any(layout != layouts[0] for layout in layouts):
            raise SriovLayoutError("the VF builder gave VFs different BARs; every VF must decode the same BARs")
        return layouts[0]

    def _bar_register(self, index: int) -> int:
        return self.offset + PCI_SRIOV_BAR + 4 * index

    # -- state -------------------------------------------------------------

    def _get(self, reg: int, size: int) -> int:
        return self.pf.config.get(self.offset + reg, size)

    @property
    def control(self) -> int:
        """SR-IOV Control."""
        return self._get(PCI_SRIOV_CTRL, 2)

    @property
    def vf_enabled(self) -> bool:
        """VF Enable."""
        return bool(self.control & PCI_SRIOV_CTRL_VFE)

    @property
    def vf_memory_enabled(self) -> bool:
        """VF MSE: VF BARs decode (with VF Enable set, since only then do VFs exist)."""
        return bool(self.control & PCI_SRIOV_CTRL_MSE)

    @property
    def ari(self) -> bool:
        """ARI Capable Hierarchy."""
        return bool(self.control & PCI_SRIOV_CTRL_ARI)

    @property
    def num_vfs(self) -> int:
        """NumVFs."""
        return self._get(PCI_SRIOV_NUM_VF, 2)

    @property
    def page_size(self) -> int:
        """The System Page Size in bytes."""
        return self._get(PCI_SRIOV_SYS_PGSIZE, 4) << SRIOV_PAGE_SHIFT

    @property
    def enabled_vfs(self) -> list[VfRole]:
        """The VFs currently on the bus, in VF order."""
        return [vf for vf in self.vfs if vf.bus is not None]

    def vf_bar_size(self, index: int) -> int:
        """Size of VF BAR ``index`` for one VF: the VF's BAR rounded up to the System Page Size."""
        return max(self.vf_bars[index].size, self.page_size)

    def vf_bar_base(self, index: int) -> int:
        """VF BAR ``index`` as assigned (0 while unassigned); VF ``k`` decodes at ``base + k*size``."""
        return self._bases[index]

    def vf_routing_ids(self, num_vfs: int, ari: bool, pf_rid: int | None = None) -> list[int]:
        """The routing IDs NumVFs = ``num_vfs`` VFs take (PF RID + Offset + Stride * n)."""
        offset, stride = self.routing(num_vfs, ari)
        rid = self.pf.requester_id if pf_rid is None else pf_rid
        return [vf_routing_id(rid, offset, stride, n) for n in range(num_vfs)]

    def placement_problem(self, bus: PciBus, devfn: int, num_vfs: int, ari: bool) -> str | None:
        """Why ``num_vfs`` VFs of a PF at ``devfn`` on ``bus`` cannot be placed, or None.

        VFs must stay on the PF's bus (as QEMU requires: "VF addr overflows")
        and may not take a slot another function holds.
        """
        pf_rid = bus.number << 8 | devfn
        for n, rid in enumerate(self.vf_routing_ids(num_vfs, ari, pf_rid)):
            if rid >> 8 != bus.number:
                return (
                    f"VF {n} would be at routing ID {rid:#x}, off the PF's bus {bus.number:#04x} "
                    f"(NumVFs {num_vfs}, ARI {ari})"
                )
            other = bus.function((rid >> 3) & 0x1F, rid & 7)
            if other is not None and other not in self.vfs:
                return f"VF {n} would take {rid >> 3 & 0x1F:02x}.{rid & 7}, held by {other!r}"
        return None

    # -- lifecycle ---------------------------------------------------------

    def _enable_vfs(self) -> str | None:
        """Put NumVFs VFs on the bus; returns why not, or None."""
        pf = self.pf
        bus = pf.bus
        if bus is None:
            return "the PF is on no bus"
        num_vfs = self.num_vfs
        problem = self.placement_problem(bus, pf.devfn, num_vfs, self.ari)
        if problem is not None:
            return problem
        for vf, rid in zip(self.vfs, self.vf_routing_ids(num_vfs, self.ari)):
            attach_vf(bus, vf, rid & 0xFF)
        self._fix_pf_multifunction()
        return None

    def _disable_vfs(self) -> None:
        """Take every VF off the bus and reset it."""
        for vf in self.enabled_vfs:
            detach_vf(vf)
            vf.reset()
        self._fix_pf_multifunction()

    def _fix_pf_multifunction(self) -> None:
        # The bus marks a device multi-function when a VF shares it with the
        # PF (ARI offsets), but VFs are never found by scanning: only other
        # non-VF functions count.
        pf = self.pf
        bus = pf.bus
        if bus is None:
            return
        device = pf.devfn >> 3
        siblings = [bus.function(device, fn) for fn in range(8)]
        others = [f for f in siblings if f is not None and f is not pf and not isinstance(f, VfRole)]
        pf.set_multifunction(bool(others))

    def _update_routing(self) -> None:
        first, stride = self.routing(self.num_vfs, self.ari)
        cfg = self.pf.config
        cfg.set(self.offset + PCI_SRIOV_VF_OFFSET, 2, first)
        cfg.set(self.offset + PCI_SRIOV_VF_STRIDE, 2, stride)

    def _set_masks(self) -> None:
        """Registers frozen while VF Enable is set: NumVFs, ARI, System Page Size."""
        cfg = self.pf.config
        enabled = self.vf_enabled
        cfg.set_wmask(self.offset + PCI_SRIOV_NUM_VF, 2, 0 if enabled else 0xFFFF)
        ctrl_mask = _CTRL_WRITABLE & ~PCI_SRIOV_CTRL_ARI if enabled else _CTRL_WRITABLE
        cfg.set_wmask(self.offset + PCI_SRIOV_CTRL, 2, ctrl_mask)
        cfg.set_wmask(self.offset + PCI_SRIOV_SYS_PGSIZE, 4, 0 if enabled else self.supported_page_sizes)

    def _set_bar_masks(self) -> None:
        """VF BAR masks for the current System Page Size; bases realigned to it."""
        cfg = self.pf.config
        for bar in self.vf_bars.values():
            size = self.vf_bar_size(bar.index)
            mask = ~(size - 1)
            register = self._bar_register(bar.index)
            low = mask & 0xFFFFFFF0
            cfg.set_wmask(register, 4, low)
            cfg.set(register, 4, cfg.get(register, 4) & (low | 0xF))
            if bar.kind is BarKind.MEM64:
                cfg.set_wmask(register + 4, 4, (mask >> 32) & 0xFFFFFFFF)
            self._bases[bar.index] &= mask

    def reset(self) -> None:
        """PF reset: config is back to defaults (VF Enable clear), so the VFs go."""
        self._disable_vfs()
        self._bases = [0] * PCI_SRIOV_NUM_BARS
        self._set_masks()
        self._set_bar_masks()
        self._update_routing()

    # -- config hook -------------------------------------------------------

    def config_read(self, offset: int, size: int) -> int:
        """Registers read as stored."""
        return self.pf.config.get(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        """Apply a write with the rules of the module docstring."""
        rel = offset - self.offset
        if rel >= PCI_SRIOV_BAR:
            self._write_vf_bar(offset, size, value)
            return
        cfg = self.pf.config
        ctrl_before = self.control
        num_before = self.num_vfs
        page_before = self._get(PCI_SRIOV_SYS_PGSIZE, 4)
        num_wanted = patch_register(num_before, PCI_SRIOV_NUM_VF, 2, rel, size, value)
        page_wanted = patch_register(page_before, PCI_SRIOV_SYS_PGSIZE, 4, rel, size, value)
        ctrl_wanted = patch_register(ctrl_before, PCI_SRIOV_CTRL, 2, rel, size, value)
        cfg.default_write(offset, size, value)

        if num_wanted is not None and num_wanted != num_before:
            if ctrl_before & PCI_SRIOV_CTRL_VFE:
                log.warning("%r: NumVFs write %d ignored: VF Enable is set (clear it first)", self.pf, num_wanted)
            elif num_wanted > self.total_vfs:
                log.warning(
                    "%r: NumVFs write %d ignored: above TotalVFs %d; NumVFs stays %d",
                    self.pf, num_wanted, self.total_vfs, num_before,
                )
                cfg.set(self.offset + PCI_SRIOV_NUM_VF, 2, num_before)
        if page_wanted is not None and page_wanted != page_before:
            self._check_page_size(page_before, page_wanted, ctrl_before)
        if ctrl_wanted is not None and (ctrl_wanted ^ ctrl_before) & PCI_SRIOV_CTRL_ARI and ctrl_before & PCI_SRIOV_CTRL_VFE:
            log.warning("%r: ARI Capable Hierarchy write ignored: VF Enable is set", self.pf)

        ctrl = self.control
        if ctrl & PCI_SRIOV_CTRL_VFE and not ctrl_before & PCI_SRIOV_CTRL_VFE:
            problem = self._enable_vfs()
            if problem is not None:
                log.warning("%r: VF Enable ignored: %s; VF Enable stays clear", self.pf, problem)
                cfg.set(self.offset + PCI_SRIOV_CTRL, 2, ctrl & ~PCI_SRIOV_CTRL_VFE)
        elif ctrl_before & PCI_SRIOV_CTRL_VFE and not ctrl & PCI_SRIOV_CTRL_VFE:
            self._disable_vfs()
        if self.num_vfs != num_before or (self.control ^ ctrl_before) & PCI_SRIOV_CTRL_ARI:
            self._update_routing()
        self._set_masks()
        if (self.control ^ ctrl_before) & (PCI_SRIOV_CTRL_VFE | PCI_SRIOV_CTRL_MSE):
            self.pf.decode_changed()

    def _check_page_size(self, before: int, wanted: int, ctrl_before: int) -> None:
        cfg = self.pf.config
        if ctrl_before & PCI_SRIOV_CTRL_VFE:
            log.warning("%r: System Page Size write %#x ignored: VF Enable is set", self.pf, wanted)
            return
        if wanted & (wanted - 1) or not wanted & self.supported_page_sizes:
            log.warning(
                "%r: System Page Size write %#x ignored: expected exactly one bit of Supported "
                "Page Sizes %#x; stays %#x", self.pf, wanted, self.supported_page_sizes, before,
            )
            cfg.set(self.offset + PCI_SRIOV_SYS_PGSIZE, 4, before)
            return
        self._set_bar_masks()
        self.pf.decode_changed()

    def _write_vf_bar(self, offset: int, size: int, value: int) -> None:
        """VF BARn: BAR semantics (a sizing probe does not move it); unimplemented ones read 0."""
        cfg = self.pf.config
        dword = offset & ~3
        index = (dword - self._bar_register(0)) // 4
        bar = self.vf_bars.get(index)
        high = False
        if bar is None:
            bar = self.vf_bars.get(index - 1)
            if bar is None or bar.kind is not BarKind.MEM64:
                # Unimplemented VF BAR, the upper half of a 32-bit one, or the
                # (read-only) VF Migration State Array Offset.
                return
            high = True
        cfg.default_write(offset, size, value)
        mask = cfg.wmask(dword, 4)
        bits = cfg.get(dword, 4) & mask
        if bits == mask:  # every address bit set: a sizing probe, the BAR stays put
            return
        base = self._bases[bar.index]
        if high:
            base = (base & 0xFFFFFFFF) | bits << 32
        else:
            base = (base & ~0xFFFFFFFF) | bits
        self._bases[bar.index] = base
        self.pf.decode_changed()


def find_sriov(function: PciFunction) -> SriovCapability | None:
    """The SR-IOV capability of ``function``, if it has one."""
    for cap in function.extended_capabilities:
        if isinstance(cap, SriovCapability):
            return cap
    return None


def attach_pf(bus: PciBus, pf: PciFunction, device: int, fn: int = 0) -> PciFunction:
    """Place a PF on ``bus`` after checking every VF it may enable fits there.

    For every NumVFs in 1..TotalVFs and both ARI settings, each VF's routing
    ID must be on ``bus`` and in a free slot; otherwise
    :class:`~iovirt.sriov.errors.SriovLayoutError` is raised and the bus is
    left unchanged.  Sets Function Dependency Link to the PF's own function
    number (§9.3.3.11: an independent PF).
    """
    sriov = find_sriov(pf)
    if sriov is None:
        raise SriovLayoutError(f"{pf!r} has no SR-IOV capability")
    devfn = device << 3 | fn
    if not 0 <= devfn <= 0xFF:
        raise PciLayoutError(f"device {device} / function {fn} out of range")
    for ari in (False, True):
        for num_vfs in range(1, sriov.total_vfs + 1):
            problem = sriov.placement_problem(bus, devfn, num_vfs, ari)
            if problem is not None:
                raise SriovLayoutError(f"PF at {device:02x}.{fn}: {problem}")
    bus.add_function(pf, device, fn)
    pf.config.set_default(sriov.offset + PCI_SRIOV_FUNC_LINK, 1, fn)
    return pf
