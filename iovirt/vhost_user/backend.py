"""The vhost-user back-end: applies front-end requests to memory, vrings and a device.

A :class:`BackendSession` is the state of one front-end connection: the
memory table it handed over, the vrings it set up, the features it
negotiated.  :meth:`BackendSession.handle` takes one parsed
:class:`~iovirt.vhost_user.protocol.Request` and returns the reply payload
(or ``None``), or raises :class:`RequestRefused` so the server NACKs it.  Every
request is validated before it touches state.  Semantics follow QEMU's
``docs/interop/vhost-user.rst``:

- Rings are started by SET_VRING_KICK and stopped by GET_VRING_BASE, and
  enabled/disabled by SET_VRING_ENABLE, two independent axes.  Without
  ``VHOST_USER_F_PROTOCOL_FEATURES`` a ring is enabled as soon as it starts.
- Ring addresses are front-end virtual addresses, translated through the
  memory table's ``userspace_addr`` when the ring starts.
- With ``VIRTIO_F_ACCESS_PLATFORM`` negotiated, ring and buffer addresses are
  IOVAs ("IOMMU support"): the device sees memory through the session's
  :class:`~iovirt.vhost_user.iotlb.DeviceIotlb`, filled by IOTLB_MSG UPDATEs
  and by MISS requests on the back-end channel.  A ring whose addresses are
  not translated yet waits (misses sent) and starts when the answers arrive;
  an INVALIDATE of a running ring's pages suspends it until it is kicked again.
- The used index is read from the used ring in memory when a ring starts.

The device (:class:`~iovirt.virtio.device.VirtioDevice`) outlives sessions:
a front-end that reconnects (QEMU ``reconnect=1``) gets the same device,
reset, and sets it up again.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable

from iovirt.errors import IovirtError
from iovirt.memory import Access, GuestMemory, GuestMemoryError, MemoryRegion, TranslationPending
from iovirt.vhost_user.channel import BackendChannel
from iovirt.vhost_user.dataplane import DataPlane
from iovirt.vhost_user.inflight import InflightRegion, inflight_mmap_size
from iovirt.vhost_user.iotlb import DeviceIotlb, IotlbError
from iovirt.vhost_user.messages import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_MAX_CONFIG_SIZE,
    BackendRequest,
    Config,
    FrontendRequest as R,
    Inflight,
    IotlbMsg,
    IotlbType,
    MemoryTable,
    Rarp,
    U64,
    VringAddr,
    VringFile,
    VringState,
)
from iovirt.vhost_user.protocol import Request
from iovirt.virtio.defs import VIRTIO_F_ACCESS_PLATFORM, avail_ring_size, desc_table_size, used_ring_size
from iovirt.virtio.device import FeatureError, VirtioDevice
from iovirt.virtio.state import QueueState

log = logging.getLogger("iovirt.vhost_user")

MAX_MEM_SLOTS = 509  # as libvhost-user and rust-vmm: KVM's slot count less the VMM's own
VHOST_F_LOG_ALL = 26


class RequestRefused(IovirtError):
    """A well-formed request the back-end will not apply; the reason is logged and NACKed."""

    def __init__(self, request: R, reason: str) -> None:
        super().__init__(f"{request.name}: {reason}")
        self.request = request
        self.reason = reason


@dataclass
class Vring:
    """One vring as the front-end described it."""

    index: int
    num: int = 0
    addr: VringAddr | None = None
    base: int = 0
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    started: bool = False
    awaiting_translation: bool = False  # started, but its ring IOVAs are not in the IOTLB yet
    enabled: bool = False
    inflight: InflightRegion | None = field(default=None, repr=False)


class BackendSession:
    """The back-end state of one front-end connection to one device."""

    def __init__(
        self,
        device: VirtioDevice,
        dataplane: DataPlane,
        protocol_features: int,
        label: str = "",
        extra_features: int = 0,
    ) -> None:
        self.device = device
        self.dataplane = dataplane
        self.supported_protocol_features = protocol_features
        self.label = label or device.label
        self.memory = GuestMemory()
        self.region_refs: dict[int, int] = {}  # ADD_MEM_REG count per region (by gpa)
        self.vrings = [Vring(i) for i in range(device.num_queues)]
        self.features = 0
        self.offered_features = device.device_features() | (1 << VHOST_USER_F_PROTOCOL_FEATURES) | extra_features
        self.protocol_features = 0
        self.status = 0
        self.inflight_fd: int | None = None
        self.inflight_map: InflightRegion | None = None
        self.backend_channel: BackendChannel | None = None
        self.iotlb: DeviceIotlb | None = None
        self.dma_memory = self.memory  # what the device sees: IOVAs through the IOTLB with ACCESS_PLATFORM
        self.device.on_needs_reset = self._device_failed
        self._handlers: dict[R, Callable[[Request], object]] = {
            R.VHOST_USER_GET_FEATURES: self._get_features,
            R.VHOST_USER_SET_FEATURES: self._set_features,
            R.VHOST_USER_GET_PROTOCOL_FEATURES: self._get_protocol_features,
            R.VHOST_USER_SET_PROTOCOL_FEATURES: self._set_protocol_features,
            R.VHOST_USER_SET_OWNER: self._set_owner,
            R.VHOST_USER_RESET_OWNER: self._reset_owner,
            R.VHOST_USER_SET_MEM_TABLE: self._set_mem_table,
            R.VHOST_USER_GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
            R.VHOST_USER_ADD_MEM_REG: self._add_mem_reg,
            R.VHOST_USER_REM_MEM_REG: self._rem_mem_reg,
            R.VHOST_USER_SET_VRING_NUM: self._set_vring_num,
            R.VHOST_USER_SET_VRING_ADDR: self._set_vring_addr,
            R.VHOST_USER_SET_VRING_BASE: self._set_vring_base,
            R.VHOST_USER_GET_VRING_BASE: self._get_vring_base,
            R.VHOST_USER_SET_VRING_KICK: self._set_vring_kick,
            R.VHOST_USER_SET_VRING_CALL: self._set_vring_call,
            R.VHOST_USER_SET_VRING_ERR: self._set_vring_err,
            R.VHOST_USER_GET_QUEUE_NUM: self._get_queue_num,
            R.VHOST_USER_SET_VRING_ENABLE: self._set_vring_enable,
            R.VHOST_USER_GET_CONFIG: self._get_config,
            R.VHOST_USER_SET_CONFIG: self._set_config,
            R.VHOST_USER_SET_STATUS: self._set_status,
            R.VHOST_USER_GET_STATUS: self._get_status,
            R.VHOST_USER_RESET_DEVICE: self._reset_device,
            R.VHOST_USER_NET_SET_MTU: self._net_set_mtu,
            R.VHOST_USER_SEND_RARP: self._send_rarp,
            R.VHOST_USER_GET_INFLIGHT_FD: self._get_inflight_fd,
            R.VHOST_USER_SET_INFLIGHT_FD: self._set_inflight_fd,
            R.VHOST_USER_SET_BACKEND_REQ_FD: self._set_backend_req_fd,
            R.VHOST_USER_IOTLB_MSG: self._iotlb_msg,
        }

    # -- dispatch ----------------------------------------------------------------
    def handle(self, req: Request) -> tuple[object | None, list[int]]:
        """Apply ``req``; returns (reply payload or None, fds to send with the reply).

        Raises :class:`RequestRefused`; the request's fds are closed then, here
        and only here: a handler takes an fd over (stores or closes it) only
        once the request has succeeded.
        """
        handler = self._handlers.get(req.request)
        try:
            if handler is None:
                raise RequestRefused(req.request, "not supported by this back-end")
            with self.dataplane.lock:
                result = handler(req)
        except RequestRefused:
            _close_all(req.fds)
            raise
        if isinstance(result, tuple):
            return result
        return result, []

    def close(self) -> None:
        """The front-end went away: stop every ring, drop the memory, reset the device."""
        if self.iotlb is not None:
            log.info("%s: IOTLB: %s", self.label, ", ".join(f"{v} {k}" for k, v in self.iotlb.stats.items()))
        self.dataplane.remove_before_handler(self)
        with self.dataplane.lock:
            for vring in self.vrings:
                self._stop_ring(vring)
                for name in ("call_fd", "err_fd"):
                    _close(getattr(vring, name))
                    setattr(vring, name, None)
            self.device.reset()
            self.memory.close()
            if self.inflight_map is not None:
                self.inflight_map.close()
                self.inflight_map = None
            _close(self.inflight_fd)
            self.inflight_fd = None
            if self.backend_channel is not None:
                self.backend_channel.close()
                self.backend_channel = None
        self.device.on_needs_reset = None

    def _vring(self, req: Request, index: int) -> Vring:
        if not 0 <= index < len(self.vrings):
            raise RequestRefused(req.request, f"vring index {index} beyond the device's {len(self.vrings)} queues")
        return self.vrings[index]

    # -- features ------------------------------------------------------------------
    def _get_features(self, req: Request) -> U64:
        return U64(self.offered_features)

    def _set_features(self, req: Request) -> None:
        features = req.payload.value  # type: ignore[union-attr]
        if features & ~self.offered_features & ~(1 << VHOST_F_LOG_ALL):
            raise RequestRefused(req.request, f"features {features & ~self.offered_features:#x} were not offered")
        if features >> VHOST_F_LOG_ALL & 1:
            raise RequestRefused(req.request, "VHOST_F_LOG_ALL (dirty logging) is not supported")
        access_platform = bool(features >> VIRTIO_F_ACCESS_PLATFORM & 1)
        if access_platform != (self.iotlb is not None) and any(v.started for v in self.vrings):
            raise RequestRefused(req.request, "VIRTIO_F_ACCESS_PLATFORM cannot change while rings are started")
        try:
            self.device.set_features(features & self.device.device_features())
        except FeatureError as exc:
            raise RequestRefused(req.request, str(exc)) from exc
        self.features = features
        if not any(v.started for v in self.vrings):
            # A fresh IOTLB per start, as Linux's vhost: while the device was
            # stopped the front-end forwarded no invalidations.
            self._use_iotlb(access_platform)
        if not features >> VHOST_USER_F_PROTOCOL_FEATURES & 1:
            # Spec: without VHOST_USER_F_PROTOCOL_FEATURES rings are enabled immediately.
            for vring in self.vrings:
                self._enable(vring, True)
        log.info("%s: negotiated features %#x", self.label, features)

    def _get_protocol_features(self, req: Request) -> U64:
        return U64(self.supported_protocol_features)

    def _set_protocol_features(self, req: Request) -> None:
        value = req.payload.value  # type: ignore[union-attr]
        if value & ~self.supported_protocol_features:
            raise RequestRefused(req.request, f"protocol features {value & ~self.supported_protocol_features:#x} not offered")
        self.protocol_features = value
        log.info("%s: negotiated protocol features %#x", self.label, value)

    def _set_owner(self, req: Request) -> None:
        # Spec: marks the start of the session.  A session is one connection
        # here, so there is nothing to record.
        pass

    def _reset_owner(self, req: Request) -> None:
        # Deprecated; the spec recommends treating it as "disable all rings".
        for vring in self.vrings:
            self._enable(vring, False)

    # -- memory table ------------------------------------------------------------------
    def _map_regions(self, req: Request, regions: list, fds: tuple[int, ...]) -> list[MemoryRegion]:
        mapped: list[MemoryRegion] = []
        try:
            for region, fd in zip(regions, fds):
                if region.memory_size == 0:
                    raise RequestRefused(req.request, f"region at {region.guest_phys_addr:#x} has size 0")
                if region.guest_phys_addr + region.memory_size > 1 << 64 or region.userspace_addr + region.memory_size > 1 << 64:
                    raise RequestRefused(req.request, f"region at {region.guest_phys_addr:#x} wraps 2^64")
                try:
                    mapped.append(
                        MemoryRegion.from_fd(
                            region.guest_phys_addr,
                            region.memory_size,
                            fd,
                            region.mmap_offset,
                            user_addr=region.userspace_addr,
                        )
                    )
                except GuestMemoryError as exc:
                    raise RequestRefused(req.request, str(exc)) from exc
            _check_no_overlap(req, mapped)
        except RequestRefused:
            for m in mapped:
                m.close()
            raise
        _close_all(fds)  # the mappings keep the memory; the fds are not needed
        return mapped

    def _set_mem_table(self, req: Request) -> None:
        table: MemoryTable = req.payload  # type: ignore[assignment]
        mapped = self._map_regions(req, list(table.regions), req.fds)
        self._replace_regions(self.memory.regions, mapped)
        self.region_refs = {r.gpa: 1 for r in mapped}
        log.info(
            "%s: memory table of %d regions: %s", self.label, len(mapped),
            ", ".join(f"[{r.gpa:#x}, +{r.size:#x})" for r in mapped),
        )

    def _replace_regions(self, old: tuple[MemoryRegion, ...] | list[MemoryRegion], new: list[MemoryRegion]) -> None:
        """Swap regions under the data-path lock; rings re-resolve before old maps close."""
        for region in old:
            self.memory.remove_region(region.gpa)
        try:
            for region in new:
                self.memory.add_region(region)
        except GuestMemoryError:
            for region in new:
                if self.memory.find_region(region.gpa) is region:
                    self.memory.remove_region(region.gpa)
                region.close()
            for region in old:
                self.memory.add_region(region)
            raise
        self._refresh_rings()
        for region in old:
            region.close()

    def _refresh_rings(self) -> None:
        for vring in self.vrings:
            queue = self.device.queues[vring.index]
            if queue is None:
                continue
            try:
                queue.refresh()
            except IovirtError as exc:
                self.device.stop_queue(vring.index)
                self.device.fail(exc)

    def _get_max_mem_slots(self, req: Request) -> U64:
        return U64(MAX_MEM_SLOTS)

    def _add_mem_reg(self, req: Request) -> None:
        region = req.payload.region  # type: ignore[union-attr]
        same = self._same_region(region)
        if same is not None:
            # QEMU's vhost-user net runs one vhost_dev per queue pair on one
            # connection, and each adds the same regions: count, do not refuse.
            _close_all(req.fds)
            self.region_refs[same.gpa] += 1
            return
        if len(self.memory.regions) >= MAX_MEM_SLOTS:
            raise RequestRefused(req.request, f"all {MAX_MEM_SLOTS} memory slots are in use")
        mapped = self._map_regions(req, [region], req.fds)
        try:
            self._replace_regions([], mapped)
        except GuestMemoryError as exc:
            raise RequestRefused(req.request, str(exc)) from exc
        self.region_refs[region.guest_phys_addr] = 1
        log.info("%s: added region [%#x, +%#x)", self.label, region.guest_phys_addr, region.memory_size)

    def _same_region(self, region) -> MemoryRegion | None:
        found = self.memory.find_region(region.guest_phys_addr)
        if (
            found is not None
            and found.gpa == region.guest_phys_addr
            and found.size == region.memory_size
            and found.user_addr == region.userspace_addr
        ):
            return found
        return None

    def _rem_mem_reg(self, req: Request) -> None:
        region = req.payload.region  # type: ignore[union-attr]
        found = self._same_region(region)
        if found is None:
            raise RequestRefused(req.request, f"no region [{region.guest_phys_addr:#x}, +{region.memory_size:#x}) mapped")
        _close_all(req.fds)  # spec: an fd sent with REM_MEM_REG must be closed
        self.region_refs[found.gpa] -= 1
        if self.region_refs[found.gpa] > 0:
            return
        del self.region_refs[found.gpa]
        self._replace_regions([found], [])

    # -- vrings ----------------------------------------------------------------------
    def _set_vring_num(self, req: Request) -> None:
        state: VringState = req.payload  # type: ignore[assignment]
        vring = self._vring(req, state.index)
        num = state.num
        if num == 0 or num & (num - 1) or num > self.device.queue_max_size:
            raise RequestRefused(
                req.request, f"ring size {num} is not a power of 2 in [1, {self.device.queue_max_size}]"
            )
        if vring.started:
            raise RequestRefused(req.request, f"vring {state.index} is started")
        vring.num = num

    def _set_vring_addr(self, req: Request) -> None:
        addr: VringAddr = req.payload  # type: ignore[assignment]
        vring = self._vring(req, addr.index)
        vring.addr = addr
        if vring.started:
            # QEMU re-sends the address of a running ring (e.g. to toggle logging): restart it in place.
            state = self.device.stop_queue(vring.index)
            vring.base = state.last_avail_idx if state else vring.base
            self._start_queue(req, vring, vring.kick_fd)

    def _set_vring_base(self, req: Request) -> None:
        state: VringState = req.payload  # type: ignore[assignment]
        vring = self._vring(req, state.index)
        if state.num > 0xFFFF:
            raise RequestRefused(req.request, f"split ring base {state.num} is not a 16-bit index")
        if vring.started:
            raise RequestRefused(req.request, f"vring {state.index} is started")
        vring.base = state.num

    def _get_vring_base(self, req: Request) -> VringState:
        state: VringState = req.payload  # type: ignore[assignment]
        vring = self._vring(req, state.index)
        self._stop_ring(vring)
        log.info("%s: vring %d stopped at avail index %d", self.label, vring.index, vring.base)
        return VringState(vring.index, vring.base)

    def _set_vring_kick(self, req: Request) -> None:
        file: VringFile = req.payload  # type: ignore[assignment]
        vring = self._vring(req, file.index)
        kick_fd = None if file.invalid_fd else _eventfd(req, req.fds[0])
        self._stop_ring(vring)
        self._start_queue(req, vring, kick_fd)

    def _start_queue(self, req: Request, vring: Vring, kick_fd: int | None) -> None:
        """Start serving ``vring``: translate its addresses, read used idx, hook its kick.

        ``kick_fd`` is taken over on success (``None``: poll the ring).  With
        ACCESS_PLATFORM a ring whose IOVAs miss in the IOTLB is started
        without its device queue: misses are sent and the queue starts when
        they are answered (or at the next kick).
        """
        if vring.num == 0 or vring.addr is None:
            raise RequestRefused(req.request, f"vring {vring.index} has no size or no addresses yet")
        try:
            running = self._start_device_queue(vring)
        except IovirtError as exc:
            raise RequestRefused(req.request, f"vring {vring.index} cannot start: {exc}") from exc
        vring.started = True
        vring.kick_fd = kick_fd
        if not self.features >> VHOST_USER_F_PROTOCOL_FEATURES & 1:
            self._enable(vring, True)
        kick = self._kicker(vring)
        if vring.kick_fd is not None:
            self.dataplane.add_eventfd(vring.kick_fd, kick)
        else:
            self.dataplane.add_poller(vring, kick)
        if running:
            kick()  # buffers made available before the kick fd arrived

    def _start_device_queue(self, vring: Vring) -> bool:
        """Hand ``vring`` to the device; False if its ring IOVAs are not translated yet.

        Raises :class:`IovirtError` for a ring that cannot be served.
        """
        addr = vring.addr
        assert addr is not None
        memory = self.dma_memory
        if self.iotlb is None:
            desc = self.memory.user_to_guest(addr.desc_user_addr)
            avail = self.memory.user_to_guest(addr.avail_user_addr)
            used = self.memory.user_to_guest(addr.used_user_addr)
        else:
            # vhost-user.rst: "a ring address is an IOVA if VIRTIO_F_IOMMU_PLATFORM has been negotiated".
            desc, avail, used = addr.desc_user_addr, addr.avail_user_addr, addr.used_user_addr
            if not self._ring_translated(vring, desc, avail, used):
                if not vring.awaiting_translation:
                    log.info("%s: vring %d waits for IOTLB entries of its ring", self.label, vring.index)
                vring.awaiting_translation = True
                return False
        used_idx = memory.read_u16(used + 2)
        if vring.inflight is not None and vring.inflight.recover(used_idx):
            # Requests a previous back-end popped and never completed.  We
            # complete in order, so they are exactly the avail entries from
            # the used idx on: popping from there resubmits them in order.
            log.info("%s: vring %d resubmits inflight requests from avail index %d", self.label, vring.index, used_idx)
            vring.base = used_idx
        state = QueueState(vring.num, desc, avail, used, last_avail_idx=vring.base, used_idx=used_idx)
        self.device.start_queue(vring.index, memory, state, self._notifier(vring))
        if vring.inflight is not None:
            self.device.track_inflight(vring.index, vring.inflight)
        vring.awaiting_translation = False
        log.info(
            "%s: vring %d started: size %d, desc %#x avail %#x used %#x, avail index %d",
            self.label, vring.index, vring.num, desc, avail, used, vring.base,
        )
        return True

    def _ring_parts(self, vring: Vring, desc: int, avail: int, used: int) -> list[tuple[int, int, Access]]:
        return [
            (desc, desc_table_size(vring.num), Access.READ),
            (avail, avail_ring_size(vring.num), Access.READ),
            (used, used_ring_size(vring.num), Access.READ | Access.WRITE),
        ]

    def _ring_translated(self, vring: Vring, desc: int, avail: int, used: int) -> bool:
        """Whether every ring part translates; sends the misses of all parts at once."""
        pending = False
        for start, size, access in self._ring_parts(vring, desc, avail, used):
            try:
                self.dma_memory.check_range(start, size, access)
            except TranslationPending:
                pending = True
        return not pending

    def _kicker(self, vring: Vring) -> Callable[[], None]:
        def kick() -> None:
            if vring.awaiting_translation:
                self._resume(vring)
            else:
                self.device.kick(vring.index)

        return kick

    def _resume(self, vring: Vring) -> None:
        """Start the device queue of a started ring that waited for translations, then serve it."""
        try:
            running = self._start_device_queue(vring)
        except IovirtError as exc:
            # No request to refuse here: the driver gave a ring the device cannot use.
            vring.awaiting_translation = False
            self.device.fail(exc)
            return
        if running:
            self.device.kick(vring.index)

    def _notifier(self, vring: Vring) -> Callable[[], None]:
        def notify() -> None:
            fd = vring.call_fd
            if fd is not None:
                try:
                    os.eventfd_write(fd, 1)
                except OSError as exc:
                    log.warning("%s: call fd of vring %d: %s", self.label, vring.index, exc)

        return notify

    def _stop_ring(self, vring: Vring) -> None:
        if vring.kick_fd is not None:
            self.dataplane.remove(vring.kick_fd)
            _close(vring.kick_fd)
            vring.kick_fd = None
        self.dataplane.remove_poller(vring)
        vring.awaiting_translation = False
        if vring.started:
            state = self.device.stop_queue(vring.index)
            if state is not None:
                vring.base = state.last_avail_idx
            vring.started = False

    def _set_vring_call(self, req: Request) -> None:
        self._set_vring_eventfd(req, "call_fd")

    def _set_vring_err(self, req: Request) -> None:
        self._set_vring_eventfd(req, "err_fd")

    def _set_vring_eventfd(self, req: Request, name: str) -> None:
        """SET_VRING_CALL/ERR: replace the vring's eventfd ``name`` (none with the no-fd bit)."""
        file: VringFile = req.payload  # type: ignore[assignment]
        vring = self._vring(req, file.index)
        fd = None if file.invalid_fd else _eventfd(req, req.fds[0])
        _close(getattr(vring, name))
        setattr(vring, name, fd)

    def _get_queue_num(self, req: Request) -> U64:
        return U64(self.device.vhost_queue_num)

    def _set_vring_enable(self, req: Request) -> None:
        state: VringState = req.payload  # type: ignore[assignment]
        vring = self._vring(req, state.index)
        if state.num not in (0, 1):
            raise RequestRefused(req.request, f"enable value {state.num} is not 0 or 1")
        self._enable(vring, bool(state.num))

    def _enable(self, vring: Vring, enabled: bool) -> None:
        if vring.enabled != enabled:
            log.info("%s: vring %d %s", self.label, vring.index, "enabled" if enabled else "disabled")
        vring.enabled = enabled
        self.device.set_queue_enabled(vring.index, enabled)
        if enabled and vring.started:
            self.device.kick(vring.index)

    def _device_failed(self, device: VirtioDevice, error: Exception) -> None:
        # Tell the front-end through the error eventfds (SET_VRING_ERR).
        for vring in self.vrings:
            if vring.err_fd is not None:
                try:
                    os.eventfd_write(vring.err_fd, 1)
                except OSError:
                    pass

    # -- config, status, reset ----------------------------------------------------------
    def _get_config(self, req: Request) -> Config:
        cfg: Config = req.payload  # type: ignore[assignment]
        if cfg.offset + cfg.size > VHOST_USER_MAX_CONFIG_SIZE:
            raise RequestRefused(req.request, f"config access [{cfg.offset}, +{cfg.size}) beyond 256 bytes")
        return Config(cfg.offset, cfg.flags, self.device.read_config(cfg.offset, cfg.size))

    def _set_config(self, req: Request) -> None:
        cfg: Config = req.payload  # type: ignore[assignment]
        if cfg.offset + cfg.size > VHOST_USER_MAX_CONFIG_SIZE:
            raise RequestRefused(req.request, f"config access [{cfg.offset}, +{cfg.size}) beyond 256 bytes")
        if not self.device.write_config(cfg.offset, cfg.payload):
            raise RequestRefused(req.request, f"config bytes [{cfg.offset}, +{cfg.size}) are read-only")

    def _set_status(self, req: Request) -> None:
        self.status = req.payload.value & 0xFF  # type: ignore[union-attr]

    def _get_status(self, req: Request) -> U64:
        return U64(self.status)

    def _reset_device(self, req: Request) -> None:
        # Spec: disable all rings and reset all internal device state; ownership stays.
        for vring in self.vrings:
            self._stop_ring(vring)
            vring.enabled = False
            vring.base = 0
        self.device.reset()
        self.features = 0
        self.status = 0
        self._use_iotlb(False)

    # -- net -------------------------------------------------------------------------------
    def _net_set_mtu(self, req: Request) -> None:
        mtu = req.payload.value  # type: ignore[union-attr]
        if not hasattr(self.device, "mtu"):
            raise RequestRefused(req.request, "not a net device")
        if not 68 <= mtu <= 65535:
            raise RequestRefused(req.request, f"MTU {mtu} outside [68, 65535]")
        self.device.mtu = mtu  # type: ignore[attr-defined]

    def _send_rarp(self, req: Request) -> None:
        rarp: Rarp = req.payload  # type: ignore[assignment]
        announce = getattr(self.device, "announce", None)
        if announce is None:
            raise RequestRefused(req.request, "not a net device")
        announce(rarp.mac)

    # -- inflight (blk) ------------------------------------------------------------------
    def _get_inflight_fd(self, req: Request) -> tuple[Inflight, list[int]]:
        info: Inflight = req.payload  # type: ignore[assignment]
        if not 0 < info.num_queues <= len(self.vrings) or not 0 < info.queue_size <= 32768:
            raise RequestRefused(req.request, f"{info.num_queues} queues of {info.queue_size} is not this device's")
        size = inflight_mmap_size(info.num_queues, info.queue_size)
        fd = os.memfd_create("iovirt-inflight", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            self._use_inflight(fd, size, 0, info.num_queues, info.queue_size, fresh=True)
        except BaseException:
            os.close(fd)
            raise
        # The server closes what it sends: send a duplicate, keep ours.
        return Inflight(size, 0, info.num_queues, info.queue_size), [os.dup(fd)]

    def _set_inflight_fd(self, req: Request) -> None:
        info: Inflight = req.payload  # type: ignore[assignment]
        if inflight_mmap_size(info.num_queues, info.queue_size) > info.mmap_size or info.num_queues > len(self.vrings):
            raise RequestRefused(req.request, "inflight region too small for its queues")
        self._use_inflight(req.fds[0], info.mmap_size, info.mmap_offset, info.num_queues, info.queue_size, fresh=False)

    def _use_inflight(self, fd: int, size: int, offset: int, num_queues: int, queue_size: int, fresh: bool) -> None:
        """Map ``fd`` as the inflight region; takes ``fd`` over only if that worked."""
        try:
            region = InflightRegion(fd, size, offset, num_queues, queue_size, fresh)
        except (OSError, ValueError) as exc:
            raise RequestRefused(R.VHOST_USER_SET_INFLIGHT_FD, f"cannot map the inflight region: {exc}") from exc
        if self.inflight_map is not None:
            self.inflight_map.close()
        _close(self.inflight_fd)
        self.inflight_fd = fd
        self.inflight_map = region
        for i, vring in enumerate(self.vrings[:num_queues]):
            vring.inflight = self.inflight_map.queue(i)

    # -- IOMMU (vhost-user.rst "IOMMU support") ---------------------------------------
    def _set_backend_req_fd(self, req: Request) -> None:
        try:
            channel = BackendChannel(req.fds[0], self.label)
        except OSError as exc:
            raise RequestRefused(req.request, f"fd {req.fds[0]} is not a socket: {exc}") from exc
        if self.backend_channel is not None:
            self.backend_channel.close()
        self.backend_channel = channel

    def _send_backend_iotlb_msg(self, msg: IotlbMsg) -> bool:
        # No need_reply: the answer to a miss is the UPDATE on the main socket.
        channel = self.backend_channel
        return channel is not None and channel.send(BackendRequest.VHOST_USER_BACKEND_IOTLB_MSG, msg)

    def _use_iotlb(self, enabled: bool) -> None:
        """A fresh, empty device IOTLB in front of the device's memory (or none)."""
        self.dataplane.remove_before_handler(self)
        if not enabled:
            self.iotlb = None
            self.dma_memory = self.memory
            return
        iotlb = DeviceIotlb(self.memory, self._send_backend_iotlb_msg, self.label)
        iotlb.on_resolved = self._translations_arrived
        iotlb.pinned = self._running_ring_ranges
        self.iotlb = iotlb
        self.dma_memory = self.memory.with_translator(iotlb)
        # Buffer translations last one handler run (see DeviceIotlb.forget_unpinned):
        # every data-plane handler starts from an IOTLB holding only the rings.
        self.dataplane.add_before_handler(self, iotlb.forget_unpinned)

    def _ring_ranges(self, vring: Vring) -> list[tuple[int, int]]:
        """IOVA ranges ``(start, end)`` of the ring parts of ``vring`` if its device queue runs."""
        a = vring.addr
        if self.device.queues[vring.index] is None or a is None:
            return []
        parts = self._ring_parts(vring, a.desc_user_addr, a.avail_user_addr, a.used_user_addr)
        return [(start, start + size) for start, size, _ in parts]

    def _running_ring_ranges(self) -> list[tuple[int, int]]:
        return [r for vring in self.vrings for r in self._ring_ranges(vring)]

    def _rings_touching(self, iova: int, size: int) -> list[Vring]:
        end = iova + size
        return [v for v in self.vrings if any(start < end and iova < stop for start, stop in self._ring_ranges(v))]

    def _iotlb_msg(self, req: Request) -> U64:
        msg: IotlbMsg = req.payload  # type: ignore[assignment]
        if self.iotlb is None:
            raise RequestRefused(req.request, "VIRTIO_F_ACCESS_PLATFORM was not negotiated: there is no IOTLB")
        log.debug("%s: IOTLB %s iova %#x size %#x uaddr %#x %s", self.label, msg.type.name, msg.iova, msg.size,
                  msg.uaddr, msg.perm.name)
        try:
            if msg.type == IotlbType.VHOST_IOTLB_UPDATE:
                touched = self._rings_touching(msg.iova, msg.size)
                self.iotlb.update(msg.iova, msg.size, msg.uaddr, msg.perm)
                for vring in touched:
                    # A remapped ring page: the ring re-resolves its host pointers.
                    self._refresh_ring(vring)
            elif msg.type == IotlbType.VHOST_IOTLB_INVALIDATE:
                for vring in self._rings_touching(msg.iova, msg.size):
                    self._suspend(vring)
                self.iotlb.invalidate(msg.iova, msg.size)
            else:
                raise RequestRefused(req.request, f"{msg.type.name} is a back-end message; expected UPDATE or INVALIDATE")
        except IotlbError as exc:
            raise RequestRefused(req.request, str(exc)) from exc
        return U64(0)

    def _suspend(self, vring: Vring) -> None:
        """Stop the device queue of ``vring`` (its ring pages are invalidated); the next kick resumes it."""
        state = self.device.stop_queue(vring.index)
        if state is not None:
            vring.base = state.last_avail_idx
        vring.awaiting_translation = True
        log.info("%s: vring %d suspended: its ring pages were invalidated", self.label, vring.index)

    def _refresh_ring(self, vring: Vring) -> None:
        queue = self.device.queues[vring.index]
        if queue is None:
            return
        try:
            queue.refresh()
        except IovirtError as exc:
            self.device.stop_queue(vring.index)
            self.device.fail(exc)

    def _translations_arrived(self) -> None:
        """An UPDATE answered a miss: serve again every ring that may have waited for it."""
        for vring in self.vrings:
            if not vring.started:
                continue
            if vring.awaiting_translation:
                self._resume(vring)
            else:
                self.device.kick(vring.index)


def _eventfd(req: Request, fd: int) -> int:
    """``fd`` if it is an eventfd; kick/call/err fds must be (as the kernel's vhost demands).

    A pipe or a file would spin the data plane (a hung-up pipe is always
    readable) or block it (a full pipe).
    """
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError as exc:
        raise RequestRefused(req.request, f"fd {fd} is not usable: {exc}") from exc
    if target != "anon_inode:[eventfd]":
        raise RequestRefused(req.request, f"fd {fd} is {target}, not an eventfd")
    return fd


def _check_no_overlap(req: Request, regions: list[MemoryRegion]) -> None:
    spans = sorted(regions, key=lambda r: r.gpa)
    for a, b in zip(spans, spans[1:]):
        if b.gpa < a.end:
            raise RequestRefused(req.request, f"regions [{a.gpa:#x}, {a.end:#x}) and [{b.gpa:#x}, {b.end:#x}) overlap")


def _close(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


def _close_all(fds) -> None:
    for fd in fds:
        _close(fd)
