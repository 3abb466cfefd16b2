"""The driver side: enable VFs the way Linux ``drivers/pci/iov.c`` does.

Every step goes through the host's config accesses, in Linux's order:

1. ``sriov_init``: clear VF Enable if set; write ARI Capable Hierarchy as
   the bus allows; require TotalVFs > 0; write System Page Size = the
   smallest supported size >= PAGE_SIZE (-EIO if none); size each VF BAR
   (all-ones, read back, restore) and require a PAGE_SIZE multiple (-EIO);
   write NumVFs = TotalVFs and require First VF Offset > 0 and, with more
   than one VF, VF Stride > 0 (-EIO).
2. ``compute_max_vf_buses``: walk NumVFs from TotalVFs down to 1, re-reading
   Offset and Stride each time (-EIO on a 0), then NumVFs = 0.
3. The PCI core assigns each VF BAR ``size * TotalVFs`` bytes
   (:meth:`SriovDriver.assign_vf_bars`).
4. ``sriov_enable``: -ERANGE above TotalVFs, -EBUSY while VFs are enabled,
   -ENOMEM with an unassigned VF BAR; write NumVFs, re-read Offset/Stride,
   set VF Enable and VF MSE together, then add each VF with Vendor ID = the
   PF's and Device ID = VF Device ID (the VF's own registers read 0xFFFF),
   and its BARs at ``VF BARn + k * size``.
5. ``sriov_disable``: clear VF Enable and VF MSE, then NumVFs = 0.

Linux's waits (``msleep(100)`` after enabling, ``ssleep(1)`` after
disabling) are not modelled: the model's VFs answer at once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from iovirt.memory import BumpAllocator
from iovirt.pci.capability import walk_extended_capabilities
from iovirt.pci.firmware import ConfigAccessor
from iovirt.pci.host import PciHost
from iovirt.pci.regs import (
    PCI_BASE_ADDRESS_MEM_TYPE_64,
    PCI_REVISION_ID,
    PCI_VENDOR_ID,
)
from iovirt.sriov.errors import SriovDriverError
from iovirt.sriov.regs import (
    PCI_EXT_CAP_ID_SRIOV,
    PCI_SRIOV_BAR,
    PCI_SRIOV_CTRL,
    PCI_SRIOV_CTRL_ARI,
    PCI_SRIOV_CTRL_MSE,
    PCI_SRIOV_CTRL_VFE,
    PCI_SRIOV_NUM_BARS,
    PCI_SRIOV_NUM_VF,
    PCI_SRIOV_SUP_PGSIZE,
    PCI_SRIOV_SYS_PGSIZE,
    PCI_SRIOV_TOTAL_VF,
    PCI_SRIOV_VF_DID,
    PCI_SRIOV_VF_OFFSET,
    PCI_SRIOV_VF_STRIDE,
    SRIOV_PAGE_SHIFT,
)
from iovirt.sriov.routing import vf_routing_id

log = logging.getLogger(__name__)

PAGE_SIZE = 4096


@dataclass
class VfBar:
    """A VF BAR as the driver sized it: register index, bytes per VF, 64-bit or not."""

    index: int
    size: int
    is64: bool
    base: int = 0


@dataclass(frozen=True)
class VfResource:
    """One BAR of an added VF, as Linux's ``pci_dev.resource[n]`` holds it."""

    address: int
    size: int
    is64: bool


@dataclass
class EnumeratedVf:
    """A VF as Linux adds it (``pci_iov_add_virtfn``)."""

    vf_index: int
    bus: int
    device: int
    fn: int
    vendor_id: int
    device_id: int
    class_code: int
    bars: dict[int, VfResource] = field(default_factory=dict)
    """BAR index -> where the VF decodes it (``VF BARn + k * size``)."""

    @property
    def rid(self) -> int:
        """Routing ID ``bus << 8 | device << 3 | fn``."""
        return self.bus << 8 | self.device << 3 | self.fn


class SriovDriver:
    """Linux's SR-IOV code for the PF at ``bus:device.fn`` behind ``host``.

    ``SriovDriver(host, bus, device, fn=0, *, page_size=4096, ari=False)``:
    ``ari`` is what Linux writes to ARI Capable Hierarchy, set when the bus
    above the PF forwards ARI (never on a root bus).  A raising API: each
    failure Linux reports raises :class:`SriovDriverError` with its errno.
    """

    def __init__(
        self, host: PciHost, bus: int, device: int, fn: int = 0, *, page_size: int = PAGE_SIZE, ari: bool = False
    ) -> None:
        self.host = host
        self.cfg = ConfigAccessor(host, bus, device, fn)
        self.page_size = page_size
        self.ari = ari
        self.pos = 0
        self.total_vfs = 0
        self.offset = 0
        self.stride = 0
        self.vf_device_id = 0
        self.bars: list[VfBar] = []
        self.vfs: list[EnumeratedVf] = []

    @property
    def pf_rid(self) -> int:
        """The PF's routing ID."""
        return self.cfg.bus << 8 | self.cfg.device << 3 | self.cfg.fn

    def _read(self, reg: int, size: int) -> int:
        return self.cfg.read(self.pos + reg, size)

    def _write(self, reg: int, size: int, value: int) -> None:
        self.cfg.write(self.pos + reg, size, value)

    def _read_routing(self, num_vfs: int) -> None:
        self.offset = self._read(PCI_SRIOV_VF_OFFSET, 2)
        self.stride = self._read(PCI_SRIOV_VF_STRIDE, 2)
        if not self.offset or (num_vfs > 1 and not self.stride):
            raise SriovDriverError(
                "EIO", f"First VF Offset {self.offset} / VF Stride {self.stride} for NumVFs {num_vfs}"
            )

    # -- sriov_init --------------------------------------------------------

    def init(self) -> None:
        """``sriov_init`` and ``compute_max_vf_buses``: find, program and probe the capability."""
        if self.cfg.read(PCI_VENDOR_ID, 2) == 0xFFFF:
            raise SriovDriverError("ENODEV", f"no function at routing ID {self.pf_rid:#06x}")
        caps = walk_extended_capabilities(self.cfg.read)
        pos = next((off for cap_id, _, off in caps if cap_id == PCI_EXT_CAP_ID_SRIOV), None)
        if pos is None:
            raise SriovDriverError("ENODEV", "the function has no SR-IOV capability")
        self.pos = pos
        if self._read(PCI_SRIOV_CTRL, 2) & PCI_SRIOV_CTRL_VFE:
            self._write(PCI_SRIOV_CTRL, 2, 0)
        self._write(PCI_SRIOV_CTRL, 2, PCI_SRIOV_CTRL_ARI if self.ari else 0)
        self.total_vfs = self._read(PCI_SRIOV_TOTAL_VF, 2)
        if not self.total_vfs:
            raise SriovDriverError("ENODEV", "TotalVFs is 0")

        supported = self._read(PCI_SRIOV_SUP_PGSIZE, 4)
        shift = max(self.page_size.bit_length() - 1 - SRIOV_PAGE_SHIFT, 0)
        supported &= ~((1 << shift) - 1)
        if not supported:
            raise SriovDriverError("EIO", f"no supported page size >= PAGE_SIZE {self.page_size:#x}")
        self._write(PCI_SRIOV_SYS_PGSIZE, 4, supported & -supported)

        self.bars = self._size_bars()
        self.vf_device_id = self._read(PCI_SRIOV_VF_DID, 2)
        self._write(PCI_SRIOV_NUM_VF, 2, self.total_vfs)
        self._read_routing(self.total_vfs)
        for num_vfs in range(self.total_vfs, 0, -1):
            self._write(PCI_SRIOV_NUM_VF, 2, num_vfs)
            self._read_routing(num_vfs)
        self._write(PCI_SRIOV_NUM_VF, 2, 0)

    def _size_bars(self) -> list[VfBar]:
        bars: list[VfBar] = []
        index = 0
        while index < PCI_SRIOV_NUM_BARS:
            reg = PCI_SRIOV_BAR + 4 * index
            original = self._read(reg, 4)
            self._write(reg, 4, 0xFFFFFFFF)
            mask = self._read(reg, 4)
            self._write(reg, 4, original)
            is64 = bool(mask & PCI_BASE_ADDRESS_MEM_TYPE_64)
            full = mask & ~0xF
            base = original & ~0xF
            if is64:
                original_hi = self._read(reg + 4, 4)
                self._write(reg + 4, 4, 0xFFFFFFFF)
                full |= self._read(reg + 4, 4) << 32
                self._write(reg + 4, 4, original_hi)
                base |= original_hi << 32
            if full:
                width = 64 if is64 else 32
                size = (~full + 1) & ((1 << width) - 1)
                if size % self.page_size:
                    raise SriovDriverError("EIO", f"VF BAR{index} size {size:#x} is not a PAGE_SIZE multiple")
                # As __pci_read_base: an address already assigned is kept.
                bars.append(VfBar(index, size, is64, base))
            index += 2 if is64 else 1
        return bars

    # -- resources ---------------------------------------------------------

    def assign_vf_bars(self, allocator: BumpAllocator) -> None:
        """Give each VF BAR ``size * TotalVFs`` bytes, aligned to the per-VF size."""
        for bar in self.bars:
            bar.base = allocator.alloc(bar.size * self.total_vfs, bar.size)
            reg = PCI_SRIOV_BAR + 4 * bar.index
            self._write(reg, 4, (self._read(reg, 4) & 0xF) | (bar.base & 0xFFFFFFF0))
            if bar.is64:
                self._write(reg + 4, 4, bar.base >> 32)

    # -- sriov_enable / sriov_disable -------------------------------------

    def enable(self, num_vfs: int) -> list[EnumeratedVf]:
        """``sriov_numvfs`` → ``sriov_enable``; returns the VFs added."""
        if num_vfs > self.total_vfs:
            raise SriovDriverError("ERANGE", f"{num_vfs} VFs requested, TotalVFs is {self.total_vfs}")
        if self.vfs:
            raise SriovDriverError("EBUSY", f"{len(self.vfs)} VFs already enabled; write 0 first")
        if not num_vfs:
            return []
        unassigned = [bar.index for bar in self.bars if not bar.base]
        if unassigned:
            raise SriovDriverError("ENOMEM", f"not enough MMIO resources: VF BAR{unassigned} unassigned")
        self._write(PCI_SRIOV_NUM_VF, 2, num_vfs)
        self._read_routing(num_vfs)
        ctrl = self._read(PCI_SRIOV_CTRL, 2)
        self._write(PCI_SRIOV_CTRL, 2, ctrl | PCI_SRIOV_CTRL_VFE | PCI_SRIOV_CTRL_MSE)
        if not self._read(PCI_SRIOV_CTRL, 2) & PCI_SRIOV_CTRL_VFE:
            raise SriovDriverError("EIO", "VF Enable did not stick")
        vendor = self.cfg.read(PCI_VENDOR_ID, 2)
        self.vfs = [self._add_virtfn(k, vendor) for k in range(num_vfs)]
        return self.vfs

    def _add_virtfn(self, k: int, vendor: int) -> EnumeratedVf:
        rid = vf_routing_id(self.pf_rid, self.offset, self.stride, k)
        bus, devfn = rid >> 8, rid & 0xFF
        vf_cfg = ConfigAccessor(self.host, bus, devfn >> 3, devfn & 7)
        class_rev = vf_cfg.read(PCI_REVISION_ID, 4)
        if class_rev == 0xFFFFFFFF:
            raise SriovDriverError("EIO", f"VF {k} does not answer at routing ID {rid:#06x}")
        bars = {bar.index: VfResource(bar.base + k * bar.size, bar.size, bar.is64) for bar in self.bars}
        return EnumeratedVf(k, bus, devfn >> 3, devfn & 7, vendor, self.vf_device_id, class_rev >> 8, bars)

    def disable(self) -> None:
        """``sriov_disable``: clear VF Enable and VF MSE, then NumVFs = 0."""
        ctrl = self._read(PCI_SRIOV_CTRL, 2)
        self._write(PCI_SRIOV_CTRL, 2, ctrl & ~(PCI_SRIOV_CTRL_VFE | PCI_SRIOV_CTRL_MSE))
        self._write(PCI_SRIOV_NUM_VF, 2, 0)
        self.vfs = []

    def configure(self, num_vfs: int, allocator: BumpAllocator) -> list[EnumeratedVf]:
        """init, assign VF BARs from ``allocator``, enable ``num_vfs`` VFs."""
        self.init()
        self.assign_vf_bars(allocator)
        return self.enable(num_vfs)

