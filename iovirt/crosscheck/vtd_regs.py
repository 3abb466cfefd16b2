"""Area ``vtd-regs``: QEMU's ``intel-iommu`` register interface against iovirt's
:class:`~iovirt.vtd.unit.VtdUnit`.

Every difference found is classified in :mod:`iovirt.crosscheck.expected_table`
(QEMU departing from the spec, or the spec leaving the outcome undefined);
where the spec leaves the device a choice iovirt's unit takes QEMU's
(:func:`qemu_choices`).  Queued-invalidation differences are conditional:
:meth:`VtdRegsArea._conditions` replays the sequence on iovirt to find the
operation after which QEMU's queue and iovirt's part ways.  One legal
combination is left out of the generator: a wait descriptor with both IF and
SW (spec 6.5.2.8) makes QEMU 7.2 abort.

QEMU: ``-machine q35,kernel-irqchip=split -device intel-iommu,intremap=on``
(interrupt remapping needs the split irqchip; TCG accepts it), registers at
:data:`VTD_BASE`.  iovirt: a :class:`VtdUnit` over guest memory of the same
size, with QEMU's choices where the spec leaves one (:func:`qemu_choices`:
CAP and ECAP as QEMU reads them, one fault recording register, RTADDR's
implemented width).  Each sequence starts from a reset: QMP
``system_reset`` on QEMU (waiting for its ``RESET`` event), :meth:`VtdUnit.reset`
on iovirt; the RAM the sequence uses is cleared on both.

Operations:

- ``r|w reg OFF 4|8`` -- any 32/64-bit aligned register access in the
  first 0x240 bytes (spec 11.2), values shaped as drivers write them
  (GCMD: GSTS's persistent bits plus one command, 11.4.4; CCMD/IOTLB with
  their invalidate bit; RTADDR/IQA/IRTA pointing into :data:`RAM`) or random;
- ``w ram OFF 16 V`` -- an invalidation descriptor (spec 6.5.2) written to
  the queue, mostly well-formed (context-cache, IOTLB, IEC, wait with a
  status write), sometimes with reserved bits or an unknown type;
- after every register write the observation is :data:`STATUS_SLOTS` dwords
  where wait descriptors write their status (then cleared).

Not compared: the event interrupts' messages (QEMU hands a fault or
completion event straight to the APIC, not as a memory write qtest could
read); their pending bits (FECTL.IP, IECTL.IP) are.  Fault recording
registers hold no fault here (no DMA or remapped interrupt is issued;
:mod:`iovirt.crosscheck.vtd_dma` would), so only their reset value and W1C
behaviour are compared.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from typing import Sequence

from iovirt.crosscheck.area import Area, Observation
from iovirt.crosscheck.expected import ExpectedDifference, explain_read
from iovirt.crosscheck.expected_table import (
    BAD_DESCRIPTOR_ACCEPTED,
    CCMD_DOMAIN_REQUEST,
    EXPECTED,
    IQA_WRITTEN_QI_ON,
    IQE_CLEARED_PENDING,
    QI_DISABLED_PENDING,
    REGISTER_INVALIDATION_QI_ON,
)
from iovirt.crosscheck.ops import Op
from iovirt.crosscheck.qmp import QmpClient
from iovirt.crosscheck.qtest import QtestClient
from iovirt.memory import GuestMemory, GuestMemoryError
from iovirt.vtd import regs as R
from iovirt.vtd.invalidation import DESC_CONTEXT, DESC_IEC, DESC_IOTLB, DESC_WAIT
from iovirt.vtd.regfile import RegSpec
from iovirt.vtd.unit import VtdUnit

VTD_BASE = 0xFED9_0000
REG_SPAN = 0x240
QEMU_ARGS = ("-machine", "q35,kernel-irqchip=split", "-m", "64M", "-device", "intel-iommu,intremap=on")
GUEST_RAM = 64 << 20
RAM = 0x20_0000
"""Tables, queues and status dwords live in RAM..RAM+RAM_SPAN."""
RAM_SPAN = 0x2_0000
QUEUE_BASES = (RAM, RAM + 0x8000)
STATUS = RAM + 0x1_0000
STATUS_SLOTS = 8
_REGS_64 = (R.CAP, R.ECAP, R.RTADDR, R.CCMD, R.IQH, R.IQT, R.IQA, R.IRTA, R.IVA, R.IOTLB, R.FRCD, R.FRCD + 8)
_QEMU_UNCHECKED = (DESC_IEC, 6, 7)
"""Descriptor types QEMU 7.2 runs without the checks iovirt makes (reserved fields; PASID-based types in legacy mode)."""
_DRIVER_REGS = (
    R.GCMD, R.RTADDR, R.CCMD, R.FSTS, R.FECTL, R.IQT, R.IQA, R.ICS, R.IECTL, R.IRTA, R.IVA, R.IOTLB,
    R.FRCD + 8,
)


def qemu_choices(cap: int, ecap: int) -> list[RegSpec]:
    """iovirt's registers redefined with QEMU's values where the spec leaves the device a choice.

    - CAP and ECAP (spec 11.4.2-11.4.3) describe what the unit implements; QEMU's
      are read at start.  Their fields this area relies on (FRO, IRO, NFR) are checked equal to iovirt's layout.
    - RTADDR's and IRTA's bits 63:HAW "can be ignored and not implemented" (11.4.5, 11.4 IRTA): QEMU
      implements them.
    - FEUADDR and IEUADDR "may" be RsvdZ on a unit without extended interrupt mode (11.4 FEUADDR,
      IEUADDR; ECAP.EIM is clear on both): QEMU makes them RsvdZ, iovirt implements them by default.
      (Its Translation Table Mode, bits 11:10, is not a choice on a legacy-mode unit: an expected
      difference in :mod:`iovirt.crosscheck.expected_table`.)
    """
    return [
        RegSpec("CAP", R.CAP, 8, cap),
        RegSpec("ECAP", R.ECAP, 8, ecap),
        RegSpec("RTADDR", R.RTADDR, 8, rw=R.PAGE_MASK & ((1 << 64) - 1)),
        RegSpec("IRTA", R.IRTA, 8, rw=R.PAGE_MASK & ((1 << 64) - 1) | R.IRTA_S_MASK),
        RegSpec("FEUADDR", R.FEUADDR, 4),
        RegSpec("IEUADDR", R.IEUADDR, 4),
    ]


class VtdRegsArea(Area):
    """QEMU's ``hw/i386/intel_iommu.c`` registers against :class:`VtdUnit`."""

    name = "vtd-regs"
    expected = tuple(e for e in EXPECTED if e.area == "vtd-regs")

    def __init__(self) -> None:
        self.qemu: QtestClient | None = None
        self.qmp: QmpClient | None = None
        self.unit: VtdUnit | None = None
        self.memory: GuestMemory | None = None
        self._dir = ""

    def start(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="iovirt-qmp-")
        path = os.path.join(self._dir, "qmp.sock")
        self.qemu = QtestClient([*QEMU_ARGS, "-qmp", f"unix:{path},server=on,wait=off"])
        self.qmp = QmpClient(path)
        cap = self.qemu.readq(VTD_BASE + R.CAP)
        ecap = self.qemu.readq(VTD_BASE + R.ECAP)
        records = (cap >> R.CAP_NFR_SHIFT & 0xFF) + 1
        self.memory = GuestMemory.from_ranges([(0, GUEST_RAM)], backing="bytes")
        self.unit = VtdUnit(self.memory, num_fault_records=records)
        if (cap >> R.CAP_FRO_SHIFT & 0x3FF) * 16 != R.FRCD or (ecap >> R.ECAP_IRO_SHIFT & 0x3FF) * 16 != R.IVA:
            raise AssertionError(f"QEMU's register layout moved: CAP {cap:#x} ECAP {ecap:#x}")
        if ecap & R.ECAP_EIM:
            # The IRTA.EIME expected difference holds only for a unit without extended interrupt mode.
            raise AssertionError(f"QEMU's unit reports ECAP.EIM (ECAP {ecap:#x}); iovirt's has no x2APIC mode")
        for spec in qemu_choices(cap, ecap):
            self.unit.regs.redefine(spec)

    def close(self) -> None:
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None
        if self.qemu is not None:
            self.qemu.close()
            self.qemu = None
            shutil.rmtree(self._dir, ignore_errors=True)

    # -- generation -------------------------------------------------------------

    def generate(self, rng: random.Random, count: int) -> list[Op]:
        ops: list[Op] = []
        queue = rng.choice(QUEUE_BASES)
        tail = 0
        while len(ops) < count:
            pick = rng.random()
            if pick < 0.25:
                size = rng.choice((4, 8))
                ops.append(Op("r", "reg", rng.randrange(0, REG_SPAN, size), size))
            elif pick < 0.35:
                # 64-bit writes only to 64-bit registers (spec 11.2; QEMU asserts on others)
                offset, size = rng.choice(((rng.randrange(0, REG_SPAN, 4), 4), (rng.choice(_REGS_64), 8)))
                if offset == R.GCMD:
                    continue  # GCMD writes go through the driver's sequence below
                ops.append(Op("w", "reg", offset, size, rng.getrandbits(8 * size)))
            elif pick < 0.55:
                gcmd = self._gcmd(rng)
                if not gcmd & R.QIE:
                    # Software waits for the queue to drain before disabling it (spec 6.5.2.10).
                    ops.append(Op("w", "ram", queue - RAM + 16 * tail, 16, self._wait_descriptor(rng)))
                    tail = (tail + 1) % 256
                    ops.append(Op("w", "reg", R.IQT, 8, tail << R.IQ_INDEX_SHIFT))
                ops.append(Op("w", "reg", R.GCMD, 4, gcmd))
                ops.append(Op("r", "reg", R.GSTS, 4))
            elif pick < 0.65:
                offset, size, value = self._driver_write(rng, queue)
                if offset == R.IQA:
                    queue, tail = value & R.ADDR_MASK, 0
                ops.append(Op("w", "reg", offset, size, value))
            else:
                posted = rng.randrange(1, 4)
                for _ in range(posted):
                    ops.append(Op("w", "ram", queue - RAM + 16 * tail, 16, self._descriptor(rng)))
                    tail = (tail + 1) % 256
                ops.append(Op("w", "reg", R.IQT, 8, tail << R.IQ_INDEX_SHIFT))
                ops.append(Op("r", "reg", R.IQH, 8))
                ops.append(Op("r", "reg", R.FSTS, 4))
        return ops[:count]

    @staticmethod
    def _gcmd(rng: random.Random) -> int:
        persistent = 0
        for bit in (R.TE, R.QIE, R.IRE, R.CFI):
            if rng.random() < 0.5:
                persistent |= bit
        command = rng.choice((0, R.SRTP, R.SIRTP, R.WBF, R.SFL, 0, 0))
        return persistent | command if rng.random() < 0.9 else rng.getrandbits(32)

    @staticmethod
    def _ram_page(rng: random.Random) -> int:
        return RAM + rng.randrange(0, RAM_SPAN, 0x1000)

    def _driver_write(self, rng: random.Random, queue: int) -> tuple[int, int, int]:
        offset = rng.choice(_DRIVER_REGS)
        if offset == R.RTADDR:
            return offset, 8, self._ram_page(rng) | rng.choice((0, 0, 1 << 10, 1 << 11))
        if offset == R.IQA:
            return offset, 8, rng.choice(QUEUE_BASES) | rng.choice((0, 0, 0, 1))
        if offset == R.IRTA:
            return offset, 8, self._ram_page(rng) | rng.randrange(16) | rng.choice((0, R.IRTA_EIME))
        if offset == R.CCMD:
            value = R.CCMD_ICC | rng.randrange(4) << R.CCMD_CIRG_SHIFT | rng.getrandbits(16) << R.CCMD_SID_SHIFT
            return offset, 8, value | rng.randrange(4) << R.CCMD_FM_SHIFT | rng.getrandbits(16)
        if offset == R.IOTLB:
            value = R.IOTLB_IVT | rng.randrange(4) << R.IOTLB_IIRG_SHIFT | rng.getrandbits(16) << R.IOTLB_DID_SHIFT
            return offset, 8, value | rng.choice((0, R.IOTLB_DR, R.IOTLB_DW))
        if offset == R.IVA:
            return offset, 8, self._ram_page(rng) | rng.randrange(10) | rng.choice((0, R.IVA_IH))
        if offset == R.IQT:
            return offset, 8, rng.randrange(0, 512) << R.IQ_INDEX_SHIFT
        if offset in (R.FSTS, R.ICS, R.FRCD + 8):
            size = 8 if offset == R.FRCD + 8 else 4
            return offset, size, rng.getrandbits(8 * size)
        return offset, 4, rng.choice((0, R.CTL_IM, R.CTL_IP, R.CTL_IM | R.CTL_IP))

    @staticmethod
    def _descriptor(rng: random.Random) -> int:
        kind = rng.choice((DESC_CONTEXT, DESC_IOTLB, DESC_IEC, DESC_WAIT, DESC_WAIT, DESC_WAIT))
        if rng.random() < 0.05:
            return rng.getrandbits(128)
        if kind == DESC_CONTEXT:
            lo = kind | rng.randrange(4) << 4 | rng.getrandbits(16) << 16 | rng.getrandbits(16) << 32
            lo |= rng.randrange(4) << 48
            hi = 0
        elif kind == DESC_IOTLB:
            lo = kind | rng.randrange(4) << 4 | rng.choice((0, 1 << 6, 1 << 7)) | rng.getrandbits(16) << 16
            hi = rng.getrandbits(36) << 12 | rng.randrange(10) | rng.choice((0, 1 << 6))
        elif kind == DESC_IEC:
            lo = kind | rng.randrange(2) << 4 | rng.randrange(32) << 27 | rng.getrandbits(16) << 32
            hi = 0
        else:
            return VtdRegsArea._wait_descriptor(rng)
        if rng.random() < 0.05:
            lo |= 1 << rng.choice((7, 8, 9, 10, 11, 12, 15, 50, 60))
        return lo | hi << 64

    @staticmethod
    def _wait_descriptor(rng: random.Random) -> int:
        """An invalidation wait descriptor (spec 6.5.2.8) writing non-zero status data to a status slot."""
        # Not IF and SW together: legal (spec 6.5.2.8) but QEMU 7.2 asserts on it and exits.
        flags = rng.choice((1 << 5, 1 << 5, 1 << 4, 1 << 5 | 1 << 6))
        lo = DESC_WAIT | flags | rng.randrange(1, 1 << 32) << 32
        return lo | (STATUS + 4 * rng.randrange(STATUS_SLOTS)) << 64

    # -- QEMU --------------------------------------------------------------------

    _STATUS_READ = f"read {STATUS:#x} {4 * STATUS_SLOTS:#x}"
    _STATUS_CLEAR = f"memset {STATUS:#x} {4 * STATUS_SLOTS:#x} 0"

    def run_qemu(self, ops: Sequence[Op]) -> list[Observation]:
        qemu, qmp = self.qemu, self.qmp
        assert qemu is not None and qmp is not None
        qmp.execute("system_reset")
        qmp.wait_event("RESET")
        commands = [f"memset {RAM:#x} {RAM_SPAN:#x} 0"]
        marks: list[int] = []
        for op in ops:
            if op.space == "ram":
                commands.append(f"write {RAM + op.offset:#x} {op.size:#x} 0x{op.value.to_bytes(op.size, 'little').hex()}")
                marks.append(-1)
            elif op.kind == "r":
                commands.append(QtestClient.read_cmd(VTD_BASE + op.offset, op.size))
                marks.append(len(commands) - 1)
            else:
                commands += [QtestClient.write_cmd(VTD_BASE + op.offset, op.size, op.value), self._STATUS_READ,
                             self._STATUS_CLEAR]
                marks.append(len(commands) - 2)
        replies = qemu.batch(commands)
        observations: list[Observation] = []
        for op, mark in zip(ops, marks):
            if mark < 0:
                observations.append(None)
            elif op.kind == "r":
                observations.append(int(replies[mark], 16))
            else:
                data = bytes.fromhex(replies[mark][2:])
                observations.append(tuple(int.from_bytes(data[i : i + 4], "little") for i in range(0, len(data), 4)))
        return observations

    # -- iovirt ------------------------------------------------------------------

    def run_iovirt(self, ops: Sequence[Op]) -> list[Observation]:
        unit, memory = self.unit, self.memory
        assert unit is not None and memory is not None
        unit.reset()
        memory.write(RAM, bytes(RAM_SPAN))
        observations: list[Observation] = []
        for op in ops:
            if op.space == "ram":
                memory.write(RAM + op.offset, op.value.to_bytes(op.size, "little"))
                observations.append(None)
            elif op.kind == "r":
                observations.append(unit.mmio_read(op.offset, op.size))
            else:
                unit.mmio_write(op.offset, op.size, op.value)
                data = memory.read(STATUS, 4 * STATUS_SLOTS)
                memory.write(STATUS, bytes(4 * STATUS_SLOTS))
                observations.append(tuple(int.from_bytes(data[i : i + 4], "little") for i in range(0, len(data), 4)))
        return observations

    def explain(
        self, ops: Sequence[Op], index: int, qemu: Observation, iovirt: Observation
    ) -> ExpectedDifference | None:
        op = ops[index]
        conditions = self._conditions(ops[: index + 1])
        if op.kind == "w" and isinstance(qemu, tuple) and isinstance(iovirt, tuple):
            # Status writes of wait descriptors: they differ only once the two queues have diverged.
            return explain_read(self.expected, "status", 0, 4 * STATUS_SLOTS, _packed(qemu), _packed(iovirt),
                                conditions)
        if op.kind != "r" or op.space != "reg" or not isinstance(qemu, int) or not isinstance(iovirt, int):
            return None
        return explain_read(self.expected, "vtd", op.offset, op.size, qemu, iovirt, conditions)

    def _conditions(self, ops: Sequence[Op]) -> frozenset[str]:
        """The conditions of :mod:`~iovirt.crosscheck.expected_table` that ``ops`` set up (replayed on iovirt).

        Each marks a point where QEMU's queued-invalidation state leaves the
        spec's (or the spec leaves it undefined); from there on the two
        queues are not comparable, so each condition holds for the rest of
        the sequence.
        """
        unit, memory = self.unit, self.memory
        assert unit is not None and memory is not None
        unit.reset()
        memory.write(RAM, bytes(RAM_SPAN))
        found: set[str] = set()
        last_type = 0
        for op in ops:
            if op.space == "ram":
                memory.write(RAM + op.offset, op.value.to_bytes(op.size, "little"))
                continue
            if op.kind != "w":
                continue
            regs = unit.regs
            qi_on = bool(regs[R.GSTS] & R.QIE)
            gcmd, fsts = _dword(op, R.GCMD), _dword(op, R.FSTS)
            if qi_on and gcmd is not None and not gcmd & R.QIE:
                if regs[R.IQH] != regs[R.IQT] or last_type != DESC_WAIT:
                    found.add(QI_DISABLED_PENDING)
            if qi_on and fsts is not None and fsts & regs[R.FSTS] & R.FSTS_IQE and regs[R.IQH] != regs[R.IQT]:
                found.add(IQE_CLEARED_PENDING)
            if qi_on and any(_dword(op, off) is not None for off in (R.IQA, R.IQA + 4)):
                found.add(IQA_WRITTEN_QI_ON)
            if qi_on and any(_dword(op, off) is not None for off in (R.CCMD + 4, R.IOTLB + 4)):
                found.add(REGISTER_INVALIDATION_QI_ON)
            ccmd_hi = _dword(op, R.CCMD + 4)
            if ccmd_hi is not None:
                domain = ccmd_hi << 32 & R.CCMD_ICC and (ccmd_hi << 32 >> R.CCMD_CIRG_SHIFT) & 3 == R.CC_DOMAIN
                found.discard(CCMD_DOMAIN_REQUEST)
                if domain and not qi_on:
                    found.add(CCMD_DOMAIN_REQUEST)
            head, iqe = regs[R.IQH], regs[R.FSTS] & R.FSTS_IQE
            unit.mmio_write(op.offset, op.size, op.value)
            if regs[R.GSTS] & R.QIE and (regs[R.IQH] != head and (qi_on or regs[R.IQH])):
                last_type = self._descriptor_type(regs[R.IQH] - (1 << R.IQ_INDEX_SHIFT), last_type)
            if regs[R.FSTS] & R.FSTS_IQE and not iqe and self._descriptor_type(regs[R.IQH], 0) in _QEMU_UNCHECKED:
                found.add(BAD_DESCRIPTOR_ACCEPTED)
        return frozenset(found)

    def _descriptor_type(self, iqh: int, default: int) -> int:
        """The type of the descriptor at IQH value ``iqh`` of iovirt's queue (``default`` if unbacked)."""
        unit, memory = self.unit, self.memory
        assert unit is not None and memory is not None
        iqa = unit.regs[R.IQA]
        entries = 256 << (iqa & R.IQA_QS_MASK)
        index = (iqh >> R.IQ_INDEX_SHIFT) % entries
        try:
            return memory.read_u64((iqa & R.ADDR_MASK) + 16 * index) & 0xF
        except GuestMemoryError:
            return default


def _packed(slots: tuple[int, ...]) -> int:
    """Status slots (dwords) as one little-endian integer, for byte-wise comparison."""
    return sum(v << (32 * i) for i, v in enumerate(slots))


def _dword(op: Op, offset: int) -> int | None:
    """The value ``op`` writes to the dword at ``offset``, or None if it does not cover it."""
    if not op.offset <= offset < op.offset + op.size:
        return None
    return (op.value >> (8 * (offset - op.offset))) & 0xFFFF_FFFF
