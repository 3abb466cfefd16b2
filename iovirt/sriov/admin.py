"""The SR-IOV group (virtio 1.4 2.12, group type 0x1): a virtio PF administers its VFs by VF number.

:class:`SriovAdminGroup` serves the group's commands on the PF's
administration virtqueue (:class:`~iovirt.virtio.admin.vq.AdminVirtqueue`):
the legacy interface commands (2.12.1.1), which reach a member VF's legacy
registers (:class:`~iovirt.virtio.transport.legacy.LegacyInterface`), and
VIRTIO_ADMIN_CMD_LEGACY_NOTIFY_INFO, which names the VF's legacy
notification address in its VF BAR.

Members (2.12, 2.12.1.5): the group exists while VF Enable is set; member
``k`` (1 to NumVFs) is VF ``k``.  A command that addresses a member fails
with VIRTIO_ADMIN_STATUS_Q_INVALID_GROUP while VF Enable is clear and with
VIRTIO_ADMIN_STATUS_Q_INVALID_MEMBER for an id outside 1..NumVFs.
VIRTIO_ADMIN_CMD_LIST_QUERY and LIST_USE address no member and work at any
time (the queue serves them), as Linux issues them when it binds the PF,
before any VF exists.

The device parts commands (2.12.1.4: stop, get, set and resume a member)
are :class:`~iovirt.sriov.device_parts.SriovDeviceParts`.

The PF's VF BAR0 is hardwired to zero (2.12.1.1.6): the VFs lay out their
BARs as the PF does (MSI-X in BAR1, the virtio structures in BAR4).
"""

from __future__ import annotations

import logging
from typing import Callable

from iovirt.sriov.capability import SriovCapability
from iovirt.sriov.device_parts import SriovDeviceParts
from iovirt.virtio.admin.defs import (
    LEGACY_NOTIFY_INFO_ENTRIES,
    LEGACY_NOTIFY_INFO_ENTRY,
    LEGACY_OPCODES,
    LEGACY_WR_DATA_OFFSET,
    VIRTIO_ADMIN_CMD_LEGACY_COMMON_CFG_READ,
    VIRTIO_ADMIN_CMD_LEGACY_COMMON_CFG_WRITE,
    VIRTIO_ADMIN_CMD_LEGACY_DEV_CFG_READ,
    VIRTIO_ADMIN_CMD_LEGACY_DEV_CFG_WRITE,
    VIRTIO_ADMIN_CMD_LEGACY_NOTIFY_INFO,
    VIRTIO_ADMIN_GROUP_TYPE_SRIOV,
    VIRTIO_ADMIN_LEGACY_NOTIFY_INFO_FLAGS_END,
    VIRTIO_ADMIN_LEGACY_NOTIFY_INFO_FLAGS_MEMBER,
    VIRTIO_ADMIN_STATUS_Q_INVALID_FIELD,
    VIRTIO_ADMIN_STATUS_Q_INVALID_GROUP,
    VIRTIO_ADMIN_STATUS_Q_INVALID_MEMBER,
)
from iovirt.virtio.admin.device_parts import DEV_PARTS_OPCODES
from iovirt.virtio.admin.vq import AdminCommand, AdminResult, einval
from iovirt.virtio.transport.pci import LEGACY_NOTIFY_OFFSET, VIRTIO_BAR, VirtioPciFunction

log = logging.getLogger(__name__)

SRIOV_ADMIN_OPCODES = LEGACY_OPCODES | {VIRTIO_ADMIN_CMD_LEGACY_NOTIFY_INFO} | DEV_PARTS_OPCODES


class SriovAdminGroup:
    """The SR-IOV group of the PF that has ``sriov`` (``sriov.pf`` once installed): members are its enabled VFs."""

    group_type = VIRTIO_ADMIN_GROUP_TYPE_SRIOV

    def __init__(self, sriov: SriovCapability) -> None:
        self.sriov = sriov
        self.parts = SriovDeviceParts()
        self._handlers: dict[int, Callable[[VirtioPciFunction, AdminCommand], AdminResult]] = {
            VIRTIO_ADMIN_CMD_LEGACY_COMMON_CFG_WRITE: self._common_write,
            VIRTIO_ADMIN_CMD_LEGACY_COMMON_CFG_READ: self._common_read,
            VIRTIO_ADMIN_CMD_LEGACY_DEV_CFG_WRITE: self._dev_write,
            VIRTIO_ADMIN_CMD_LEGACY_DEV_CFG_READ: self._dev_read,
            VIRTIO_ADMIN_CMD_LEGACY_NOTIFY_INFO: self._notify_info,
            **self.parts.handlers(),
        }

    def supported(self) -> frozenset[int]:
        """The legacy interface commands, VIRTIO_ADMIN_CMD_LEGACY_NOTIFY_INFO and the device parts commands."""
        return SRIOV_ADMIN_OPCODES

    def reset(self) -> None:
        """Nothing of the group's own outlives a PF reset (the VFs go with VF Enable; the device parts objects too)."""
        self.parts.reset(self.sriov.enabled_vfs)

    def execute(self, command: AdminCommand) -> AdminResult:
        """Run a legacy command on member ``group_member_id`` (2.12.1.5: group, then member checks)."""
        sriov = self.sriov
        if not sriov.vf_enabled:
            return einval(VIRTIO_ADMIN_STATUS_Q_INVALID_GROUP)
        vfs = sriov.enabled_vfs
        if not 1 <= command.group_member_id <= min(sriov.num_vfs, len(vfs)):
            return einval(VIRTIO_ADMIN_STATUS_Q_INVALID_MEMBER)
        member = vfs[command.group_member_id - 1]
        if not isinstance(member, VirtioPciFunction):
            return einval(VIRTIO_ADMIN_STATUS_Q_INVALID_MEMBER)
        return self._handlers[command.opcode](member, command)

    # -- legacy interface (2.12.1.1) -----------------------------------------------------
    @staticmethod
    def _write_args(command: AdminCommand) -> tuple[int, bytes]:
        """``struct virtio_admin_cmd_legacy_*_wr_data``: u8 offset, u8 reserved[7], u8 data[]."""
        offset = command.data[0] if command.data else 0
        return offset, command.data[LEGACY_WR_DATA_OFFSET:]

    @staticmethod
    def _read_offset(command: AdminCommand) -> int:
        """``struct virtio_admin_cmd_legacy_*_rd_data``: u8 offset (missing reads as 0, 2.13)."""
        return command.data[0] if command.data else 0

    def _common_write(self, vf: VirtioPciFunction, command: AdminCommand) -> AdminResult:
        offset, data = self._write_args(command)
        if not data or not vf.legacy.common_write(offset, len(data), int.from_bytes(data, "little")):
            return self._bad_access(vf, "common configuration write", offset, len(data))
        return AdminResult()

    def _common_read(self, vf: VirtioPciFunction, command: AdminCommand) -> AdminResult:
        offset, size = self._read_offset(command), command.result_room
        value = vf.legacy.common_read(offset, size) if size else None
        if value is None:
            return self._bad_access(vf, "common configuration read", offset, size)
        return AdminResult(data=value.to_bytes(size, "little"))

    def _dev_write(self, vf: VirtioPciFunction, command: AdminCommand) -> AdminResult:
        offset, data = self._write_args(command)
        if not data or not vf.legacy.device_write(offset, data):
            return self._bad_access(vf, "device configuration write", offset, len(data))
        return AdminResult()

    def _dev_read(self, vf: VirtioPciFunction, command: AdminCommand) -> AdminResult:
        offset, size = self._read_offset(command), command.result_room
        data = vf.legacy.device_read(offset, size) if size else None
        if data is None:
            return self._bad_access(vf, "device configuration read", offset, size)
        return AdminResult(data=data)

    def _notify_info(self, vf: VirtioPciFunction, command: AdminCommand) -> AdminResult:
        """One entry: the member's legacy notification address in VF BAR4; then end-of-list entries."""
        entries = [LEGACY_NOTIFY_INFO_ENTRY.pack(VIRTIO_ADMIN_LEGACY_NOTIFY_INFO_FLAGS_MEMBER, VIRTIO_BAR,
                                                 LEGACY_NOTIFY_OFFSET)]
        entries += [LEGACY_NOTIFY_INFO_ENTRY.pack(VIRTIO_ADMIN_LEGACY_NOTIFY_INFO_FLAGS_END, 0, 0)] * (
            LEGACY_NOTIFY_INFO_ENTRIES - len(entries))
        return AdminResult(data=b"".join(entries))

    @staticmethod
    def _bad_access(vf: VirtioPciFunction, what: str, offset: int, size: int) -> AdminResult:
        # 2.12.1.1.6: an access that is not one field within the structure fails the command.
        log.warning("%s: legacy %s of %d byte(s) at %d is not within a single field; failed",
                    vf.device.label, what, size, offset)
        return einval(VIRTIO_ADMIN_STATUS_Q_INVALID_FIELD)
