"""The device parts of a virtio-pci function, and its device mode (virtio 1.4 2.14, 2.12.1.4).

:class:`PciDeviceParts` is what a group owner's device parts commands reach
on one member (:mod:`iovirt.sriov.device_parts` drives it):

- :meth:`~PciDeviceParts.capture` returns the member's parts in the order
  of 2.12.1.4.4: VIRTIO_DEV_PART_DEV_FEATURES (optional), _DRV_FEATURES
  (one le64 word each: the 64 bits the common configuration exposes), one
  _PCI_COMMON_CFG per field of :data:`COMMON_CFG_PARTS`, _DEVICE_STATUS,
  one _VQ_CFG and one _VQ_NOTIFY_CFG per device queue, then the device
  type's parts (:class:`DeviceTypeParts`, e.g. :class:`iovirt.virtio.net.parts.NetParts`);
- :meth:`~PciDeviceParts.stop` and :meth:`~PciDeviceParts.resume` are
  VIRTIO_ADMIN_CMD_DEV_MODE_SET.  Stopped, the member initiates no transport
  request: its queues are detached from the device (their positions kept;
  every buffer the device took is already in the used ring, as the device
  serves chains to completion), so it reads and writes no guest memory, and
  its common configuration talks to a :class:`HoldingPort` that keeps the
  used-buffer and configuration notifications it would send.  Register
  reads and writes, and notifications from the driver, are taken as ever
  (2.12.1.4.4.1: accept driver notifications, valid values for reads);
- :meth:`~PciDeviceParts.stage` validates parts of a
  VIRTIO_ADMIN_CMD_DEV_PARTS_SET (only while stopped) and keeps them;
  :meth:`~PciDeviceParts.resume` applies what was staged, then restarts the
  queues and hands the held notifications on.  A restored queue resumes at
  the used index in its ring (the ring holds no buffer in flight).

Read-only and invariant fields (the device features, ``num_queues``,
``queue_notify_off``, ``queue_notif_config_data``) are verified, never
written (2.12.1.4.4.1).  A queue the driver enables while the member is
stopped is only recorded by the common configuration (the holding port's
``queues_held``) and started when the member resumes; a queue whose
registers changed while stopped resumes at its ring's used index, never at
the positions it had on the old ring.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from iovirt.errors import IovirtError
from iovirt.memory import GuestMemory
from iovirt.virtio.admin.device_parts import (
    DEVICE_TYPE_PARTS,
    VIRTIO_DEV_PART_DEV_FEATURES,
    VIRTIO_DEV_PART_DEVICE_STATUS,
    VIRTIO_DEV_PART_DRV_FEATURES,
    VIRTIO_DEV_PART_F_OPTIONAL,
    VIRTIO_DEV_PART_PCI_COMMON_CFG,
    VIRTIO_DEV_PART_VQ_CFG,
    VIRTIO_DEV_PART_VQ_NOTIFY_CFG,
    VQ_CFG,
    VQ_NOTIFY_CFG,
    DevicePart,
    in_order,
    offset_selector,
    selector_offset,
    selector_vq,
    vq_selector,
)
from iovirt.virtio.defs import VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_F_ACCESS_PLATFORM, VIRTQ_MAX_SIZE
from iovirt.virtio.device import VirtioDevice
from iovirt.virtio.state import QueueState
from iovirt.virtio.transport.common_cfg import TransportPort, VirtqueueConfig
from iovirt.virtio.transport.defs import (
    VIRTIO_MSI_NO_VECTOR,
    VIRTIO_PCI_COMMON_DFSELECT,
    VIRTIO_PCI_COMMON_GFSELECT,
    VIRTIO_PCI_COMMON_MSIX,
    VIRTIO_PCI_COMMON_NUMQ,
    VIRTIO_PCI_COMMON_Q_SELECT,
)

if TYPE_CHECKING:
    from iovirt.virtio.transport.pci import VirtioPciFunction

log = logging.getLogger(__name__)

FEATURES_LEN = 8
"""``struct virtio_dev_part_features`` of one le64 word: the 64 feature bits the common configuration exposes."""
FEATURES_MASK = (1 << 64) - 1

COMMON_CFG_PARTS: dict[int, tuple[int, str | None]] = {
    VIRTIO_PCI_COMMON_DFSELECT: (4, "device_feature_select"),
    VIRTIO_PCI_COMMON_GFSELECT: (4, "driver_feature_select"),
    VIRTIO_PCI_COMMON_MSIX: (2, "config_msix_vector"),
    VIRTIO_PCI_COMMON_NUMQ: (2, None),  # num_queues: invariant, verified only
    VIRTIO_PCI_COMMON_Q_SELECT: (2, "queue_select"),
}
"""The ``struct virtio_pci_common_cfg`` fields that are parts: offset -> (size, CommonCfg attribute or None if read-only).
The feature words, status and per-queue fields are parts of their own."""


class DeviceTypeParts(Protocol):
    """The parts (``part_type`` 0x200-0x5FF) of one device type."""

    def capture(self, device: VirtioDevice) -> list[DevicePart]:
        """The device's parts, in the order they are exchanged."""
        ...

    def problem(self, device: VirtioDevice, part: DevicePart) -> str | None:
        """Why ``part`` cannot be set on ``device`` (unknown selector, wrong length, bad value), or None."""
        ...

    def apply(self, device: VirtioDevice, part: DevicePart) -> None:
        """Set a part :meth:`problem` accepted."""
        ...


class HoldingPort:
    """A stopped member's transport port: forwards everything but keeps the notifications it would send,
    and holds the queues the driver enables until the member resumes."""

    queues_held = True

    def __init__(self, port: TransportPort) -> None:
        self.port = port
        self.transport_features = port.transport_features
        self.queues: set[int] = set()
        self.config = False

    def offered_features(self) -> int:
        """As the transport."""
        return self.port.offered_features()

    def vector_valid(self, vector: int) -> bool:
        """As the transport."""
        return self.port.vector_valid(vector)

    def dma_memory(self, access_platform: bool) -> GuestMemory:
        """As the transport."""
        return self.port.dma_memory(access_platform)

    def queue_interrupt(self, index: int) -> None:
        """Held: no virtqueue notification while stopped."""
        self.queues.add(index)

    def config_interrupt(self) -> None:
        """Held: no configuration change notification while stopped."""
        self.config = True

    def release(self) -> None:
        """Send what was held."""
        if self.config:
            self.port.config_interrupt()
        for index in sorted(self.queues):
            self.port.queue_interrupt(index)


@dataclass
class _Stopped:
    port: HoldingPort
    saved: dict[int, QueueState] = field(default_factory=dict)
    staged: dict[tuple[int, bytes], DevicePart] = field(default_factory=dict)


class PciDeviceParts:
    """The device parts and device mode of ``function``; ``device_parts`` serves its device type's parts."""

    def __init__(self, function: "VirtioPciFunction", device_parts: DeviceTypeParts | None = None) -> None:
        self.function = function
        self.device_parts = device_parts
        self._stopped: _Stopped | None = None

    @property
    def stopped(self) -> bool:
        """The member is stopped (VIRTIO_ADMIN_CMD_DEV_MODE_F_STOPPED)."""
        return self._stopped is not None

    # -- get -------------------------------------------------------------------------------------
    def capture(self) -> list[DevicePart]:
        """Every part, in the order of 2.12.1.4.4."""
        common = self.function.common
        device = self.function.device
        parts = [
            DevicePart(VIRTIO_DEV_PART_DEV_FEATURES, self._features(self._offered()),
                       flags=1 << VIRTIO_DEV_PART_F_OPTIONAL),
            DevicePart(VIRTIO_DEV_PART_DRV_FEATURES, self._features(common.driver_features)),
        ]
        for offset, (size, attr) in COMMON_CFG_PARTS.items():
            value = getattr(common, attr) if attr is not None else device.num_queues
            parts.append(DevicePart(VIRTIO_DEV_PART_PCI_COMMON_CFG, value.to_bytes(size, "little"),
                                    offset_selector(offset)))
        parts.append(DevicePart(VIRTIO_DEV_PART_DEVICE_STATUS, bytes([common.status])))
        for index in range(device.num_queues):
            q = common.queues[index]
            parts.append(DevicePart(VIRTIO_DEV_PART_VQ_CFG, VQ_CFG.pack(
                q.size, q.msix_vector, int(q.enabled), q.desc, q.driver, q.device), vq_selector(index)))
        for index in range(device.num_queues):
            parts.append(DevicePart(VIRTIO_DEV_PART_VQ_NOTIFY_CFG, VQ_NOTIFY_CFG.pack(index, 0), vq_selector(index)))
        if self.device_parts is not None:
            parts += self.device_parts.capture(device)
        return parts

    def _offered(self) -> int:
        return self.function.offered_features() & FEATURES_MASK

    @staticmethod
    def _features(bits: int) -> bytes:
        return (bits & FEATURES_MASK).to_bytes(FEATURES_LEN, "little")

    # -- mode --------------------------------------------------------------------------------------
    def stop(self) -> None:
        """VIRTIO_ADMIN_CMD_DEV_MODE_SET with F_STOPPED: detach the queues, hold notifications (idempotent)."""
        if self._stopped is not None:
            return
        common = self.function.common
        device = self.function.device
        stopped = _Stopped(HoldingPort(common.port))
        common.port = stopped.port
        for index in range(device.num_queues):
            if device.queues[index] is not None:
                device.set_queue_enabled(index, False)
                state = device.stop_queue(index)
                if state is not None:
                    stopped.saved[index] = state
        self._stopped = stopped
        log.info("%s: stopped (%d queue(s) detached)", device.label, len(stopped.saved))

    def resume(self, apply: bool = True) -> None:
        """VIRTIO_ADMIN_CMD_DEV_MODE_SET with flags 0: apply the staged parts (unless not ``apply``),
        restart the queues, send the held notifications (idempotent)."""
        stopped = self._stopped
        if stopped is None:
            return
        self._stopped = None
        common = self.function.common
        device = self.function.device
        common.port = stopped.port.port
        try:
            restored = self._apply(list(stopped.staged.values()) if apply else [])
        except IovirtError as exc:
            log.warning("%s: staged device parts cannot be applied: %s; device needs reset", device.label, exc)
            common.set_needs_reset()
            return
        memory = common.port.dma_memory(bool(common.driver_features >> VIRTIO_F_ACCESS_PLATFORM & 1))
        for index in range(device.num_queues):
            if not common.queues[index].enabled:
                continue  # reset, or never enabled: nothing to resume
            state = stopped.saved.get(index) if index not in restored else None
            try:
                self._restart(index, memory, state)
            except IovirtError as exc:
                log.warning("%s: queue %d cannot resume: %s; device needs reset", device.label, index, exc)
                common.set_needs_reset()
                return
        stopped.port.release()
        log.info("%s: resumed (%d part(s) restored)", device.label, len(stopped.staged))

    def _restart(self, index: int, memory: GuestMemory, state: QueueState | None) -> None:
        common = self.function.common
        device = self.function.device
        q = common.queues[index]
        if device.queues[index] is None:
            if state is None or (state.size, state.desc_addr, state.avail_addr, state.used_addr) != (
                    q.size, q.desc, q.driver, q.device):
                # Restored, or set up anew after a reset while stopped: the device took every buffer up to the
                # used index (2.12.1.4.4.1), so it resumes there.
                used = memory.read_u16(q.device + 2)
                state = QueueState(size=q.size, desc_addr=q.desc, avail_addr=q.driver, used_addr=q.device,
                                   last_avail_idx=used, used_idx=used)
            device.start_queue(index, memory, state, lambda: common.port.queue_interrupt(index))
        if common.status & VIRTIO_CONFIG_S_DRIVER_OK:
            device.set_queue_enabled(index, True)
            device.kick(index)  # what the driver made available while the member was stopped

    # -- set ---------------------------------------------------------------------------------------
    def stage(self, parts: list[DevicePart]) -> str | None:
        """Validate the parts of a DEV_PARTS_SET and keep them for the resume; the problem if any (nothing kept)."""
        stopped = self._stopped
        if stopped is None:
            return "the member is not stopped"
        if not in_order(parts):
            return "the parts are not in the order of the device parts order table"
        keep = []
        for part in parts:
            problem = self._problem(part)
            if problem is not None:
                return f"part {part.part_type:#x}: {problem}"
            if part.part_type != VIRTIO_DEV_PART_DEV_FEATURES and not self._ignored(part):
                keep.append(part)  # the device features are verified, never set
        for part in keep:
            stopped.staged[part.key] = part
        return None

    def _ignored(self, part: DevicePart) -> bool:
        """An optional part the device does not know (2.12.1.4.4.1: it MAY ignore it)."""
        return part.optional and self._kind(part) is None

    def _kind(self, part: DevicePart) -> str | None:
        t = part.part_type
        if t in (VIRTIO_DEV_PART_DEV_FEATURES, VIRTIO_DEV_PART_DRV_FEATURES, VIRTIO_DEV_PART_PCI_COMMON_CFG,
                 VIRTIO_DEV_PART_DEVICE_STATUS, VIRTIO_DEV_PART_VQ_CFG, VIRTIO_DEV_PART_VQ_NOTIFY_CFG):
            return "common"
        if t in DEVICE_TYPE_PARTS and self.device_parts is not None:
            return "device"
        return None

    def _problem(self, part: DevicePart) -> str | None:
        kind = self._kind(part)
        if kind is None:
            return None if part.optional else "unknown part type"
        if kind == "device":
            assert self.device_parts is not None
            return self.device_parts.problem(self.function.device, part)
        t, value = part.part_type, part.value
        if t in (VIRTIO_DEV_PART_DEV_FEATURES, VIRTIO_DEV_PART_DRV_FEATURES):
            if len(value) != FEATURES_LEN:
                return f"length {len(value)}, the device's is {FEATURES_LEN}"
            bits = int.from_bytes(value, "little")
            if t == VIRTIO_DEV_PART_DEV_FEATURES and bits != self._offered():
                return f"device features {bits:#x} are not the device's {self._offered():#x}"
            if bits & ~self._offered():
                return f"driver features {bits:#x} include bits the device does not offer"
            return None
        if t == VIRTIO_DEV_PART_PCI_COMMON_CFG:
            return self._common_problem(selector_offset(part), value)
        if t == VIRTIO_DEV_PART_DEVICE_STATUS:
            return None if len(value) == 1 else f"length {len(value)}, the device's is 1"
        index = selector_vq(part)
        if index >= self.function.device.num_queues:
            return f"virtqueue {index} does not exist"
        if t == VIRTIO_DEV_PART_VQ_NOTIFY_CFG:
            if len(value) != VQ_NOTIFY_CFG.size:
                return f"length {len(value)}, the device's is {VQ_NOTIFY_CFG.size}"
            return None if VQ_NOTIFY_CFG.unpack(value) == (index, 0) else "queue_notify_off or data differ"
        if len(value) != VQ_CFG.size:
            return f"length {len(value)}, the device's is {VQ_CFG.size}"
        size, vector, enabled, *_addresses = VQ_CFG.unpack(value)
        if not 0 < size <= min(self.function.common.queue_max_size, VIRTQ_MAX_SIZE) or size & (size - 1):
            return f"queue_size {size} is not a power of 2 up to the maximum"
        if vector != VIRTIO_MSI_NO_VECTOR and not self.function.vector_valid(vector):
            return f"vector {vector} is not an MSI-X table entry"
        return None if enabled in (0, 1) else f"enabled {enabled}"

    def _common_problem(self, offset: int, value: bytes) -> str | None:
        spec = COMMON_CFG_PARTS.get(offset)
        if spec is None:
            return f"offset {offset:#x} is not a common configuration field this device has as a part"
        size, attr = spec
        if len(value) != size:
            return f"length {len(value)} at offset {offset:#x}, the device's is {size}"
        number = int.from_bytes(value, "little")
        if attr is None and number != self.function.device.num_queues:
            return f"num_queues {number}, the device has {self.function.device.num_queues}"
        if offset == VIRTIO_PCI_COMMON_MSIX and number != VIRTIO_MSI_NO_VECTOR and not self.function.vector_valid(number):
            return f"config_msix_vector {number} is not an MSI-X table entry"
        return None

    def _apply(self, parts: list[DevicePart]) -> set[int]:
        """Write validated parts into the member; returns the queues whose configuration was restored."""
        common = self.function.common
        device = self.function.device
        restored = set()
        for part in sorted(parts, key=lambda p: p.part_type):
            t, value = part.part_type, part.value
            if t == VIRTIO_DEV_PART_DRV_FEATURES:
                bits = int.from_bytes(value, "little")
                device.set_features(bits & ~self.function.transport_mask())
                common.driver_features = bits
            elif t == VIRTIO_DEV_PART_PCI_COMMON_CFG:
                size, attr = COMMON_CFG_PARTS[selector_offset(part)]
                if attr is not None:
                    setattr(common, attr, int.from_bytes(value, "little"))
            elif t == VIRTIO_DEV_PART_DEVICE_STATUS:
                common.status = value[0]
            elif t == VIRTIO_DEV_PART_VQ_CFG:
                index = selector_vq(part)
                size, vector, enabled, desc, driver, used = VQ_CFG.unpack(value)
                common.queues[index] = VirtqueueConfig(size, vector, bool(enabled), desc, driver, used)
                restored.add(index)
            elif t in DEVICE_TYPE_PARTS and self.device_parts is not None:
                self.device_parts.apply(device, part)
        return restored
