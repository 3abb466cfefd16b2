"""Device parts and the device parts commands' structures (virtio 1.4 2.14 "Device parts", 2.12.1.4).

A device part is ``struct virtio_dev_part``: a 16-byte ``struct
virtio_dev_part_hdr`` (le16 ``part_type``, u8 ``flags``, u8 reserved, an
8-byte ``selector``, le32 ``length``) followed by ``length`` bytes of
``value``.  :class:`DevicePart` is one; :func:`pack_parts` and
:func:`unpack_parts` convert lists of them, refusing a truncated header or
value (:class:`PartsError`).

The order table of 2.12.1.4.4 ("Device parts order") is :func:`order_rank`:
parts are exchanged in that order, device-type parts (0x200-0x5FF) after the
common ones.  This module knows no transport and no device; what the parts of
a virtio-pci function are is :mod:`iovirt.virtio.transport.parts`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from iovirt.errors import IovirtError
from iovirt.virtio.admin.defs import (
    VIRTIO_ADMIN_CMD_DEV_MODE_SET,
    VIRTIO_ADMIN_CMD_DEV_PARTS_GET,
    VIRTIO_ADMIN_CMD_DEV_PARTS_METADATA_GET,
    VIRTIO_ADMIN_CMD_DEV_PARTS_SET,
    VIRTIO_ADMIN_CMD_RESOURCE_OBJ_CREATE,
    VIRTIO_ADMIN_CMD_RESOURCE_OBJ_DESTROY,
    VIRTIO_ADMIN_CMD_RESOURCE_OBJ_MODIFY,
    VIRTIO_ADMIN_CMD_RESOURCE_OBJ_QUERY,
)

DEV_PARTS_OPCODES = frozenset({
    VIRTIO_ADMIN_CMD_RESOURCE_OBJ_CREATE,
    VIRTIO_ADMIN_CMD_RESOURCE_OBJ_MODIFY,
    VIRTIO_ADMIN_CMD_RESOURCE_OBJ_QUERY,
    VIRTIO_ADMIN_CMD_RESOURCE_OBJ_DESTROY,
    VIRTIO_ADMIN_CMD_DEV_PARTS_METADATA_GET,
    VIRTIO_ADMIN_CMD_DEV_PARTS_GET,
    VIRTIO_ADMIN_CMD_DEV_PARTS_SET,
    VIRTIO_ADMIN_CMD_DEV_MODE_SET,
})
"""2.12.1.4.4.1: a device supports all of these or none."""

# 2.14.1 common device parts
VIRTIO_DEV_PART_DEV_FEATURES = 0x100
VIRTIO_DEV_PART_DRV_FEATURES = 0x101
VIRTIO_DEV_PART_PCI_COMMON_CFG = 0x102
VIRTIO_DEV_PART_DEVICE_STATUS = 0x103
VIRTIO_DEV_PART_VQ_CFG = 0x104
VIRTIO_DEV_PART_VQ_NOTIFY_CFG = 0x105
DEVICE_TYPE_PARTS = range(0x200, 0x600)
"""2.14: ``part_type`` 0x200-0x5FF are specific to a device type."""

VIRTIO_DEV_PART_F_OPTIONAL = 0
"""``flags`` bit 0: the part need not be written to the device when restored."""

# struct virtio_dev_part_hdr: le16 part_type, u8 flags, u8 reserved, u8 selector[8], le32 length
DEV_PART_HDR = struct.Struct("<HBx8sI")
DEV_PART_HDR_SIZE = DEV_PART_HDR.size  # 16
SELECTOR_OFFSET = struct.Struct("<I4x")  # selector.pci_common_cfg: le32 offset, le32 reserved
SELECTOR_VQ_INDEX = struct.Struct("<H6x")  # selector.vq_index: le16 index, u8 reserved[6]
NO_SELECTOR = bytes(8)

# struct virtio_dev_part_vq_cfg: le16 queue_size, le16 vector, le16 enabled, le16 reserved,
# le64 queue_desc, le64 queue_driver, le64 queue_device
VQ_CFG = struct.Struct("<HHH2xQQQ")
# struct virtio_dev_part_vq_notify_data: le16 queue_notify_off, le16 queue_notif_config_data, u8 reserved[4]
VQ_NOTIFY_CFG = struct.Struct("<HH4x")

# 2.12.1.4: the device parts resource object and capability
VIRTIO_RESOURCE_OBJ_DEV_PARTS = 0x000
VIRTIO_RESOURCE_OBJ_DEV_PARTS_TYPE_GET = 0
VIRTIO_RESOURCE_OBJ_DEV_PARTS_TYPE_SET = 1
RESOURCE_OBJ_DEV_PARTS = struct.Struct("<B7x")  # struct virtio_resource_obj_dev_parts: u8 type, u8 reserved[7]
VIRTIO_DEV_PARTS_CAP = 0x0000
DEV_PARTS_CAP = struct.Struct("<BB")  # get_parts_resource_objects_limit, set_parts_resource_objects_limit

# struct virtio_admin_cmd_resource_obj_cmd_hdr: le16 type, u8 reserved[2], le32 id
RESOURCE_OBJ_CMD_HDR = struct.Struct("<H2xI")
RESOURCE_OBJ_FLAGS = struct.Struct("<Q")  # the le64 flags of the create / modify / query data

# VIRTIO_ADMIN_CMD_DEV_PARTS_METADATA_GET: hdr, u8 type, u8 reserved[7]
VIRTIO_ADMIN_CMD_DEV_PARTS_METADATA_TYPE_SIZE = 0
VIRTIO_ADMIN_CMD_DEV_PARTS_METADATA_TYPE_COUNT = 1
VIRTIO_ADMIN_CMD_DEV_PARTS_METADATA_TYPE_LIST = 2
PARTS_CMD_TYPE = struct.Struct("<B7x")  # the u8 type, u8 reserved[7] after the hdr (metadata and get data)
METADATA_RESULT = struct.Struct("<I4x")  # le32 size or count, le32 reserved

# VIRTIO_ADMIN_CMD_DEV_PARTS_GET: hdr, u8 type, u8 reserved[7], struct virtio_dev_part_hdr hdr_list[]
VIRTIO_ADMIN_CMD_DEV_PARTS_GET_TYPE_SELECTED = 0
VIRTIO_ADMIN_CMD_DEV_PARTS_GET_TYPE_ALL = 1

# VIRTIO_ADMIN_CMD_DEV_MODE_SET: u8 flags
VIRTIO_ADMIN_CMD_DEV_MODE_F_STOPPED = 0


class PartsError(IovirtError):
    """A list of device parts that cannot be parsed: ``offset`` is where it went wrong."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(f"{message} at byte {offset}")
        self.offset = offset


@dataclass(frozen=True)
class DevicePart:
    """One ``struct virtio_dev_part``: header fields and ``value`` (``length`` is ``len(value)``)."""

    part_type: int
    value: bytes = b""
    selector: bytes = NO_SELECTOR
    flags: int = 0

    @property
    def optional(self) -> bool:
        """VIRTIO_DEV_PART_F_OPTIONAL is set."""
        return bool(self.flags >> VIRTIO_DEV_PART_F_OPTIONAL & 1)

    @property
    def key(self) -> tuple[int, bytes]:
        """What identifies the part: its type and selector."""
        return self.part_type, self.selector

    def header(self) -> bytes:
        """Its ``struct virtio_dev_part_hdr``."""
        return DEV_PART_HDR.pack(self.part_type, self.flags, self.selector, len(self.value))

    def pack(self) -> bytes:
        """Its ``struct virtio_dev_part``: header then value."""
        return self.header() + self.value


def offset_selector(offset: int) -> bytes:
    """``selector.pci_common_cfg`` for the common configuration field at ``offset``."""
    return SELECTOR_OFFSET.pack(offset)


def vq_selector(index: int) -> bytes:
    """``selector.vq_index`` for virtqueue ``index``."""
    return SELECTOR_VQ_INDEX.pack(index)


def selector_offset(part: DevicePart) -> int:
    """``selector.pci_common_cfg.offset`` of ``part``."""
    return int(SELECTOR_OFFSET.unpack(part.selector)[0])


def selector_vq(part: DevicePart) -> int:
    """``selector.vq_index.index`` of ``part``."""
    return int(SELECTOR_VQ_INDEX.unpack(part.selector)[0])


def pack_parts(parts: list[DevicePart]) -> bytes:
    """``struct virtio_dev_part parts[]``."""
    return b"".join(part.pack() for part in parts)


def unpack_parts(data: bytes) -> list[DevicePart]:
    """Parse ``struct virtio_dev_part parts[]``; :class:`PartsError` for a truncated header or value."""
    parts, pos = [], 0
    while pos < len(data):
        if len(data) - pos < DEV_PART_HDR_SIZE:
            raise PartsError(f"truncated device part header ({len(data) - pos} of {DEV_PART_HDR_SIZE} bytes)", pos)
        part_type, flags, selector, length = DEV_PART_HDR.unpack_from(data, pos)
        start = pos + DEV_PART_HDR_SIZE
        if start + length > len(data):
            raise PartsError(f"device part {part_type:#x} says {length} bytes of value, {len(data) - start} follow", pos)
        parts.append(DevicePart(part_type, data[start:start + length], selector, flags))
        pos = start + length
    return parts


def unpack_headers(data: bytes) -> list[DevicePart]:
    """Parse ``struct virtio_dev_part_hdr hdr_list[]`` (no values; the lengths are dropped)."""
    if len(data) % DEV_PART_HDR_SIZE:
        raise PartsError(f"header list of {len(data)} bytes is not a multiple of {DEV_PART_HDR_SIZE}",
                         len(data) - len(data) % DEV_PART_HDR_SIZE)
    return [DevicePart(t, b"", sel, f) for t, f, sel, _length in DEV_PART_HDR.iter_unpack(data)]


_ORDER = (
    VIRTIO_DEV_PART_DEV_FEATURES,
    VIRTIO_DEV_PART_DRV_FEATURES,
    VIRTIO_DEV_PART_PCI_COMMON_CFG,
    VIRTIO_DEV_PART_DEVICE_STATUS,
    VIRTIO_DEV_PART_VQ_CFG,
    VIRTIO_DEV_PART_VQ_NOTIFY_CFG,
)


def order_rank(part_type: int) -> int:
    """Where parts of ``part_type`` come in the order of 2.12.1.4.4; device-type parts after the common ones."""
    if part_type in _ORDER:
        return _ORDER.index(part_type)
    return len(_ORDER)


PRECEDING = {
    VIRTIO_DEV_PART_DRV_FEATURES: frozenset({VIRTIO_DEV_PART_DEV_FEATURES}),
    VIRTIO_DEV_PART_PCI_COMMON_CFG: frozenset({VIRTIO_DEV_PART_DEV_FEATURES, VIRTIO_DEV_PART_DRV_FEATURES}),
}
"""2.12.1.4.4.1: parts a get or metadata answer MUST put before a part of the key's type."""


def select(parts: list[DevicePart], wanted: set[tuple[int, bytes]]) -> list[DevicePart]:
    """The parts of ``parts`` (in their order) that ``wanted`` names, with the parts they must follow (:data:`PRECEDING`)."""
    types = {part_type for part_type, _selector in wanted}
    needed = set().union(*(PRECEDING.get(t, frozenset()) for t in types))
    return [p for p in parts if p.key in wanted or p.part_type in needed]


def in_order(parts: list[DevicePart]) -> bool:
    """``parts`` follow the order table (parts of one rank may come in any order among themselves)."""
    ranks = [order_rank(p.part_type) for p in parts]
    return ranks == sorted(ranks)
