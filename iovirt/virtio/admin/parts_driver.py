"""The driver side of the device parts commands (virtio 1.4 2.12.1.4), as Linux's vfio virtio migration sends them.

:class:`DevicePartsClient` builds each command's ``command_specific_data``
and sends it on an :class:`~iovirt.virtio.admin.driver.AdminClient`; the
tests and the conformance checks use it to stop a member, read its parts and
restore them into another.
"""

from __future__ import annotations

from iovirt.virtio.admin.defs import (
    VIRTIO_ADMIN_CMD_DEV_MODE_SET,
    VIRTIO_ADMIN_CMD_DEV_PARTS_GET,
    VIRTIO_ADMIN_CMD_DEV_PARTS_METADATA_GET,
    VIRTIO_ADMIN_CMD_DEV_PARTS_SET,
    VIRTIO_ADMIN_CMD_RESOURCE_OBJ_CREATE,
    VIRTIO_ADMIN_CMD_RESOURCE_OBJ_DESTROY,
    VIRTIO_ADMIN_CMD_RESOURCE_OBJ_QUERY,
    VIRTIO_ADMIN_GROUP_TYPE_SRIOV,
)
from iovirt.virtio.admin.device_parts import (
    METADATA_RESULT,
    PARTS_CMD_TYPE,
    RESOURCE_OBJ_CMD_HDR,
    RESOURCE_OBJ_DEV_PARTS,
    RESOURCE_OBJ_FLAGS,
    VIRTIO_ADMIN_CMD_DEV_PARTS_GET_TYPE_ALL,
    VIRTIO_ADMIN_CMD_DEV_PARTS_GET_TYPE_SELECTED,
    VIRTIO_ADMIN_CMD_DEV_PARTS_METADATA_TYPE_SIZE,
    VIRTIO_RESOURCE_OBJ_DEV_PARTS,
    DevicePart,
    pack_parts,
)
from iovirt.virtio.admin.driver import AdminClient, AdminCompletion


def obj_hdr(obj_id: int) -> bytes:
    """``struct virtio_admin_cmd_resource_obj_cmd_hdr`` of device parts object ``obj_id``."""
    return RESOURCE_OBJ_CMD_HDR.pack(VIRTIO_RESOURCE_OBJ_DEV_PARTS, obj_id)


class DevicePartsClient:
    """Device parts commands for the members of the group ``group_type`` (SR-IOV) on ``admin``."""

    def __init__(self, admin: AdminClient, group_type: int = VIRTIO_ADMIN_GROUP_TYPE_SRIOV) -> None:
        self.admin = admin
        self.group_type = group_type

    def send(self, opcode: int, member: int, data: bytes, result: int = 0) -> AdminCompletion:
        """One command with room for ``result`` bytes of result."""
        return self.admin.command(opcode, self.group_type, member, data, result)

    def create(self, member: int, obj_id: int, parts_type: int) -> AdminCompletion:
        """VIRTIO_ADMIN_CMD_RESOURCE_OBJ_CREATE of a device parts object (``parts_type`` GET or SET)."""
        data = obj_hdr(obj_id) + RESOURCE_OBJ_FLAGS.pack(0) + RESOURCE_OBJ_DEV_PARTS.pack(parts_type)
        return self.send(VIRTIO_ADMIN_CMD_RESOURCE_OBJ_CREATE, member, data)

    def query(self, member: int, obj_id: int) -> AdminCompletion:
        """VIRTIO_ADMIN_CMD_RESOURCE_OBJ_QUERY: the object's ``struct virtio_resource_obj_dev_parts``."""
        data = obj_hdr(obj_id) + RESOURCE_OBJ_FLAGS.pack(0)
        return self.send(VIRTIO_ADMIN_CMD_RESOURCE_OBJ_QUERY, member, data, RESOURCE_OBJ_DEV_PARTS.size)

    def destroy(self, member: int, obj_id: int) -> AdminCompletion:
        """VIRTIO_ADMIN_CMD_RESOURCE_OBJ_DESTROY."""
        return self.send(VIRTIO_ADMIN_CMD_RESOURCE_OBJ_DESTROY, member, obj_hdr(obj_id))

    def metadata(self, member: int, obj_id: int, kind: int, room: int = METADATA_RESULT.size) -> AdminCompletion:
        """VIRTIO_ADMIN_CMD_DEV_PARTS_METADATA_GET of ``kind`` (SIZE, COUNT or LIST)."""
        return self.send(VIRTIO_ADMIN_CMD_DEV_PARTS_METADATA_GET, member, obj_hdr(obj_id) + PARTS_CMD_TYPE.pack(kind),
                         room)

    def parts_size(self, member: int, obj_id: int) -> int | None:
        """``parts_size.size``, or None if the command failed."""
        got = self.metadata(member, obj_id, VIRTIO_ADMIN_CMD_DEV_PARTS_METADATA_TYPE_SIZE)
        return METADATA_RESULT.unpack(got.result[:METADATA_RESULT.size])[0] if got.status == 0 else None

    def get(self, member: int, obj_id: int, room: int, selected: list[DevicePart] | None = None) -> AdminCompletion:
        """VIRTIO_ADMIN_CMD_DEV_PARTS_GET: every part, or the parts whose headers ``selected`` gives."""
        if selected is None:
            data = PARTS_CMD_TYPE.pack(VIRTIO_ADMIN_CMD_DEV_PARTS_GET_TYPE_ALL)
        else:
            data = PARTS_CMD_TYPE.pack(VIRTIO_ADMIN_CMD_DEV_PARTS_GET_TYPE_SELECTED) + b"".join(
                p.header() for p in selected)
        return self.send(VIRTIO_ADMIN_CMD_DEV_PARTS_GET, member, obj_hdr(obj_id) + data, room)

    def set(self, member: int, obj_id: int, parts: list[DevicePart]) -> AdminCompletion:
        """VIRTIO_ADMIN_CMD_DEV_PARTS_SET of ``parts``."""
        return self.send(VIRTIO_ADMIN_CMD_DEV_PARTS_SET, member, obj_hdr(obj_id) + pack_parts(parts))

    def mode(self, member: int, flags: int) -> AdminCompletion:
        """VIRTIO_ADMIN_CMD_DEV_MODE_SET: ``flags`` 1 stops the member, 0 resumes it."""
        return self.send(VIRTIO_ADMIN_CMD_DEV_MODE_SET, member, bytes([flags]))
