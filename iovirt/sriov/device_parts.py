"""The SR-IOV group's device parts commands (virtio 1.4 2.12.1.4): a virtio PF gets, sets, stops and resumes its VFs.

:class:`SriovDeviceParts` serves, for :class:`~iovirt.sriov.admin.SriovAdminGroup`,
on members the group has validated:

- the device parts resource objects (VIRTIO_RESOURCE_OBJ_DEV_PARTS, 2.12.1.3
  and 2.12.1.4.2): VIRTIO_ADMIN_CMD_RESOURCE_OBJ_CREATE / _MODIFY / _QUERY /
  _DESTROY with ``group_member_id`` the VF.  Ids are 0 to
  ``DEV_PARTS_OBJECTS_LIMIT - 1``, one id space for the group; at most
  :data:`GET_PARTS_OBJECTS_LIMIT` get objects and
  :data:`SET_PARTS_OBJECTS_LIMIT` set objects (``struct
  virtio_dev_parts_cap``).  An id in use fails EEXIST, an object that does
  not exist (or belongs to another member) ENXIO, too many ENOSPC;
- VIRTIO_ADMIN_CMD_DEV_PARTS_METADATA_GET and VIRTIO_ADMIN_CMD_DEV_PARTS_GET
  on a get object, VIRTIO_ADMIN_CMD_DEV_PARTS_SET on a set object (a
  command on an object of the other kind fails EINVAL/INVALID_FIELD); a
  result buffer too small for the answer fails ENOMEM, a selected part
  the member does not have is skipped;
- VIRTIO_ADMIN_CMD_DEV_MODE_SET: bit 0 of ``flags`` stops the member, 0
  resumes it (either when already so completes OK); other bits fail
  EINVAL/INVALID_FIELD.  DEV_PARTS_SET while the member is not stopped
  fails EINVAL/INVALID_COMMAND.

What a member's parts are, and what stopping it does, is
:class:`~iovirt.virtio.transport.parts.PciDeviceParts`.  A failing command
changes nothing; every failure is logged with its reason.  An owner reset
destroys every object (2.12.1.3: resource objects do not survive a reset).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

from iovirt.virtio.admin.defs import (
    VIRTIO_ADMIN_CMD_DEV_MODE_SET,
    VIRTIO_ADMIN_CMD_DEV_PARTS_GET,
    VIRTIO_ADMIN_CMD_DEV_PARTS_METADATA_GET,
    VIRTIO_ADMIN_CMD_DEV_PARTS_SET,
    VIRTIO_ADMIN_CMD_RESOURCE_OBJ_CREATE,
    VIRTIO_ADMIN_CMD_RESOURCE_OBJ_DESTROY,
    VIRTIO_ADMIN_CMD_RESOURCE_OBJ_MODIFY,
    VIRTIO_ADMIN_CMD_RESOURCE_OBJ_QUERY,
    VIRTIO_ADMIN_STATUS_EEXIST,
    VIRTIO_ADMIN_STATUS_EINVAL,
    VIRTIO_ADMIN_STATUS_ENOMEM,
    VIRTIO_ADMIN_STATUS_ENOSPC,
    VIRTIO_ADMIN_STATUS_ENXIO,
    VIRTIO_ADMIN_STATUS_Q_INVALID_COMMAND,
    VIRTIO_ADMIN_STATUS_Q_INVALID_FIELD,
    VIRTIO_ADMIN_STATUS_Q_NORESOURCE,
)
from iovirt.virtio.admin.device_parts import (
    METADATA_RESULT,
    PARTS_CMD_TYPE,
    RESOURCE_OBJ_CMD_HDR,
    RESOURCE_OBJ_DEV_PARTS,
    RESOURCE_OBJ_FLAGS,
    VIRTIO_ADMIN_CMD_DEV_MODE_F_STOPPED,
    VIRTIO_ADMIN_CMD_DEV_PARTS_GET_TYPE_ALL,
    VIRTIO_ADMIN_CMD_DEV_PARTS_GET_TYPE_SELECTED,
    VIRTIO_ADMIN_CMD_DEV_PARTS_METADATA_TYPE_COUNT,
    VIRTIO_ADMIN_CMD_DEV_PARTS_METADATA_TYPE_LIST,
    VIRTIO_ADMIN_CMD_DEV_PARTS_METADATA_TYPE_SIZE,
    VIRTIO_RESOURCE_OBJ_DEV_PARTS,
    VIRTIO_RESOURCE_OBJ_DEV_PARTS_TYPE_GET,
    VIRTIO_RESOURCE_OBJ_DEV_PARTS_TYPE_SET,
    PartsError,
    pack_parts,
    select,
    unpack_headers,
    unpack_parts,
)
from iovirt.virtio.admin.vq import AdminCommand, AdminResult
from iovirt.virtio.net.defs import VIRTIO_ID_NET
from iovirt.virtio.net.parts import NetParts
from iovirt.virtio.transport.parts import DeviceTypeParts, PciDeviceParts
from iovirt.virtio.transport.pci import VirtioPciFunction

log = logging.getLogger(__name__)

GET_PARTS_OBJECTS_LIMIT = 4
"""``get_parts_resource_objects_limit`` of VIRTIO_DEV_PARTS_CAP."""
SET_PARTS_OBJECTS_LIMIT = 4
"""``set_parts_resource_objects_limit`` of VIRTIO_DEV_PARTS_CAP."""
DEV_PARTS_OBJECTS_LIMIT = GET_PARTS_OBJECTS_LIMIT + SET_PARTS_OBJECTS_LIMIT
"""Resource object ids are 0 to this - 1."""

TYPE_PARTS: dict[int, Callable[[], DeviceTypeParts]] = {VIRTIO_ID_NET: NetParts}
"""The device-type parts (0x200-0x5FF) of a member, by its virtio device id."""

_OBJ_LIMITS = {VIRTIO_RESOURCE_OBJ_DEV_PARTS_TYPE_GET: GET_PARTS_OBJECTS_LIMIT,
               VIRTIO_RESOURCE_OBJ_DEV_PARTS_TYPE_SET: SET_PARTS_OBJECTS_LIMIT}


@dataclass
class DevPartsObject:
    """A device parts resource object: the member it was created for and its ``type`` (get or set)."""

    member: int
    type: int


def _fixed(data: bytes, size: int) -> bytes:
    """The first ``size`` bytes of ``data``; bytes a short buffer lacks read as zero (2.13.1)."""
    return data[:size].ljust(size, b"\0")


class SriovDeviceParts:
    """The device parts commands and objects of one SR-IOV group."""

    def __init__(self) -> None:
        self.objects: dict[int, DevPartsObject] = {}
        self._members: dict[int, PciDeviceParts] = {}

    def handlers(self) -> dict[int, Callable[[VirtioPciFunction, AdminCommand], AdminResult]]:
        """Opcode -> handler, for the group's dispatch."""
        return {
            VIRTIO_ADMIN_CMD_RESOURCE_OBJ_CREATE: self._create,
            VIRTIO_ADMIN_CMD_RESOURCE_OBJ_MODIFY: self._modify,
            VIRTIO_ADMIN_CMD_RESOURCE_OBJ_QUERY: self._query,
            VIRTIO_ADMIN_CMD_RESOURCE_OBJ_DESTROY: self._destroy,
            VIRTIO_ADMIN_CMD_DEV_PARTS_METADATA_GET: self._metadata_get,
            VIRTIO_ADMIN_CMD_DEV_PARTS_GET: self._get,
            VIRTIO_ADMIN_CMD_DEV_PARTS_SET: self._set,
            VIRTIO_ADMIN_CMD_DEV_MODE_SET: self._mode_set,
        }

    def reset(self, members: Sequence[object]) -> None:
        """Owner reset: every object is destroyed; a stopped member still in ``members`` (the enabled VFs) runs
        again as it is, nothing staged applied (a removed VF is gone with its state)."""
        for parts in self._members.values():
            if any(parts.function is vf for vf in members):
                parts.resume(apply=False)
        self._members.clear()
        self.objects.clear()

    def member(self, vf: VirtioPciFunction, member_id: int) -> PciDeviceParts:
        """The parts and mode of member ``member_id``, now ``vf`` (a new VF behind the id starts active)."""
        parts = self._members.get(member_id)
        if parts is None or parts.function is not vf:
            type_parts = TYPE_PARTS.get(vf.device.device_id)
            parts = PciDeviceParts(vf, type_parts() if type_parts is not None else None)
            self._members[member_id] = parts
        return parts

    # -- resource objects ---------------------------------------------------------------------------
    def _create(self, vf: VirtioPciFunction, command: AdminCommand) -> AdminResult:
        data = _fixed(command.data, RESOURCE_OBJ_CMD_HDR.size + RESOURCE_OBJ_FLAGS.size + RESOURCE_OBJ_DEV_PARTS.size)
        obj_type, obj_id = RESOURCE_OBJ_CMD_HDR.unpack_from(data)
        (flags,) = RESOURCE_OBJ_FLAGS.unpack_from(data, RESOURCE_OBJ_CMD_HDR.size)
        (parts_type,) = RESOURCE_OBJ_DEV_PARTS.unpack_from(data, RESOURCE_OBJ_CMD_HDR.size + RESOURCE_OBJ_FLAGS.size)
        problem = self._bad_object_args(obj_type, obj_id, flags, parts_type)
        if problem is not None:
            return _fail(vf, f"RESOURCE_OBJ_CREATE: {problem}", VIRTIO_ADMIN_STATUS_EINVAL)
        if obj_id in self.objects:
            return _fail(vf, f"RESOURCE_OBJ_CREATE: device parts object {obj_id} exists",
                         VIRTIO_ADMIN_STATUS_EEXIST)
        if sum(o.type == parts_type for o in self.objects.values()) >= _OBJ_LIMITS[parts_type]:
            return _fail(vf, f"RESOURCE_OBJ_CREATE: no more device parts objects of type {parts_type}",
                         VIRTIO_ADMIN_STATUS_ENOSPC, VIRTIO_ADMIN_STATUS_Q_NORESOURCE)
        self.objects[obj_id] = DevPartsObject(command.group_member_id, parts_type)
        return AdminResult()

    @staticmethod
    def _bad_object_args(obj_type: int, obj_id: int, flags: int, parts_type: int) -> str | None:
        if obj_type != VIRTIO_RESOURCE_OBJ_DEV_PARTS:
            return f"resource object type {obj_type:#x} is not VIRTIO_RESOURCE_OBJ_DEV_PARTS"
        if obj_id >= DEV_PARTS_OBJECTS_LIMIT:
            return f"id {obj_id} is outside 0..{DEV_PARTS_OBJECTS_LIMIT - 1}"
        if flags:
            return f"flags {flags:#x} (reserved, 0)"
        if parts_type not in _OBJ_LIMITS:
            return f"device parts object type {parts_type} is neither GET (0) nor SET (1)"
        return None

    def _object(self, vf: VirtioPciFunction, command: AdminCommand, what: str,
                want: int | None = None) -> tuple[int, AdminResult | None]:
        """The object ``hdr`` of ``command_specific_data`` names: its id, or the failure to complete with."""
        obj_type, obj_id = RESOURCE_OBJ_CMD_HDR.unpack(_fixed(command.data, RESOURCE_OBJ_CMD_HDR.size))
        if obj_type != VIRTIO_RESOURCE_OBJ_DEV_PARTS:
            return obj_id, _fail(vf, f"{what}: resource object type {obj_type:#x} is not VIRTIO_RESOURCE_OBJ_DEV_PARTS",
                                 VIRTIO_ADMIN_STATUS_EINVAL)
        obj = self.objects.get(obj_id)
        if obj is None or obj.member != command.group_member_id:
            return obj_id, _fail(vf, f"{what}: no device parts object {obj_id} for member {command.group_member_id}",
                                 VIRTIO_ADMIN_STATUS_ENXIO)
        if want is not None and obj.type != want:
            return obj_id, _fail(vf, f"{what}: device parts object {obj_id} is of type {obj.type}, not {want}",
                                 VIRTIO_ADMIN_STATUS_EINVAL)
        return obj_id, None

    def _modify(self, vf: VirtioPciFunction, command: AdminCommand) -> AdminResult:
        obj_id, failed = self._object(vf, command, "RESOURCE_OBJ_MODIFY")
        if failed is not None:
            return failed
        data = _fixed(command.data, RESOURCE_OBJ_CMD_HDR.size + RESOURCE_OBJ_FLAGS.size + RESOURCE_OBJ_DEV_PARTS.size)
        (flags,) = RESOURCE_OBJ_FLAGS.unpack_from(data, RESOURCE_OBJ_CMD_HDR.size)
        (parts_type,) = RESOURCE_OBJ_DEV_PARTS.unpack_from(data, RESOURCE_OBJ_CMD_HDR.size + RESOURCE_OBJ_FLAGS.size)
        problem = self._bad_object_args(VIRTIO_RESOURCE_OBJ_DEV_PARTS, obj_id, flags, parts_type)
        obj = self.objects[obj_id]
        if problem is None and parts_type != obj.type and sum(
                o.type == parts_type for o in self.objects.values()) >= _OBJ_LIMITS[parts_type]:
            problem = f"no more device parts objects of type {parts_type}"
        if problem is not None:
            return _fail(vf, f"RESOURCE_OBJ_MODIFY: {problem}", VIRTIO_ADMIN_STATUS_EINVAL)
        obj.type = parts_type
        return AdminResult()

    def _query(self, vf: VirtioPciFunction, command: AdminCommand) -> AdminResult:
        obj_id, failed = self._object(vf, command, "RESOURCE_OBJ_QUERY")
        if failed is not None:
            return failed
        return AdminResult(data=RESOURCE_OBJ_DEV_PARTS.pack(self.objects[obj_id].type))

    def _destroy(self, vf: VirtioPciFunction, command: AdminCommand) -> AdminResult:
        obj_id, failed = self._object(vf, command, "RESOURCE_OBJ_DESTROY")
        if failed is not None:
            return failed
        del self.objects[obj_id]
        return AdminResult()

    # -- device parts ---------------------------------------------------------------------------------
    def _metadata_get(self, vf: VirtioPciFunction, command: AdminCommand) -> AdminResult:
        _obj_id, failed = self._object(vf, command, "DEV_PARTS_METADATA_GET", VIRTIO_RESOURCE_OBJ_DEV_PARTS_TYPE_GET)
        if failed is not None:
            return failed
        data = _fixed(command.data, RESOURCE_OBJ_CMD_HDR.size + PARTS_CMD_TYPE.size)
        (kind,) = PARTS_CMD_TYPE.unpack_from(data, RESOURCE_OBJ_CMD_HDR.size)
        parts = self.member(vf, command.group_member_id).capture()
        if kind == VIRTIO_ADMIN_CMD_DEV_PARTS_METADATA_TYPE_SIZE:
            result = METADATA_RESULT.pack(len(pack_parts(parts)))
        elif kind == VIRTIO_ADMIN_CMD_DEV_PARTS_METADATA_TYPE_COUNT:
            result = METADATA_RESULT.pack(len(parts))
        elif kind == VIRTIO_ADMIN_CMD_DEV_PARTS_METADATA_TYPE_LIST:
            result = METADATA_RESULT.pack(len(parts)) + b"".join(p.header() for p in parts)
        else:
            return _fail(vf, f"DEV_PARTS_METADATA_GET: type {kind} is not SIZE, COUNT or LIST",
                         VIRTIO_ADMIN_STATUS_EINVAL)
        return _fits(vf, "DEV_PARTS_METADATA_GET", command, result)

    def _get(self, vf: VirtioPciFunction, command: AdminCommand) -> AdminResult:
        _obj_id, failed = self._object(vf, command, "DEV_PARTS_GET", VIRTIO_RESOURCE_OBJ_DEV_PARTS_TYPE_GET)
        if failed is not None:
            return failed
        start = RESOURCE_OBJ_CMD_HDR.size + PARTS_CMD_TYPE.size
        (kind,) = PARTS_CMD_TYPE.unpack_from(_fixed(command.data, start), RESOURCE_OBJ_CMD_HDR.size)
        parts = self.member(vf, command.group_member_id).capture()
        if kind == VIRTIO_ADMIN_CMD_DEV_PARTS_GET_TYPE_SELECTED:
            try:
                wanted = {h.key for h in unpack_headers(command.data[start:])}
            except PartsError as exc:
                return _fail(vf, f"DEV_PARTS_GET: {exc}", VIRTIO_ADMIN_STATUS_EINVAL)
            parts = select(parts, wanted)  # the device's order; parts it lacks are skipped
        elif kind != VIRTIO_ADMIN_CMD_DEV_PARTS_GET_TYPE_ALL:
            return _fail(vf, f"DEV_PARTS_GET: type {kind} is not SELECTED or ALL", VIRTIO_ADMIN_STATUS_EINVAL)
        return _fits(vf, "DEV_PARTS_GET", command, pack_parts(parts))

    def _set(self, vf: VirtioPciFunction, command: AdminCommand) -> AdminResult:
        _obj_id, failed = self._object(vf, command, "DEV_PARTS_SET", VIRTIO_RESOURCE_OBJ_DEV_PARTS_TYPE_SET)
        if failed is not None:
            return failed
        member = self.member(vf, command.group_member_id)
        if not member.stopped:
            return _fail(vf, "DEV_PARTS_SET: the member is not stopped", VIRTIO_ADMIN_STATUS_EINVAL,
                         VIRTIO_ADMIN_STATUS_Q_INVALID_COMMAND)
        try:
            parts = unpack_parts(command.data[RESOURCE_OBJ_CMD_HDR.size:])
        except PartsError as exc:
            return _fail(vf, f"DEV_PARTS_SET: {exc}", VIRTIO_ADMIN_STATUS_EINVAL)
        problem = member.stage(parts)
        if problem is not None:
            return _fail(vf, f"DEV_PARTS_SET: {problem}", VIRTIO_ADMIN_STATUS_EINVAL)
        return AdminResult()

    def _mode_set(self, vf: VirtioPciFunction, command: AdminCommand) -> AdminResult:
        flags = command.data[0] if command.data else 0
        if flags & ~(1 << VIRTIO_ADMIN_CMD_DEV_MODE_F_STOPPED):
            return _fail(vf, f"DEV_MODE_SET: flags {flags:#x} has bits other than F_STOPPED",
                         VIRTIO_ADMIN_STATUS_EINVAL)
        member = self.member(vf, command.group_member_id)
        if flags:
            member.stop()
        else:
            member.resume()
        return AdminResult()


def _fits(vf: VirtioPciFunction, what: str, command: AdminCommand, result: bytes) -> AdminResult:
    """``result``, or ENOMEM when the driver's buffer has no room for all of it (2.12.1.4.3.1)."""
    if len(result) > command.result_room:
        return _fail(vf, f"{what}: {len(result)} bytes of result, room for {command.result_room}",
                     VIRTIO_ADMIN_STATUS_ENOMEM, VIRTIO_ADMIN_STATUS_Q_NORESOURCE)
    return AdminResult(data=result)


def _fail(vf: VirtioPciFunction, reason: str, status: int,
          qualifier: int = VIRTIO_ADMIN_STATUS_Q_INVALID_FIELD) -> AdminResult:
    log.warning("%s: %s; failed with status %d", vf.device.label, reason, status)
    return AdminResult(status, qualifier)
