"""A virtio-pci modern driver that brings a device up the way Linux's ``virtio_pci_modern`` does.

Everything goes through what a guest kernel has: config accesses through
ECAM, MMIO through the host bridge, guest memory for the rings, MSI-X
messages into the vLAPICs.  The sequence (virtio 1.2 3.1.1 and 4.1.5, Linux
``virtio_pci_modern_probe``, ``vp_modern_*``, ``virtio_dev_probe``,
``vp_find_vqs_msix``):

1. :meth:`VirtioPciDriver.probe`: match vendor 0x1AF4 / device 0x1040-0x107F,
   walk the capability list for the virtio structures, read the BAR
   addresses firmware assigned, set Memory Space and Bus Master.
2. :meth:`~VirtioPciDriver.reset`, ACKNOWLEDGE, DRIVER,
   :meth:`~VirtioPciDriver.negotiate` (feature words, FEATURES_OK, re-read).
3. :meth:`~VirtioPciDriver.setup_msix` (table programmed with the function
   masked, ``config_msix_vector`` checked) and
   :meth:`~VirtioPciDriver.setup_queue` per queue (select, size, vector,
   ring addresses as two 32-bit halves, ``queue_notify_off``, enable).
4. :meth:`~VirtioPciDriver.driver_ok`.

:meth:`VirtioPciDriver.bring_up` runs all of it.  Each step is public so
tests can drive a device off the happy path.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Callable

from iovirt.memory import BumpAllocator, GuestMemory
from iovirt.pci.capability import walk_capabilities
from iovirt.pci.regs import (
    PCI_BASE_ADDRESS_0,
    PCI_BASE_ADDRESS_MEM_TYPE_64,
    PCI_CAP_ID_MSIX,
    PCI_COMMAND,
    PCI_COMMAND_MASTER,
    PCI_COMMAND_MEMORY,
    PCI_DEVICE_ID,
    PCI_MSIX_ENTRY_SIZE,
    PCI_MSIX_FLAGS,
    PCI_MSIX_FLAGS_ENABLE,
    PCI_MSIX_FLAGS_MASKALL,
    PCI_MSIX_FLAGS_QSIZE,
    PCI_MSIX_TABLE,
    PCI_VENDOR_ID,
)
from iovirt.platform.config_access import EcamConfig
from iovirt.platform.errors import VirtioDriverError
from iovirt.platform.irq import IrqDomain, IrqVector
from iovirt.virtio.defs import (
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_VERSION_1,
)
from iovirt.virtio.driver import DriverQueue
from iovirt.virtio.transport.caps import VirtioCapInfo, find_virtio_caps
from iovirt.virtio.transport.defs import (
    VIRTIO_MSI_NO_VECTOR,
    VIRTIO_PCI_CAP_COMMON_CFG,
    VIRTIO_PCI_CAP_DEVICE_CFG,
    VIRTIO_PCI_CAP_ISR_CFG,
    VIRTIO_PCI_CAP_NOTIFY_CFG,
    VIRTIO_PCI_COMMON_CFGGENERATION,
    VIRTIO_PCI_COMMON_DF,
    VIRTIO_PCI_COMMON_DFSELECT,
    VIRTIO_PCI_COMMON_GF,
    VIRTIO_PCI_COMMON_GFSELECT,
    VIRTIO_PCI_COMMON_MSIX,
    VIRTIO_PCI_COMMON_NUMQ,
    VIRTIO_PCI_COMMON_Q_AVAIL,
    VIRTIO_PCI_COMMON_Q_DESC,
    VIRTIO_PCI_COMMON_Q_ENABLE,
    VIRTIO_PCI_COMMON_Q_MSIX,
    VIRTIO_PCI_COMMON_Q_NOFF,
    VIRTIO_PCI_COMMON_Q_SELECT,
    VIRTIO_PCI_COMMON_Q_SIZE,
    VIRTIO_PCI_COMMON_Q_USED,
    VIRTIO_PCI_COMMON_STATUS,
    VIRTIO_PCI_VENDOR_ID,
)

if TYPE_CHECKING:
    from iovirt.pci.host import PciHost

_REQUIRED = (VIRTIO_PCI_CAP_COMMON_CFG, VIRTIO_PCI_CAP_NOTIFY_CFG, VIRTIO_PCI_CAP_ISR_CFG)
CONFIG_VECTOR = 0  # MSI-X entry 0: configuration changes; entry i+1: queue i (Linux vp_find_vqs_msix)


class VirtioPciDriver:
    """The driver of one virtio-pci function.

    ``VirtioPciDriver(host, cfg, memory, alloc, irq)``: ``cfg`` reaches the
    function's config space, ``memory`` is guest-physical memory (the CPU's
    view), ``alloc`` hands out DMA-able guest memory for rings and buffers,
    ``irq`` allocates interrupt vectors.  After :meth:`bring_up`,
    :attr:`queues` holds a :class:`~iovirt.virtio.driver.DriverQueue` per
    queue set up, :attr:`interrupts` counts the MSI-X interrupts handled per
    queue index (and ``"config"``), and :meth:`kick` notifies a queue.
    """

    def __init__(
        self, host: PciHost, cfg: EcamConfig, memory: GuestMemory, alloc: BumpAllocator, irq: IrqDomain
    ) -> None:
        self.host = host
        self.cfg = cfg
        self.memory = memory
        self.alloc = alloc
        self.irq = irq
        self.caps: dict[int, VirtioCapInfo] = {}
        self.bar_address: dict[int, int] = {}
        self.features = 0
        self.queues: dict[int, DriverQueue] = {}
        self.notify_addr: dict[int, int] = {}
        self.vectors: dict[int, IrqVector] = {}  # MSI-X entry -> where it lands
        self.interrupts: collections.Counter[int | str] = collections.Counter()
        self.on_interrupt: dict[int | str, Callable[[], None]] = {}
        self._msix_cap = 0

    # -- discovery ----------------------------------------------------------------
    def probe(self) -> None:
        """Match the function, find its virtio structures and BARs, enable memory decoding and bus mastering."""
        vendor, device = self.cfg.read(PCI_VENDOR_ID, 2), self.cfg.read(PCI_DEVICE_ID, 2)
        if vendor != VIRTIO_PCI_VENDOR_ID or not 0x1040 <= device <= 0x107F:
            raise VirtioDriverError("probe", f"{vendor:04x}:{device:04x} is not a modern virtio-pci device", 0)
        self.caps = find_virtio_caps(self.cfg.read)
        missing = [t for t in _REQUIRED if t not in self.caps]
        if missing:
            raise VirtioDriverError("probe", f"virtio capabilities of cfg_type {missing} are missing", 0)
        for cap_id, offset in walk_capabilities(self.cfg.read):
            if cap_id == PCI_CAP_ID_MSIX:
                self._msix_cap = offset
        for info in self.caps.values():
            self.bar_address.setdefault(info.bar, self._bar_address(info.bar))
        if self._msix_cap:
            bir = self.cfg.read(self._msix_cap + PCI_MSIX_TABLE, 4) & 7
            self.bar_address.setdefault(bir, self._bar_address(bir))
        # pci_enable_device + pci_set_master.
        command = self.cfg.read(PCI_COMMAND, 2)
        self.cfg.write(PCI_COMMAND, 2, command | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER)

    def _bar_address(self, index: int) -> int:
        register = PCI_BASE_ADDRESS_0 + 4 * index
        low = self.cfg.read(register, 4)
        address = low & ~0xF
        if low & PCI_BASE_ADDRESS_MEM_TYPE_64:
            address |= self.cfg.read(register + 4, 4) << 32
        return address

    def _structure(self, cfg_type: int) -> int:
        info = self.caps[cfg_type]
        return self.bar_address[info.bar] + info.offset

    # -- register access ------------------------------------------------------------
    def common_read(self, offset: int, size: int) -> int:
        """Read a field of the common configuration."""
        return self.host.mmio_read(self._structure(VIRTIO_PCI_CAP_COMMON_CFG) + offset, size)

    def common_write(self, offset: int, size: int, value: int) -> None:
        """Write a field of the common configuration."""
        self.host.mmio_write(self._structure(VIRTIO_PCI_CAP_COMMON_CFG) + offset, size, value)

    def device_cfg_read(self, offset: int, size: int) -> int:
        """Read the device-specific configuration."""
        return self.host.mmio_read(self._structure(VIRTIO_PCI_CAP_DEVICE_CFG) + offset, size)

    def read_device_config(self, offset: int, length: int) -> bytes:
        """Bytes of the device configuration, re-read until ``config_generation`` is stable (4.1.4.3)."""
        while True:
            before = self.common_read(VIRTIO_PCI_COMMON_CFGGENERATION, 1)
            data = bytes(self.device_cfg_read(offset + i, 1) for i in range(length))
            if self.common_read(VIRTIO_PCI_COMMON_CFGGENERATION, 1) == before:
                return data

    def isr_read(self) -> int:
        """Read (and so clear) ISR status."""
        return self.host.mmio_read(self._structure(VIRTIO_PCI_CAP_ISR_CFG), 1)

    @property
    def status(self) -> int:
        """``device_status``."""
        return self.common_read(VIRTIO_PCI_COMMON_STATUS, 1)

    def add_status(self, bit: int) -> None:
        """Set a status bit on top of the current ones (Linux ``virtio_add_status``)."""
        self.common_write(VIRTIO_PCI_COMMON_STATUS, 1, self.status | bit)

    # -- bring-up -------------------------------------------------------------------
    def reset(self) -> None:
        """Write 0 to ``device_status`` and wait for it to read 0 (4.1.4.3.2)."""
        self.common_write(VIRTIO_PCI_COMMON_STATUS, 1, 0)
        if self.status != 0:
            raise VirtioDriverError("reset", "device_status did not read back 0", self.status)
        self.queues.clear()
        self.notify_addr.clear()

    def device_features(self) -> int:
        """The 64 offered feature bits."""
        words = []
        for select in (0, 1):
            self.common_write(VIRTIO_PCI_COMMON_DFSELECT, 4, select)
            words.append(self.common_read(VIRTIO_PCI_COMMON_DF, 4))
        return words[0] | words[1] << 32

    def write_driver_features(self, features: int) -> None:
        """Write both driver feature words."""
        for select in (0, 1):
            self.common_write(VIRTIO_PCI_COMMON_GFSELECT, 4, select)
            self.common_write(VIRTIO_PCI_COMMON_GF, 4, features >> (32 * select) & 0xFFFFFFFF)

    def negotiate(self, wanted: int | None = None) -> int:
        """Accept ``offered & wanted`` (all offered by default), set FEATURES_OK and check it stuck."""
        offered = self.device_features()
        features = offered if wanted is None else offered & wanted
        self.write_driver_features(features)
        self.add_status(VIRTIO_CONFIG_S_FEATURES_OK)
        if not self.status & VIRTIO_CONFIG_S_FEATURES_OK:
            self.add_status(VIRTIO_CONFIG_S_FAILED)
            raise VirtioDriverError("negotiate", f"device refused features {features:#x}", self.status)
        if not features >> VIRTIO_F_VERSION_1 & 1:
            raise VirtioDriverError("negotiate", "VIRTIO_F_VERSION_1 was not negotiated", self.status)
        self.features = features
        return features

    def has_feature(self, bit: int) -> bool:
        """Whether ``bit`` was negotiated."""
        return bool(self.features >> bit & 1)

    def setup_msix(self, queues: int) -> None:
        """Enable MSI-X, program entry 0 for config changes and entry i+1 for queue i."""
        if not self._msix_cap:
            raise VirtioDriverError("setup_msix", "the function has no MSI-X capability", self.status)
        flags_at = self._msix_cap + PCI_MSIX_FLAGS
        table_size = (self.cfg.read(flags_at, 2) & PCI_MSIX_FLAGS_QSIZE) + 1
        if table_size < queues + 1:
            raise VirtioDriverError("setup_msix", f"{table_size} MSI-X vectors for {queues} queues", self.status)
        table_reg = self.cfg.read(self._msix_cap + PCI_MSIX_TABLE, 4)
        table = self.bar_address[table_reg & 7] + (table_reg & ~7)
        # As Linux's msix_capability_init: enable with the function masked while programming.
        self.cfg.write(flags_at, 2, PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL)
        for entry in range(queues + 1):
            key: int | str = "config" if entry == CONFIG_VECTOR else entry - 1
            vec = self.irq.allocate(self.cfg.requester_id, self._handler(key))
            self.vectors[entry] = vec
            base = table + entry * PCI_MSIX_ENTRY_SIZE
            self.host.mmio_write(base, 4, vec.address & 0xFFFFFFFF)
            self.host.mmio_write(base + 4, 4, vec.address >> 32)
            self.host.mmio_write(base + 8, 4, vec.data)
            self.host.mmio_write(base + 12, 4, 0)  # unmask the entry
        self.cfg.write(flags_at, 2, PCI_MSIX_FLAGS_ENABLE)
        self.common_write(VIRTIO_PCI_COMMON_MSIX, 2, CONFIG_VECTOR)
        if self.common_read(VIRTIO_PCI_COMMON_MSIX, 2) != CONFIG_VECTOR:
            raise VirtioDriverError("setup_msix", "config_msix_vector mapping failed", self.status)

    def _handler(self, key: int | str) -> Callable[[], None]:
        def handle() -> None:
            self.interrupts[key] += 1
            callback = self.on_interrupt.get(key)
            if callback is not None:
                callback()

        return handle

    def setup_queue(self, index: int, size: int | None = None) -> DriverQueue:
        """Set up queue ``index`` (4.1.5.1.3) with at most ``size`` entries and enable it."""
        self.common_write(VIRTIO_PCI_COMMON_Q_SELECT, 2, index)
        max_size = self.common_read(VIRTIO_PCI_COMMON_Q_SIZE, 2)
        if not max_size:
            raise VirtioDriverError("setup_queue", f"queue {index} is not available", self.status)
        if self.common_read(VIRTIO_PCI_COMMON_Q_ENABLE, 2):
            raise VirtioDriverError("setup_queue", f"queue {index} is already enabled", self.status)
        size = max_size if size is None else min(size, max_size)
        self.common_write(VIRTIO_PCI_COMMON_Q_SIZE, 2, size)
        queue = DriverQueue(self.memory, self.alloc, size, event_idx=self.has_feature(VIRTIO_F_EVENT_IDX), index=index)
        vector = index + 1 if index + 1 in self.vectors else VIRTIO_MSI_NO_VECTOR
        self.common_write(VIRTIO_PCI_COMMON_Q_MSIX, 2, vector)
        if self.common_read(VIRTIO_PCI_COMMON_Q_MSIX, 2) != vector:
            raise VirtioDriverError("setup_queue", f"queue {index} MSI-X vector {vector} mapping failed", self.status)
        for field, addr in (
            (VIRTIO_PCI_COMMON_Q_DESC, queue.desc_addr),
            (VIRTIO_PCI_COMMON_Q_AVAIL, queue.avail_addr),
            (VIRTIO_PCI_COMMON_Q_USED, queue.used_addr),
        ):
            # Linux vp_iowrite64_twopart: low then high dword.
            self.common_write(field, 4, addr & 0xFFFFFFFF)
            self.common_write(field + 4, 4, addr >> 32)
        notify = self.caps[VIRTIO_PCI_CAP_NOTIFY_CFG]
        notify_off = self.common_read(VIRTIO_PCI_COMMON_Q_NOFF, 2)
        self.notify_addr[index] = self._structure(VIRTIO_PCI_CAP_NOTIFY_CFG) + notify_off * notify.notify_off_multiplier
        self.common_write(VIRTIO_PCI_COMMON_Q_ENABLE, 2, 1)
        self.queues[index] = queue
        return queue

    def driver_ok(self) -> None:
        """Set DRIVER_OK: the device is live."""
        self.add_status(VIRTIO_CONFIG_S_DRIVER_OK)
        if not self.status & VIRTIO_CONFIG_S_DRIVER_OK:
            raise VirtioDriverError("driver_ok", "DRIVER_OK did not stick", self.status)

    def bring_up(self, wanted: int | None = None, queues: int | None = None, queue_size: int | None = None) -> None:
        """Probe and initialise the device (3.1.1) with ``queues`` queues (default: all it has)."""
        self.probe()
        self.reset()
        self.add_status(VIRTIO_CONFIG_S_ACKNOWLEDGE)
        self.add_status(VIRTIO_CONFIG_S_DRIVER)
        self.negotiate(wanted)
        count = self.common_read(VIRTIO_PCI_COMMON_NUMQ, 2) if queues is None else queues
        self.setup_msix(count)
        for index in range(count):
            self.setup_queue(index, queue_size)
        self.driver_ok()

    # -- operation --------------------------------------------------------------------
    def kick(self, index: int) -> bool:
        """Publish queue ``index``'s new buffers and notify the device if it wants it; returns whether notified."""
        if self.queues[index].publish():
            self.host.mmio_write(self.notify_addr[index], 2, index)
            return True
        return False
