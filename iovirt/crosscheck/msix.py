"""Area ``msix``: MSI-X table, PBA and delivery of QEMU's virtio-net-pci against iovirt's model.

The topology is :mod:`iovirt.crosscheck.topology`'s.  Both sides get the
same memory map: the root port's memory window at :data:`WINDOW`, the
endpoint's MSI-X BAR (BAR1) and virtio BAR (BAR4) inside it, Memory Space
and Bus Master on in both Command registers (an MSI is a memory write, PCI
3.0 §6.8).  Each sequence starts from a Function Level Reset of the
endpoint, then reprograms the BARs and brings the virtio device to
DRIVER_OK (virtio 1.2 §3.1.1) so that it may signal configuration changes.

Operations:

- ``r|w tbl OFF 4|8`` -- the MSI-X table (dword or aligned qword, PCI 3.0 §6.8.2);
- ``r|w pba OFF 4|8`` -- the Pending Bit Array (read-only, §6.8.2.10);
- ``r|w cfg OFF 1|2|4`` -- Message Control (MSI-X Enable, Function Mask), by word, by its upper
  byte alone, or with the dword holding it;
- ``w virtio 0x10 2 V`` -- the common configuration's ``msix_config``
  (virtio 1.2 §4.1.4.3), generated first in a sequence;
- ``w virtio 0x1a 2 V`` -- the transmit queue's ``queue_msix_vector``, generated first too;
- ``fire txq 0 0`` -- a used-buffer interrupt of the transmit queue: the driver
  places one frame on it and notifies; the device (QEMU's with no peer,
  iovirt's with no port) consumes it and notifies on the queue's vector
  (virtio 1.2 §2.7.10, §4.1.5.4).  QEMU's virtio-net transmits only for a
  running VM, so the VM runs, on a firmware image of ``hlt``
  (:func:`~iovirt.crosscheck.qtest.halt_firmware`): no guest code runs;
- ``fire link 0 0`` -- a configuration-change interrupt: QEMU's link is
  toggled with QMP ``set_link`` (virtio-net then notifies the driver,
  virtio 1.2 §5.1.4.2), iovirt's device's ``link_up`` is toggled and
  :meth:`~iovirt.virtio.transport.pci.VirtioPciFunction.config_changed` called.

An interrupt message is a memory write.  Table addresses are drawn from
:data:`SLOTS` dwords of ordinary RAM (not 0xFEExxxxx, which q35 sends to
the APIC), so QEMU's MSI-X writes land in RAM, where ``read`` finds them.
After every write and ``fire`` the observation is the slots' contents,
cleared again for the next operation; iovirt's sink records the messages,
and the same slots are filled from them.  Message data is never 0 (the
cleared slot's value), and software only ever writes 0 to Vector Control's
reserved bits 31:1 and Message Upper Address (the first because the spec
makes the effect of other values undefined, §6.8.2.9; the second to stay in RAM).
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import time
from typing import Sequence

from iovirt.crosscheck.area import Area, Observation
from iovirt.crosscheck.ops import Op
from iovirt.crosscheck.qmp import QmpClient
from iovirt.crosscheck.qtest import QtestClient, QtestError, halt_firmware
from iovirt.crosscheck.topology import (
    ENDPOINT_BDF,
    PCI_EXP_DEVCTL_BCR_FLR,
    ROOT_PORT_BDF,
    build_iovirt,
    config_commands,
    discover_layout,
    flr_offset,
    iovirt_config_read,
    iovirt_config_write,
    rom_size,
    start_qemu,
)
from iovirt.pci.host import PciHost
from iovirt.pci.regs import (
    PCI_BASE_ADDRESS_0,
    PCI_COMMAND,
    PCI_COMMAND_MASTER,
    PCI_COMMAND_MEMORY,
    PCI_MEMORY_BASE,
    PCI_MSIX_ENTRY_SIZE,
    PCI_MSIX_FLAGS,
    PCI_MSIX_FLAGS_ENABLE,
    PCI_MSIX_FLAGS_MASKALL,
    PCI_PREF_BASE_UPPER32,
    PCI_PREF_LIMIT_UPPER32,
    PCI_PREF_MEMORY_BASE,
)
from iovirt.virtio.net.device import VirtioNet
from iovirt.virtio.defs import (
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
)
from iovirt.virtio.transport.defs import (
    VIRTIO_PCI_COMMON_GF,
    VIRTIO_PCI_COMMON_GFSELECT,
    VIRTIO_PCI_COMMON_MSIX,
    VIRTIO_PCI_COMMON_Q_AVAIL,
    VIRTIO_PCI_COMMON_Q_DESC,
    VIRTIO_PCI_COMMON_Q_ENABLE,
    VIRTIO_PCI_COMMON_Q_MSIX,
    VIRTIO_PCI_COMMON_Q_SELECT,
    VIRTIO_PCI_COMMON_Q_SIZE,
    VIRTIO_PCI_COMMON_Q_USED,
    VIRTIO_PCI_COMMON_STATUS,
)
from iovirt.virtio.transport.pci import (
    COMMON_OFFSET,
    MSIX_BAR,
    MSIX_PBA_OFFSET,
    NOTIFY_OFFSET,
    VIRTIO_BAR,
    VirtioPciFunction,
)

MSIX_BAR_ADDR = 0xC000_0000
VIRTIO_BAR_ADDR = 0xC010_0000
WINDOW = (MSIX_BAR_ADDR, VIRTIO_BAR_ADDR)
"""Non-prefetchable window (1 MiB from the first) for BAR1, prefetchable (1 MiB from the second) for BAR4."""
SLOTS = 8
SLOT_BASE = 0x10_0000
"""Message addresses: SLOTS dwords of RAM from SLOT_BASE."""
VIRTIO_F_VERSION_1_WORD = 1  # feature bit 32: word 1, bit 0 (virtio 1.2 §6)
_COMMAND = PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER
_STATUS_STEPS = (
    VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK,
)


def _window_writes(base: int) -> int:
    """A bridge Memory Base/Limit dword for a 1 MiB window at ``base`` (PCI-to-PCI bridge 1.2 §3.2.5.8)."""
    reg = (base >> 16) & 0xFFF0
    return reg | reg << 16


BRIDGE_SETUP = (
    (PCI_MEMORY_BASE, 4, _window_writes(MSIX_BAR_ADDR)),
    (PCI_PREF_MEMORY_BASE, 4, _window_writes(VIRTIO_BAR_ADDR)),
    (PCI_PREF_BASE_UPPER32, 4, 0),
    (PCI_PREF_LIMIT_UPPER32, 4, 0),
    (PCI_COMMAND, 2, _COMMAND),
)
"""Config writes to the root port: its two windows, Memory Space and Bus Master."""
ENDPOINT_SETUP = (
    (PCI_BASE_ADDRESS_0 + 4 * MSIX_BAR, 4, MSIX_BAR_ADDR),
    (PCI_BASE_ADDRESS_0 + 4 * VIRTIO_BAR, 4, VIRTIO_BAR_ADDR),
    (PCI_BASE_ADDRESS_0 + 4 * VIRTIO_BAR + 4, 4, 0),
    (PCI_COMMAND, 2, _COMMAND),
)
"""Config writes to the endpoint after its reset: BAR1, BAR4 (64-bit), Memory Space and Bus Master."""
TX_QUEUE = 1  # virtio-net's transmitq1 (virtio 1.2 §5.1.2)
TX_QUEUE_SIZE = 16
TX_DESC = 0x8_0000
TX_AVAIL = TX_DESC + 0x1000
TX_USED = TX_DESC + 0x2000
TX_BUFFER = TX_DESC + 0x3000
"""The transmit queue's rings and its one buffer, in RAM below 1 MiB on both sides."""
TX_FRAME = bytes(12) + bytes.fromhex("ffffffffffff" "525400123456" "0800") + bytes(46)
"""A virtio-net header (12 bytes, no offloads, virtio 1.2 §5.1.6) and a 60-byte broadcast frame."""
VIRTIO_SETUP = (
    (VIRTIO_PCI_COMMON_GFSELECT, 4, 1),
    (VIRTIO_PCI_COMMON_GF, 4, VIRTIO_F_VERSION_1_WORD),
    (VIRTIO_PCI_COMMON_STATUS, 1, _STATUS_STEPS[0]),
    (VIRTIO_PCI_COMMON_Q_SELECT, 2, TX_QUEUE),
    (VIRTIO_PCI_COMMON_Q_SIZE, 2, TX_QUEUE_SIZE),
    (VIRTIO_PCI_COMMON_Q_DESC, 8, TX_DESC),
    (VIRTIO_PCI_COMMON_Q_AVAIL, 8, TX_AVAIL),
    (VIRTIO_PCI_COMMON_Q_USED, 8, TX_USED),
    (VIRTIO_PCI_COMMON_Q_ENABLE, 2, 1),
    (VIRTIO_PCI_COMMON_STATUS, 1, _STATUS_STEPS[1]),
)
"""Common-configuration writes: accept VERSION_1 only, FEATURES_OK, the transmit queue, DRIVER_OK (virtio 1.2
§3.1.1); queue_select stays on the transmit queue, so ``w virtio 0x1a`` sets its MSI-X vector."""
_TX_RING_CLEAR = (TX_DESC, 0x4000)
"""Rings and buffer are cleared before each sequence: a device reset starts the queue at index 0 again."""


def tx_writes(n: int) -> list[tuple[int, bytes]]:
    """The driver's memory writes for transmit number ``n`` of a sequence: descriptor, avail.ring, avail.idx."""
    slot = n % TX_QUEUE_SIZE
    desc = TX_BUFFER.to_bytes(8, "little") + len(TX_FRAME).to_bytes(4, "little") + bytes(4)
    return [(TX_DESC + 16 * slot, desc), (TX_AVAIL + 4 + 2 * slot, slot.to_bytes(2, "little")),
            (TX_AVAIL + 2, ((n + 1) & 0xFFFF).to_bytes(2, "little"))]


_TX_TIMEOUT = 10.0

_CONTROL_BITS = (
    0, PCI_MSIX_FLAGS_MASKALL, PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL,
    PCI_MSIX_FLAGS_ENABLE, PCI_MSIX_FLAGS_ENABLE, PCI_MSIX_FLAGS_ENABLE,
)
"""Message Control values written: enabled and unmasked half of the time."""


class _Sink:
    """iovirt's MSI sink: the messages delivered since the last :meth:`take`."""

    def __init__(self) -> None:
        self.messages: list[tuple[int, int]] = []

    def deliver_msi(self, source_id: int, address: int, data: int) -> None:
        self.messages.append((address, data))

    def take(self) -> list[tuple[int, int]]:
        messages, self.messages = self.messages, []
        return messages


def slots_observation(words: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """The non-zero slots as ``((slot, data), …)``."""
    return tuple((i, word) for i, word in enumerate(words) if word)


def messages_observation(messages: Sequence[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """What :data:`SLOTS` RAM would hold after ``messages`` (later ones overwrite); other addresses as is."""
    words = [0] * SLOTS
    other: list[tuple[int, int]] = []
    for address, data in messages:
        slot, rem = divmod(address - SLOT_BASE, 4)
        if rem == 0 and 0 <= slot < SLOTS:
            words[slot] = data
        else:
            other.append((address, data))
    return slots_observation(words) + tuple(other)


class MsixArea(Area):
    """QEMU's virtio-net-pci MSI-X (``hw/pci/msix.c``) against :class:`~iovirt.pci.msix.MsixCapability`."""

    name = "msix"

    def __init__(self) -> None:
        self.qemu: QtestClient | None = None
        self.qmp: QmpClient | None = None
        self.host: PciHost | None = None
        self.endpoint: VirtioPciFunction | None = None
        self.sink = _Sink()
        self.vectors = 0
        self.cap = 0
        self.flr = 0
        self.qemu_link = True

    # -- lifetime ------------------------------------------------------------

    def start(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="iovirt-qmp-")
        path = os.path.join(self._dir, "qmp.sock")
        self.qemu = start_qemu(["-qmp", f"unix:{path},server=on,wait=off", "-bios", halt_firmware(self._dir)])
        self.qmp = QmpClient(path)
        self.qmp.execute("cont")
        layout, self.vectors = discover_layout(self.qemu)
        self.host, self.endpoint = build_iovirt(layout, self.vectors, rom_size(self.qemu))
        self.host.msi_sink = self.sink
        offsets = dict(layout)
        assert offsets["msix"] is not None
        self.cap = offsets["msix"]
        self.flr = flr_offset(layout)
        for offset, size, value in BRIDGE_SETUP:
            self.qemu.batch(config_commands(ROOT_PORT_BDF, "w", offset, size, value))
            iovirt_config_write(self.host, ROOT_PORT_BDF, offset, size, value)

    def close(self) -> None:
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None
        if self.qemu is not None:
            self.qemu.close()
            self.qemu = None
            shutil.rmtree(self._dir, ignore_errors=True)

    # -- generation -------------------------------------------------------------

    def _data(self, rng: random.Random) -> int:
        return rng.randrange(1, 1 << 32)

    def _address(self, rng: random.Random) -> int:
        return SLOT_BASE + 4 * rng.randrange(SLOTS)

    def _entry_write(self, rng: random.Random) -> Op:
        vector = rng.randrange(self.vectors)
        base = vector * PCI_MSIX_ENTRY_SIZE
        ctrl = int(rng.random() < 0.35)  # unmasked more often than not, so messages go out
        field = rng.randrange(6)
        if field == 0:
            return Op("w", "tbl", base, 4, self._address(rng))
        if field == 1:
            return Op("w", "tbl", base + 4, 4, 0)
        if field == 2:
            return Op("w", "tbl", base + 8, 4, self._data(rng))
        if field == 3:
            return Op("w", "tbl", base, 8, self._address(rng))
        if field == 4:
            return Op("w", "tbl", base + 8, 8, self._data(rng) | ctrl << 32)
        return Op("w", "tbl", base + 12, 4, ctrl)

    def generate(self, rng: random.Random, count: int) -> list[Op]:
        ops = [Op("w", "virtio", VIRTIO_PCI_COMMON_MSIX, 2, rng.randrange(self.vectors)),
               Op("w", "virtio", VIRTIO_PCI_COMMON_Q_MSIX, 2, rng.randrange(self.vectors))]
        for vector in range(self.vectors):
            base = vector * PCI_MSIX_ENTRY_SIZE
            ops += [Op("w", "tbl", base, 4, self._address(rng)), Op("w", "tbl", base + 8, 4, self._data(rng))]
        table = self.vectors * PCI_MSIX_ENTRY_SIZE
        pba = ((self.vectors + 63) // 64) * 8
        while len(ops) < count:
            pick = rng.random()
            if pick < 0.1:
                ops.append(Op("fire", "link", 0, 0))
            elif pick < 0.2:
                ops.append(Op("fire", "txq", 0, 0))
            elif pick < 0.45:
                ops.append(self._entry_write(rng))
            elif pick < 0.6:
                size = rng.choice((4, 8))
                ops.append(Op("r", "tbl", rng.randrange(0, table, size), size))
            elif pick < 0.7:
                size = rng.choice((4, 8))
                offset = rng.randrange(0, pba, size)
                ops.append(Op("r", "pba", offset, size) if rng.random() < 0.8 else Op("w", "pba", offset, size, rng.getrandbits(8 * size)))
            elif pick < 0.9:
                bits = rng.choice(_CONTROL_BITS)
                value = bits | rng.getrandbits(14) if rng.random() < 0.3 else bits
                width = rng.random()
                if width < 0.6:
                    ops.append(Op("w", "cfg", self.cap + PCI_MSIX_FLAGS, 2, value))
                elif width < 0.8:
                    ops.append(Op("w", "cfg", self.cap + PCI_MSIX_FLAGS + 1, 1, value >> 8))
                else:
                    ops.append(Op("w", "cfg", self.cap, 4, value << 16 | rng.getrandbits(16)))
            else:
                ops.append(Op("r", "cfg", self.cap + PCI_MSIX_FLAGS, 2))
        return ops[:count]

    # -- QEMU --------------------------------------------------------------------

    def _qemu_preamble(self) -> list[str]:
        commands = config_commands(ENDPOINT_BDF, "w", self.flr, 2, PCI_EXP_DEVCTL_BCR_FLR)
        for offset, size, value in ENDPOINT_SETUP:
            commands += config_commands(ENDPOINT_BDF, "w", offset, size, value)
        for offset, size, value in VIRTIO_SETUP:
            commands.append(QtestClient.write_cmd(VIRTIO_BAR_ADDR + COMMON_OFFSET + offset, size, value))
        commands.append(f"memset {SLOT_BASE:#x} {4 * SLOTS:#x} 0")
        commands.append(f"memset {_TX_RING_CLEAR[0]:#x} {_TX_RING_CLEAR[1]:#x} 0")
        commands.append(f"write {TX_BUFFER:#x} {len(TX_FRAME):#x} 0x{TX_FRAME.hex()}")
        return commands

    def _qemu_access(self, op: Op) -> list[str]:
        if op.space == "cfg":
            return config_commands(ENDPOINT_BDF, op.kind, op.offset, op.size, op.value)
        base = {"tbl": MSIX_BAR_ADDR, "pba": MSIX_BAR_ADDR + MSIX_PBA_OFFSET,
                "virtio": VIRTIO_BAR_ADDR + COMMON_OFFSET}[op.space]
        if op.kind == "r":
            return [QtestClient.read_cmd(base + op.offset, op.size)]
        return [QtestClient.write_cmd(base + op.offset, op.size, op.value)]

    _SLOTS_READ = f"read {SLOT_BASE:#x} {4 * SLOTS:#x}"
    _SLOTS_CLEAR = f"memset {SLOT_BASE:#x} {4 * SLOTS:#x} 0"

    def run_qemu(self, ops: Sequence[Op]) -> list[Observation]:
        qemu, qmp = self.qemu, self.qmp
        assert qemu is not None and qmp is not None
        if not self.qemu_link:
            qmp.execute("set_link", name="nic0", up=True)
            self.qemu_link = True
        pending = self._qemu_preamble()
        preamble = len(pending)
        # (index into the batch's replies, op kind) per op of the current batch
        marks: list[int] = []
        observations: list[Observation] = []

        def flush() -> None:
            nonlocal pending, preamble
            replies = qemu.batch(pending)[preamble:]
            for mark, op in zip(marks, batch_ops):
                observations.append(self._qemu_observation(op, replies[mark]))
            pending, preamble = [], 0
            marks.clear()
            batch_ops.clear()

        batch_ops: list[Op] = []
        transmits = 0
        for op in ops:
            if op.kind == "fire" and op.space == "txq":
                flush()
                commands = [f"write {a:#x} {len(d):#x} 0x{d.hex()}" for a, d in tx_writes(transmits)]
                commands.append(QtestClient.write_cmd(VIRTIO_BAR_ADDR + NOTIFY_OFFSET + 4 * TX_QUEUE, 2, TX_QUEUE))
                qemu.batch(commands)
                transmits += 1
                self._wait_used(transmits)
                words = qemu.batch([self._SLOTS_READ, self._SLOTS_CLEAR])[0]
                observations.append(self._slots(words))
                continue
            if op.kind == "fire":
                flush()
                self.qemu_link = not self.qemu_link
                qmp.execute("set_link", name="nic0", up=self.qemu_link)
                words = qemu.batch([self._SLOTS_READ, self._SLOTS_CLEAR])[0]
                observations.append(self._slots(words))
                continue
            commands = self._qemu_access(op)
            if op.kind == "r":
                marks.append(len(pending) - preamble + len(commands) - 1)
            else:
                commands += [self._SLOTS_READ, self._SLOTS_CLEAR]
                marks.append(len(pending) - preamble + len(commands) - 2)
            pending += commands
            batch_ops.append(op)
        flush()
        return observations

    def _wait_used(self, count: int) -> None:
        """Until QEMU's transmit bottom half has used ``count`` buffers (it runs after the notify returns)."""
        qemu = self.qemu
        assert qemu is not None
        deadline = time.monotonic() + _TX_TIMEOUT
        while int(qemu.command(QtestClient.read_cmd(TX_USED + 2, 2)), 16) != count & 0xFFFF:
            if time.monotonic() > deadline:
                raise QtestError(f"QEMU's virtio-net did not use transmit buffer {count} in {_TX_TIMEOUT} s")
            time.sleep(0.0005)

    @staticmethod
    def _slots(reply: str) -> tuple[tuple[int, int], ...]:
        data = bytes.fromhex(reply[2:] if reply.startswith("0x") else reply)
        return slots_observation([int.from_bytes(data[i : i + 4], "little") for i in range(0, len(data), 4)])

    def _qemu_observation(self, op: Op, reply: str) -> Observation:
        if op.kind == "r":
            return int(reply, 16)
        return self._slots(reply)

    # -- iovirt ------------------------------------------------------------------

    def run_iovirt(self, ops: Sequence[Op]) -> list[Observation]:
        host, endpoint = self.host, self.endpoint
        assert host is not None and endpoint is not None
        device = endpoint.device
        assert isinstance(device, VirtioNet)
        device.link_up = True
        iovirt_config_write(host, ENDPOINT_BDF, self.flr, 2, PCI_EXP_DEVCTL_BCR_FLR)
        for offset, size, value in ENDPOINT_SETUP:
            iovirt_config_write(host, ENDPOINT_BDF, offset, size, value)
        endpoint.memory.write(_TX_RING_CLEAR[0], bytes(_TX_RING_CLEAR[1]))
        endpoint.memory.write(TX_BUFFER, TX_FRAME)
        for offset, size, value in VIRTIO_SETUP:
            host.mmio_write(VIRTIO_BAR_ADDR + COMMON_OFFSET + offset, size, value)
        self.sink.take()
        observations: list[Observation] = []
        transmits = 0
        for op in ops:
            if op.kind == "fire" and op.space == "txq":
                for addr, data in tx_writes(transmits):
                    endpoint.memory.write(addr, data)
                transmits += 1
                host.mmio_write(VIRTIO_BAR_ADDR + NOTIFY_OFFSET + 4 * TX_QUEUE, 2, TX_QUEUE)
            elif op.kind == "fire":
                device.link_up = not device.link_up
                endpoint.config_changed()
            elif op.space == "cfg":
                if op.kind == "r":
                    observations.append(iovirt_config_read(host, ENDPOINT_BDF, op.offset, op.size))
                    continue
                iovirt_config_write(host, ENDPOINT_BDF, op.offset, op.size, op.value)
            else:
                base = {"tbl": MSIX_BAR_ADDR, "pba": MSIX_BAR_ADDR + MSIX_PBA_OFFSET,
                        "virtio": VIRTIO_BAR_ADDR + COMMON_OFFSET}[op.space]
                if op.kind == "r":
                    observations.append(host.mmio_read(base + op.offset, op.size))
                    continue
                host.mmio_write(base + op.offset, op.size, op.value)
            observations.append(messages_observation(self.sink.take()))
        return observations
