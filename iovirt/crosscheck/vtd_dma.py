"""Area ``vtd-dma``: DMA through QEMU's ``intel-iommu`` against iovirt's walk of the same tables.

QEMU: q35 with ``intel-iommu`` (48-bit MGAW, device-IOTLB support, as iovirt's
unit: CAP.SAGAW 39/48, ECAP.DT) and two ``virtio-rng-pci`` devices with
``iommu_platform=on`` at 00:03.0 and 00:04.0 (:data:`DEVICES`).  virtio-rng
only serves a running VM, so the VM runs, on a firmware image that is one
page of ``hlt`` (:func:`~iovirt.crosscheck.qtest.halt_firmware`): no guest code touches the devices.
iovirt: a :class:`~iovirt.vtd.unit.VtdUnit` over the same 64 MiB of memory,
with QEMU's number of fault recording registers.

Operations (text form ``KIND SPACE OFFSET SIZE [VALUE]``):

- ``w ram GPA 8 V`` -- a qword of the root, context or page tables
  (:mod:`~iovirt.crosscheck.vtd_dma_tables` builds them at random);
- ``w reg OFF 4|8 V`` -- a VT-d register write: RTADDR, GCMD.SRTP, global
  context-cache and IOTLB invalidation (CCMD, IOTLB), GCMD.TE, in the order a
  driver enables translation (spec 6.5, 10.4);
- ``dma rngN IOVA LEN 1|0`` -- device N does one DMA request of LEN bytes at
  IOVA, a write (1: a device-writable buffer virtio-rng fills) or a read (0: a
  device-readable buffer followed by a writable one in the sink page).

A DMA op on QEMU: the device is reset and brought to DRIVER_OK with its
queue at the ring IOVAs, one descriptor chain is placed and the queue
notified; then the window is read (``b64read``), and FSTS and the fault
recording register.  The device reads the avail ring and the descriptors and
writes the used ring through the IOMMU too, so iovirt translates the same
requests in the same order (:func:`requests`: avail.idx, avail.ring[0], the
descriptors, the probe page by page, the sink, the used element, used.idx) and stops at the first fault, as the device's
request does.  The observation is ``(runs, FSTS, FRCD low, FRCD high)``:
``runs`` the ``(GPA, length)`` stretches of the window the request wrote
(qword granularity; the device writes random bytes, all-zero qwords are
2^-64 events), the rest the fault log after it.

What counts: every operation is one compared observation, like the other
areas (table and register writes observe ``None`` on both sides).  A
``dma`` op is one DMA request of the probe with the ring accesses around
it, up to 8 translations in all (:func:`requests`), every one of which must
agree for the observation to; the JSON counts the ``dma`` ops apart
(``compared_by_kind``).

Not compared: FSTS.PFO.  When a translation fails, QEMU's device still maps
the request through a bounce buffer and repeats the failed access when it
copies or writes the buffer back (``address_space_map`` /
``address_space_unmap``), so QEMU logs the same fault twice and overflows the
log; the second request is QEMU's device, not its IOMMU.
"""

from __future__ import annotations

import base64
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Sequence

from iovirt.crosscheck.area import Area, Observation
from iovirt.crosscheck.expected import ExpectedDifference, explain_read
from iovirt.crosscheck.expected_table import (
    EXPECTED,
    IOTLB_PERMISSION_HIT,
    NO_ROOT_TABLE,
    PERMISSION_BEFORE_RESERVED,
    UNBACKED_TABLE,
)
from iovirt.crosscheck.ops import Op
from iovirt.crosscheck.qmp import QmpClient
from iovirt.crosscheck.qtest import QtestClient, halt_firmware
from iovirt.crosscheck.topology import config_commands
from iovirt.crosscheck.vtd_dma_tables import (
    GUEST_RAM,
    RING_PAGES,
    RINGS,
    TABLE_PAGES,
    TABLES,
    WINDOW,
    WINDOW_SIZE,
    Context,
    TableBuilder,
    probe,
    ring_base,
)
from iovirt.crosscheck.vtd_regs import VTD_BASE
from iovirt.memory import Access, GuestMemory, GuestMemoryError
from iovirt.pci.regs import PCI_BASE_ADDRESS_0, PCI_COMMAND, PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY
from iovirt.virtio.defs import (
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
)
from iovirt.virtio.transport.defs import (
    VIRTIO_PCI_COMMON_GF,
    VIRTIO_PCI_COMMON_GFSELECT,
    VIRTIO_PCI_COMMON_Q_AVAIL,
    VIRTIO_PCI_COMMON_Q_DESC,
    VIRTIO_PCI_COMMON_Q_ENABLE,
    VIRTIO_PCI_COMMON_Q_SELECT,
    VIRTIO_PCI_COMMON_Q_USED,
    VIRTIO_PCI_COMMON_STATUS,
)
from iovirt.virtio.transport.pci import COMMON_OFFSET, NOTIFY_OFFSET, VIRTIO_BAR
from iovirt.vtd import regs as R
from iovirt.vtd.faults import (
    FR_CONTEXT_INVALID,
    FR_CONTEXT_TABLE_INVALID,
    FR_PAGING_ENTRY_INVALID,
    FR_PAGING_ENTRY_RSVD,
    FR_READ,
    FR_ROOT_TABLE_INVALID,
    FR_WRITE,
    DmarFault,
)
from iovirt.vtd.regs import PAGE_SIZE
from iovirt.vtd.tables import PTE_PERM, PTE_PS
from iovirt.vtd.unit import VtdUnit

PAGE_OFFSET = PAGE_SIZE - 1
UNBACKED_REASONS = (FR_ROOT_TABLE_INVALID, FR_CONTEXT_TABLE_INVALID, FR_PAGING_ENTRY_INVALID)
"""Fault reasons iovirt gives only when a table read finds no memory (3h too, when SLPTPTR points nowhere)."""


@dataclass(frozen=True)
class Device:
    """One virtio-rng-pci: its name in ops, PCI slot on bus 0 and BAR4 address."""

    name: str
    slot: int
    bar: int

    @property
    def source_id(self) -> int:
        """Its requester id (bus 0, function 0)."""
        return self.slot << 3


DEVICES = (Device("rng0", 3, 0xC000_0000), Device("rng1", 4, 0xC010_0000))
_BY_NAME = {d.name: (k, d) for k, d in enumerate(DEVICES)}
IOMMU_ARGS = ("-device", "intel-iommu,intremap=on,aw-bits=48,device-iotlb=on")
"""aw-bits=48 and device-iotlb=on: QEMU's MGAW, SAGAW and ECAP.DT become iovirt's (spec 11.4.2-11.4.3:
the unit's choice), so both reserve the same PTE bits (51:48; TM outside leaves only)."""
VIRTIO_F_VERSION_1 = 1 << 0  # feature word 1: bit 32
VIRTIO_F_ACCESS_PLATFORM = 1 << 1  # bit 33: the device's DMA goes through the platform's IOMMU
VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
FRCD_HI_PP = 1 << 31  # PASID Present (spec 11.4.14)
FRCD_HI_PV = 0xFFFFF << 40  # PASID Value, bits 59:40
FSTS_RECORDED = ~R.FSTS_PFO & 0xFFFF_FFFF
"""FSTS bits compared: all but PFO (see the module docstring)."""
_STATUS_SEQUENCE = (
    0,
    VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
)
_RUNNING = (VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK
            | VIRTIO_CONFIG_S_DRIVER_OK)
_DEVICE_TIMEOUT = 2.0


def qemu_args(firmware: str, qmp_path: str) -> list[str]:
    """QEMU's command line after :data:`~iovirt.crosscheck.qtest.BASE_ARGS`."""
    args = ["-machine", "q35,kernel-irqchip=split", "-m", f"{GUEST_RAM >> 20}M", "-bios", firmware,
            "-qmp", f"unix:{qmp_path},server=on,wait=off", *IOMMU_ARGS]
    for d in DEVICES:
        args += ["-device", f"virtio-rng-pci,id={d.name},addr={d.slot:#x}.0,disable-legacy=on,iommu_platform=on,"
                            "ioeventfd=off,vectors=0"]
    return args


@dataclass(frozen=True)
class Request:
    """One DMA request a device makes for a ``dma`` op, in the device's order."""

    addr: int
    length: int
    access: Access
    probe: bool = False


def requests(device: int, op: Op) -> list[Request]:
    """The requests QEMU's virtio-rng makes for ``op``, in its order (split at 4 KiB pages).

    virtqueue_num_heads reads avail.idx, virtqueue_pop avail.ring[0] and the
    descriptors; the buffers are mapped in chain order; virtqueue_push
    writes the used element, then used.idx.
    """
    desc = ring_base(device)
    avail, used, sink = desc + PAGE_SIZE, desc + 2 * PAGE_SIZE, desc + 3 * PAGE_SIZE
    out = [Request(avail + 2, 2, Access.READ), Request(avail + 4, 2, Access.READ), Request(desc, 16, Access.READ)]
    write = bool(op.value & 1)
    if not write:
        out.append(Request(desc + 16, 16, Access.READ))
    addr, end = op.offset, op.offset + op.size
    while addr < end:
        n = min(end, (addr | PAGE_OFFSET) + 1) - addr
        out.append(Request(addr, n, Access.WRITE if write else Access.READ, probe=True))
        addr += n
    if not write:
        out.append(Request(sink, 8, Access.WRITE))
    out += [Request(used + 4, 8, Access.WRITE), Request(used + 2, 2, Access.WRITE)]
    return out


def runs(pieces: Sequence[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """``(gpa, length)`` pieces clipped to the window, adjacent ones merged."""
    merged: list[list[int]] = []
    for gpa, length in sorted(pieces):
        start, end = max(gpa, WINDOW), min(gpa + length, WINDOW + WINDOW_SIZE)
        if start >= end:
            continue
        if merged and merged[-1][0] + merged[-1][1] == start:
            merged[-1][1] += end - start
        else:
            merged.append([start, end - start])
    return tuple((a, n) for a, n in merged)


def window_runs(data: bytes) -> tuple[tuple[int, int], ...]:
    """The stretches of the window holding non-zero qwords."""
    pieces = [(WINDOW + i, 8) for i in range(0, len(data), 8) if data[i : i + 8] != bytes(8)]
    return runs(pieces)


class VtdDmaArea(Area):
    """DMA from QEMU's virtio-rng-pci through ``hw/i386/intel_iommu.c`` against :class:`VtdUnit`'s translation."""

    name = "vtd-dma"
    expected = tuple(e for e in EXPECTED if e.area == "vtd-dma")

    def __init__(self) -> None:
        self.qemu: QtestClient | None = None
        self.qmp: QmpClient | None = None
        self.unit: VtdUnit | None = None
        self.memory: GuestMemory | None = None
        self._dir = ""
        self.filled: set[tuple[int, int]] = set()
        """``(source id, leaf start)`` of every translation that succeeded since the reset: QEMU's IOTLB is
        tagged by source id, iovirt's by domain, so only these are hits on both sides."""

    # -- lifetime ------------------------------------------------------------------

    def start(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="iovirt-vtd-dma-")
        qmp_path = os.path.join(self._dir, "qmp.sock")
        self.qemu = QtestClient(qemu_args(halt_firmware(self._dir), qmp_path))
        self.qmp = QmpClient(qmp_path)
        self.qmp.execute("cont")
        cap = self.qemu.readq(VTD_BASE + R.CAP)
        if cap >> R.CAP_MGAW_SHIFT & 0x3F != R.HAW - 1 or (cap >> R.CAP_FRO_SHIFT & 0x3FF) * 16 != R.FRCD:
            raise AssertionError(f"QEMU's intel-iommu CAP {cap:#x}: expected MGAW {R.HAW} and FRCD at {R.FRCD:#x}")
        self.memory = GuestMemory.from_ranges([(0, GUEST_RAM)], backing="bytes")
        self.unit = VtdUnit(self.memory, num_fault_records=(cap >> R.CAP_NFR_SHIFT & 0xFF) + 1)

    def close(self) -> None:
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None
        if self.qemu is not None:
            self.qemu.close()
            self.qemu = None
        shutil.rmtree(self._dir, ignore_errors=True)

    # -- generation ------------------------------------------------------------------

    def generate(self, rng: random.Random, count: int) -> list[Op]:
        tables = TableBuilder(rng)
        root = tables.page()
        context_table = tables.page()
        tables.root(root, 0, context_table)
        domains = [tables.domain(1 + rng.randrange(0xFFFF), rng.choice((3, 4)), list(range(len(DEVICES))))]
        if rng.random() < 0.6:
            domains.append(tables.domain(1 + rng.randrange(0xFFFF), rng.choice((3, 4)), list(range(len(DEVICES)))))
        contexts: list[Context] = [tables.context(context_table, d.slot << 3, rng.choice(domains)) for d in DEVICES]
        ops = [Op("w", "ram", gpa, 8, value) for gpa, value in tables.writes]
        ops += enable_ops(root)
        while len(ops) < count:
            k = rng.randrange(len(DEVICES))
            p = probe(rng, contexts[k])
            ops.append(Op("dma", DEVICES[k].name, p.iova, p.length, int(p.write)))
        return ops[:count]

    # -- QEMU --------------------------------------------------------------------------

    def _reset_commands(self) -> list[str]:
        commands = [f"memset {TABLES:#x} {TABLE_PAGES * PAGE_SIZE:#x} 0",
                    f"memset {RINGS:#x} {len(DEVICES) * RING_PAGES * PAGE_SIZE:#x} 0",
                    f"memset {WINDOW:#x} {WINDOW_SIZE:#x} 0"]
        for d in DEVICES:
            bar = PCI_BASE_ADDRESS_0 + 4 * VIRTIO_BAR
            commands += config_commands(d.source_id, "w", bar, 4, d.bar)
            commands += config_commands(d.source_id, "w", bar + 4, 4, 0)
            commands += config_commands(d.source_id, "w", PCI_COMMAND, 2, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER)
        return commands

    @staticmethod
    def _dma_commands(k: int, device: Device, op: Op) -> list[str]:
        common = device.bar + COMMON_OFFSET
        desc = ring_base(k)
        avail, used, sink = desc + PAGE_SIZE, desc + 2 * PAGE_SIZE, desc + 3 * PAGE_SIZE
        w = QtestClient.write_cmd
        commands = [
            w(VTD_BASE + R.FSTS, 4, R.FSTS_W1C),
            w(VTD_BASE + R.FRCD + 12, 4, R.FRCD_HI_F >> 32),
            f"memset {WINDOW:#x} {WINDOW_SIZE:#x} 0",
            f"memset {desc:#x} {RING_PAGES * PAGE_SIZE:#x} 0",
        ]
        commands += [w(common + VIRTIO_PCI_COMMON_STATUS, 1, s) for s in _STATUS_SEQUENCE]
        commands += [
            w(common + VIRTIO_PCI_COMMON_GFSELECT, 4, 1),
            w(common + VIRTIO_PCI_COMMON_GF, 4, VIRTIO_F_VERSION_1 | VIRTIO_F_ACCESS_PLATFORM),
            w(common + VIRTIO_PCI_COMMON_STATUS, 1, _RUNNING & ~VIRTIO_CONFIG_S_DRIVER_OK),
            w(common + VIRTIO_PCI_COMMON_Q_SELECT, 2, 0),
            w(common + VIRTIO_PCI_COMMON_Q_DESC, 8, desc),
            w(common + VIRTIO_PCI_COMMON_Q_AVAIL, 8, avail),
            w(common + VIRTIO_PCI_COMMON_Q_USED, 8, used),
            w(common + VIRTIO_PCI_COMMON_Q_ENABLE, 2, 1),
            w(common + VIRTIO_PCI_COMMON_STATUS, 1, _RUNNING),
        ]
        if op.value & 1:
            chain = [(op.offset, op.size, VRING_DESC_F_WRITE, 0)]
        else:
            chain = [(op.offset, op.size, VRING_DESC_F_NEXT, 1), (sink, 8, VRING_DESC_F_WRITE, 0)]
        data = b"".join(a.to_bytes(8, "little") + n.to_bytes(4, "little") + f.to_bytes(2, "little")
                        + nxt.to_bytes(2, "little") for a, n, f, nxt in chain)
        commands.append(f"write {desc:#x} {len(data):#x} 0x{data.hex()}")
        commands.append(f"write {avail:#x} 0x6 0x000001000000")  # flags 0, idx 1, ring[0] = 0
        commands.append(w(device.bar + NOTIFY_OFFSET, 2, 0))  # queue 0 (queue_notify_off 0)
        return commands

    def _observe_commands(self, k: int, device: Device) -> list[str]:
        used = ring_base(k) + 2 * PAGE_SIZE
        r = QtestClient.read_cmd
        return [r(used + 2, 2), r(device.bar + COMMON_OFFSET + VIRTIO_PCI_COMMON_STATUS, 1),
                f"b64read {WINDOW:#x} {WINDOW_SIZE:#x}", r(VTD_BASE + R.FSTS, 4), r(VTD_BASE + R.FRCD, 8),
                r(VTD_BASE + R.FRCD + 8, 8)]

    def _observe(self, k: int, device: Device) -> list[str]:
        """The observation replies once QEMU's device is done with the chain (or will never take it).

        virtio-rng takes the chain in a bottom half after the notify returns, all of it in one go.  Done: the
        chain is used, or the device gave up (NEEDS_RESET), or a fault is logged (either the bottom half ran,
        or the notify's own reads of the avail ring or the descriptors failed and no entropy was asked for),
        or QEMU's queue state says no chain is pending (``x-query-virtio-queue-status``: the avail index read
        during the notify failed, so the shadow avail index equals the last one taken).  One case is none
        of these: the descriptor read failed with the fault suppressed by FPD (only ever in a shrunk
        sequence without the descriptor page mapped); it ends at :data:`_DEVICE_TIMEOUT`.
        """
        qemu, qmp = self.qemu, self.qmp
        assert qemu is not None and qmp is not None
        deadline = time.monotonic() + _DEVICE_TIMEOUT
        while True:
            replies = qemu.batch(self._observe_commands(k, device))
            if int(replies[0], 16) or int(replies[1], 16) & VIRTIO_CONFIG_S_NEEDS_RESET or int(replies[5], 16) >> 63:
                return replies
            queue = qmp.execute("x-query-virtio-queue-status", path=f"/machine/peripheral/{device.name}/virtio-backend",
                                queue=0)
            assert isinstance(queue, dict)
            if queue["shadow-avail-idx"] == queue["last-avail-idx"] and not queue["inuse"]:
                return qemu.batch(self._observe_commands(k, device))
            if time.monotonic() > deadline:
                return replies
            time.sleep(0.0005)

    def run_qemu(self, ops: Sequence[Op]) -> list[Observation]:
        qemu, qmp = self.qemu, self.qmp
        assert qemu is not None and qmp is not None
        qmp.execute("system_reset")
        qmp.wait_event("RESET")
        pending = self._reset_commands()
        observations: list[Observation] = []
        for op in ops:
            if op.kind != "dma":
                if op.space == "ram":
                    pending.append(f"write {op.offset:#x} {op.size:#x} 0x{op.value.to_bytes(op.size, 'little').hex()}")
                else:
                    pending.append(QtestClient.write_cmd(VTD_BASE + op.offset, op.size, op.value))
                observations.append(None)
                continue
            k, device = _BY_NAME[op.space]
            qemu.batch(pending + self._dma_commands(k, device, op))
            pending = []
            used_idx, status, window, fsts, lo, hi = self._observe(k, device)
            data = base64.b64decode(window)
            observations.append((window_runs(data), *fault_log(int(fsts, 16), int(lo, 16), int(hi, 16))))
        if pending:
            qemu.batch(pending)
        return observations

    # -- iovirt ------------------------------------------------------------------------

    def _reset_iovirt(self) -> None:
        unit, memory = self.unit, self.memory
        assert unit is not None and memory is not None
        unit.reset()
        memory.write(TABLES, bytes(TABLE_PAGES * PAGE_SIZE))
        self.filled.clear()

    def run_iovirt_op(self, op: Op) -> Observation:
        """One op on iovirt's unit, from whatever state it is in."""
        unit, memory = self.unit, self.memory
        assert unit is not None and memory is not None
        if op.kind != "dma":
            if op.space == "ram":
                memory.write(op.offset, op.value.to_bytes(op.size, "little"))
            else:
                unit.mmio_write(op.offset, op.size, op.value)
            return None
        k, device = _BY_NAME[op.space]
        unit.mmio_write(R.FSTS, 4, R.FSTS_W1C)
        unit.mmio_write(R.FRCD + 12, 4, R.FRCD_HI_F >> 32)
        written: list[tuple[int, int]] = []
        for request in requests(k, op):
            try:
                pieces = unit.translate(device.source_id, request.addr, request.length, request.access)
            except DmarFault:
                break
            self._note_fill(device.source_id, request.addr)
            if request.probe and request.access == Access.WRITE:
                written += pieces
        return (runs(written), *fault_log(unit.mmio_read(R.FSTS, 4), unit.mmio_read(R.FRCD, 8),
                                          unit.mmio_read(R.FRCD + 8, 8)))

    def _slptptr_unbacked(self, source_id: int) -> bool:
        """Whether ``source_id``'s context entry points at a top table no memory backs."""
        unit, memory = self.unit, self.memory
        assert unit is not None and memory is not None and unit.dma.root_table is not None
        try:
            root = memory.read_u64(unit.dma.root_table + 16 * (source_id >> 8))
            lo = memory.read_u64((root & R.ADDR_MASK) + 16 * (source_id & 0xFF))
            memory.read_u64(lo & R.ADDR_MASK)
        except GuestMemoryError:
            return True
        return False

    def _note_fill(self, source_id: int, addr: int) -> None:
        unit = self.unit
        assert unit is not None
        ctx = unit.dma.context_cache.entries.get(source_id)
        if ctx is None or not unit.dma.enabled:
            return
        path = walk_path(unit.memory, ctx[3], ctx[2], addr)
        if path and path[-1].leaf_start is not None:
            self.filled.add((source_id, path[-1].leaf_start))

    def run_iovirt(self, ops: Sequence[Op]) -> list[Observation]:
        self._reset_iovirt()
        return [self.run_iovirt_op(op) for op in ops]

    # -- expected differences ------------------------------------------------------------

    def explain(
        self, ops: Sequence[Op], index: int, qemu: Observation, iovirt: Observation
    ) -> ExpectedDifference | None:
        if not isinstance(qemu, tuple) or not isinstance(iovirt, tuple) or qemu[0] != iovirt[0]:
            return None
        conditions = self._conditions(ops, index)
        return explain_read(self.expected, "fault", 0, 20, _fault_log(qemu), _fault_log(iovirt), conditions)

    def _conditions(self, ops: Sequence[Op], index: int) -> frozenset[str]:
        """Replays ``ops[:index]`` on iovirt, then looks at how ``ops[index]``'s first fault arose."""
        unit = self.unit
        assert unit is not None
        self._reset_iovirt()
        for op in ops[:index]:
            self.run_iovirt_op(op)
        op = ops[index]
        if op.kind != "dma":
            return frozenset()
        k, device = _BY_NAME[op.space]
        dma = unit.dma
        if dma.enabled and dma.root_table is None:
            return frozenset({NO_ROOT_TABLE})
        for request in requests(k, op):
            try:
                unit.translate(device.source_id, request.addr, request.length, request.access)
            except DmarFault as fault:
                return self._fault_conditions(device.source_id, request, fault.fault_reason)
            self._note_fill(device.source_id, request.addr)
        return frozenset()

    def _fault_conditions(self, source_id: int, request: Request, reason: int) -> frozenset[str]:
        """The conditions of the first fault iovirt found for ``request`` (its context is cached by now)."""
        unit = self.unit
        assert unit is not None
        if reason in UNBACKED_REASONS or reason == FR_CONTEXT_INVALID and self._slptptr_unbacked(source_id):
            return frozenset({UNBACKED_TABLE})
        ctx = unit.dma.context_cache.entries.get(source_id)
        if ctx is None:
            return frozenset()
        path = walk_path(unit.memory, ctx[3], ctx[2], request.addr)
        if reason in (FR_READ, FR_WRITE) and path and path[-1].leaf_start is not None:
            if (source_id, path[-1].leaf_start) in self.filled:
                return frozenset({IOTLB_PERMISSION_HIT})
        if reason == FR_PAGING_ENTRY_RSVD and any(not e.entry & int(request.access) for e in path):
            return frozenset({PERMISSION_BEFORE_RESERVED})
        return frozenset()

@dataclass(frozen=True)
class PathEntry:
    """One present entry of a second-level walk: its value, level, and the leaf's first IOVA if it is the leaf."""

    entry: int
    level: int
    leaf_start: int | None


def walk_path(memory: GuestMemory, slptptr: int, levels: int, iova: int) -> list[PathEntry]:
    """The present entries a walk of ``iova`` reads, top down, stopping at a leaf, a non-present entry or RAM's end.

    Reserved bits are not checked (the conditions ask where permissions and reserved bits sit on the path).
    """
    path: list[PathEntry] = []
    table = slptptr
    for level in range(levels, 0, -1):
        shift = 12 + 9 * (level - 1)
        try:
            entry = memory.read_u64(table + ((iova >> shift) & 0x1FF) * 8)
        except GuestMemoryError:
            break
        if not entry & PTE_PERM:
            break
        leaf = level == 1 or (level in (2, 3) and bool(entry & PTE_PS))
        path.append(PathEntry(entry, level, iova >> shift << shift if leaf else None))
        if leaf:
            break
        table = entry & R.ADDR_MASK
    return path


def fault_log(fsts: int, lo: int, hi: int) -> tuple[int, int, int]:
    """What is compared of the fault log: FSTS but PFO, and FRCD only while its F bit says it holds a fault.

    VT-d 3.x §11.4.14: FRCD's fields are valid only while F is set; after software clears F they keep
    whatever the last fault left (QEMU and iovirt differ there whenever an earlier difference was expected).
    Likewise PV (PASID Value) is valid only with PP set: for a request without PASID QEMU leaves its
    no-PASID marker 0xFFFF there, iovirt 0.
    """
    if not hi & R.FRCD_HI_F:
        lo = hi = 0
    if not hi & FRCD_HI_PP:
        hi &= ~FRCD_HI_PV
    return fsts & FSTS_RECORDED, lo, hi


def _fault_log(observation: tuple[object, ...]) -> int:
    """FSTS, FRCD low and FRCD high of an observation as one little-endian integer (20 bytes)."""
    _, fsts, lo, hi = observation
    assert isinstance(fsts, int) and isinstance(lo, int) and isinstance(hi, int)
    return fsts | lo << 32 | hi << 96


def enable_ops(root: int) -> list[Op]:
    """Register writes that point the unit at ``root`` and turn translation on (spec 10.4.6, 6.5)."""
    return [
        Op("w", "reg", R.RTADDR, 8, root),
        Op("w", "reg", R.GCMD, 4, R.SRTP),
        Op("w", "reg", R.CCMD, 8, R.CCMD_ICC | R.CC_GLOBAL << R.CCMD_CIRG_SHIFT),
        Op("w", "reg", R.IOTLB, 8, R.IOTLB_IVT | R.IOTLB_GLOBAL << R.IOTLB_IIRG_SHIFT),
        Op("w", "reg", R.GCMD, 4, R.TE),
    ]
