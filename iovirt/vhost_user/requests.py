"""Typed front-end requests: one frozen dataclass per request the protocol parses.

:class:`~iovirt.vhost_user.protocol.BackendConnection` turns each well-formed
message into an instance of the class registered for its code, built from
the payload class :data:`~iovirt.vhost_user.protocol.REQUEST_RULES` names
for it: the class's own fields are the payload's fields, in the payload's
order, under the names the spec uses for them ("features", "mtu", the vring
``index`` and ``num``, ...).  A handler reads ``req.num``, never a payload it
has to cast.  Every request also carries the header flags, the fds that
came with it (the handler's from then on) and the :class:`ReplyKind` the
front-end waits for.

``tests/vhost_user/test_vhost_user_protocol.py`` checks that every rule has
its class and that class and payload round-trip.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypeVar

from iovirt.vhost_user.messages import (
    VHOST_USER_NEED_REPLY_MASK,
    VHOST_USER_VERSION,
    FrontendRequest as R,
    IotlbPerm,
    IotlbType,
    MemRegion,
    Payload,
    TransferDirection,
    MigrationPhase,
)


class ReplyKind(enum.Enum):
    """What the front-end waits for after a request."""

    NONE = "none"
    ACK = "REPLY_ACK u64"
    BODY = "the request's reply payload"


RequestT = TypeVar("RequestT", bound="Request")


@dataclass(frozen=True)
class Request:
    """A well-formed front-end request.

    Subclasses set ``code`` and declare the payload's fields.  ``fds`` are
    owned by the caller from now on.  ``reply`` says what the front-end waits
    for: answer with :meth:`BackendConnection.reply` (``BODY``),
    :meth:`~BackendConnection.ack` / :meth:`~BackendConnection.nack`.
    """

    code: ClassVar[R]
    header_flags: int = field(default=VHOST_USER_VERSION, kw_only=True)
    fds: tuple[int, ...] = field(default=(), kw_only=True)
    reply: ReplyKind = field(default=ReplyKind.NONE, kw_only=True)

    @property
    def request(self) -> R:
        """The request code."""
        return self.code

    @property
    def need_reply(self) -> bool:
        """The header's need_reply bit."""
        return bool(self.header_flags & VHOST_USER_NEED_REPLY_MASK)

    def values(self) -> tuple[Any, ...]:
        """The payload's field values, in the payload's order."""
        return tuple(getattr(self, f.name) for f in fields(self) if not f.kw_only)

    @classmethod
    def from_payload(
        cls: type[RequestT], payload: Payload | None, *, header_flags: int, fds: tuple[int, ...], reply: ReplyKind
    ) -> RequestT:
        """The request carrying ``payload``'s fields (positionally: the payload's order)."""
        values = () if payload is None else tuple(getattr(payload, f.name) for f in fields(payload))  # type: ignore[arg-type]
        return cls(*values, header_flags=header_flags, fds=fds, reply=reply)


REQUEST_TYPES: dict[R, type[Request]] = {}
"""The typed request class of every parsed request code."""


def _register(cls: type[RequestT]) -> type[RequestT]:
    REQUEST_TYPES[cls.code] = cls
    return cls


# -- requests without payload ---------------------------------------------------


@_register
@dataclass(frozen=True)
class GetFeatures(Request):
    """VHOST_USER_GET_FEATURES."""

    code = R.VHOST_USER_GET_FEATURES


@_register
@dataclass(frozen=True)
class SetOwner(Request):
    """VHOST_USER_SET_OWNER."""

    code = R.VHOST_USER_SET_OWNER


@_register
@dataclass(frozen=True)
class ResetOwner(Request):
    """VHOST_USER_RESET_OWNER (deprecated)."""

    code = R.VHOST_USER_RESET_OWNER


@_register
@dataclass(frozen=True)
class SetLogFd(Request):
    """VHOST_USER_SET_LOG_FD: the fd is the log eventfd."""

    code = R.VHOST_USER_SET_LOG_FD


@_register
@dataclass(frozen=True)
class GetProtocolFeatures(Request):
    """VHOST_USER_GET_PROTOCOL_FEATURES."""

    code = R.VHOST_USER_GET_PROTOCOL_FEATURES


@_register
@dataclass(frozen=True)
class GetQueueNum(Request):
    """VHOST_USER_GET_QUEUE_NUM."""

    code = R.VHOST_USER_GET_QUEUE_NUM


@_register
@dataclass(frozen=True)
class SetBackendReqFd(Request):
    """VHOST_USER_SET_BACKEND_REQ_FD: the fd is the back-end channel socket."""

    code = R.VHOST_USER_SET_BACKEND_REQ_FD


@_register
@dataclass(frozen=True)
class ResetDevice(Request):
    """VHOST_USER_RESET_DEVICE."""

    code = R.VHOST_USER_RESET_DEVICE


@_register
@dataclass(frozen=True)
class GetMaxMemSlots(Request):
    """VHOST_USER_GET_MAX_MEM_SLOTS."""

    code = R.VHOST_USER_GET_MAX_MEM_SLOTS


@_register
@dataclass(frozen=True)
class GetStatus(Request):
    """VHOST_USER_GET_STATUS."""

    code = R.VHOST_USER_GET_STATUS


@_register
@dataclass(frozen=True)
class CheckDeviceState(Request):
    """VHOST_USER_CHECK_DEVICE_STATE."""

    code = R.VHOST_USER_CHECK_DEVICE_STATE


# -- one u64 -----------------------------------------------------------------------


@_register
@dataclass(frozen=True)
class SetFeatures(Request):
    """VHOST_USER_SET_FEATURES."""

    code = R.VHOST_USER_SET_FEATURES
    features: int


@_register
@dataclass(frozen=True)
class SetProtocolFeatures(Request):
    """VHOST_USER_SET_PROTOCOL_FEATURES."""

    code = R.VHOST_USER_SET_PROTOCOL_FEATURES
    features: int


@_register
@dataclass(frozen=True)
class NetSetMtu(Request):
    """VHOST_USER_NET_SET_MTU."""

    code = R.VHOST_USER_NET_SET_MTU
    mtu: int


@_register
@dataclass(frozen=True)
class SetStatus(Request):
    """VHOST_USER_SET_STATUS: the device status byte in a u64."""

    code = R.VHOST_USER_SET_STATUS
    status: int


@_register
@dataclass(frozen=True)
class SendRarp(Request):
    """VHOST_USER_SEND_RARP: the guest MAC to announce."""

    code = R.VHOST_USER_SEND_RARP
    mac: bytes


# -- vring state, file and address ---------------------------------------------------


@dataclass(frozen=True)
class _VringState(Request):
    index: int
    num: int


@_register
@dataclass(frozen=True)
class SetVringNum(_VringState):
    """VHOST_USER_SET_VRING_NUM: ``num`` is the ring size."""

    code = R.VHOST_USER_SET_VRING_NUM


@_register
@dataclass(frozen=True)
class SetVringBase(_VringState):
    """VHOST_USER_SET_VRING_BASE: ``num`` is the next avail index."""

    code = R.VHOST_USER_SET_VRING_BASE


@_register
@dataclass(frozen=True)
class GetVringBase(_VringState):
    """VHOST_USER_GET_VRING_BASE (``num`` unused)."""

    code = R.VHOST_USER_GET_VRING_BASE


@_register
@dataclass(frozen=True)
class SetVringEnable(_VringState):
    """VHOST_USER_SET_VRING_ENABLE: ``num`` is 1 (enable) or 0."""

    code = R.VHOST_USER_SET_VRING_ENABLE


@_register
@dataclass(frozen=True)
class SetVringEndian(_VringState):
    """VHOST_USER_SET_VRING_ENDIAN (legacy devices only)."""

    code = R.VHOST_USER_SET_VRING_ENDIAN


@_register
@dataclass(frozen=True)
class VringKick(_VringState):
    """VHOST_USER_VRING_KICK (in-band notification)."""

    code = R.VHOST_USER_VRING_KICK


@dataclass(frozen=True)
class _VringFile(Request):
    index: int
    invalid_fd: bool = False


@_register
@dataclass(frozen=True)
class SetVringKick(_VringFile):
    """VHOST_USER_SET_VRING_KICK: an eventfd, or none with the invalid-fd bit (poll)."""

    code = R.VHOST_USER_SET_VRING_KICK


@_register
@dataclass(frozen=True)
class SetVringCall(_VringFile):
    """VHOST_USER_SET_VRING_CALL."""

    code = R.VHOST_USER_SET_VRING_CALL


@_register
@dataclass(frozen=True)
class SetVringErr(_VringFile):
    """VHOST_USER_SET_VRING_ERR."""

    code = R.VHOST_USER_SET_VRING_ERR


@_register
@dataclass(frozen=True)
class SetVringAddr(Request):
    """VHOST_USER_SET_VRING_ADDR: user addresses, or IOVAs with ACCESS_PLATFORM."""

    code = R.VHOST_USER_SET_VRING_ADDR
    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int = 0


# -- memory ------------------------------------------------------------------------------


@_register
@dataclass(frozen=True)
class SetMemTable(Request):
    """VHOST_USER_SET_MEM_TABLE: ``regions`` with one fd each, in order."""

    code = R.VHOST_USER_SET_MEM_TABLE
    regions: tuple[MemRegion, ...]


@_register
@dataclass(frozen=True)
class AddMemReg(Request):
    """VHOST_USER_ADD_MEM_REG: one region and its fd."""

    code = R.VHOST_USER_ADD_MEM_REG
    region: MemRegion


@_register
@dataclass(frozen=True)
class RemMemReg(Request):
    """VHOST_USER_REM_MEM_REG: one region (an fd, if any, is to be closed unused)."""

    code = R.VHOST_USER_REM_MEM_REG
    region: MemRegion


@_register
@dataclass(frozen=True)
class SetLogBase(Request):
    """VHOST_USER_SET_LOG_BASE: the shared dirty log's size and offset in its fd."""

    code = R.VHOST_USER_SET_LOG_BASE
    mmap_size: int
    mmap_offset: int


# -- config, inflight, IOTLB, device state ---------------------------------------------


@dataclass(frozen=True)
class _Config(Request):
    offset: int
    flags: int
    payload: bytes

    @property
    def size(self) -> int:
        """Bytes of config space accessed."""
        return len(self.payload)


@_register
@dataclass(frozen=True)
class GetConfig(_Config):
    """VHOST_USER_GET_CONFIG: ``payload`` is as long as the access (its bytes unused)."""

    code = R.VHOST_USER_GET_CONFIG


@_register
@dataclass(frozen=True)
class SetConfig(_Config):
    """VHOST_USER_SET_CONFIG: ``payload`` holds the bytes to write."""

    code = R.VHOST_USER_SET_CONFIG


@dataclass(frozen=True)
class _Inflight(Request):
    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int


@_register
@dataclass(frozen=True)
class GetInflightFd(_Inflight):
    """VHOST_USER_GET_INFLIGHT_FD: the front-end's ``num_queues`` and ``queue_size``."""

    code = R.VHOST_USER_GET_INFLIGHT_FD


@_register
@dataclass(frozen=True)
class SetInflightFd(_Inflight):
    """VHOST_USER_SET_INFLIGHT_FD: the region a previous back-end shared, and its fd."""

    code = R.VHOST_USER_SET_INFLIGHT_FD


@_register
@dataclass(frozen=True)
class IotlbMsgRequest(Request):
    """VHOST_USER_IOTLB_MSG: an UPDATE or INVALIDATE from the front-end's IOMMU."""

    code = R.VHOST_USER_IOTLB_MSG
    iova: int
    size: int
    uaddr: int
    perm: IotlbPerm
    type: IotlbType


@_register
@dataclass(frozen=True)
class SetDeviceStateFd(Request):
    """VHOST_USER_SET_DEVICE_STATE_FD: a pipe end to save state to or load it from."""

    code = R.VHOST_USER_SET_DEVICE_STATE_FD
    direction: TransferDirection
    phase: MigrationPhase

