"""The vhost-user wire format: header flags, request codes, feature bits, payloads.

Everything here follows QEMU's ``docs/interop/vhost-user.rst`` ("Message
Specification", "Protocol features", "Front-end message types", "Back-end
message types").  All numbers are in the machine's native byte order (spec:
"All numbers are in the machine native byte order"), hence the ``=`` struct
prefix: native order, standard sizes, no implicit alignment.

Payload classes are frozen dataclasses with ``pack()`` and
``unpack(data, request=None)``.  ``unpack`` checks *syntax only*: the byte
count, counts against their limits, enumerations and reserved bits.  Whether
a memory table overlaps or a ring index exists is for the backend to judge.
Errors are :class:`~iovirt.vhost_user.errors.VhostUserProtocolError`
subclasses carrying the request code passed in.

The header and message framing live in :mod:`iovirt.vhost_user.framing`;
which request carries which payload, fds and reply in
:mod:`iovirt.vhost_user.protocol`.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import ClassVar, Protocol, TypeVar

from iovirt.vhost_user.errors import PayloadSizeError, PayloadValueError

# -- header flags ("Header"; the header itself is framing: iovirt.vhost_user.framing) --

VHOST_USER_VERSION_MASK = 0x3
VHOST_USER_VERSION = 0x1
VHOST_USER_REPLY_MASK = 0x1 << 2
VHOST_USER_NEED_REPLY_MASK = 0x1 << 3
VHOST_USER_KNOWN_FLAGS = VHOST_USER_VERSION_MASK | VHOST_USER_REPLY_MASK | VHOST_USER_NEED_REPLY_MASK

VHOST_MEMORY_BASELINE_NREGIONS = 8
"""At most 8 regions (and 8 fds) in SET_MEM_TABLE ("Memory regions description")."""

VHOST_USER_MAX_CONFIG_SIZE = 256
"""Largest virtio config space access (QEMU ``VHOST_USER_MAX_CONFIG_SIZE``)."""


# -- request codes --------------------------------------------------------------


class FrontendRequest(enum.IntEnum):
    """Front-end message types ("Front-end message types"), front-end -> back-end."""

    VHOST_USER_GET_FEATURES = 1
    VHOST_USER_SET_FEATURES = 2
    VHOST_USER_SET_OWNER = 3
    VHOST_USER_RESET_OWNER = 4
    VHOST_USER_SET_MEM_TABLE = 5
    VHOST_USER_SET_LOG_BASE = 6
    VHOST_USER_SET_LOG_FD = 7
    VHOST_USER_SET_VRING_NUM = 8
    VHOST_USER_SET_VRING_ADDR = 9
    VHOST_USER_SET_VRING_BASE = 10
    VHOST_USER_GET_VRING_BASE = 11
    VHOST_USER_SET_VRING_KICK = 12
    VHOST_USER_SET_VRING_CALL = 13
    VHOST_USER_SET_VRING_ERR = 14
    VHOST_USER_GET_PROTOCOL_FEATURES = 15
    VHOST_USER_SET_PROTOCOL_FEATURES = 16
    VHOST_USER_GET_QUEUE_NUM = 17
    VHOST_USER_SET_VRING_ENABLE = 18
    VHOST_USER_SEND_RARP = 19
    VHOST_USER_NET_SET_MTU = 20
    VHOST_USER_SET_BACKEND_REQ_FD = 21  # formerly VHOST_USER_SET_SLAVE_REQ_FD
    VHOST_USER_IOTLB_MSG = 22
    VHOST_USER_SET_VRING_ENDIAN = 23
    VHOST_USER_GET_CONFIG = 24
    VHOST_USER_SET_CONFIG = 25
    VHOST_USER_CREATE_CRYPTO_SESSION = 26
    VHOST_USER_CLOSE_CRYPTO_SESSION = 27
    VHOST_USER_POSTCOPY_ADVISE = 28
    VHOST_USER_POSTCOPY_LISTEN = 29
    VHOST_USER_POSTCOPY_END = 30
    VHOST_USER_GET_INFLIGHT_FD = 31
    VHOST_USER_SET_INFLIGHT_FD = 32
    VHOST_USER_GPU_SET_SOCKET = 33
    VHOST_USER_RESET_DEVICE = 34
    VHOST_USER_VRING_KICK = 35
    VHOST_USER_GET_MAX_MEM_SLOTS = 36
    VHOST_USER_ADD_MEM_REG = 37
    VHOST_USER_REM_MEM_REG = 38
    VHOST_USER_SET_STATUS = 39
    VHOST_USER_GET_STATUS = 40
    VHOST_USER_GET_SHARED_OBJECT = 41
    VHOST_USER_SET_DEVICE_STATE_FD = 42
    VHOST_USER_CHECK_DEVICE_STATE = 43


class BackendRequest(enum.IntEnum):
    """Back-end message types ("Back-end message types"), sent on the BACKEND_REQ channel."""

    VHOST_USER_BACKEND_IOTLB_MSG = 1
    VHOST_USER_BACKEND_CONFIG_CHANGE_MSG = 2
    VHOST_USER_BACKEND_VRING_HOST_NOTIFIER_MSG = 3
    VHOST_USER_BACKEND_VRING_CALL = 4
    VHOST_USER_BACKEND_VRING_ERR = 5
    VHOST_USER_BACKEND_SHARED_OBJECT_ADD = 6
    VHOST_USER_BACKEND_SHARED_OBJECT_REMOVE = 7
    VHOST_USER_BACKEND_SHARED_OBJECT_LOOKUP = 8


# -- feature bits ---------------------------------------------------------------

VHOST_USER_F_PROTOCOL_FEATURES = 30
"""Virtio feature bit 30 (reserved in virtio) gates protocol-feature negotiation."""

VHOST_F_LOG_ALL = 26
"""Vhost feature bit: the front-end may ask for dirty logging ("Migration")."""

VHOST_LOG_PAGE = 0x1000
"""Dirty-log granularity: one bit per 4 KiB guest page ("Migration")."""


class ProtocolFeature(enum.IntEnum):
    """Protocol feature bit numbers ("Protocol features")."""

    VHOST_USER_PROTOCOL_F_MQ = 0
    VHOST_USER_PROTOCOL_F_LOG_SHMFD = 1
    VHOST_USER_PROTOCOL_F_RARP = 2
    VHOST_USER_PROTOCOL_F_REPLY_ACK = 3
    VHOST_USER_PROTOCOL_F_MTU = 4
    VHOST_USER_PROTOCOL_F_BACKEND_REQ = 5
    VHOST_USER_PROTOCOL_F_CROSS_ENDIAN = 6
    VHOST_USER_PROTOCOL_F_CRYPTO_SESSION = 7
    VHOST_USER_PROTOCOL_F_PAGEFAULT = 8
    VHOST_USER_PROTOCOL_F_CONFIG = 9
    VHOST_USER_PROTOCOL_F_BACKEND_SEND_FD = 10
    VHOST_USER_PROTOCOL_F_HOST_NOTIFIER = 11
    VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD = 12
    VHOST_USER_PROTOCOL_F_RESET_DEVICE = 13
    VHOST_USER_PROTOCOL_F_INBAND_NOTIFICATIONS = 14
    VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS = 15
    VHOST_USER_PROTOCOL_F_STATUS = 16
    VHOST_USER_PROTOCOL_F_XEN_MMAP = 17
    VHOST_USER_PROTOCOL_F_SHARED_OBJECT = 18
    VHOST_USER_PROTOCOL_F_DEVICE_STATE = 19


def feature_mask(*bits: int) -> int:
    """The bitmask with the given feature bit numbers set."""
    mask = 0
    for bit in bits:
        mask |= 1 << bit
    return mask


# -- payloads ----------------------------------------------------------------

P = TypeVar("P", bound="Payload")


class Payload(Protocol):
    """What every payload class provides."""

    def pack(self) -> bytes:
        """The payload's wire bytes."""
        ...

    @classmethod
    def unpack(cls: type[P], data: bytes, request: int | None = None) -> P:
        """Parse ``data`` (exactly the payload), raising a protocol error on bad syntax."""
        ...


def _check_size(data: bytes, size: int, request: int | None) -> None:
    if len(data) != size:
        raise PayloadSizeError(request, len(data), f"{size} bytes")


@dataclass(frozen=True)
class U64:
    """A single 64-bit integer (features, status, queue counts, REPLY_ACK status)."""

    value: int

    FORMAT: ClassVar[struct.Struct] = struct.Struct("=Q")

    def pack(self) -> bytes:
        """8 bytes."""
        return self.FORMAT.pack(self.value)

    @classmethod
    def unpack(cls, data: bytes, request: int | None = None) -> "U64":
        """Parse 8 bytes."""
        _check_size(data, cls.FORMAT.size, request)
        return cls(*cls.FORMAT.unpack(data))


VHOST_USER_VRING_IDX_MASK = 0xFF
VHOST_USER_VRING_NOFD_MASK = 0x1 << 8


@dataclass(frozen=True)
class VringFile:
    """The u64 of SET_VRING_KICK/CALL/ERR: bits 0-7 the vring index, bit 8 "no fd".

    ``invalid_fd`` set means no fd is attached: poll instead of waiting for
    the kick (spec ``VHOST_USER_SET_VRING_KICK``).  Other bits are reserved.
    """

    index: int
    invalid_fd: bool = False

    FORMAT: ClassVar[struct.Struct] = struct.Struct("=Q")

    def pack(self) -> bytes:
        """8 bytes."""
        return self.FORMAT.pack(self.index | (VHOST_USER_VRING_NOFD_MASK if self.invalid_fd else 0))

    @classmethod
    def unpack(cls, data: bytes, request: int | None = None) -> "VringFile":
        """Parse 8 bytes; bits 9-63 must be zero."""
        _check_size(data, cls.FORMAT.size, request)
        (value,) = cls.FORMAT.unpack(data)
        if value & ~(VHOST_USER_VRING_IDX_MASK | VHOST_USER_VRING_NOFD_MASK):
            raise PayloadValueError(request, "vring file u64", value, "only bits 0-8 set")
        return cls(value & VHOST_USER_VRING_IDX_MASK, bool(value & VHOST_USER_VRING_NOFD_MASK))


@dataclass(frozen=True)
class Rarp:
    """SEND_RARP's u64: the guest MAC address in its first 6 bytes."""

    mac: bytes

    SIZE: ClassVar[int] = 8

    def __post_init__(self) -> None:
        if len(self.mac) != 6:
            raise ValueError(f"a MAC address is 6 bytes, got {len(self.mac)}")

    def pack(self) -> bytes:
        """The MAC and two zero bytes."""
        return bytes(self.mac) + b"\0\0"

    @classmethod
    def unpack(cls, data: bytes, request: int | None = None) -> "Rarp":
        """Parse 8 bytes; the last two are ignored."""
        _check_size(data, cls.SIZE, request)
        return cls(bytes(data[:6]))


@dataclass(frozen=True)
class VringState:
    """A vring state description: ``index`` u32, ``num`` u32."""

    index: int
    num: int

    FORMAT: ClassVar[struct.Struct] = struct.Struct("=II")

    def pack(self) -> bytes:
        """8 bytes."""
        return self.FORMAT.pack(self.index, self.num)

    @classmethod
    def unpack(cls, data: bytes, request: int | None = None) -> "VringState":
        """Parse 8 bytes."""
        _check_size(data, cls.FORMAT.size, request)
        return cls(*cls.FORMAT.unpack(data))


VHOST_VRING_F_LOG = 0
"""Bit in the vring address flags: log used-ring writes at ``log_guest_addr``."""


@dataclass(frozen=True)
class VringAddr:
    """A vring address description (``struct vhost_vring_addr``, 40 bytes).

    Ring addresses are user addresses, or IOVAs with ``VIRTIO_F_IOMMU_PLATFORM``.
    """

    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int = 0

    FORMAT: ClassVar[struct.Struct] = struct.Struct("=IIQQQQ")

    def pack(self) -> bytes:
        """40 bytes."""
        return self.FORMAT.pack(
            self.index,
            self.flags,
            self.desc_user_addr,
            self.used_user_addr,
            self.avail_user_addr,
            self.log_guest_addr,
        )

    @classmethod
    def unpack(cls, data: bytes, request: int | None = None) -> "VringAddr":
        """Parse 40 bytes; only the VHOST_VRING_F_LOG flag may be set."""
        _check_size(data, cls.FORMAT.size, request)
        addr = cls(*cls.FORMAT.unpack(data))
        if addr.flags & ~(1 << VHOST_VRING_F_LOG):
            raise PayloadValueError(request, "vring flags", addr.flags, "only VHOST_VRING_F_LOG (bit 0)")
        return addr


@dataclass(frozen=True)
class MemRegion:
    """A memory region description (32 bytes)."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int

    FORMAT: ClassVar[struct.Struct] = struct.Struct("=QQQQ")

    def pack(self) -> bytes:
        """32 bytes."""
        return self.FORMAT.pack(self.guest_phys_addr, self.memory_size, self.userspace_addr, self.mmap_offset)

    @classmethod
    def unpack(cls, data: bytes, request: int | None = None) -> "MemRegion":
        """Parse 32 bytes."""
        _check_size(data, cls.FORMAT.size, request)
        return cls(*cls.FORMAT.unpack(data))


@dataclass(frozen=True)
class MemoryTable:
    """SET_MEM_TABLE's "multiple memory regions description".

    ``num regions`` u32, padding u32, then ``num regions`` region
    descriptions.  Frontends (QEMU, DPDK) send only the regions in use, so the
    payload is ``8 + 32 * nregions`` bytes, with at most 8 regions.
    """

    regions: tuple[MemRegion, ...]

    PREFIX: ClassVar[struct.Struct] = struct.Struct("=II")

    def pack(self) -> bytes:
        """``8 + 32 * len(regions)`` bytes."""
        return self.PREFIX.pack(len(self.regions), 0) + b"".join(r.pack() for r in self.regions)

    @classmethod
    def unpack(cls, data: bytes, request: int | None = None) -> "MemoryTable":
        """Parse and check the region count against the limit and the size."""
        if len(data) < cls.PREFIX.size:
            raise PayloadSizeError(request, len(data), f"at least {cls.PREFIX.size} bytes")
        nregions, _padding = cls.PREFIX.unpack_from(data)
        if nregions > VHOST_MEMORY_BASELINE_NREGIONS:
            raise PayloadValueError(
                request, "num regions", nregions, f"at most {VHOST_MEMORY_BASELINE_NREGIONS}"
            )
        region_size = MemRegion.FORMAT.size
        _check_size(data, cls.PREFIX.size + nregions * region_size, request)
        body = data[cls.PREFIX.size :]
        return cls(
            tuple(
                MemRegion.unpack(body[i * region_size : (i + 1) * region_size], request)
                for i in range(nregions)
            )
        )


@dataclass(frozen=True)
class SingleMemRegion:
    """ADD_MEM_REG / REM_MEM_REG payload: 64-bit padding, then one region (40 bytes)."""

    region: MemRegion

    SIZE: ClassVar[int] = 8 + 32

    def pack(self) -> bytes:
        """40 bytes."""
        return bytes(8) + self.region.pack()

    @classmethod
    def unpack(cls, data: bytes, request: int | None = None) -> "SingleMemRegion":
        """Parse 40 bytes."""
        _check_size(data, cls.SIZE, request)
        return cls(MemRegion.unpack(bytes(data[8:]), request))


@dataclass(frozen=True)
class Log:
    """A log description: ``mmap_size`` u64, ``mmap_offset`` u64 (SET_LOG_BASE)."""

    mmap_size: int
    mmap_offset: int

    FORMAT: ClassVar[struct.Struct] = struct.Struct("=QQ")

    def pack(self) -> bytes:
        """16 bytes."""
        return self.FORMAT.pack(self.mmap_size, self.mmap_offset)

    @classmethod
    def unpack(cls, data: bytes, request: int | None = None) -> "Log":
        """Parse 16 bytes."""
        _check_size(data, cls.FORMAT.size, request)
        return cls(*cls.FORMAT.unpack(data))


class IotlbType(enum.IntEnum):
    """IOTLB message types ("An IOTLB message")."""

    VHOST_IOTLB_MISS = 1
    VHOST_IOTLB_UPDATE = 2
    VHOST_IOTLB_INVALIDATE = 3
    VHOST_IOTLB_ACCESS_FAIL = 4


class IotlbPerm(enum.IntEnum):
    """IOTLB permission flags ("An IOTLB message")."""

    VHOST_ACCESS_NONE = 0
    VHOST_ACCESS_RO = 1
    VHOST_ACCESS_WO = 2
    VHOST_ACCESS_RW = 3


@dataclass(frozen=True)
class IotlbMsg:
    """``struct vhost_iotlb_msg``: iova, size, uaddr (u64 each), perm u8, type u8.

    The C struct is 8-byte aligned, so it is 32 bytes on the wire (QEMU
    sends ``sizeof(struct vhost_iotlb_msg)``).
    """

    iova: int
    size: int
    uaddr: int
    perm: IotlbPerm
    type: IotlbType

    FORMAT: ClassVar[struct.Struct] = struct.Struct("=QQQBB6x")

    def pack(self) -> bytes:
        """32 bytes."""
        return self.FORMAT.pack(self.iova, self.size, self.uaddr, self.perm, self.type)

    @classmethod
    def unpack(cls, data: bytes, request: int | None = None) -> "IotlbMsg":
        """Parse 32 bytes; perm and type must be values the spec defines."""
        _check_size(data, cls.FORMAT.size, request)
        iova, size, uaddr, perm, type_ = cls.FORMAT.unpack(data)
        if perm not in IotlbPerm._value2member_map_:
            raise PayloadValueError(request, "IOTLB perm", perm, "0-3")
        if type_ not in IotlbType._value2member_map_:
            raise PayloadValueError(request, "IOTLB type", type_, "1-4")
        return cls(iova, size, uaddr, IotlbPerm(perm), IotlbType(type_))


VHOST_USER_CONFIG_HDR_SIZE = 12

VHOST_SET_CONFIG_TYPE_FRONTEND = 0
VHOST_SET_CONFIG_TYPE_MIGRATION = 1


@dataclass(frozen=True)
class Config:
    """Virtio device config space access: offset u32, size u32, flags u32, payload.

    ``size`` is ``len(payload)``; at most 256 bytes.  ``flags`` is 0
    (writable fields) or 1 (live migration).
    """

    offset: int
    flags: int
    payload: bytes

    PREFIX: ClassVar[struct.Struct] = struct.Struct("=III")

    @property
    def size(self) -> int:
        """The access size in bytes."""
        return len(self.payload)

    def pack(self) -> bytes:
        """``12 + size`` bytes."""
        return self.PREFIX.pack(self.offset, self.size, self.flags) + bytes(self.payload)

    @classmethod
    def unpack(cls, data: bytes, request: int | None = None) -> "Config":
        """Parse; the size field must match the bytes that follow and be <= 256."""
        if len(data) < VHOST_USER_CONFIG_HDR_SIZE:
            raise PayloadSizeError(request, len(data), f"at least {VHOST_USER_CONFIG_HDR_SIZE} bytes")
        offset, size, flags = cls.PREFIX.unpack_from(data)
        if size > VHOST_USER_MAX_CONFIG_SIZE:
            raise PayloadValueError(request, "config size", size, f"at most {VHOST_USER_MAX_CONFIG_SIZE}")
        _check_size(data, VHOST_USER_CONFIG_HDR_SIZE + size, request)
        if flags not in (VHOST_SET_CONFIG_TYPE_FRONTEND, VHOST_SET_CONFIG_TYPE_MIGRATION):
            raise PayloadValueError(request, "config flags", flags, "0 (front-end) or 1 (migration)")
        return cls(offset, flags, bytes(data[VHOST_USER_CONFIG_HDR_SIZE:]))


@dataclass(frozen=True)
class Inflight:
    """Inflight description: mmap_size u64, mmap_offset u64, num_queues u16, queue_size u16.

    The C struct is padded to 8-byte alignment: 24 bytes on the wire.
    """

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int

    FORMAT: ClassVar[struct.Struct] = struct.Struct("=QQHH4x")

    def pack(self) -> bytes:
        """24 bytes."""
        return self.FORMAT.pack(self.mmap_size, self.mmap_offset, self.num_queues, self.queue_size)

    @classmethod
    def unpack(cls, data: bytes, request: int | None = None) -> "Inflight":
        """Parse 24 bytes."""
        _check_size(data, cls.FORMAT.size, request)
        return cls(*cls.FORMAT.unpack(data))


@dataclass(frozen=True)
class VringArea:
    """Vring area description (back-end VRING_HOST_NOTIFIER_MSG): u64, size, offset."""

    u64: int
    size: int
    offset: int

    FORMAT: ClassVar[struct.Struct] = struct.Struct("=QQQ")

    def pack(self) -> bytes:
        """24 bytes."""
        return self.FORMAT.pack(self.u64, self.size, self.offset)

    @classmethod
    def unpack(cls, data: bytes, request: int | None = None) -> "VringArea":
        """Parse 24 bytes."""
        _check_size(data, cls.FORMAT.size, request)
        return cls(*cls.FORMAT.unpack(data))


@dataclass(frozen=True)
class SharedObject:
    """VhostUserShared: a 16-byte UUID (back-end SHARED_OBJECT_* messages)."""

    uuid: bytes

    SIZE: ClassVar[int] = 16

    def pack(self) -> bytes:
        """16 bytes."""
        return bytes(self.uuid)

    @classmethod
    def unpack(cls, data: bytes, request: int | None = None) -> "SharedObject":
        """Parse 16 bytes."""
        _check_size(data, cls.SIZE, request)
        return cls(bytes(data))


class TransferDirection(enum.IntEnum):
    """Device state transfer direction ("Device state transfer parameters")."""

    SAVE = 0
    LOAD = 1


class MigrationPhase(enum.IntEnum):
    """Device state migration phase ("Device state transfer parameters")."""

    STOPPED = 0


@dataclass(frozen=True)
class DeviceStateTransfer:
    """SET_DEVICE_STATE_FD payload: transfer direction u32, migration phase u32."""

    direction: TransferDirection
    phase: MigrationPhase

    FORMAT: ClassVar[struct.Struct] = struct.Struct("=II")

    def pack(self) -> bytes:
        """8 bytes."""
        return self.FORMAT.pack(self.direction, self.phase)

    @classmethod
    def unpack(cls, data: bytes, request: int | None = None) -> "DeviceStateTransfer":
        """Parse 8 bytes; direction and phase must be values the spec defines."""
        _check_size(data, cls.FORMAT.size, request)
        direction, phase = cls.FORMAT.unpack(data)
        if direction not in TransferDirection._value2member_map_:
            raise PayloadValueError(request, "transfer direction", direction, "0 (save) or 1 (load)")
        if phase not in MigrationPhase._value2member_map_:
            raise PayloadValueError(request, "migration phase", phase, "0 (stopped)")
        return cls(TransferDirection(direction), MigrationPhase(phase))


VHOST_USER_DEVICE_STATE_NOFD = 0x1 << 8
"""In SET_DEVICE_STATE_FD's u64 reply: no fd is returned."""
