"""Area ``pci-config``: the endpoint's configuration space, QEMU's virtio-net-pci against iovirt's.

Random sequences of 1-, 2- and 4-byte reads and writes at every offset of the
256-byte space (header and capabilities, all of it reached through
0xCF8/0xCFC), with values biased towards the ones with meaning: all-ones
(BAR sizing, PCI 3.0 §6.2.5.1; RW1C Status bits, §6.2.3), zero and single
bits, besides uniform random values.  A share of the sequence is explicit
BAR sizing: all-ones, read the mask back, write an address, read it back,
for each BAR slot and the ROM BAR.  Every sequence starts from a Function
Level Reset (PCIe §6.6.2) on both sides.  QEMU's FLR (and its device reset)
leaves some writable capability bytes as they were, against §6.6.2; at
start the area finds which (write all-ones, FLR, read back) and, on QEMU
only, writes their initial values back after the sequence's FLR, so both
sides start each sequence equal.  An FLR inside a sequence shows the
difference, which the expected-differences table records.

The pci_cfg capability's window (virtio 1.2 §4.1.4.9) forwards to the
device's registers only once ``bar``, ``offset`` and ``length`` describe a
valid BAR access; random values almost never do, so this area compares the
window's registers as config space and leaves the device registers behind
it to a virtio area.
"""

from __future__ import annotations

import random
from typing import Sequence

from iovirt.crosscheck.area import Area, Observation
from iovirt.crosscheck.expected import ExpectedDifference, explain_read
from iovirt.crosscheck.expected_table import AFTER_RESET, EXPECTED, WINDOW_OTHER_BAR
from iovirt.crosscheck.ops import Op
from iovirt.crosscheck.qtest import QtestClient
from iovirt.crosscheck.topology import (
    ENDPOINT_BDF,
    PCI_EXP_DEVCTL_BCR_FLR,
    build_iovirt,
    config_commands,
    discover_layout,
    flr_offset,
    rom_size,
    iovirt_config_read,
    iovirt_config_write,
    start_qemu,
)
from iovirt.pci.host import PciHost
from iovirt.virtio.transport.defs import VIRTIO_PCI_CAP_BAR, VIRTIO_PCI_CFG_CAP_DATA
from iovirt.virtio.transport.pci import VIRTIO_BAR
from iovirt.pci.regs import PCI_BASE_ADDRESS_0, PCI_CAP_MIN_OFFSET, PCI_CFG_SPACE_SIZE, PCI_ROM_ADDRESS

SPACE = "cfg"
_BAR_REGISTERS = tuple(PCI_BASE_ADDRESS_0 + 4 * i for i in range(6)) + (PCI_ROM_ADDRESS,)


def random_value(rng: random.Random, size: int) -> int:
    """A write value: uniform, all-ones, zero or one bit."""
    bits = 8 * size
    pick = rng.random()
    if pick < 0.4:
        return rng.getrandbits(bits)
    if pick < 0.6:
        return (1 << bits) - 1
    if pick < 0.75:
        return 0
    return 1 << rng.randrange(bits)


class PciConfigArea(Area):
    """QEMU's ``virtio-net-pci`` (modern, behind a root port) against :class:`VirtioPciFunction`."""

    name = "pci-config"
    expected = tuple(e for e in EXPECTED if e.area == "pci-config")

    def __init__(self) -> None:
        self.qemu: QtestClient | None = None
        self.host: PciHost | None = None
        self.flr = 0
        self.qemu_restore: list[Op] = []
        self.pci_cfg: int | None = None

    def start(self) -> None:
        self.qemu = start_qemu()
        layout, vectors = discover_layout(self.qemu)
        self.host, _ = build_iovirt(layout, vectors, rom_size(self.qemu))
        self.flr = flr_offset(layout)
        self.pci_cfg = dict(layout).get("pci_cfg")
        self.qemu_restore = self._find_flr_survivors()

    def close(self) -> None:
        if self.qemu is not None:
            self.qemu.close()
            self.qemu = None

    def generate(self, rng: random.Random, count: int) -> list[Op]:
        ops: list[Op] = []
        while len(ops) < count:
            if rng.random() < 0.05:
                bar = rng.choice(_BAR_REGISTERS)
                ops += [
                    Op("w", SPACE, bar, 4, 0xFFFFFFFF),
                    Op("r", SPACE, bar, 4),
                    Op("w", SPACE, bar, 4, rng.getrandbits(32)),
                    Op("r", SPACE, bar, 4),
                ]
                continue
            size = rng.choice((1, 2, 4))
            offset = rng.randrange(0, PCI_CFG_SPACE_SIZE, size)
            if rng.random() < 0.5:
                ops.append(Op("r", SPACE, offset, size))
            else:
                ops.append(Op("w", SPACE, offset, size, random_value(rng, size)))
        return ops[:count]

    def _reset_op(self) -> Op:
        return Op("w", SPACE, self.flr, 2, PCI_EXP_DEVCTL_BCR_FLR)

    def _find_flr_survivors(self) -> list[Op]:
        """Writes that put back the bytes QEMU's FLR leaves as they were (see the module docstring)."""
        assert self.qemu is not None
        reads = [Op("r", SPACE, offset, 1) for offset in range(PCI_CFG_SPACE_SIZE)]
        initial = self._qemu_ops(reads)
        dirty = [
            Op("w", SPACE, offset, 1, 0xFF)
            for offset in range(PCI_CAP_MIN_OFFSET, PCI_CFG_SPACE_SIZE)
            if not self.flr <= offset < self.flr + 2
        ]
        after = self._qemu_ops([*dirty, self._reset_op(), *reads])[-len(reads) :]
        return [
            Op("w", SPACE, offset, 1, value)
            for offset, value in enumerate(initial)
            if isinstance(value, int) and value != after[offset]
        ]

    def _qemu_ops(self, ops: Sequence[Op]) -> list[Observation]:
        assert self.qemu is not None
        commands: list[str] = []
        for op in ops:
            commands += config_commands(ENDPOINT_BDF, op.kind, op.offset, op.size, op.value)
        replies = self.qemu.batch(commands)
        return [int(replies[2 * i + 1], 16) if op.kind == "r" else None for i, op in enumerate(ops)]

    def run_qemu(self, ops: Sequence[Op]) -> list[Observation]:
        preamble = [self._reset_op(), *self.qemu_restore]
        return self._qemu_ops([*preamble, *ops])[len(preamble) :]

    def run_iovirt(self, ops: Sequence[Op]) -> list[Observation]:
        host = self.host
        assert host is not None
        observations: list[Observation] = []
        for op in [self._reset_op(), *ops]:
            if op.kind == "r":
                observations.append(iovirt_config_read(host, ENDPOINT_BDF, op.offset, op.size))
            else:
                iovirt_config_write(host, ENDPOINT_BDF, op.offset, op.size, op.value)
                observations.append(None)
        return observations[1:]

    def explain(
        self, ops: Sequence[Op], index: int, qemu: Observation, iovirt: Observation
    ) -> ExpectedDifference | None:
        op = ops[index]
        if op.kind != "r" or not isinstance(qemu, int) or not isinstance(iovirt, int):
            return None
        conditions = set()
        if any(self._is_flr(earlier) for earlier in ops[:index]):
            conditions.add(AFTER_RESET)
        data = None if self.pci_cfg is None else self.pci_cfg + VIRTIO_PCI_CFG_CAP_DATA
        if data is not None and self.pci_cfg is not None and op.offset < data + 4 and data < op.offset + op.size:
            # State at the read: replay the prefix on iovirt (rare: only for a mismatch).
            self.run_iovirt(ops[:index])
            assert self.host is not None
            if iovirt_config_read(self.host, ENDPOINT_BDF, self.pci_cfg + VIRTIO_PCI_CAP_BAR, 1) != VIRTIO_BAR:
                conditions.add(WINDOW_OTHER_BAR)
        return explain_read(self.expected, op.space, op.offset, op.size, qemu, iovirt, frozenset(conditions))

    def _is_flr(self, op: Op) -> bool:
        # A write that sets bit 15 of Device Control, whatever its width.
        bit = (self.flr - op.offset) * 8 + 15
        return op.kind == "w" and 0 <= bit < 8 * op.size and bool(op.value >> bit & 1)
