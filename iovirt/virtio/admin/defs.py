"""Constants and structures of group administration commands (virtio 1.4 sections 2.12 and 2.13), named as the spec names them."""

from __future__ import annotations

import struct

# 2.12 group types
VIRTIO_ADMIN_GROUP_TYPE_SELF = 0x0
VIRTIO_ADMIN_GROUP_TYPE_SRIOV = 0x1

# 2.12.1 opcodes
VIRTIO_ADMIN_CMD_LIST_QUERY = 0x0
VIRTIO_ADMIN_CMD_LIST_USE = 0x1
VIRTIO_ADMIN_CMD_LEGACY_COMMON_CFG_WRITE = 0x2
VIRTIO_ADMIN_CMD_LEGACY_COMMON_CFG_READ = 0x3
VIRTIO_ADMIN_CMD_LEGACY_DEV_CFG_WRITE = 0x4
VIRTIO_ADMIN_CMD_LEGACY_DEV_CFG_READ = 0x5
VIRTIO_ADMIN_CMD_LEGACY_NOTIFY_INFO = 0x6
VIRTIO_ADMIN_CMD_CAP_ID_LIST_QUERY = 0x7
VIRTIO_ADMIN_CMD_DEVICE_CAP_GET = 0x8
VIRTIO_ADMIN_CMD_DRIVER_CAP_SET = 0x9
VIRTIO_ADMIN_CMD_RESOURCE_OBJ_CREATE = 0xA
VIRTIO_ADMIN_CMD_RESOURCE_OBJ_MODIFY = 0xB
VIRTIO_ADMIN_CMD_RESOURCE_OBJ_QUERY = 0xC
VIRTIO_ADMIN_CMD_RESOURCE_OBJ_DESTROY = 0xD
VIRTIO_ADMIN_CMD_DEV_PARTS_METADATA_GET = 0xE
VIRTIO_ADMIN_CMD_DEV_PARTS_GET = 0xF
VIRTIO_ADMIN_CMD_DEV_PARTS_SET = 0x10
VIRTIO_ADMIN_CMD_DEV_MODE_SET = 0x11

LEGACY_OPCODES = frozenset({
    VIRTIO_ADMIN_CMD_LEGACY_COMMON_CFG_WRITE,
    VIRTIO_ADMIN_CMD_LEGACY_COMMON_CFG_READ,
    VIRTIO_ADMIN_CMD_LEGACY_DEV_CFG_WRITE,
    VIRTIO_ADMIN_CMD_LEGACY_DEV_CFG_READ,
})
"""2.12.1.1.6: a device supports all of these or none."""

# 2.12.1 status (Linux errno values) and status_qualifier
VIRTIO_ADMIN_STATUS_OK = 0
VIRTIO_ADMIN_STATUS_ENXIO = 6
VIRTIO_ADMIN_STATUS_EAGAIN = 11
VIRTIO_ADMIN_STATUS_ENOMEM = 12
VIRTIO_ADMIN_STATUS_EBUSY = 16
VIRTIO_ADMIN_STATUS_EEXIST = 17
VIRTIO_ADMIN_STATUS_EINVAL = 22
VIRTIO_ADMIN_STATUS_ENOSPC = 28

VIRTIO_ADMIN_STATUS_Q_OK = 0x0
VIRTIO_ADMIN_STATUS_Q_INVALID_COMMAND = 0x1
VIRTIO_ADMIN_STATUS_Q_INVALID_OPCODE = 0x2
VIRTIO_ADMIN_STATUS_Q_INVALID_FIELD = 0x3
VIRTIO_ADMIN_STATUS_Q_INVALID_GROUP = 0x4
VIRTIO_ADMIN_STATUS_Q_INVALID_MEMBER = 0x5
VIRTIO_ADMIN_STATUS_Q_NORESOURCE = 0x6
VIRTIO_ADMIN_STATUS_Q_TRYAGAIN = 0x7

# struct virtio_admin_cmd: le16 opcode, le16 group_type, u8 reserved1[12], le64 group_member_id,
# le64 command_specific_data[] | le16 status, le16 status_qualifier, u8 reserved2[4], u8 command_specific_result[]
ADMIN_CMD_HDR = struct.Struct("<HH12xQ")
ADMIN_CMD_HDR_SIZE = ADMIN_CMD_HDR.size  # 24: the device-readable part before command_specific_data
ADMIN_CMD_RESULT_HDR = struct.Struct("<HH4x")
ADMIN_CMD_RESULT_HDR_SIZE = ADMIN_CMD_RESULT_HDR.size  # 8: the device-writable part before command_specific_result

# 2.12.1.1 legacy interface: command_specific_data of the write commands is u8 offset, u8 reserved[7], u8 data[]
LEGACY_WR_DATA_OFFSET = 8

# struct virtio_pci_legacy_notify_info: u8 flags, u8 bar, u8 padding[6], le64 offset; 4 entries
LEGACY_NOTIFY_INFO_ENTRY = struct.Struct("<BB6xQ")
LEGACY_NOTIFY_INFO_ENTRIES = 4
VIRTIO_ADMIN_LEGACY_NOTIFY_INFO_FLAGS_END = 0x0
VIRTIO_ADMIN_LEGACY_NOTIFY_INFO_FLAGS_OWNER = 0x1
VIRTIO_ADMIN_LEGACY_NOTIFY_INFO_FLAGS_MEMBER = 0x2


def opcode_bitmap(opcodes: "set[int] | frozenset[int]") -> bytes:
    """``struct virtio_admin_cmd_list``: le64 words, bit ``n`` set for opcode ``n``, as many words as the largest needs."""
    bits = 0
    for op in opcodes:
        bits |= 1 << op
    words = max((max(opcodes, default=0) + 64) // 64, 1)
    return bits.to_bytes(8 * words, "little")


def opcodes_of(bitmap: bytes) -> frozenset[int]:
    """The opcodes a ``struct virtio_admin_cmd_list`` names (any length; missing words are zero)."""
    bits = int.from_bytes(bitmap, "little")
    return frozenset(n for n in range(8 * len(bitmap)) if bits >> n & 1)
