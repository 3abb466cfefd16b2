"""The VMM's bring-up sequence, step by step, on a :class:`~iovirt.vhost_user.frontend.VhostUserFrontend`.

One implementation for every front-end in iovirt (the tests, the packet
bench's :class:`~iovirt.vhost_user.driver.VhostUserDriver`, the conformance
suite's :class:`~iovirt.conformance.link.Link`), in QEMU's order
(vhost-user.rst "Ring states", "Memory regions description"; virtio 1.2
3.1.1 "Driver Requirements: Device Initialization"):

1. :func:`negotiate` - GET_FEATURES, then GET/SET_PROTOCOL_FEATURES when
   ``VHOST_USER_F_PROTOCOL_FEATURES`` (bit 30) is offered and wanted,
   SET_OWNER, SET_FEATURES;
2. :func:`features_ok` - SET_STATUS ACKNOWLEDGE|DRIVER|FEATURES_OK (only
   with ``VHOST_USER_PROTOCOL_F_STATUS``);
3. :func:`share_memory` - SET_MEM_TABLE, or one ADD_MEM_REG per region;
4. :func:`start_vring` per ring - NUM, BASE, ADDR, CALL, KICK, then ENABLE
   (only with bit 30: without it rings are enabled at once);
5. :func:`driver_ok` - SET_STATUS ... DRIVER_OK (only with F_STATUS), once
   the rings run: a back-end may serve nothing before it (DPDK's vhost
   library waits for it).

Migration (vhost-user.rst "Migration"): :func:`start_logging` turns dirty
logging on as QEMU does, SET_LOG_BASE, then SET_FEATURES with
``VHOST_F_LOG_ALL``, then SET_VRING_ADDR with ``VHOST_VRING_F_LOG`` per
ring; :func:`stop_logging` turns it off in the same order, less the log.

Every step is a separate call with selectable options, so that a
conformance check can leave a ring disabled, poll instead of taking a call
eventfd, or negotiate without bit 30.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from typing import Sequence

from iovirt.memory import MemoryRegion
from iovirt.vhost_user.frontend import VhostUserFrontend
from iovirt.vhost_user.messages import (
    VHOST_F_LOG_ALL,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_VRING_F_LOG,
    Log,
    ProtocolFeature,
)
from iovirt.virtio.dirtylog import log_bytes_needed
from iovirt.virtio.defs import (
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_F_ACCESS_PLATFORM,
    VIRTIO_F_RING_PACKED,
)

ALL_FEATURES = (1 << 64) - 1
PROTOCOL_BIT = 1 << VHOST_USER_F_PROTOCOL_FEATURES
FEATURES_OK_STATUS = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK


@dataclass(frozen=True)
class Negotiated:
    """What one front-end agreed with the back-end."""

    offered: int
    features: int
    protocol_features: int

    def has(self, bit: int) -> bool:
        """Whether virtio/vhost feature ``bit`` was negotiated."""
        return bool(self.features >> bit & 1)


def negotiate(
    frontend: VhostUserFrontend,
    features: int = ALL_FEATURES,
    protocol_features: int = ALL_FEATURES,
    *,
    protocol: bool = True,
    iommu: bool = False,
    packed: bool = False,
) -> Negotiated:
    """GET_FEATURES, GET/SET_PROTOCOL_FEATURES, SET_OWNER, SET_FEATURES.

    Acks the bits of ``features`` the back-end offers, and bit 30 whenever
    it is offered and ``protocol`` is true (then the offered protocol
    features within ``protocol_features`` are set); ``protocol`` False
    negotiates without protocol features at all.  VIRTIO_F_ACCESS_PLATFORM
    is acked only with ``iommu``: a VMM accepts it only with an IOMMU in
    front of the device, and must then answer the back-end's IOTLB misses
    (:mod:`iovirt.vhost_user.viommu`).  VIRTIO_F_RING_PACKED is acked only
    with ``packed``: the rings must then be laid out packed
    (:class:`~iovirt.virtio.packed_driver.PackedDriverQueue`).  ``VHOST_F_LOG_ALL`` is never
    acked here: a VMM asks for it only while migrating (:func:`start_logging`).
    """
    features &= ~(1 << VHOST_F_LOG_ALL)
    if not iommu:
        features &= ~(1 << VIRTIO_F_ACCESS_PLATFORM)
    if not packed:
        features &= ~(1 << VIRTIO_F_RING_PACKED)
    offered = frontend.get_features()
    use_protocol = protocol and bool(offered & PROTOCOL_BIT)
    acked_protocol = 0
    if use_protocol:
        acked_protocol = frontend.get_protocol_features() & protocol_features
        frontend.set_protocol_features(acked_protocol)
    frontend.set_owner()
    acked = offered & features & ~PROTOCOL_BIT | (PROTOCOL_BIT if use_protocol else 0)
    frontend.set_features(acked)
    return Negotiated(offered, acked, acked_protocol)


def has_status(frontend: VhostUserFrontend) -> bool:
    """Whether VHOST_USER_PROTOCOL_F_STATUS was negotiated (SET_STATUS exists only then)."""
    return bool(frontend.protocol_features >> ProtocolFeature.VHOST_USER_PROTOCOL_F_STATUS & 1)


def features_ok(frontend: VhostUserFrontend) -> None:
    """SET_STATUS ACKNOWLEDGE|DRIVER|FEATURES_OK right after SET_FEATURES, as QEMU does (with F_STATUS)."""
    if has_status(frontend):
        frontend.set_status(frontend.status | FEATURES_OK_STATUS)


def share_memory(
    frontend: VhostUserFrontend, regions: Sequence[MemoryRegion] | None = None, *, mem_slots: bool = False
) -> None:
    """Share ``regions`` (default: all): one ADD_MEM_REG each with ``mem_slots``, else SET_MEM_TABLE of all."""
    if mem_slots:
        for region in frontend.memory.regions if regions is None else regions:
            frontend.add_mem_reg(region)
    else:
        frontend.set_mem_table()


def start_vring(
    frontend: VhostUserFrontend,
    index: int,
    num: int,
    desc: int,
    avail: int,
    used: int,
    *,
    base: int = 0,
    call: bool = True,
    kick: bool = True,
    enable: bool | None = True,
) -> None:
    """NUM, BASE, ADDR, CALL, KICK, ENABLE for one split ring at guest-physical (or IOVA) addresses.

    ``call`` False sends CALL with the no-fd bit (the driver polls);
    ``kick`` False sends no KICK (the ring never starts); ``enable`` is the
    ENABLE value, sent only when bit 30 was negotiated (without it a ring is
    enabled at once) and never when ``None`` (a restart after GET_VRING_BASE
    keeps the ring's enable state).
    """
    frontend.set_vring_num(index, num)
    frontend.set_vring_base(index, base)
    frontend.set_vring_addr(index, desc, avail, used)
    frontend.set_vring_call(index, poll=not call)
    if kick:
        frontend.set_vring_kick(index)
    if enable is not None and frontend.features & PROTOCOL_BIT:
        frontend.set_vring_enable(index, enable)


def driver_ok(frontend: VhostUserFrontend) -> None:
    """SET_STATUS with DRIVER_OK (virtio 1.2 3.1.1 step 8) once the rings run; only with F_STATUS, only once."""
    if has_status(frontend) and not frontend.status & VIRTIO_CONFIG_S_DRIVER_OK:
        frontend.set_status(frontend.status | FEATURES_OK_STATUS | VIRTIO_CONFIG_S_DRIVER_OK)


@dataclass(frozen=True)
class RingLayout:
    """Where one started ring is (guest-physical, or IOVAs with VIRTIO_F_ACCESS_PLATFORM)."""

    index: int
    desc: int
    avail: int
    used: int


def make_log(frontend: VhostUserFrontend) -> tuple[int, int]:
    """A sealed memfd sized for the shared memory as QEMU sizes it (whole u64 words); returns (fd, size)."""
    end = max((r.end for r in frontend.memory.regions), default=0)
    size = max(8, (log_bytes_needed(end) + 7) // 8 * 8)
    fd = os.memfd_create("iovirt-dirty-log", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd, size


def start_logging(frontend: VhostUserFrontend, log_fd: int, log_size: int, rings: Sequence[RingLayout]) -> None:
    """QEMU's order: SET_LOG_BASE, SET_FEATURES with LOG_ALL, SET_VRING_ADDR with VHOST_VRING_F_LOG per ring.

    ``log_guest_addr`` is the used ring's address as the ring addresses are
    given (its IOVA with VIRTIO_F_ACCESS_PLATFORM, as QEMU sends it).
    """
    frontend.set_log_base(Log(log_size, 0), log_fd)
    frontend.set_features(frontend.features | 1 << VHOST_F_LOG_ALL)
    for ring in rings:
        frontend.set_vring_addr(
            ring.index, ring.desc, ring.avail, ring.used, flags=1 << VHOST_VRING_F_LOG, log_guest_addr=ring.used
        )


def stop_logging(frontend: VhostUserFrontend, rings: Sequence[RingLayout]) -> None:
    """SET_FEATURES without LOG_ALL, then SET_VRING_ADDR without VHOST_VRING_F_LOG per ring."""
    frontend.set_features(frontend.features & ~(1 << VHOST_F_LOG_ALL))
    for ring in rings:
        frontend.set_vring_addr(ring.index, ring.desc, ring.avail, ring.used)
