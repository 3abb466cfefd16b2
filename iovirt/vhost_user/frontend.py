"""A vhost-user front-end (client) over a real UNIX socket.

:class:`VhostUserFrontend` plays the VMM's part: it creates guest memory as
memfd regions and shares it with ``SET_MEM_TABLE`` / ``ADD_MEM_REG``, sets up
vrings with eventfds for kick/call/err, and negotiates features, passing fds
with ``socket.send_fds`` and receiving replies (and their fds) with
``socket.recv_fds``.  It only moves bytes and fds: building requests,
framing and checking replies is
:class:`~iovirt.vhost_user.protocol.FrontendConnection`'s.  Every wait is
bounded by a timeout.  It is used by the tests, the packet bench and the
conformance suite.

Three levels:

* raw - :meth:`~VhostUserFrontend.send_raw` any bytes and fds (malformed
  messages for bad-input tests), :meth:`~VhostUserFrontend.send` one message
  with any flags, :meth:`~VhostUserFrontend.recv_message` /
  :meth:`~VhostUserFrontend.wait_closed`;
* :meth:`~VhostUserFrontend.call` - send a request and collect the reply the
  spec says is due (a reply body, or a REPLY_ACK ack, see
  :func:`iovirt.vhost_user.protocol.reply_kind`);
* helpers named after the requests (``get_features``, ``set_mem_table``,
  ``set_vring_kick``, ...); the VMM's bring-up sequence built from them is
  :mod:`iovirt.vhost_user.bringup`.

Memory regions get a user address (``userspace_addr``) of
``USER_ADDR_BASE + gpa``, deliberately different from the guest-physical
address, so that a backend confusing the two fails.  Ring addresses given to
:meth:`~VhostUserFrontend.set_vring_addr` are guest-physical and sent as
those user addresses, as QEMU does.
"""

from __future__ import annotations

import os
import select
import socket
import time
from typing import Sequence

from iovirt.memory import GuestMemory, MemoryRegion
from iovirt.vhost_user.errors import (
    BackendClosedError,
    BadReplyError,
    NackError,
    ReplyTimeoutError,
)
from iovirt.vhost_user.framing import Message, ProtocolFailure
from iovirt.vhost_user.messages import (
    VHOST_MEMORY_BASELINE_NREGIONS,
    VHOST_USER_DEVICE_STATE_NOFD,
    Config,
    DeviceStateTransfer,
    FrontendRequest,
    Inflight,
    IotlbMsg,
    Log,
    MemoryTable,
    MemRegion,
    Payload,
    ProtocolFeature,
    Rarp,
    SingleMemRegion,
    U64,
    VringAddr,
    VringFile,
    VringState,
)
from iovirt.vhost_user.protocol import FrontendConnection, Reply, ReplyKind
from iovirt.virtio.defs import VIRTIO_F_ACCESS_PLATFORM

R = FrontendRequest

DEFAULT_TIMEOUT = 5.0
"""Seconds to wait for a connection or a reply unless told otherwise."""

USER_ADDR_BASE = 0x7F00_0000_0000
"""Base of the synthetic VMM user addresses given to memory regions."""

MAX_REPLY_FDS = VHOST_MEMORY_BASELINE_NREGIONS
"""Replies carry at most 8 fds (as back-end messages with BACKEND_SEND_FD)."""


class VhostUserFrontend:
    """The front-end side of one vhost-user connection.

    Build with :meth:`connect` (a listening backend's socket path) or from a
    connected socket (e.g. one end of ``socket.socketpair()``).  Closing it
    closes the socket and every fd and memory region it created.
    """

    def __init__(self, sock: socket.socket, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.sock = sock
        self.timeout = timeout
        self.conn = FrontendConnection()
        """The sans-I/O side: request bytes out, framed and checked replies in."""
        self.features = 0
        """Virtio features set with :meth:`set_features`."""
        self.status = 0
        """Device status last set with :meth:`set_status`."""
        self.memory = GuestMemory()
        """The guest memory this front-end shares (driver-side view)."""
        self._region_fds: dict[int, int] = {}
        self.kick_fds: dict[int, int] = {}
        """Kick eventfds by vring index (write to kick)."""
        self.call_fds: dict[int, int] = {}
        """Call eventfds by vring index (readable when the backend signals)."""
        self.err_fds: dict[int, int] = {}
        """Error eventfds by vring index."""

    @classmethod
    def connect(cls, path: str, timeout: float = DEFAULT_TIMEOUT) -> "VhostUserFrontend":
        """Connect to a backend listening on ``path``, retrying until ``timeout``.

        Retrying covers a backend that is still starting up.
        """
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout)
                sock.connect(path)
                return cls(sock, timeout)
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.02)
            except BaseException:
                sock.close()
                raise

    def close(self) -> None:
        """Close the socket, the eventfds and the guest memory."""
        self.sock.close()
        for table in (self.kick_fds, self.call_fds, self.err_fds, self._region_fds):
            for fd in table.values():
                os.close(fd)
            table.clear()
        self.memory.close()

    def __enter__(self) -> "VhostUserFrontend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- raw messages ------------------------------------------------------------
    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send ``data`` with ``fds`` attached to its first byte (one ``sendmsg``).

        Sends anything, including truncated or malformed messages.
        """
        self.sock.settimeout(self.timeout)
        sent = socket.send_fds(self.sock, [data], list(fds)) if fds else self.sock.send(data)
        if sent < len(data):
            self.sock.sendall(data[sent:])

    def send(
        self,
        request: int,
        payload: Payload | bytes | None = None,
        fds: Sequence[int] = (),
        *,
        need_reply: bool = False,
        flags: int | None = None,
    ) -> None:
        """Send one message; ``flags`` overrides version/need_reply (for bad input)."""
        self.send_raw(self.conn.request(request, payload, need_reply=need_reply, flags=flags), fds)

    def recv_message(self, timeout: float | None = None, request: int | None = None) -> Message:
        """Read one whole message (header, payload bytes and the fds that came with it).

        Reads at most :attr:`FrontendConnection.bytes_needed` at a time, so
        that fds stay with their message.  Raises :class:`ReplyTimeoutError`,
        :class:`BackendClosedError` (naming ``request``, the one awaited), or
        :class:`BadReplyError` when the stream can no longer be framed.
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ReplyTimeoutError(request, self.timeout)
            self.sock.settimeout(remaining)
            try:
                chunk, fds, _flags, _addr = socket.recv_fds(self.sock, self.conn.bytes_needed, MAX_REPLY_FDS)
            except socket.timeout:
                raise ReplyTimeoutError(request, self.timeout) from None
            if not chunk:
                _close(self.conn.feed_eof().fds + tuple(fds))
                raise BackendClosedError(request)
            for framed in self.conn.feed(chunk, fds):
                if isinstance(framed, ProtocolFailure):
                    _close(framed.fds)
                    code = framed.error.request
                    assert code is not None  # a fatal header names its request
                    raise BadReplyError(code, str(framed.error)) from framed.error
                return framed  # bounded reads complete at most one message

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Whether the backend closes the connection within ``timeout`` (data read meanwhile is dropped)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.sock.settimeout(remaining)
            try:
                chunk, fds, _flags, _addr = socket.recv_fds(self.sock, 4096, MAX_REPLY_FDS)
            except socket.timeout:
                return False
            except ConnectionResetError:
                return True
            _close(fds)
            if not chunk:
                return True

    # -- request / reply ---------------------------------------------------------
    @property
    def protocol_features(self) -> int:
        """Protocol features set with :meth:`set_protocol_features`."""
        return self.conn.protocol_features

    @property
    def reply_ack(self) -> bool:
        """Whether REPLY_ACK was negotiated."""
        return bool(self.protocol_features & (1 << ProtocolFeature.VHOST_USER_PROTOCOL_F_REPLY_ACK))

    def recv_reply(self, request: int, timeout: float | None = None) -> Reply:
        """Read the reply to ``request``: an explicit reply body, or a u64 ack.

        Checks it with :meth:`FrontendConnection.reply` (request code, REPLY
        bit, payload syntax); raises :class:`BadReplyError` otherwise.
        """
        message = self.recv_message(timeout, request)
        try:
            return self.conn.reply(message, request)
        except BaseException:
            _close(message.fds)
            raise

    def call(
        self,
        request: int,
        payload: Payload | bytes | None = None,
        fds: Sequence[int] = (),
        *,
        need_reply: bool | None = None,
        timeout: float | None = None,
    ) -> Reply | None:
        """Send a request and wait for the reply the spec says is due.

        ``need_reply`` defaults to "REPLY_ACK negotiated", so every request
        is confirmed when it can be.  Returns the reply body (``Reply``), or
        ``None`` when no reply is due; a non-zero ack raises :class:`NackError`.
        """
        if need_reply is None:
            need_reply = self.reply_ack
        kind = self.conn.reply_due(request, need_reply)
        self.send(request, payload, fds, need_reply=need_reply)
        if kind is ReplyKind.NONE:
            return None
        reply = self.recv_reply(request, timeout)
        if kind is ReplyKind.ACK:
            self.conn.check_ack(request, reply)
        return reply

    def _call_body(self, request: int, payload: Payload | None = None) -> Payload:
        reply = self.call(request, payload)
        assert reply is not None and reply.payload is not None
        for fd in reply.fds:
            os.close(fd)
        return reply.payload

    def _call_u64(self, request: int) -> int:
        payload = self._call_body(request)
        assert isinstance(payload, U64)
        return payload.value

    # -- features and ownership ---------------------------------------------------
    def get_features(self) -> int:
        """VHOST_USER_GET_FEATURES."""
        return self._call_u64(R.VHOST_USER_GET_FEATURES)

    def set_features(self, features: int) -> None:
        """VHOST_USER_SET_FEATURES; remembered in :attr:`features`."""
        self.call(R.VHOST_USER_SET_FEATURES, U64(features))
        self.features = features

    def get_protocol_features(self) -> int:
        """VHOST_USER_GET_PROTOCOL_FEATURES."""
        return self._call_u64(R.VHOST_USER_GET_PROTOCOL_FEATURES)

    def set_protocol_features(self, features: int) -> None:
        """VHOST_USER_SET_PROTOCOL_FEATURES; remembered in :attr:`protocol_features`."""
        # Never with need_reply (as QEMU): whether REPLY_ACK applies to this
        # very message is what is being negotiated.
        self.call(R.VHOST_USER_SET_PROTOCOL_FEATURES, U64(features), need_reply=False)

    def set_owner(self) -> None:
        """VHOST_USER_SET_OWNER."""
        self.call(R.VHOST_USER_SET_OWNER)

    def reset_owner(self) -> None:
        """VHOST_USER_RESET_OWNER (deprecated)."""
        self.call(R.VHOST_USER_RESET_OWNER)

    def reset_device(self) -> None:
        """VHOST_USER_RESET_DEVICE."""
        self.call(R.VHOST_USER_RESET_DEVICE)

    def get_queue_num(self) -> int:
        """VHOST_USER_GET_QUEUE_NUM."""
        return self._call_u64(R.VHOST_USER_GET_QUEUE_NUM)

    def get_status(self) -> int:
        """VHOST_USER_GET_STATUS."""
        return self._call_u64(R.VHOST_USER_GET_STATUS)

    def set_status(self, status: int) -> None:
        """VHOST_USER_SET_STATUS; remembered in :attr:`status`."""
        self.call(R.VHOST_USER_SET_STATUS, U64(status))
        self.status = status

    def net_set_mtu(self, mtu: int) -> None:
        """VHOST_USER_NET_SET_MTU."""
        self.call(R.VHOST_USER_NET_SET_MTU, U64(mtu))

    def send_rarp(self, mac: bytes) -> None:
        """VHOST_USER_SEND_RARP."""
        self.call(R.VHOST_USER_SEND_RARP, Rarp(mac))

    # -- guest memory ----------------------------------------------------------------
    def add_region(self, gpa: int, size: int) -> MemoryRegion:
        """Create a memfd-backed guest region (not yet sent to the backend)."""
        region, fd = MemoryRegion.memfd(gpa, size, name=f"iovirt-guest-{gpa:#x}")
        try:
            self.memory.add_region(region)
        except BaseException:
            region.close()
            os.close(fd)
            raise
        self._region_fds[gpa] = fd
        return region

    def region_fd(self, region: MemoryRegion) -> int:
        """The memfd backing ``region`` (owned by the front-end)."""
        return self._region_fds[region.gpa]

    @staticmethod
    def region_desc(region: MemoryRegion) -> MemRegion:
        """The wire description of ``region`` (mmap offset 0 in its memfd, user address USER_ADDR_BASE + gpa)."""
        return MemRegion(region.gpa, region.size, USER_ADDR_BASE + region.gpa, 0)

    def user_addr(self, gpa: int) -> int:
        """The user address of guest-physical ``gpa`` (for ring addresses)."""
        if self.memory.find_region(gpa) is None:
            raise ValueError(f"guest address {gpa:#x} is in no region of this front-end")
        return USER_ADDR_BASE + gpa

    def set_mem_table(self, regions: Sequence[MemoryRegion] | None = None) -> None:
        """VHOST_USER_SET_MEM_TABLE with ``regions`` (default: all) and one fd each."""
        regions = list(self.memory.regions if regions is None else regions)
        table = MemoryTable(tuple(self.region_desc(r) for r in regions))
        self.call(R.VHOST_USER_SET_MEM_TABLE, table, [self.region_fd(r) for r in regions])

    def get_max_mem_slots(self) -> int:
        """VHOST_USER_GET_MAX_MEM_SLOTS."""
        return self._call_u64(R.VHOST_USER_GET_MAX_MEM_SLOTS)

    def add_mem_reg(self, region: MemoryRegion) -> None:
        """VHOST_USER_ADD_MEM_REG for ``region``, with its fd."""
        self.call(R.VHOST_USER_ADD_MEM_REG, SingleMemRegion(self.region_desc(region)), [self.region_fd(region)])

    def rem_mem_reg(self, region: MemoryRegion) -> None:
        """VHOST_USER_REM_MEM_REG for ``region`` (no fd, as the spec says it SHOULD)."""
        self.call(R.VHOST_USER_REM_MEM_REG, SingleMemRegion(self.region_desc(region)))

    # -- vrings --------------------------------------------------------------------
    def set_vring_num(self, index: int, num: int) -> None:
        """VHOST_USER_SET_VRING_NUM."""
        self.call(R.VHOST_USER_SET_VRING_NUM, VringState(index, num))

    def set_vring_base(self, index: int, base: int) -> None:
        """VHOST_USER_SET_VRING_BASE."""
        self.call(R.VHOST_USER_SET_VRING_BASE, VringState(index, base))

    def get_vring_base(self, index: int) -> int:
        """VHOST_USER_GET_VRING_BASE: stops the ring, returns the next avail index."""
        payload = self._call_body(R.VHOST_USER_GET_VRING_BASE, VringState(index, 0))
        assert isinstance(payload, VringState)
        if payload.index != index:
            raise BadReplyError(R.VHOST_USER_GET_VRING_BASE, f"reply is for vring {payload.index}, asked {index}")
        return payload.num

    def set_vring_addr(
        self, index: int, desc: int, avail: int, used: int, *, flags: int = 0, log_guest_addr: int = 0
    ) -> None:
        """VHOST_USER_SET_VRING_ADDR from guest-physical ring addresses (sent as user addresses).

        With VIRTIO_F_ACCESS_PLATFORM negotiated the addresses are IOVAs and
        sent as they are ("a ring address is an IOVA if VIRTIO_F_IOMMU_PLATFORM
        has been negotiated").
        """
        if self.features >> VIRTIO_F_ACCESS_PLATFORM & 1:
            addr = VringAddr(index, flags, desc, used, avail, log_guest_addr)
        else:
            addr = VringAddr(index, flags, self.user_addr(desc), self.user_addr(used), self.user_addr(avail), log_guest_addr)
        self.call(R.VHOST_USER_SET_VRING_ADDR, addr)

    def _set_vring_fd(self, request: FrontendRequest, table: dict[int, int], index: int, poll: bool) -> int | None:
        fd = None if poll else os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            self.call(request, VringFile(index, invalid_fd=poll), [] if fd is None else [fd])
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        old = table.pop(index, None)
        if old is not None:
            os.close(old)
        if fd is not None:
            table[index] = fd
        return fd

    def set_vring_kick(self, index: int, *, poll: bool = False) -> int | None:
        """VHOST_USER_SET_VRING_KICK with a new eventfd (or the no-fd bit: ``poll``)."""
        return self._set_vring_fd(R.VHOST_USER_SET_VRING_KICK, self.kick_fds, index, poll)

    def set_vring_call(self, index: int, *, poll: bool = False) -> int | None:
        """VHOST_USER_SET_VRING_CALL with a new eventfd (or the no-fd bit: ``poll``)."""
        return self._set_vring_fd(R.VHOST_USER_SET_VRING_CALL, self.call_fds, index, poll)

    def set_vring_err(self, index: int, *, poll: bool = False) -> int | None:
        """VHOST_USER_SET_VRING_ERR with a new eventfd (or the no-fd bit)."""
        return self._set_vring_fd(R.VHOST_USER_SET_VRING_ERR, self.err_fds, index, poll)

    def set_vring_enable(self, index: int, enable: bool = True) -> None:
        """VHOST_USER_SET_VRING_ENABLE."""
        self.call(R.VHOST_USER_SET_VRING_ENABLE, VringState(index, int(enable)))

    def kick(self, index: int) -> None:
        """Signal the vring's kick eventfd."""
        os.eventfd_write(self.kick_fds[index], 1)

    def wait_call(self, index: int, timeout: float | None = None) -> bool:
        """Wait (bounded) for the backend to signal the vring's call eventfd; consume it."""
        fd = self.call_fds[index]
        readable, _, _ = select.select([fd], [], [], self.timeout if timeout is None else timeout)
        if not readable:
            return False
        os.eventfd_read(fd)
        return True

    # -- config, inflight, log, IOTLB, device state ----------------------------------
    def get_config(self, offset: int, size: int, flags: int = 0) -> bytes:
        """VHOST_USER_GET_CONFIG; raises :class:`BadReplyError` on the empty (failure) reply."""
        reply = self.call(R.VHOST_USER_GET_CONFIG, Config(offset, flags, bytes(size)))
        assert reply is not None
        if not isinstance(reply.payload, Config):
            raise BadReplyError(R.VHOST_USER_GET_CONFIG, "empty payload: the backend reported failure")
        if reply.payload.size != size:
            raise BadReplyError(R.VHOST_USER_GET_CONFIG, f"{reply.payload.size} bytes, asked {size}")
        return reply.payload.payload

    def set_config(self, offset: int, data: bytes, flags: int = 0) -> None:
        """VHOST_USER_SET_CONFIG."""
        self.call(R.VHOST_USER_SET_CONFIG, Config(offset, flags, data))

    def get_inflight_fd(self, num_queues: int, queue_size: int) -> tuple[Inflight, int]:
        """VHOST_USER_GET_INFLIGHT_FD: the inflight description and its fd (caller closes)."""
        reply = self.call(R.VHOST_USER_GET_INFLIGHT_FD, Inflight(0, 0, num_queues, queue_size))
        assert reply is not None and isinstance(reply.payload, Inflight)
        if len(reply.fds) != 1:
            for fd in reply.fds:
                os.close(fd)
            raise BadReplyError(R.VHOST_USER_GET_INFLIGHT_FD, f"{len(reply.fds)} fds, expected 1")
        return reply.payload, reply.fds[0]

    def set_inflight_fd(self, inflight: Inflight, fd: int) -> None:
        """VHOST_USER_SET_INFLIGHT_FD (``fd`` stays the caller's)."""
        self.call(R.VHOST_USER_SET_INFLIGHT_FD, inflight, [fd])

    def set_log_base(self, log: Log, fd: int) -> None:
        """VHOST_USER_SET_LOG_BASE with the shared log fd; the u64 reply must be 0."""
        reply = self.call(R.VHOST_USER_SET_LOG_BASE, log, [fd])
        if reply is not None and isinstance(reply.payload, U64) and reply.payload.value != 0:
            raise NackError(R.VHOST_USER_SET_LOG_BASE, reply.payload.value)

    def set_log_fd(self, fd: int) -> None:
        """VHOST_USER_SET_LOG_FD: the eventfd the back-end signals after logging writes."""
        self.call(R.VHOST_USER_SET_LOG_FD, None, [fd])

    def set_backend_req_fd(self, fd: int) -> None:
        """VHOST_USER_SET_BACKEND_REQ_FD (``fd`` stays the caller's)."""
        self.call(R.VHOST_USER_SET_BACKEND_REQ_FD, None, [fd])

    def iotlb_msg(self, msg: IotlbMsg) -> None:
        """VHOST_USER_IOTLB_MSG; a non-zero u64 reply raises :class:`NackError`."""
        status = self._call_body(R.VHOST_USER_IOTLB_MSG, msg)
        assert isinstance(status, U64)
        if status.value != 0:
            raise NackError(R.VHOST_USER_IOTLB_MSG, status.value)

    def set_device_state_fd(self, transfer: DeviceStateTransfer, fd: int) -> int | None:
        """VHOST_USER_SET_DEVICE_STATE_FD: the backend's own channel fd, or ``None``."""
        reply = self.call(R.VHOST_USER_SET_DEVICE_STATE_FD, transfer, [fd])
        assert reply is not None and isinstance(reply.payload, U64)
        value = reply.payload.value
        if value & 0xFF:
            for extra in reply.fds:
                os.close(extra)
            raise NackError(R.VHOST_USER_SET_DEVICE_STATE_FD, value)
        if value & VHOST_USER_DEVICE_STATE_NOFD:
            for extra in reply.fds:
                os.close(extra)
            return None
        if len(reply.fds) != 1:
            for extra in reply.fds:
                os.close(extra)
            raise BadReplyError(R.VHOST_USER_SET_DEVICE_STATE_FD, f"{len(reply.fds)} fds, expected 1")
        return reply.fds[0]

    def check_device_state(self) -> None:
        """VHOST_USER_CHECK_DEVICE_STATE; a non-zero reply raises :class:`NackError`."""
        status = self._call_u64(R.VHOST_USER_CHECK_DEVICE_STATE)
        if status != 0:
            raise NackError(R.VHOST_USER_CHECK_DEVICE_STATE, status)


def _close(fds: Sequence[int]) -> None:
    for fd in fds:
        os.close(fd)
