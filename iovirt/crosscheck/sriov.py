"""Area ``sriov``: QEMU's nvme SR-IOV capability and VFs against :class:`~iovirt.sriov.capability.SriovCapability`.

The topology is :mod:`iovirt.crosscheck.sriov_topology`'s; every access
goes through ECAM.  Operations:

- ``r|w sriov OFF 1|2|4`` -- the PF's SR-IOV capability (PCIe §9.3.3), ``OFF``
  relative to it.  Writes are biased towards the registers with rules: SR-IOV
  Control (VF Enable, VF MSE, ARI Capable Hierarchy in every combination),
  NumVFs (0 to TotalVFs + 2, sometimes any 16-bit value), System Page Size
  (one supported bit, any one bit, any value), and explicit VF BAR sizing
  (all-ones, read the mask, write an address, read it back);
- ``r vfbar OFF 4`` -- a memory read at :data:`VF_BAR_WINDOW` + ``OFF``: where
  VF BAR0 is programmed (``w sriov 0x24 4`` with the window, sometimes), the
  MSI-X table's Vector Control of vector 0 or the PBA of VF ``OFF // 16 KiB``.
  A VF's BAR decodes only with VF Enable and VF MSE set (§9.3.3.3.4); the
  root port forwards the window (its Memory Base/Limit and Memory Space are
  set once, on both sides, at start);
- ``w vf OFF 2 2`` -- Memory Space Enable written to a VF's Command register, as
  Linux's ``pci_enable_device`` does on a VF (the bit is read-only 0 in a VF,
  §9.3.4.1.3: VF MSE in the PF decides);
- ``r vf OFF 1|2|4`` -- a read of a VF's configuration space, ``OFF`` being
  ``devfn << 12 | register`` on the PF's bus: the routing IDs ``PF RID + First
  VF Offset + n * VF Stride`` (§9.3.3.9-10) for every n a NumVFs allows, and
  the one after the last.  Before VF Enable (or past NumVFs) nothing answers
  and the read is all-ones; after it the VF's header and capabilities answer.

Each sequence starts from the same state on both sides: SR-IOV Control 0
(VF Enable clear, so no VFs), NumVFs 0, System Page Size 1 (4 KiB) and every
VF BAR 0, written through ECAM as software would.
"""

from __future__ import annotations

import random
from typing import Sequence

from iovirt.crosscheck.area import Area, Observation
from iovirt.crosscheck.expected import ExpectedDifference, explain_read
from iovirt.crosscheck.expected_table import (
    EXPECTED,
    SRIOV_ARI_DIVERGED,
    SRIOV_NUMVFS_DIVERGED,
    SRIOV_PAGE_ABOVE_BAR,
    SRIOV_PAGE_DIVERGED,
    SRIOV_UNCLAIMED_READ,
    SRIOV_VF_COMMAND_MSE,
    SRIOV_VF_DECODE_DIFFERS,
    SRIOV_VF_PRESENCE_DIVERGED,
)
from iovirt.crosscheck.ops import Op
from iovirt.crosscheck.qtest import QtestClient
from iovirt.crosscheck.sriov_topology import (
    ECAM_BASE,
    PF_BDF,
    SriovLayout,
    SriovTopologyError,
    VfBarInfo,
    build_iovirt,
    discover,
    start_qemu,
)
from iovirt.crosscheck.topology import ENDPOINT_BUS, ROOT_PORT_BDF, iovirt_config_write, qemu_config_write
from iovirt.pci.host import PciHost
from iovirt.pci.regs import (
    PCI_CAP_ID_MSIX,
    PCI_CFG_SPACE_EXP_SIZE,
    PCI_COMMAND,
    PCI_COMMAND_MEMORY,
    PCI_MEMORY_BASE,
    PCI_MSIX_ENTRY_VECTOR_CTRL,
    PCI_REVISION_ID,
)
from iovirt.sriov.capability import SriovCapability
from iovirt.sriov.regs import (
    PCI_EXT_CAP_SRIOV_SIZEOF,
    PCI_SRIOV_BAR,
    PCI_SRIOV_CTRL,
    PCI_SRIOV_CTRL_ARI,
    PCI_SRIOV_CTRL_MSE,
    PCI_SRIOV_CTRL_VFE,
    PCI_SRIOV_NUM_BARS,
    PCI_SRIOV_NUM_VF,
    PCI_SRIOV_SYS_PGSIZE,
    SRIOV_PAGE_SHIFT,
)
from iovirt.sriov.capability import patch_register

SRIOV_SPACE = "sriov"
VF_SPACE = "vf"
VF_BAR_SPACE = "vfbar"
VF_BAR_WINDOW = 0xC000_0000
"""VF BAR0 is programmed here; the root port's non-prefetchable window is the 1 MiB from it (QEMU's VF BAR0 is a
64-bit non-prefetchable BAR, so it is routed through that window, PCI-to-PCI bridge 1.2 §3.2.5.8)."""
VF_BAR_READS = (0x2000 + PCI_MSIX_ENTRY_VECTOR_CTRL, 0x3000)
"""Offsets in a VF's BAR0 read: vector 0's Vector Control (reset: masked, 1) and the PBA (0), where QEMU's nvme VF
puts its MSI-X table and PBA (checked at start against the VFs' MSI-X capability)."""
_BRIDGE_WINDOW = (VF_BAR_WINDOW >> 16 & 0xFFF0) * 0x10001
_BRIDGE_WINDOW_SIZE = 1 << 20  # Memory Base = Memory Limit: one 1 MiB granule
TABLE_LAYOUT = (0x553, [VfBarInfo(0, 0x4000, True, False)])
"""Supported Page Sizes and VF BARs the SR-IOV entries of the expected-differences table are written for."""
_VF_REGIONS = ((0, 0x40), (0x40, 0x100), (0x100, 0x200), (0, PCI_CFG_SPACE_EXP_SIZE))
_VF_REGION_WEIGHTS = (5, 3, 1.5, 0.5)
"""VF reads: mostly the header and the capabilities, some the first extended ones, a few anywhere."""


def _ctrl_value(rng: random.Random) -> int:
    bits = rng.getrandbits(3)
    value = (PCI_SRIOV_CTRL_VFE if bits & 1 else 0) | (PCI_SRIOV_CTRL_MSE if bits & 2 else 0)
    value |= PCI_SRIOV_CTRL_ARI if bits & 4 else 0
    return value | rng.getrandbits(16) if rng.random() < 0.15 else value


class SriovArea(Area):
    """QEMU's ``nvme`` with ``sriov_max_vfs`` (``hw/pci/pcie_sriov.c``) against iovirt's SR-IOV capability."""

    name = "sriov"
    expected = tuple(e for e in EXPECTED if e.area == "sriov")

    def __init__(self) -> None:
        self.qemu: QtestClient | None = None
        self.host: PciHost | None = None
        self.sriov: SriovCapability | None = None
        self.layout: SriovLayout | None = None
        self.vf_devfns: list[int] = []
        self._qemu_vf_mse: dict[int, int] = {}
        """devfn -> BAR0 address of the VFs whose Command.MSE QEMU holds set (by :meth:`_conditions`' replay)."""

    # -- lifetime ------------------------------------------------------------

    def start(self) -> None:
        self.qemu = start_qemu()
        self.layout = discover(self.qemu)
        self.host, _, self.sriov = build_iovirt(self.layout)
        self.vf_devfns = self.layout.vf_devfns()
        if (self.layout.supported_page_sizes, self.layout.vf_bars) != TABLE_LAYOUT:
            raise SriovTopologyError(
                f"QEMU's nvme offers page sizes {self.layout.supported_page_sizes:#x} and VF BARs "
                f"{self.layout.vf_bars}; the expected-differences table assumes {TABLE_LAYOUT}"
            )
        msix = [(self.layout.vf_regs[off + 4], self.layout.vf_regs[off + 8]) for cap, off in self.layout.vf_caps
                if cap == PCI_CAP_ID_MSIX]
        if msix != [(0x2000, 0x3000)]:
            raise SriovTopologyError(f"QEMU's VF MSI-X table/PBA are at {msix}; {VF_BAR_READS} assumes BAR0 0x2000/0x3000")
        for offset, size, value in ((PCI_MEMORY_BASE, 4, _BRIDGE_WINDOW), (PCI_COMMAND, 2, PCI_COMMAND_MEMORY)):
            qemu_config_write(self.qemu, ROOT_PORT_BDF, offset, size, value)
            iovirt_config_write(self.host, ROOT_PORT_BDF, offset, size, value)

    def close(self) -> None:
        if self.qemu is not None:
            self.qemu.close()
            self.qemu = None

    # -- generation -------------------------------------------------------------

    def _sriov_write(self, rng: random.Random) -> list[Op]:
        assert self.layout is not None
        pick = rng.random()
        if pick < 0.35:
            return [Op("w", SRIOV_SPACE, PCI_SRIOV_CTRL, 2, _ctrl_value(rng))]
        if pick < 0.45:
            return [Op("w", SRIOV_SPACE, PCI_SRIOV_CTRL, 1, _ctrl_value(rng) & 0xFF)]
        if pick < 0.7:
            value = rng.randrange(self.layout.total_vfs + 3) if rng.random() < 0.85 else rng.getrandbits(16)
            return [Op("w", SRIOV_SPACE, PCI_SRIOV_NUM_VF, 2, value)]
        if pick < 0.85:
            kind = rng.random()
            if kind < 0.6:
                bits = [b for b in range(32) if self.layout.supported_page_sizes >> b & 1]
                value = 1 << rng.choice(bits)
            elif kind < 0.85:
                value = 1 << rng.randrange(32)
            else:
                value = rng.getrandbits(32)
            return [Op("w", SRIOV_SPACE, PCI_SRIOV_SYS_PGSIZE, 4, value)]
        bar = PCI_SRIOV_BAR + 4 * rng.randrange(PCI_SRIOV_NUM_BARS)
        return [
            Op("w", SRIOV_SPACE, bar, 4, 0xFFFFFFFF),
            Op("r", SRIOV_SPACE, bar, 4),
            Op("w", SRIOV_SPACE, bar, 4, rng.getrandbits(32)),
            Op("r", SRIOV_SPACE, bar, 4),
        ]

    def _vf_read(self, rng: random.Random) -> Op:
        devfn = rng.choice(self.vf_devfns)
        size = rng.choice((1, 2, 4))
        lo, hi = rng.choices(_VF_REGIONS, _VF_REGION_WEIGHTS)[0]
        return Op("r", VF_SPACE, devfn << 12 | rng.randrange(lo, hi, size), size)

    def generate(self, rng: random.Random, count: int) -> list[Op]:
        ops: list[Op] = []
        while len(ops) < count:
            pick = rng.random()
            if pick < 0.3:
                ops += self._sriov_write(rng)
            elif pick < 0.65:
                size = rng.choice((1, 2, 4))
                offset = rng.randrange(0, PCI_EXT_CAP_SRIOV_SIZEOF, size)
                if rng.random() < 0.7:
                    ops.append(Op("r", SRIOV_SPACE, offset, size))
                else:
                    ops.append(Op("w", SRIOV_SPACE, offset, size, rng.getrandbits(8 * size)))
            elif pick < 0.9:
                ops.append(self._vf_read(rng))
            elif pick < 0.97:
                vf = rng.randrange(self.layout.total_vfs + 1) if self.layout else 0
                ops.append(Op("r", VF_BAR_SPACE, vf * TABLE_LAYOUT[1][0].size + rng.choice(VF_BAR_READS), 4))
            elif pick < 0.98:
                ops += [Op("w", SRIOV_SPACE, PCI_SRIOV_BAR, 4, VF_BAR_WINDOW), Op("w", SRIOV_SPACE, PCI_SRIOV_BAR + 4, 4, 0)]
            else:
                # As Linux enables each VF: Memory Space Enable in its Command register.
                ops += [Op("w", VF_SPACE, devfn << 12 | PCI_COMMAND, 2, PCI_COMMAND_MEMORY) for devfn in self.vf_devfns]
        return ops[:count]

    # -- running -------------------------------------------------------------------

    def _preamble(self) -> list[Op]:
        # SR-IOV Control twice: ARI Capable Hierarchy cannot change in the write that clears VF Enable.
        ops = [
            Op("w", SRIOV_SPACE, PCI_SRIOV_CTRL, 2, 0),
            Op("w", SRIOV_SPACE, PCI_SRIOV_CTRL, 2, 0),
            Op("w", SRIOV_SPACE, PCI_SRIOV_NUM_VF, 2, 0),
            Op("w", SRIOV_SPACE, PCI_SRIOV_SYS_PGSIZE, 4, 1),
        ]
        return ops + [Op("w", SRIOV_SPACE, PCI_SRIOV_BAR + 4 * i, 4, 0) for i in range(PCI_SRIOV_NUM_BARS)]

    def _ecam(self, op: Op) -> int:
        assert self.layout is not None
        if op.space == SRIOV_SPACE:
            return PF_BDF << 12 | (self.layout.sriov + op.offset)
        return ENDPOINT_BUS << 20 | op.offset

    def run_qemu(self, ops: Sequence[Op]) -> list[Observation]:
        qemu = self.qemu
        assert qemu is not None
        preamble = self._preamble()
        commands = []
        for op in [*preamble, *ops]:
            address = VF_BAR_WINDOW + op.offset if op.space == VF_BAR_SPACE else ECAM_BASE + self._ecam(op)
            if op.kind == "r":
                commands.append(QtestClient.read_cmd(address, op.size))
            else:
                commands.append(QtestClient.write_cmd(address, op.size, op.value))
        replies = qemu.batch(commands)[len(preamble) :]
        return [int(reply, 16) if op.kind == "r" else None for op, reply in zip(ops, replies)]

    def run_iovirt_op(self, op: Op) -> Observation:
        """One op on iovirt, from whatever state it is in."""
        assert self.host is not None
        if op.space == VF_BAR_SPACE:
            return self.host.mmio_read(VF_BAR_WINDOW + op.offset, op.size)
        if op.kind == "r":
            return self.host.ecam_read(self._ecam(op), op.size)
        self.host.ecam_write(self._ecam(op), op.size, op.value)
        return None

    def run_iovirt(self, ops: Sequence[Op]) -> list[Observation]:
        preamble = self._preamble()
        return [self.run_iovirt_op(op) for op in [*preamble, *ops]][len(preamble) :]

    # -- expected differences ----------------------------------------------------------

    def explain(
        self, ops: Sequence[Op], index: int, qemu: Observation, iovirt: Observation
    ) -> ExpectedDifference | None:
        op = ops[index]
        if op.kind != "r" or not isinstance(qemu, int) or not isinstance(iovirt, int):
            return None
        conditions = self._conditions(ops, index)
        if op.space == VF_BAR_SPACE:
            return self._explain_vf_bar(op, conditions, qemu, iovirt)
        if op.space == VF_SPACE:
            if SRIOV_NUMVFS_DIVERGED in conditions and self._presence_differs(ops, index):
                return next(e for e in self.expected if e.condition == SRIOV_VF_PRESENCE_DIVERGED)
            if op.offset >> 12 in self._qemu_vf_mse:
                conditions |= {SRIOV_VF_COMMAND_MSE}
            # Entries name a VF register, whichever VF is read.
            return explain_read(self.expected, op.space, op.offset & 0xFFF, op.size, qemu, iovirt, conditions)
        return explain_read(self.expected, op.space, op.offset, op.size, qemu, iovirt, conditions)

    def _explain_vf_bar(
        self, op: Op, conditions: frozenset[str], qemu: int, iovirt: int
    ) -> ExpectedDifference | None:
        """A VF BAR read: decoded on both sides (must match), on neither, or on one (QEMU's VF decode rule)."""
        sriov = self.sriov
        assert sriov is not None
        size = TABLE_LAYOUT[1][0].size
        address = VF_BAR_WINDOW + op.offset
        base, stride = sriov.vf_bar_base(0), sriov.vf_bar_size(0)
        vf = (address - base) // stride if address >= base else -1
        # iovirt's bridge forwards a BAR only when all of it lies in its window (iovirt.pci.address_map).
        spec_decodes = (bool(sriov.control & PCI_SRIOV_CTRL_VFE) and bool(sriov.control & PCI_SRIOV_CTRL_MSE)
                        and 0 <= vf < len(sriov.enabled_vfs)
                        and base + (vf + 1) * stride <= VF_BAR_WINDOW + _BRIDGE_WINDOW_SIZE)
        # Vector Control and the PBA never read all-ones; with a System Page Size above 16 KiB a VF's BAR is
        # larger than its registers, and what the rest of it reads is the device's.
        on_register = (address - base) % stride in VF_BAR_READS
        if spec_decodes and on_register and iovirt == 0xFFFF_FFFF or not spec_decodes and iovirt != 0xFFFF_FFFF:
            return None  # iovirt breaks the spec's rule: never explained
        if conditions & {SRIOV_NUMVFS_DIVERGED, SRIOV_PAGE_DIVERGED, SRIOV_PAGE_ABOVE_BAR}:
            # The VFs or their BAR layout differ already (entries above): which VF a VF BAR address reaches
            # differs too, so decoding may.
            return next(e for e in self.expected if e.condition == SRIOV_VF_DECODE_DIFFERS)
        qemu_decodes = any(b <= address < b + size for b in self._qemu_vf_mse.values())
        if spec_decodes != qemu_decodes:
            return next(e for e in self.expected if e.condition == SRIOV_VF_DECODE_DIFFERS)
        if not spec_decodes:
            return explain_read(self.expected, VF_BAR_SPACE, 0, 4, qemu, iovirt, frozenset({SRIOV_UNCLAIMED_READ}))
        return None

    def _presence_differs(self, ops: Sequence[Op], index: int) -> bool:
        """Whether the VF ``ops[index]`` reads exists on one side only (its Class Code reads all-ones on the other)."""
        probe = Op("r", VF_SPACE, ops[index].offset & ~0xFFF | PCI_REVISION_ID, 4)
        absent = [side([*ops[:index], probe])[-1] == 0xFFFFFFFF for side in (self.run_qemu, self.run_iovirt)]
        return absent[0] != absent[1]

    def _conditions(self, ops: Sequence[Op], index: int) -> frozenset[str]:
        """Which of the SR-IOV conditions of :mod:`~iovirt.crosscheck.expected_table` the prefix meets.

        Replays ``ops[:index]`` on iovirt (only for a mismatch), looking at its state before each write.
        """
        sriov, host, layout = self.sriov, self.host, self.layout
        assert sriov is not None and host is not None and layout is not None
        min_bar = min(bar.size for bar in layout.vf_bars)
        found: set[str] = set()
        self._qemu_vf_mse = {}
        for op in self._preamble():
            self.run_iovirt_op(op)
        for op in ops[:index]:
            if op.kind == "w" and op.space == VF_SPACE and op.offset & 0xFFF == PCI_COMMAND:
                devfn = op.offset >> 12
                vfs = [vf.devfn for vf in sriov.enabled_vfs]
                if devfn in vfs and op.value & PCI_COMMAND_MEMORY:
                    # QEMU maps the VF's BAR where the PF's VF BAR0 says now (pci_update_mappings runs on
                    # the VF's config writes, not on the PF's VF BAR writes).
                    base = sriov.vf_bar_base(0) + vfs.index(devfn) * sriov.vf_bar_size(0)
                    self._qemu_vf_mse[devfn] = base
            ctrl = patch_register(sriov.control, PCI_SRIOV_CTRL, 2, op.offset, op.size, op.value)
            if op.kind == "w" and op.space == SRIOV_SPACE and ctrl is not None and (ctrl ^ sriov.control) & PCI_SRIOV_CTRL_VFE:
                self._qemu_vf_mse.clear()  # QEMU unregisters the VFs, or registers new ones: Command 0

            if op.kind == "w" and op.space == SRIOV_SPACE:
                enabled, total = sriov.vf_enabled, sriov.total_vfs
                num = patch_register(sriov.num_vfs, PCI_SRIOV_NUM_VF, 2, op.offset, op.size, op.value)
                if num is not None and num != sriov.num_vfs and (enabled or num > total):
                    found.add(SRIOV_NUMVFS_DIVERGED)
                ctrl = patch_register(sriov.control, PCI_SRIOV_CTRL, 2, op.offset, op.size, op.value)
                if ctrl is not None and enabled and not ctrl & PCI_SRIOV_CTRL_VFE and sriov.enabled_vfs:
                    found.add(SRIOV_NUMVFS_DIVERGED)
                if ctrl is not None and enabled and (ctrl ^ sriov.control) & PCI_SRIOV_CTRL_ARI:
                    found.add(SRIOV_ARI_DIVERGED)
                page_before = sriov.page_size >> SRIOV_PAGE_SHIFT
                page = patch_register(page_before, PCI_SRIOV_SYS_PGSIZE, 4, op.offset, op.size, op.value)
                if page is not None and page != page_before and (
                    enabled or page & (page - 1) or not page & layout.supported_page_sizes
                ):
                    found.add(SRIOV_PAGE_DIVERGED)
            self.run_iovirt_op(op)
            if sriov.page_size > min_bar:
                found.add(SRIOV_PAGE_ABOVE_BAR)
        return frozenset(found)
