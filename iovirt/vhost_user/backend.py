"""The vhost-user back-end session: front-end requests applied to one device.

A :class:`BackendSession` is the state of one front-end connection: the
features it negotiated and the device status it set; the memory table
(:mod:`iovirt.vhost_user.memtable`) and the vrings
(:mod:`iovirt.vhost_user.vrings`) it set up; the inflight region it shares;
the dirty log (:mod:`iovirt.vhost_user.migration_log`) and device-state
transfer (:mod:`iovirt.vhost_user.state_migration`) of a migration.
:meth:`BackendSession.handle` takes one typed request
(:mod:`iovirt.vhost_user.requests`) and returns the reply payload (or
``None``) with the fds to send, or raises :class:`RequestRefused` so the
server NACKs it.  Every request is validated before it touches state.

The device is reached only through its
:class:`~iovirt.vhost_user.device.VhostUserDevice` adapter, and outlives
sessions: a front-end that reconnects (QEMU ``reconnect=1``) gets the same
device, reset, and sets it up again.
"""

from __future__ import annotations

import fcntl
import logging
import os
from typing import Any, Callable

from iovirt.memory import GuestMemoryError
from iovirt.vhost_user.channel import BackendChannel
from iovirt.vhost_user.dataplane import DataPlane
from iovirt.vhost_user.fds import close_fds
from iovirt.vhost_user.device import NotSupported, VhostUserDevice
from iovirt.vhost_user.errors import RequestRefused
from iovirt.vhost_user.inflight import InflightError, InflightRegion, inflight_mmap_size, min_inflight_mmap_size
from iovirt.vhost_user.iotlb import IotlbError
from iovirt.vhost_user.migration_log import MigrationLog
from iovirt.vhost_user.memtable import MAX_MEM_SLOTS, GuestMemoryTable, MemoryTableError
from iovirt.vhost_user.messages import (
    VHOST_F_LOG_ALL,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_MAX_CONFIG_SIZE,
    Config,
    Inflight,
    IotlbType,
    ProtocolFeature as PF,
    U64,
    VHOST_USER_DEVICE_STATE_NOFD,
    VringState,
)
from iovirt.vhost_user import requests as rq
from iovirt.vhost_user.state_migration import StateMigration
from iovirt.vhost_user.vrings import RingAddr, VringError, Vrings
from iovirt.virtio.defs import VIRTIO_F_ACCESS_PLATFORM
from iovirt.virtio.device import FeatureError, VirtioDevice

log = logging.getLogger("iovirt.vhost_user")

MAX_INFLIGHT_QUEUE_SIZE = 32768  # virtio 1.2 2.7: the largest split ring


class BackendSession:
    """The back-end state of one front-end connection to one device.

    ``extra_features`` are offered on top of the adapter's (``iovirt serve``
    adds VIRTIO_F_ACCESS_PLATFORM, see :mod:`iovirt.vhost_user.server`).
    ``require_sealed_memory`` refuses guest memory and inflight fds that are
    not sealed against shrinking (:class:`~iovirt.vhost_user.memtable.SealPolicy`).
    """

    def __init__(
        self,
        device: VhostUserDevice,
        dataplane: DataPlane,
        label: str = "",
        extra_features: int = 0,
        require_sealed_memory: bool = False,
    ) -> None:
        self.device = device
        self.dataplane = dataplane
        self.label = label or device.label
        self.table = GuestMemoryTable(self.label, self._memory_changed, require_sealed_memory)
        self.vrings = Vrings(device, dataplane, self.table, self.label)
        self.features = 0
        # VHOST_F_LOG_ALL: dirty logging for migration (QEMU blocks migration without it).
        self.offered_features = (
            device.features() | (1 << VHOST_USER_F_PROTOCOL_FEATURES) | (1 << VHOST_F_LOG_ALL) | extra_features
        )
        self.supported_protocol_features = device.protocol_features
        self.protocol_features = 0
        self.status = 0
        self.inflight_fd: int | None = None
        self.inflight_map: InflightRegion | None = None
        self.migration_log = MigrationLog(self.label, self.table, self.vrings)
        self.state_migration = StateMigration(self.label, device, self.vrings, dataplane)
        device.device.on_needs_reset = self._device_failed
        device.device.call_later = dataplane.call_later
        device.device.requeue = self.vrings.requeue
        if device.wake_fd is not None:
            dataplane.add_eventfd(device.wake_fd, self.vrings.wake)
        self._handlers: dict[type[rq.Request], Callable[[Any], object]] = {
            rq.GetFeatures: lambda req: U64(self.offered_features),
            rq.SetFeatures: self._set_features,
            rq.GetProtocolFeatures: lambda req: U64(self.supported_protocol_features),
            rq.SetProtocolFeatures: self._set_protocol_features,
            # Spec: SET_OWNER marks the start of a session, which is one connection here.
            rq.SetOwner: lambda req: None,
            # Deprecated; the spec recommends treating it as "disable all rings".
            rq.ResetOwner: lambda req: self.vrings.enable_all(False),
            rq.SetMemTable: lambda req: self.table.set_table(req.regions, req.fds),
            rq.GetMaxMemSlots: lambda req: U64(MAX_MEM_SLOTS),
            rq.AddMemReg: lambda req: self.table.add(req.region, req.fds),
            rq.RemMemReg: lambda req: self.table.remove(req.region, req.fds),
            rq.SetVringNum: lambda req: self.vrings.set_num(req.index, req.num),
            rq.SetVringAddr: lambda req: self.vrings.set_addr(
                req.index,
                RingAddr(req.desc_user_addr, req.avail_user_addr, req.used_user_addr, req.flags, req.log_guest_addr),
            ),
            rq.SetVringBase: lambda req: self.vrings.set_base(req.index, req.num),
            rq.GetVringBase: lambda req: VringState(req.index, self.vrings.get_base(req.index)),
            rq.SetVringKick: lambda req: self.vrings.set_kick(req.index, _fd(req)),
            rq.SetVringCall: lambda req: self.vrings.set_eventfd(req.index, "call_fd", _fd(req)),
            rq.SetVringErr: lambda req: self.vrings.set_eventfd(req.index, "err_fd", _fd(req)),
            rq.GetQueueNum: lambda req: U64(device.queue_num),
            rq.SetVringEnable: self._set_vring_enable,
            rq.GetConfig: self._get_config,
            rq.SetConfig: self._set_config,
            rq.SetStatus: self._set_status,
            rq.GetStatus: lambda req: U64(self.status),
            rq.ResetDevice: self._reset_device,
            rq.NetSetMtu: lambda req: device.set_mtu(req.mtu),
            rq.SendRarp: lambda req: device.announce(req.mac),
            rq.GetInflightFd: self._get_inflight_fd,
            rq.SetInflightFd: self._set_inflight_fd,
            rq.SetBackendReqFd: self._set_backend_req_fd,
            rq.IotlbMsgRequest: self._iotlb_msg,
            rq.SetLogBase: self._set_log_base,
            rq.SetLogFd: lambda req: self.migration_log.set_fd(req.fds[0]),
            rq.SetDeviceStateFd: self._set_device_state_fd,
            rq.CheckDeviceState: self._check_device_state,
        }

    # -- dispatch ----------------------------------------------------------------
    def handle(self, req: rq.Request) -> tuple[object | None, list[int]]:
        """Apply ``req``; returns (reply payload or None, fds to send with the reply).

        Raises :class:`RequestRefused`; the request's fds are closed then, here
        and only here: a handler takes an fd over (stores or closes it) only
        once the request has succeeded.
        """
        handler = self._handlers.get(type(req))
        try:
            if handler is None:
                raise RequestRefused(req.code, "not supported by this back-end")
            with self.dataplane.lock:
                try:
                    result = handler(req)
                except (MemoryTableError, VringError, IotlbError, FeatureError, NotSupported, ValueError) as exc:
                    raise RequestRefused(req.code, str(exc)) from exc
        except RequestRefused:
            close_fds(req.fds)
            raise
        if isinstance(result, tuple):
            return result
        return result, []

    def close(self) -> None:
        """The front-end went away: stop every ring, drop the memory, reset the device."""
        if self.vrings.iotlb is not None:
            stats = self.vrings.iotlb.stats
            log.info("%s: IOTLB: %s", self.label, ", ".join(f"{v} {k}" for k, v in stats.items()))
        if self.device.wake_fd is not None:
            self.dataplane.remove(self.device.wake_fd)
        with self.dataplane.lock:
            self.vrings.close()
            self.device.reset()
            self.migration_log.drop()
            self.table.close()
            self._drop_inflight()
            self.state_migration.drop()
        self.device.device.on_needs_reset = None
        self.device.device.call_later = None
        self.device.device.requeue = None

    def _memory_changed(self) -> None:
        self.vrings.refresh()
        self.migration_log.check_coverage()

    def _device_failed(self, device: VirtioDevice, error: Exception) -> None:
        self.vrings.signal_errors()

    # -- features ------------------------------------------------------------------
    def _set_features(self, req: rq.SetFeatures) -> None:
        features = req.features
        if features & ~self.offered_features:
            raise RequestRefused(req.code, f"features {features & ~self.offered_features:#x} were not offered")
        access_platform = bool(features >> VIRTIO_F_ACCESS_PLATFORM & 1)
        started = self.vrings.any_started
        if access_platform != (self.vrings.iotlb is not None) and started:
            raise RequestRefused(req.code, "VIRTIO_F_ACCESS_PLATFORM cannot change while rings are started")
        self.device.set_features(features)
        self.features = features
        if not started:
            # A fresh IOTLB per start, as Linux's vhost: while the device was
            # stopped the front-end forwarded no invalidations.
            self.vrings.use_iotlb(access_platform)
        # Spec: without VHOST_USER_F_PROTOCOL_FEATURES rings are enabled immediately.
        self.vrings.auto_enable = not features >> VHOST_USER_F_PROTOCOL_FEATURES & 1
        if self.vrings.auto_enable:
            self.vrings.enable_all(True)
        log_all = bool(features >> VHOST_F_LOG_ALL & 1)
        if log_all != self.vrings.log_all:
            # LOG_ALL without a log is accepted, as QEMU restarting a device during a
            # migration sends SET_FEATURES before SET_LOG_BASE; the rings wait for the log.
            self.vrings.set_logging(log_all, self.vrings.dirty_log)
        log.info("%s: negotiated features %#x", self.label, features)

    def _set_protocol_features(self, req: rq.SetProtocolFeatures) -> None:
        unoffered = req.features & ~self.supported_protocol_features
        if unoffered:
            raise RequestRefused(req.code, f"protocol features {unoffered:#x} not offered")
        self.protocol_features = req.features
        log.info("%s: negotiated protocol features %#x", self.label, req.features)

    def _set_vring_enable(self, req: rq.SetVringEnable) -> None:
        if req.num not in (0, 1):
            raise RequestRefused(req.code, f"enable value {req.num} is not 0 or 1")
        self.vrings.enable(req.index, bool(req.num))

    # -- config, status, reset ----------------------------------------------------------
    def _check_config(self, req: rq.GetConfig | rq.SetConfig) -> None:
        if req.offset + req.size > VHOST_USER_MAX_CONFIG_SIZE:
            raise RequestRefused(req.code, f"config access [{req.offset}, +{req.size}) beyond 256 bytes")

    def _get_config(self, req: rq.GetConfig) -> Config:
        self._check_config(req)
        return Config(req.offset, req.flags, self.device.read_config(req.offset, req.size))

    def _set_config(self, req: rq.SetConfig) -> None:
        self._check_config(req)
        if not self.device.write_config(req.offset, req.payload):
            raise RequestRefused(req.code, f"config bytes [{req.offset}, +{req.size}) are read-only")

    def _set_status(self, req: rq.SetStatus) -> None:
        self.status = req.status & 0xFF

    def _reset_device(self, req: rq.ResetDevice) -> None:
        # Spec: disable all rings and reset all internal device state; ownership stays.
        self.vrings.reset()
        self.device.reset()
        self.features = 0
        self.status = 0
        self.vrings.use_iotlb(False)
        self.vrings.set_logging(False, self.vrings.dirty_log)

    # -- inflight ("Inflight I/O tracking") ------------------------------------------------
    def _check_inflight(self, req: rq.GetInflightFd | rq.SetInflightFd) -> None:
        """Refuse an inflight region this session cannot use, before anything is mapped."""
        # Spec: "only sent if VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD ... has been successfully negotiated".
        if not self.protocol_features >> PF.VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD & 1:
            raise RequestRefused(req.code, "VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD was not negotiated")
        if not 0 < req.num_queues <= len(self.vrings.rings) or not 0 < req.queue_size <= MAX_INFLIGHT_QUEUE_SIZE:
            raise RequestRefused(req.code, f"{req.num_queues} queues of {req.queue_size} is not this device's")
        # A running ring's wrapper writes into the current region: it may change only between starts.
        if self.vrings.any_started:
            raise RequestRefused(req.code, "the inflight region cannot change while rings are started")
        try:
            self.vrings.check_inflight_size(req.num_queues, req.queue_size)
        except VringError as exc:
            raise RequestRefused(req.code, str(exc)) from exc

    def _get_inflight_fd(self, req: rq.GetInflightFd) -> tuple[Inflight, list[int]]:
        self._check_inflight(req)
        size = inflight_mmap_size(req.num_queues, req.queue_size)
        fd = os.memfd_create("iovirt-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            # Sealed, so that the front-end can hand it back with SET_INFLIGHT_FD under any seal policy.
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            self._use_inflight(req, fd, size, 0, fresh=True)
        except BaseException:
            os.close(fd)
            raise
        # The server closes what it sends: send a duplicate, keep ours.
        return Inflight(size, 0, req.num_queues, req.queue_size), [os.dup(fd)]

    def _set_inflight_fd(self, req: rq.SetInflightFd) -> None:
        self._check_inflight(req)
        needed = min_inflight_mmap_size(req.num_queues, req.queue_size)
        if needed > req.mmap_size:
            raise RequestRefused(
                req.code, f"inflight region of {req.mmap_size} bytes too small for its queues (needs {needed})"
            )
        self._use_inflight(req, req.fds[0], req.mmap_size, req.mmap_offset, fresh=False)

    def _use_inflight(
        self, req: rq.GetInflightFd | rq.SetInflightFd, fd: int, size: int, offset: int, fresh: bool
    ) -> None:
        """Map ``fd`` as the inflight region; takes ``fd`` over only if that worked.

        The fd is checked before it is mapped, and must pass the seal policy
        (the data plane writes the region on every request).
        """
        try:
            region = InflightRegion(fd, size, offset, req.num_queues, req.queue_size, fresh)
        except (GuestMemoryError, InflightError) as exc:
            raise RequestRefused(req.code, f"cannot map the inflight region: {exc}") from exc
        try:
            self.table.seals.admit(region.fd_info, fd, "inflight region")
        except MemoryTableError as exc:
            region.close()
            raise RequestRefused(req.code, str(exc)) from exc
        self._drop_inflight()
        self.inflight_fd = fd
        self.inflight_map = region
        self.vrings.use_inflight(region.queues)

    def _drop_inflight(self) -> None:
        if self.inflight_map is not None:
            self.inflight_map.close()
            self.inflight_map = None
        close_fds([self.inflight_fd])
        self.inflight_fd = None

    # -- dirty logging and device state (vhost-user.rst "Migration") -------------------------
    def _set_log_base(self, req: rq.SetLogBase) -> U64:
        # Spec: the fd comes "when the back-end has VHOST_USER_PROTOCOL_F_LOG_SHMFD".
        if not self.protocol_features >> PF.VHOST_USER_PROTOCOL_F_LOG_SHMFD & 1:
            raise RequestRefused(req.code, "VHOST_USER_PROTOCOL_F_LOG_SHMFD was not negotiated")
        self.migration_log.set_base(req.mmap_size, req.mmap_offset, req.fds[0])
        return U64(0)

    def _set_device_state_fd(self, req: rq.SetDeviceStateFd) -> U64:
        if not self.protocol_features >> PF.VHOST_USER_PROTOCOL_F_DEVICE_STATE & 1:
            raise RequestRefused(req.code, "VHOST_USER_PROTOCOL_F_DEVICE_STATE was not negotiated")
        self.state_migration.start(req.fds[0], req.direction)
        # The front-end's channel is used: no fd of ours in the reply.
        return U64(VHOST_USER_DEVICE_STATE_NOFD)

    def _check_device_state(self, req: rq.CheckDeviceState) -> U64:
        self.state_migration.check()
        return U64(0)

    # -- IOMMU (vhost-user.rst "IOMMU support") ---------------------------------------
    def _set_backend_req_fd(self, req: rq.SetBackendReqFd) -> None:
        try:
            channel = BackendChannel(req.fds[0], self.label)
        except OSError as exc:
            raise RequestRefused(req.code, f"fd {req.fds[0]} is not a socket: {exc}") from exc
        if self.vrings.backend_channel is not None:
            self.vrings.backend_channel.close()
        self.vrings.backend_channel = channel

    def _iotlb_msg(self, req: rq.IotlbMsgRequest) -> U64:
        iotlb = self.vrings.iotlb
        if iotlb is None:
            raise RequestRefused(req.code, "VIRTIO_F_ACCESS_PLATFORM was not negotiated: there is no IOTLB")
        log.debug("%s: IOTLB %s iova %#x size %#x uaddr %#x %s", self.label, req.type.name, req.iova, req.size,
                  req.uaddr, req.perm.name)
        if req.type == IotlbType.VHOST_IOTLB_UPDATE:
            touched = self.vrings.touching(req.iova, req.size)
            iotlb.update(req.iova, req.size, req.uaddr, req.perm)
            # A remapped ring page: the ring re-resolves its host pointers.
            self.vrings.refresh(touched)
        elif req.type == IotlbType.VHOST_IOTLB_INVALIDATE:
            for vring in self.vrings.touching(req.iova, req.size):
                self.vrings.suspend(vring)
            iotlb.invalidate(req.iova, req.size)
        else:
            raise RequestRefused(req.code, f"{req.type.name} is a back-end message; expected UPDATE or INVALIDATE")
        return U64(0)


def _fd(req: rq.SetVringKick | rq.SetVringCall | rq.SetVringErr) -> int | None:
    """The eventfd of a SET_VRING_KICK/CALL/ERR, or None with the no-fd bit."""
    return None if req.invalid_fd else req.fds[0]
