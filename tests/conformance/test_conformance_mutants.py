"""Each check added for issue 17 fails against a back-end or transport broken in exactly its clause.

A mutant is a monkeypatch (or a device subclass) that breaks one rule; the
test runs the new checks (and, for contrast, the rest of the same transport)
and asserts that exactly the expected clauses fail: those of the mutant in
:data:`MUTANT_EXPECTATIONS` (built from the tables and :data:`SINGLE_MUTANTS`
at the end of the module).
"""

from __future__ import annotations

import os
import struct
import threading
import time
import weakref
import zlib

import pytest

from mutant_queue import MutantBlk
from zoned_model import MAX_APPEND, CoarseWritesBlk, EraseKeepsZoneStateBlk, NoAppendZonedBlk, SecureEraseZonedBlk, NoOpenLimitBlk, StaleAfterResetBlk, UnalignedWriteOkBlk, ZonedOpsBlk
from iovirt.conformance.checks.blk_edges import (
    CONFIG_ZONED,
    LIFETIME,
    VIRTIO_BLK_F_LIFETIME,
    VIRTIO_BLK_T_GET_LIFETIME,
    VIRTIO_BLK_F_ZONED,
    VIRTIO_BLK_Z_HA,
    VIRTIO_BLK_Z_HM,
    ZONE_TYPES,
    ZONED_FIELDS,
)
from iovirt.conformance.checks.net_gso import TUNNEL_BITS
from iovirt.conformance.checks.net_headers import VIRTIO_NET_F_CTRL_RX_EXTRA as NEED_CTRL_VQ_RX_EXTRA
from iovirt.conformance.checks.net_headers import VIRTIO_NET_F_RSS, VIRTIO_NET_F_SPEED_DUPLEX
from iovirt.conformance.platform_target import PlatformTarget
from iovirt.conformance.registry import Verdict, all_checks
from iovirt.conformance.runner import Runner
from iovirt.conformance.target import Target
from iovirt.errors import IovirtError
from iovirt.vhost_user import devstate, state_migration, vrings as vrings_module
from iovirt.vhost_user.backend import BackendSession
from iovirt.vhost_user.device import VhostUserDevice
from iovirt.vhost_user.iotlb import DeviceIotlb
from iovirt.vhost_user.devices.blk import BlkAdapter
from iovirt.vhost_user.devices.net import NetAdapter, NetConfigAdapter
from iovirt.vhost_user.errors import RequestRefused
from iovirt.vhost_user.messages import ProtocolFeature as PF, feature_mask
from iovirt.vhost_user.vrings import Vrings
from iovirt.virtio.blk._datapath_py import parse_request
from iovirt.virtio.blk.defs import (
    DISCARD_SEG,
    REQ_HDR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
)
from iovirt.virtio.blk.device import VirtioBlk
from iovirt.virtio.defs import (
    VIRTIO_F_ADMIN_VQ,
    VIRTIO_F_NOTIFICATION_DATA,
    VIRTIO_F_VERSION_1,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_USED,
    VIRTQ_DESC_F_WRITE,
)
from iovirt.virtio.net.defs import (
    ETH_HLEN,
    NET_HDR_SIZE,
    VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_RSC_EXT,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_F_RSC_INFO,
    VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_UDP,
    NetHdr,
)
from iovirt.virtio.net.ctrl import NetCtrl
from iovirt.virtio.net.device import VirtioNet
from iovirt.virtio.net.switch import LearningSwitch
from iovirt.virtio.device import VirtioDevice
from iovirt.virtio.state import QueueState
from iovirt.virtio.queue import PackedQueue
from iovirt.pci.regs import PCI_DEVICE_ID
from iovirt.pci.vendor import VendorCapability
from iovirt.virtio.transport import pci as transport_pci
from iovirt.virtio.transport.caps import VirtioPciCfgCap
from iovirt.virtio.transport import common_cfg as common_cfg_module
from iovirt.virtio.transport.common_cfg import CommonCfg
from iovirt.virtio.transport.defs import VIRTIO_PCI_CAP_DEVICE_CFG, VIRTIO_PCI_COMMON_ADMIN_Q_INDEX, VIRTIO_PCI_COMMON_ADMIN_Q_NUM


def _failed(results: dict) -> dict:
    return {c: r.reason for c, r in results.items() if r.verdict is Verdict.FAIL}


# -- virtio-pci (in-process platform) ------------------------------------------------------------------
def _pci_run(device: str = "net") -> dict:
    return {r.clause: r for r in Runner(PlatformTarget(device)).run()}


def _low_subsystem_id(monkeypatch):
    monkeypatch.setattr(transport_pci, "VIRTIO_PCI_SUBSYSTEM_ID", 0x10)


def _unaligned_device_cfg(monkeypatch):
    # The capability says offset + 2 (the region stays where it was): a driver reads config 2 bytes late.
    original = transport_pci.VirtioPciCap

    def cap(cfg_type, bar, offset, length, **kwargs):
        return original(cfg_type, bar, offset + 2 if cfg_type == VIRTIO_PCI_CAP_DEVICE_CFG else offset, length, **kwargs)

    monkeypatch.setattr(transport_pci, "VirtioPciCap", cap)


def _window_write_ignored(monkeypatch):
    monkeypatch.setattr(VirtioPciCfgCap, "config_write", lambda self, offset, size, value: self.function.config.default_write(offset, size, value))


def _any_vector_sticks(monkeypatch):
    monkeypatch.setattr(CommonCfg, "_map_vector", lambda self, vector: vector)


def _writable_device_id(monkeypatch):
    original = transport_pci.VirtioPciFunction.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.config.set_wmask(PCI_DEVICE_ID, 2, 0xFFFF)

    monkeypatch.setattr(transport_pci.VirtioPciFunction, "__init__", init)


PCI_MUTANTS = {
    "writable-device-id": (_writable_device_id, {"virtio-1.2:4.1.1"}),
    "subsystem-id-below-0x40": (_low_subsystem_id, {"virtio-1.2:4.1.2.1#non-transitional"}),
    "device-cfg-unaligned": (_unaligned_device_cfg, {"virtio-1.2:4.1.4#structures"}),
    "pci-cfg-window-write-ignored": (_window_write_ignored, {"virtio-1.2:4.1.4.9.1#write"}),
    "vector-beyond-table-sticks": (_any_vector_sticks, {"virtio-1.2:4.1.5.1.2.1#table"}),
}


@pytest.mark.parametrize("mutant", sorted(PCI_MUTANTS))
def test_pci_mutant_fails_exactly_its_check(monkeypatch, mutant):
    inject, _expected = PCI_MUTANTS[mutant]
    inject(monkeypatch)
    failed = _failed(_pci_run())
    assert set(failed) == MUTANT_EXPECTATIONS[mutant], failed


# -- vhost-user back-ends (iovirt's, broken) -----------------------------------------------------------
TIMEOUT = 0.5


def _vu_run(target: Target, clauses: set[str]) -> dict:
    checks = [c for c in all_checks("vhost-user") if c.clause in clauses]
    assert {c.clause for c in checks} == clauses, "unknown clause in the test"
    return {r.clause: r for r in Runner(target, checks).run()}


def _blk(b) -> Target:
    return Target(b.blk_path, "blk", TIMEOUT)


def _avail(queue, state, i: int) -> int:
    return queue.memory.read_u16(state.avail_addr + 4 + 2 * (i % state.size))


class AlwaysNotifyBlk(VirtioBlk):
    """Sends a used buffer notification after every batch, whatever the driver asked."""

    def signal(self, index):
        queue, notify = self.queues[index], self.notifiers[index]
        if queue is not None and notify is not None:
            queue.need_notify()  # keeps its bookkeeping; the answer is ignored
            notify()


class FlagsOverEventIdxBlk(VirtioBlk):
    """Honours the avail flags' NO_INTERRUPT bit even with EVENT_IDX negotiated."""

    def signal(self, index):
        queue = self.queues[index]
        if queue is not None and queue.memory.read_u16(queue.state().avail_addr) & VIRTQ_AVAIL_F_NO_INTERRUPT:
            queue.need_notify()
            return
        super().signal(index)


class SpuriousKickFailsBlk(VirtioBlk):
    """Treats a run of kicks with nothing new available as a driver error (and so needs a reset).

    One empty pass is normal (a kick for chains an earlier pass already took); four in a row are not.
    """

    empty = 0

    def _reset(self):
        super()._reset()
        self.empty = 0

    def process_queue(self, index, queue):
        state = queue.state()
        self.empty = self.empty + 1 if queue.memory.read_u16(state.avail_addr + 2) == state.last_avail_idx else 0
        if self.empty >= 4:
            self.fail(IovirtError("kicks with nothing available"))
            return
        super().process_queue(index, queue)


class IndirectWriteFlagFailsBlk(MutantBlk):
    """Rejects an indirect descriptor that also carries the write flag."""

    def mutate(self, queue, chain):
        flags = chain[0][2]
        if flags & VIRTQ_DESC_F_INDIRECT and flags & VIRTQ_DESC_F_WRITE:
            self.fail(IovirtError("indirect descriptor with the write flag"))
            return False
        return True


NOTIFY_CLAUSES = {
    "virtio-1.2:2.7.7.2#no_interrupt",
    "virtio-1.2:2.7.7.2#event_idx",
    "virtio-1.2:2.7.10#spurious",
    "virtio-1.2:2.7.5.3.1#write-flag",
    "virtio-1.2:2.7.7.2#flags",
    "virtio-1.2:2.7.7.2#used_event",
}

BLK_MUTANTS = {
    "always-notify": (AlwaysNotifyBlk, {"virtio-1.2:2.7.7.2#no_interrupt", "virtio-1.2:2.7.7.2#event_idx"}),
    "flags-over-event-idx": (FlagsOverEventIdxBlk, {"virtio-1.2:2.7.7.2#event_idx"}),
    "spurious-kick-fails": (SpuriousKickFailsBlk, {"virtio-1.2:2.7.10#spurious"}),
    "indirect-write-flag-fails": (IndirectWriteFlagFailsBlk, {"virtio-1.2:2.7.5.3.1#write-flag"}),
}


@pytest.mark.parametrize("mutant", sorted(BLK_MUTANTS))
def test_notification_mutant_fails_exactly_its_checks(make_backend, mutant):
    blk_class, _expected = BLK_MUTANTS[mutant]
    failed = _failed(_vu_run(_blk(make_backend(blk_class=blk_class)), NOTIFY_CLAUSES))
    assert set(failed) == MUTANT_EXPECTATIONS[mutant], failed


# -- features and ring lifecycle ---------------------------------------------------------------------
class StrayBitBlk(VirtioBlk):
    """Offers feature bit 20, which virtio 1.4 does not define for a block device."""

    def device_features(self):
        return super().device_features() | 1 << 20


def _no_mq(monkeypatch):
    monkeypatch.setattr(BlkAdapter, "protocol_features", BlkAdapter.protocol_features & ~feature_mask(PF.VHOST_USER_PROTOCOL_F_MQ))


def _refuses_renegotiation(monkeypatch):
    # The runner's probe negotiates once, the check's first link a second time: refuse the third.
    original = VhostUserDevice.set_features
    count: dict[int, int] = {}

    def set_features(self, features):
        count[id(self.device)] = count.get(id(self.device), 0) + 1
        if count[id(self.device)] > 2:
            raise IovirtError("features were negotiated before")
        original(self, features)

    monkeypatch.setattr(VhostUserDevice, "set_features", set_features)


def _disable_after_enable_ignored(monkeypatch):
    original = Vrings._enable
    enabled_once: set[int] = set()

    def enable(self, vring, enabled):
        if enabled:
            enabled_once.add(id(vring))
        original(self, vring, enabled or id(vring) in enabled_once)

    monkeypatch.setattr(Vrings, "_enable", enable)


def _call_fd_fixed_once_started(monkeypatch):
    original = Vrings.set_eventfd

    def set_eventfd(self, index, name, fd):
        if name == "call_fd" and self[index].started and fd is not None:
            os.close(fd)  # keeps signalling the old eventfd
            return
        original(self, index, name, fd)

    monkeypatch.setattr(Vrings, "set_eventfd", set_eventfd)


def _writes_not_logged(monkeypatch):
    original = Vrings._install_log

    def install(self, vring, queue):
        original(self, vring, queue)
        vrings_module.ring_of(queue).set_dirty_log(None)  # LOG_ALL and the log accepted, then ignored


    monkeypatch.setattr(Vrings, "_install_log", install)


LIFECYCLE_CLAUSES = {
    "virtio-1.2:2.2#reserved",
    "vhost-user:Multiple queue support",
    "virtio-1.2:2.2.2#renegotiate",
    "vhost-user:SET_VRING_ENABLE#both",
    "vhost-user:Ring states#on-the-fly",
    "vhost-user:Migration#dirty-log",
    "vhost-user:Ring states#disabled",
}

LIFECYCLE_MUTANTS = {
    "stray-feature-bit": (None, {"blk_class": StrayBitBlk}, {"virtio-1.2:2.2#reserved"}),
    "no-protocol-mq": (_no_mq, {}, {"vhost-user:Multiple queue support"}),
    "disable-after-enable-ignored": (_disable_after_enable_ignored, {}, {"vhost-user:SET_VRING_ENABLE#both"}),
    "call-fd-fixed-once-started": (_call_fd_fixed_once_started, {}, {"vhost-user:Ring states#on-the-fly"}),
    "writes-not-logged": (_writes_not_logged, {}, {"vhost-user:Migration#dirty-log"}),
}


@pytest.mark.parametrize("mutant", sorted(LIFECYCLE_MUTANTS))
def test_lifecycle_mutant_fails_exactly_its_check(make_backend, monkeypatch, mutant):
    inject, kwargs, _expected = LIFECYCLE_MUTANTS[mutant]
    if inject is not None:
        inject(monkeypatch)
    failed = _failed(_vu_run(_blk(make_backend(**kwargs)), LIFECYCLE_CLAUSES))
    assert set(failed) == MUTANT_EXPECTATIONS[mutant], failed


def test_renegotiation_mutant(make_backend, monkeypatch):
    _refuses_renegotiation(monkeypatch)
    failed = _failed(_vu_run(_blk(make_backend()), {"virtio-1.2:2.2.2#renegotiate"}))
    assert set(failed) == {"virtio-1.2:2.2.2#renegotiate"} == MUTANT_EXPECTATIONS["refuses-renegotiation"], failed


def test_net_enable_and_dirty_log_mutants(make_backend, monkeypatch):
    _disable_after_enable_ignored(monkeypatch)
    _writes_not_logged(monkeypatch)
    b = make_backend()
    target = Target(b.net_paths[0], "net", TIMEOUT, peer_socket=b.net_paths[1])
    failed = _failed(_vu_run(target, {"vhost-user:SET_VRING_ENABLE#both", "vhost-user:Migration#dirty-log"}))
    assert set(failed) == {"vhost-user:SET_VRING_ENABLE#both", "vhost-user:Migration#dirty-log"}, failed


# -- virtio-blk edges --------------------------------------------------------------------------------
class ZonedOkBlk(VirtioBlk):
    """Completes the zoned request types with OK although VIRTIO_BLK_F_ZONED is not offered."""

    def _serve(self, memory, chain):
        request = parse_request(memory, chain)
        if request is not None and request.type in ZONE_TYPES.values():
            memory.write(request.status_addr, bytes([VIRTIO_BLK_S_OK]))
            return chain.writable_len
        return super()._serve(memory, chain)


class IgnoresUnknownFlagsBlk(VirtioBlk):
    """Ignores the segment flags it does not know instead of answering UNSUPP."""

    def _discard_or_zero(self, memory, rtype, bufs):
        for addr, n in bufs:
            for off in range(0, n - n % DISCARD_SEG.size, DISCARD_SEG.size):
                flags = memory.read_u32(addr + off + 12)
                memory.write_u32(addr + off + 12, flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)
        super()._discard_or_zero(memory, rtype, bufs)


class DirtyPaddingBlk(VirtioBlk):
    """Leaves garbage in unused0."""

    def config_space(self):
        config = bytearray(super().config_space())
        config[33] = 0x5A
        return bytes(config)


class Sector0MisplacedBlk(MutantBlk):
    """Writes what the driver sends to sector 0 into sector 1."""

    def mutate(self, queue, chain):
        hdr = chain[0][0]
        rtype, _reserved, sector = REQ_HDR.unpack(queue.memory.read(hdr, REQ_HDR.size))
        if rtype == VIRTIO_BLK_T_OUT and sector == 0:
            queue.memory.write(hdr, REQ_HDR.pack(rtype, 0, 1))
        return True


BLK_EDGE_CLAUSES = {
    "virtio-1.2:5.2.6#zoned-unsupp",
    "virtio-1.2:5.2.6.2#unknown-flags",
    "virtio-1.2:5.2.5#config",
    "virtio-1.2:5.2.6#edges",
    "virtio-1.2:5.2.6#in-out",
    "virtio-1.2:5.2.6#unsupp",
}

BLK_EDGE_MUTANTS = {
    "zoned-ok": (ZonedOkBlk, {"virtio-1.2:5.2.6#zoned-unsupp"}),
    "ignores-unknown-flags": (IgnoresUnknownFlagsBlk, {"virtio-1.2:5.2.6.2#unknown-flags"}),
    "dirty-padding": (DirtyPaddingBlk, {"virtio-1.2:5.2.5#config"}),
    "sector-0-misplaced": (Sector0MisplacedBlk, {"virtio-1.2:5.2.6#edges"}),
}


@pytest.mark.parametrize("mutant", sorted(BLK_EDGE_MUTANTS))
def test_blk_edge_mutant_fails_exactly_its_check(make_backend, mutant):
    blk_class, _expected = BLK_EDGE_MUTANTS[mutant]
    failed = _failed(_vu_run(_blk(make_backend(blk_class=blk_class)), BLK_EDGE_CLAUSES))
    assert set(failed) == MUTANT_EXPECTATIONS[mutant], failed


# -- virtio-net header variants ------------------------------------------------------------------------
class SlowPathNet(VirtioNet):
    """Receives every frame through the per-frame path, where the mutants below break one rule."""

    def _deliver_batch(self, frames, indexes):
        return sum(int(self.deliver(frames.frame(i), frames.csum(i))) for i in indexes)


class CsumWithoutNeedsCsumNet(VirtioNet):
    """Applies csum_start/csum_offset from the transmit header even without VIRTIO_NET_HDR_F_NEEDS_CSUM."""

    def _transmit(self, index, queue):
        state = queue.state()
        end = queue.memory.read_u16(state.avail_addr + 2)
        i = state.last_avail_idx
        while i != end:
            hdr_addr = queue.memory.read_u64(state.desc_addr + 16 * _avail(queue, state, i))
            hdr = NetHdr.unpack(queue.memory.read(hdr_addr, NET_HDR_SIZE))
            if not hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM and hdr.csum_start:
                queue.memory.write(hdr_addr, NetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, hdr.gso_type, hdr.hdr_len, hdr.gso_size,
                                                    hdr.csum_start, hdr.csum_offset).pack(NET_HDR_SIZE))
            i = (i + 1) & 0xFFFF
        super()._transmit(index, queue)


class PartialCsumPassedOnNet(SlowPathNet):
    """Hands a partially checksummed frame to a driver that did not negotiate GUEST_CSUM, unfinished."""

    def deliver(self, frame, csum):
        return super().deliver(frame, None)


class LabelsTsoNet(SlowPathNet):
    """Marks received TCP/IPv4 frames as GSO_TCPV4 whatever the driver negotiated."""

    def _receive_mergeable(self, queue, hdr, frame):
        if frame[12:14] == b"\x08\x00" and frame[ETH_HLEN + 9] == 6:
            hdr = NetHdr(hdr.flags, VIRTIO_NET_HDR_GSO_TCPV4, hdr.hdr_len, 1000, hdr.csum_start, hdr.csum_offset)
        return super()._receive_mergeable(queue, hdr, frame)


class SmallMtuNet(VirtioNet):
    """Offers VIRTIO_NET_F_MTU with an mtu of 576 in its config space (and goes on moving 1500-byte frames)."""

    def config_space(self):
        return super().config_space()[:10] + (576).to_bytes(2, "little")


class DropsVlanNet(SlowPathNet):
    """Drops VLAN-tagged frames though the driver did not negotiate VIRTIO_NET_F_CTRL_VLAN."""

    def deliver(self, frame, csum):
        return False if frame[12:14] == b"\x81\x00" else super().deliver(frame, csum)


NET_HEADER_CLAUSES = {
    "virtio-1.2:5.1.6.2#flags",
    "virtio-1.2:5.1.6.4#csum",
    "virtio-1.2:5.1.6.4#gso",
    "virtio-1.2:5.1.4.1#mtu",
    "virtio-1.2:5.1.6.5.3#untagged-filter",
    "virtio-1.2:5.1.6.2",
}

NET_MUTANTS = {
    "csum-without-needs-csum": (CsumWithoutNeedsCsumNet, {"virtio-1.2:5.1.6.2#flags"}),
    "partial-csum-passed-on": (PartialCsumPassedOnNet, {"virtio-1.2:5.1.6.4#csum"}),
    "labels-tso": (LabelsTsoNet, {"virtio-1.2:5.1.6.4#gso"}),
    "small-mtu": (SmallMtuNet, {"virtio-1.2:5.1.4.1#mtu"}),
    "drops-vlan": (DropsVlanNet, {"virtio-1.2:5.1.6.5.3#untagged-filter"}),
}


@pytest.mark.parametrize("mutant", sorted(NET_MUTANTS))
def test_net_header_mutant_fails_exactly_its_check(make_backend, mutant):
    net_class, _expected = NET_MUTANTS[mutant]
    b = make_backend(net_class=net_class)
    target = Target(b.net_paths[0], "net", TIMEOUT, peer_socket=b.net_paths[1])
    failed = _failed(_vu_run(target, NET_HEADER_CLAUSES))
    assert set(failed) == MUTANT_EXPECTATIONS[mutant], failed


# -- single messages -------------------------------------------------------------------------------
def _starts_on_enable(monkeypatch):
    original = Vrings.enable

    def enable(self, index, enabled):
        original(self, index, enabled)
        vring = self[index]
        if enabled and not vring.started and vring.addr is not None:
            self._start(vring, None)  # polls a ring that never got its kick fd

    monkeypatch.setattr(Vrings, "enable", enable)


def _any_mtu(monkeypatch):
    monkeypatch.setattr(NetAdapter, "set_mtu", lambda self, mtu: None)


def _refuses_backend_channel(monkeypatch):
    def refuse(self, req):
        raise RequestRefused(req.code, "no back-end channel wanted")

    monkeypatch.setattr(BackendSession, "_set_backend_req_fd", refuse)


MESSAGE_CLAUSES = {"vhost-user:Ring states#started", "vhost-user:NET_SET_MTU", "vhost-user:SET_SLAVE_REQ_FD", "vhost-user:Header"}

MESSAGE_MUTANTS = {
    "starts-on-enable": (_starts_on_enable, {"vhost-user:Ring states#started"}),
    "accepts-any-mtu": (_any_mtu, {"vhost-user:NET_SET_MTU"}),
    "refuses-backend-channel": (_refuses_backend_channel, {"vhost-user:SET_SLAVE_REQ_FD"}),
}


@pytest.mark.parametrize("mutant", sorted(MESSAGE_MUTANTS))
def test_message_mutant_fails_exactly_its_check(make_backend, monkeypatch, mutant):
    inject, _expected = MESSAGE_MUTANTS[mutant]
    inject(monkeypatch)
    b = make_backend()
    failed = _failed(_vu_run(Target(b.net_paths[0], "net", TIMEOUT, peer_socket=b.net_paths[1]), MESSAGE_CLAUSES))
    assert set(failed) == MUTANT_EXPECTATIONS[mutant], failed


class IgnoresMtuNet(VirtioNet):
    """Passes received frames of any length (iovirt before the 5.1.4.1 fix)."""

    def _over_mtu(self, frame):
        return False


def test_mtu_rx_check_catches_oversized_delivery(make_backend):
    b = make_backend(net_class=IgnoresMtuNet)
    target = Target(b.net_paths[0], "net", TIMEOUT, peer_socket=b.net_paths[1])
    failed = _failed(_vu_run(target, {"virtio-1.2:5.1.4.1#mtu-rx", "virtio-1.2:5.1.4.1#mtu"}))
    assert set(failed) == {"virtio-1.2:5.1.4.1#mtu-rx"} == MUTANT_EXPECTATIONS["ignores-mtu"], failed
    assert "was passed to the driver" in failed["virtio-1.2:5.1.4.1#mtu-rx"]


def test_net_drops_received_frames_over_its_mtu(tmp_path):
    # Regression (virtio 1.2 5.1.4.1): with VIRTIO_NET_F_MTU negotiated, a frame longer than mtu plus its
    # Ethernet header (a VLAN tag included) is not passed to the driver, on the batch and the per-frame path.
    net = VirtioNet(bytes(6), mtu=1000)
    net.set_features(net.device_features())
    plain = b"\xff" * 12 + b"\x08\x00"
    tagged = b"\xff" * 12 + b"\x81\x00\x00\x2a\x08\x00"
    assert not net._over_mtu(plain + bytes(1000)) and net._over_mtu(plain + bytes(1001))
    assert not net._over_mtu(tagged + bytes(1000 - 4 + 4)) and net._over_mtu(tagged + bytes(1001))
    assert net.deliver(plain + bytes(1001), None) is False
    net.set_features(net.device_features() & ~(1 << VIRTIO_NET_F_MTU))
    assert not net._over_mtu(plain + bytes(1001))


# -- hdr_len, CTRL_VQ dependencies, used len ------------------------------------------------------------
class RelyOnHdrLenNet(VirtioNet):
    """Drops a GSO frame whose hdr_len does not cover its headers (it trusts hdr_len)."""

    def _transmit(self, index, queue):
        state = queue.state()
        end = queue.memory.read_u16(state.avail_addr + 2)
        i = state.last_avail_idx
        while i != end:
            hdr_addr = queue.memory.read_u64(state.desc_addr + 16 * _avail(queue, state, i))
            hdr = NetHdr.unpack(queue.memory.read(hdr_addr, NET_HDR_SIZE))
            if hdr.gso_type and hdr.hdr_len < hdr.csum_start + 20:
                queue.memory.write(hdr_addr, NetHdr(hdr.flags, 0x33, 0, hdr.gso_size, hdr.csum_start,
                                                    hdr.csum_offset).pack(NET_HDR_SIZE))  # an invalid gso_type
            i = (i + 1) & 0xFFFF
        super()._transmit(index, queue)


class RxExtraWithoutCtrlVqNet(VirtioNet):
    """Offers CTRL_RX_EXTRA (and no MQ) while its adapter no longer adds CTRL_VQ."""

    def device_features(self):
        return super().device_features() & ~(1 << VIRTIO_NET_F_MQ) | 1 << NEED_CTRL_VQ_RX_EXTRA


def test_hdr_len_and_ctrl_vq_mutants(make_backend, monkeypatch):
    clauses = {"virtio-1.2:5.1.6.2#hdr_len", "virtio-1.2:5.1.4.1#ctrl_vq", "virtio-1.2:5.1.3.1", "virtio-1.2:5.1.6.2"}
    b = make_backend(net_class=RelyOnHdrLenNet)
    failed = _failed(_vu_run(Target(b.net_paths[0], "net", TIMEOUT, peer_socket=b.net_paths[1]), clauses))
    assert set(failed) == {"virtio-1.2:5.1.6.2#hdr_len"} == MUTANT_EXPECTATIONS["relies-on-hdr-len"], failed
    monkeypatch.setattr(NetConfigAdapter, "extra_features", 0)
    b = make_backend(net_class=RxExtraWithoutCtrlVqNet)
    failed = _failed(_vu_run(Target(b.net_paths[0], "net", TIMEOUT, peer_socket=b.net_paths[1]), clauses))
    assert set(failed) == {"virtio-1.2:5.1.4.1#ctrl_vq"} == MUTANT_EXPECTATIONS["rx-extra-without-ctrl-vq"], failed


class _OldBytesBeforePush:
    """A queue whose ``push_batch`` first writes back ``reads``' old bytes (the rest is the queue's)."""

    def __init__(self, inner, reads):
        self.inner = inner
        self.reads = reads

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def push_batch(self, batch, *args, **kwargs):
        for addr, before in self.reads:
            self.inner.memory.write(addr, before)
        self.reads.clear()
        self.inner.push_batch(batch, *args, **kwargs)


class LateDataBlk(VirtioBlk):
    """Publishes reads whose data it has not (yet) written: the first bytes still hold what was there.

    The read's data goes into the driver's buffer, and its first 16 bytes are
    put back as they were just before the used entry is published, in the
    push itself: no driver can see the entry before the old bytes (putting
    them back after the push raced with a driver that reads at once).
    """

    # Every request completes (and is pushed) inside process_queue; asynchronous completion (the vhost-user
    # back-end's) pushes from the completion handler, which this mutant does not wrap.
    @property
    def complete_async(self):
        return False

    @complete_async.setter
    def complete_async(self, value):
        pass

    def process_queue(self, index, queue):
        state = queue.state()
        end = queue.memory.read_u16(state.avail_addr + 2)
        i, reads = state.last_avail_idx, []
        while i != end:
            head = _avail(queue, state, i)
            hdr_addr = queue.memory.read_u64(state.desc_addr + 16 * head)
            if REQ_HDR.unpack(queue.memory.read(hdr_addr, REQ_HDR.size))[0] == VIRTIO_BLK_T_IN:
                nxt = queue.memory.read_u16(state.desc_addr + 16 * head + 14)
                data_addr = queue.memory.read_u64(state.desc_addr + 16 * nxt)
                reads.append((data_addr, queue.memory.read(data_addr, 16)))
            i = (i + 1) & 0xFFFF
        super().process_queue(index, _OldBytesBeforePush(queue, reads))


def test_used_len_written_mutant(make_backend):
    failed = _failed(_vu_run(_blk(make_backend(blk_class=LateDataBlk)), {"virtio-1.2:2.7.8#written", "vhost-user:Header"}))
    assert set(failed) == {"virtio-1.2:2.7.8#written"} == MUTANT_EXPECTATIONS["late-data"], failed


# -- feature-gated config fields: a correct device passes, a broken one fails ---------------------------
class ZonedBlk(VirtioBlk):
    """Offers VIRTIO_BLK_F_ZONED, host-aware, with a zoned characteristics struct (5.2.4)."""

    model, unused2, zero_when_not_accepted = VIRTIO_BLK_Z_HA, bytes(3), True

    def device_features(self):
        return super().device_features() | 1 << VIRTIO_BLK_F_ZONED

    def config_space(self):
        accepted = self.has_feature(VIRTIO_BLK_F_ZONED) or not self.zero_when_not_accepted
        zoned = ZONED_FIELDS.pack(2048, 8, 8, 64, 8, self.model, self.unused2) if accepted else bytes(ZONED_FIELDS.size - 4) + bytes([self.model]) + bytes(3)
        return super().config_space() + bytes(CONFIG_ZONED - 60) + zoned


class BadModelBlk(ZonedBlk):
    model = 7


class ZonedFieldsKeptBlk(ZonedBlk):
    zero_when_not_accepted = False


class LegacyZonedBlk(ZonedBlk):
    """Offers ZONED without VIRTIO_F_VERSION_1 (a legacy device)."""

    def device_features(self):
        return super().device_features() & ~(1 << VIRTIO_F_VERSION_1)


class FieldsNet(VirtioNet):
    """Offers SPEED_DUPLEX and RSS with the fields of struct virtio_net_config they bring."""

    speed, duplex, key = 10000, 0x00, 40

    def device_features(self):
        return super().device_features() | 1 << VIRTIO_NET_F_SPEED_DUPLEX | 1 << VIRTIO_NET_F_RSS

    def config_space(self):
        return super().config_space() + struct.pack("<IBBH", self.speed, self.duplex, self.key, 128)


class BadDuplexNet(FieldsNet):
    duplex = 5


class ShortKeyNet(FieldsNet):
    key = 16


@pytest.mark.parametrize("blk_class,fails", [(ZonedBlk, False), (BadModelBlk, True), (ZonedFieldsKeptBlk, True),
                                             (LegacyZonedBlk, True)],
                         ids=["correct", "bad-zoned-model", "zoned-fields-kept", "legacy-zoned"])
def test_zoned_config_check(make_backend, request, blk_class, fails):
    results = _vu_run(_blk(make_backend(blk_class=blk_class)), {"virtio-1.2:5.2.5#zoned"})
    assert results["virtio-1.2:5.2.5#zoned"].verdict is (Verdict.FAIL if fails else Verdict.PASS), results
    _assert_mutant(request, results, "virtio-1.2:5.2.5#zoned")


@pytest.mark.parametrize("net_class,fails", [(FieldsNet, False), (BadDuplexNet, True), (ShortKeyNet, True)],
                         ids=["correct", "bad-duplex", "short-rss-key"])
def test_net_feature_fields_check(make_backend, request, net_class, fails):
    b = make_backend(net_class=net_class)
    results = _vu_run(Target(b.net_paths[0], "net", TIMEOUT, peer_socket=b.net_paths[1]), {"virtio-1.2:5.1.4.1#feature-fields"})
    assert results["virtio-1.2:5.1.4.1#feature-fields"].verdict is (Verdict.FAIL if fails else Verdict.PASS), results
    _assert_mutant(request, results, "virtio-1.2:5.1.4.1#feature-fields")


class HostManagedAcceptsPlainBlk(ZonedBlk):
    """Host-managed, yet accepts FEATURES_OK from a driver that did not accept ZONED."""

    model = VIRTIO_BLK_Z_HM


def test_zoned_host_managed_must_refuse_features_ok(make_backend):
    results = _vu_run(_blk(make_backend(blk_class=HostManagedAcceptsPlainBlk)), {"virtio-1.2:5.2.5#zoned"})
    assert results["virtio-1.2:5.2.5#zoned"].verdict is Verdict.FAIL
    assert "accepted FEATURES_OK" in results["virtio-1.2:5.2.5#zoned"].reason
    assert set(_failed(results)) == MUTANT_EXPECTATIONS["host-managed-accepts-plain"]


class FirstPairOnlyNet(VirtioNet):
    """Serves transmitq1 only: the other transmit queues are never processed."""

    def process_queue(self, index, queue):
        if index % 2 and index > 1:
            return
        super().process_queue(index, queue)


class DisabledRxStillUsedNet(SlowPathNet):
    """Spreads received frames over every started receive queue, enabled or not."""

    def _rx_queue(self, flow):
        ready = [2 * p for p in range(self.queue_pairs) if self.queues[2 * p] is not None]
        return ready[flow % len(ready)] if ready else None


@pytest.mark.parametrize("net_class", [FirstPairOnlyNet, DisabledRxStillUsedNet], ids=["first-pair-only", "disabled-rx-still-used"])
def test_mq_data_path_mutants(make_backend, request, net_class):
    b = make_backend(net_class=net_class)
    clauses = {"vhost-user:Multiple queue support#data-path", "virtio-1.2:5.1.6.2"}
    failed = _failed(_vu_run(Target(b.net_paths[0], "net", TIMEOUT, peer_socket=b.net_paths[1]), clauses))
    assert set(failed) == {"vhost-user:Multiple queue support#data-path"} == MUTANT_EXPECTATIONS[request.node.callspec.id], failed


def test_device_state_round_trip_mutant(make_backend, monkeypatch):
    def cannot_save(self):
        raise IovirtError("state not saved")

    monkeypatch.setattr(BlkAdapter, "save_state", cannot_save)
    failed = _failed(_vu_run(_blk(make_backend()), {"vhost-user:DEVICE_STATE#round-trip", "vhost-user:Header"}))
    assert set(failed) == {"vhost-user:DEVICE_STATE#round-trip"} == MUTANT_EXPECTATIONS["cannot-save-state"], failed


def test_device_state_corrupt_copy_must_be_refused(make_backend, monkeypatch):
    # A back-end that loads whatever it is given (no integrity check) fails the corrupted-copy step.
    original = state_migration.decode
    monkeypatch.setattr(state_migration, "decode", lambda data, device_id: original(_fix_crc(data), device_id))
    results = _vu_run(_blk(make_backend()), {"vhost-user:DEVICE_STATE#round-trip"})
    result = results["vhost-user:DEVICE_STATE#round-trip"]
    assert result.verdict is Verdict.FAIL and "corrupted" in result.reason, result
    assert set(_failed(results)) == MUTANT_EXPECTATIONS["loads-corrupt-state"]


def _fix_crc(data: bytes) -> bytes:
    """The stream with its header's CRC recomputed and the payload's flipped byte flipped back (as if unchecked)."""
    payload = bytearray(data[devstate.HEADER.size :])
    magic, version, device_id, reserved, length, _crc = devstate.HEADER.unpack_from(data)
    try:
        devstate.decode(data, device_id)
        return data
    except devstate.DeviceStateError:
        payload[len(data) // 2 - devstate.HEADER.size] ^= 0xFF  # undo the check's corruption: the load "succeeds"
        return devstate.HEADER.pack(magic, version, device_id, reserved, length, zlib.crc32(payload)) + bytes(payload)


# -- optional virtio-pci capabilities: good ones pass, bad ones fail -------------------------------------
def _with_caps(monkeypatch, *payloads):
    original = transport_pci.VirtioPciFunction.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        for payload in payloads:
            self.add_capability(payload() if callable(payload) else VendorCapability(payload))

    monkeypatch.setattr(transport_pci.VirtioPciFunction, "__init__", init)


def _shm(shm_id: int, offset: int, length: int) -> bytes:
    bar = transport_pci.VIRTIO_BAR
    return bytes([8, bar, shm_id, 0, 0]) + struct.pack(
        "<IIII", offset & 0xFFFFFFFF, length & 0xFFFFFFFF, offset >> 32, length >> 32
    )


GOOD_VENDOR = bytes([9]) + struct.pack("<H", 0x1B36) + b"\x01\x02"  # 8 bytes with its header
BAD_VENDOR = bytes([9]) + struct.pack("<H", 0x1AF4) + b"\x01"  # 7 bytes, virtio's vendor ID


class CountingVendorCapability(VendorCapability):
    """A vendor data capability whose last dword counts the reads of it (a read side effect)."""

    def install(self, function, offset):
        super().install(function, offset)
        self.counter_at = offset + self.size - 4
        function.config.add_hook(self.counter_at, 4, self)

    def config_read(self, offset, size):
        cfg = self.function.config
        cfg.set(self.counter_at, 4, (cfg.get(self.counter_at, 4) + 1) & 0xFFFFFFFF)
        return cfg.get(offset, size)

    def config_write(self, offset, size, value):
        pass


@pytest.mark.parametrize("payloads,failure", [
    ((GOOD_VENDOR, _shm(1, 0x3000, 0x100)), None),
    ((BAD_VENDOR,), "not a multiple of 4"),
    ((_shm(1, 0x3000, 1 << 40),), "exceeds BAR"),
    ((lambda: CountingVendorCapability(GOOD_VENDOR[:-2] + bytes(6)),), "reads differently"),
], ids=["good", "vendor-0x1af4-odd-size", "shm-beyond-bar", "vendor-read-side-effect"])
def test_optional_pci_caps_check(monkeypatch, request, payloads, failure):
    _with_caps(monkeypatch, *payloads)
    results = _pci_run()
    result = results["virtio-1.2:4.1.4#shm-vendor"]
    assert result.verdict is (Verdict.FAIL if failure else Verdict.PASS), result
    assert (failure in result.reason) if failure else not result.reason  # found and checked
    if failure is None:  # a good 8-byte vendor data and a 24-byte shm capability hold their whole structures
        assert results["virtio-1.2:4.1.4.2"].verdict is Verdict.PASS, results["virtio-1.2:4.1.4.2"]
    _assert_mutant(request, results, "virtio-1.2:4.1.4#shm-vendor")


def test_inflight_resubmit_mutant(make_backend, monkeypatch):
    # A back-end that ignores the region a crashed one left: the requests in flight are never served.
    monkeypatch.setattr(Vrings, "_recover", lambda self, vring, region, used_idx: [])
    clauses = {"vhost-user:Inflight I/O tracking#resubmit", "vhost-user:Inflight I/O tracking"}
    failed = _failed(_vu_run(_blk(make_backend()), clauses))
    assert set(failed) == {"vhost-user:Inflight I/O tracking#resubmit"} == MUTANT_EXPECTATIONS["ignores-inflight-region"], failed


@pytest.mark.parametrize("multiplier,fails", [(4, False), (2, True)], ids=["correct", "notify-multiplier-2"])
def test_notification_data_layout_check(monkeypatch, request, multiplier, fails):
    # The transport offers VIRTIO_F_NOTIFICATION_DATA; a multiplier of 2 breaks its 4-byte rules.
    original = transport_pci.VirtioPciFunction.offered_features
    monkeypatch.setattr(transport_pci.VirtioPciFunction, "offered_features",
                        lambda self: original(self) | 1 << VIRTIO_F_NOTIFICATION_DATA)
    monkeypatch.setattr(transport_pci, "NOTIFY_OFF_MULTIPLIER", multiplier)
    results = _pci_run()
    result = results["virtio-1.2:4.1.4.4.1#notification-data"]
    assert result.verdict is (Verdict.FAIL if fails else Verdict.PASS), result
    assert not fails or "multiple of 4" in result.reason
    _assert_mutant(request, results, "virtio-1.2:4.1.4.4.1#notification-data")


# -- net: GSO types, UDP-tunnel bits and NEEDS_CSUM on receive --------------------------------------------
class IgnoresTunnelBitsNet(VirtioNet):
    """Clears the UDP-tunnel bits of a transmit header's gso_type (and DATA_VALID) and sends the frame."""

    def _transmit(self, index, queue):
        state = queue.state()
        end = queue.memory.read_u16(state.avail_addr + 2)
        i = state.last_avail_idx
        while i != end:
            hdr_addr = queue.memory.read_u64(state.desc_addr + 16 * _avail(queue, state, i))
            hdr = NetHdr.unpack(queue.memory.read(hdr_addr, NET_HDR_SIZE))
            if hdr.gso_type & TUNNEL_BITS:
                queue.memory.write(hdr_addr, NetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, hdr.gso_type & ~TUNNEL_BITS, hdr.hdr_len,
                                                    hdr.gso_size, hdr.csum_start, hdr.csum_offset).pack(NET_HDR_SIZE))
            i = (i + 1) & 0xFFFF
        super()._transmit(index, queue)


class LabelsUdpNet(SlowPathNet):
    """Marks received UDP/IPv4 frames as GSO_UDP whatever the driver negotiated."""

    def _receive_mergeable(self, queue, hdr, frame):
        if frame[12:14] == b"\x08\x00" and frame[ETH_HLEN + 9] == 17:
            hdr = NetHdr(hdr.flags, VIRTIO_NET_HDR_GSO_UDP, hdr.hdr_len, 1400, hdr.csum_start, hdr.csum_offset)
        return super()._receive_mergeable(queue, hdr, frame)


class CsumOffsetOffByTwoNet(SlowPathNet):
    """Passes NEEDS_CSUM on with csum_offset two bytes past the checksum field."""

    def deliver(self, frame, csum):
        return super().deliver(frame, None if csum is None else (csum[0], csum[1] + 2))


GSO_CLAUSES = {"virtio-1.2:5.1.6.2#tunnel", "virtio-1.2:5.1.6.4#gso-types", "virtio-1.2:5.1.6.4#needs-csum",
               "virtio-1.2:5.1.6.2"}
GSO_MUTANTS = {
    "ignores-tunnel-bits": (IgnoresTunnelBitsNet, {"virtio-1.2:5.1.6.2#tunnel"}),
    "labels-udp": (LabelsUdpNet, {"virtio-1.2:5.1.6.4#gso-types"}),
    "csum-offset-off-by-two": (CsumOffsetOffByTwoNet, {"virtio-1.2:5.1.6.4#needs-csum"}),
}


@pytest.mark.parametrize("mutant", sorted(GSO_MUTANTS))
def test_net_gso_mutant_fails_exactly_its_check(make_backend, mutant):
    net_class, _expected = GSO_MUTANTS[mutant]
    b = make_backend(net_class=net_class)
    target = Target(b.net_paths[0], "net", TIMEOUT, peer_socket=b.net_paths[1])
    failed = _failed(_vu_run(target, GSO_CLAUSES))
    assert set(failed) == MUTANT_EXPECTATIONS[mutant], failed


# -- packed rings -------------------------------------------------------------------------------------------
def _packed_available(queue):
    """(slot, flags) of the descriptors the driver has made available from the device's next slot on."""
    state = queue.state()
    slot, wrap = state.last_avail_idx & 0x7FFF, bool(state.last_avail_idx & 0x8000)
    out = []
    for _ in range(state.size):
        flags = queue.memory.read_u16(state.desc_addr + 16 * slot + 14)
        if bool(flags & VIRTQ_DESC_F_AVAIL) != wrap or bool(flags & VIRTQ_DESC_F_USED) == wrap:
            break
        out.append((slot, flags))
        slot += 1
        if slot == state.size:
            slot, wrap = 0, not wrap
    return out


def _is_packed(queue) -> bool:
    return isinstance(vrings_module.ring_of(queue), PackedQueue)


class SwapsFirstTwoNet(VirtioNet):
    """Transmits the first two lists of a packed batch in swapped order (their buffers exchanged)."""

    def _transmit(self, index, queue):
        avail = _packed_available(queue) if _is_packed(queue) else []
        if len(avail) >= 2 and not (avail[0][1] | avail[1][1]) & VIRTQ_DESC_F_NEXT:  # two one-descriptor lists
            base = queue.state().desc_addr
            a, b = (queue.memory.read(base + 16 * slot, 12) for slot, _f in avail[:2])
            queue.memory.write(base + 16 * avail[0][0], b)
            queue.memory.write(base + 16 * avail[1][0], a)
        super()._transmit(index, queue)


class TrustsFilledDescriptorBlk(VirtioBlk):
    """Takes a packed descriptor with an address as available, whatever its AVAIL/USED bits say."""

    def process_queue(self, index, queue):
        if _is_packed(queue):
            state = queue.state()
            slot, wrap = state.last_avail_idx & 0x7FFF, bool(state.last_avail_idx & 0x8000)
            at = state.desc_addr + 16 * slot
            flags = queue.memory.read_u16(at + 14)
            if queue.memory.read_u64(at) and (bool(flags & VIRTQ_DESC_F_AVAIL) != wrap or bool(flags & VIRTQ_DESC_F_USED) == wrap):
                avail = VIRTQ_DESC_F_AVAIL if wrap else VIRTQ_DESC_F_USED
                queue.memory.write_u16(at + 14, flags & ~(VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED) | avail)
        super().process_queue(index, queue)


class RewritesFirstUsedBlk(VirtioBlk):
    """Before each pass, rewrites the address field of slot 0's used descriptor (a used descriptor changed later;
    before the pass, so the change is made by the time the pass's own buffers show as used)."""

    def process_queue(self, index, queue):
        if _is_packed(queue):
            at = queue.state().desc_addr
            if queue.memory.read_u16(at + 14) & VIRTQ_DESC_F_USED:
                queue.memory.write_u64(at, queue.memory.read_u64(at) + 1)
        super().process_queue(index, queue)


class SwapsDataPiecesBlk(VirtioBlk):
    """Exchanges the second and third descriptors of a packed list of five or more (data out of order)."""

    def process_queue(self, index, queue):
        if _is_packed(queue):
            avail = _packed_available(queue)
            base = queue.state().desc_addr
            start = 0
            while start < len(avail):
                end = start
                while end < len(avail) and avail[end][1] & VIRTQ_DESC_F_NEXT:
                    end += 1
                if end - start >= 4:
                    b, c = avail[start + 1][0], avail[start + 2][0]
                    db, dc = queue.memory.read(base + 16 * b, 12), queue.memory.read(base + 16 * c, 12)
                    queue.memory.write(base + 16 * b, dc)
                    queue.memory.write(base + 16 * c, db)
                start = end + 1
        super().process_queue(index, queue)


PACKED_CLAUSES = {"virtio-1.2:2.8.12#order", "virtio-1.2:2.8.15#avail-bit", "virtio-1.2:2.8.15#used-descs",
                  "virtio-1.2:2.8.18#chain-order"}
PACKED_MUTANTS = {
    "swaps-first-two": ("net", SwapsFirstTwoNet, {"virtio-1.2:2.8.12#order"}),
    "trusts-filled-descriptor": ("blk", TrustsFilledDescriptorBlk, {"virtio-1.2:2.8.15#avail-bit"}),
    "rewrites-first-used": ("blk", RewritesFirstUsedBlk, {"virtio-1.2:2.8.15#used-descs"}),
    "swaps-data-pieces": ("blk", SwapsDataPiecesBlk, {"virtio-1.2:2.8.18#chain-order"}),
}


@pytest.mark.parametrize("mutant", sorted(PACKED_MUTANTS))
def test_packed_mutant_fails_exactly_its_check(make_backend, mutant):
    device, cls, _expected = PACKED_MUTANTS[mutant]
    if device == "net":
        b = make_backend(net_class=cls)
        target = Target(b.net_paths[0], "net", TIMEOUT, peer_socket=b.net_paths[1])
    else:
        target = _blk(make_backend(blk_class=cls))
    failed = _failed(_vu_run(target, PACKED_CLAUSES))
    assert set(failed) == MUTANT_EXPECTATIONS[mutant], failed


# -- virtqueue reset (virtio-pci queue_reset) ---------------------------------------------------------------
def _queue_reset_ignored(monkeypatch):
    monkeypatch.setattr(CommonCfg, "_write_queue_reset", lambda self, value: None)


def _restart_keeps_old_state(monkeypatch):
    # The device remembers where a queue the driver reset was and resumes there when the queue comes back.
    kept: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # device -> {queue index: state}
    original_reset, original_start = CommonCfg._write_queue_reset, VirtioDevice.start_queue

    def write_queue_reset(self, value):
        queue = self.device.queues[self.queue_select] if self.queue_select < len(self.device.queues) else None
        if queue is not None:
            kept.setdefault(self.device, {})[self.queue_select] = queue.state()
        original_reset(self, value)

    def start_queue(self, index, memory, state, notify, wrap=None, **options):
        old = kept.get(self, {}).pop(index, None)
        if old is not None:
            state = QueueState(**{**state.to_dict(), "last_avail_idx": old.last_avail_idx, "used_idx": old.used_idx})
        return original_start(self, index, memory, state, notify, wrap, **options)

    monkeypatch.setattr(CommonCfg, "_write_queue_reset", write_queue_reset)
    monkeypatch.setattr(VirtioDevice, "start_queue", start_queue)


QUEUE_RESET_MUTANTS = {
    "queue-reset-ignored": (_queue_reset_ignored, {"virtio-1.2:4.1.4.3.1#queue_reset"}),
    "restart-keeps-old-state": (_restart_keeps_old_state, {"virtio-1.2:4.1.4.3.1#queue_reset"}),
}


@pytest.mark.parametrize("mutant", sorted(QUEUE_RESET_MUTANTS))
@pytest.mark.parametrize("device", ["net", "blk"])
def test_queue_reset_mutants(monkeypatch, mutant, device):
    inject, _expected = QUEUE_RESET_MUTANTS[mutant]
    inject(monkeypatch)
    failed = _failed(_pci_run(device))
    assert set(failed) == {"virtio-1.2:4.1.4.3.1#queue_reset"} == MUTANT_EXPECTATIONS[mutant], failed


# -- zoned operation ---------------------------------------------------------------------------------------
class AppendsWithoutMaxAppendBlk(NoAppendZonedBlk):
    """Reports max_append_sectors 0 yet appends."""

    max_append = 0

    def _append(self, memory, request):
        self.max_append = MAX_APPEND
        try:
            super()._append(memory, request)
        finally:
            self.max_append = 0


@pytest.mark.parametrize("blk_class,fails", [(ZonedOpsBlk, None), (NoAppendZonedBlk, None), (SecureEraseZonedBlk, None),
                                             (EraseKeepsZoneStateBlk, "after SECURE_ERASE"),
                                             (CoarseWritesBlk, "write_granularity"),
                                             (AppendsWithoutMaxAppendBlk, "max_append_sectors 0"),
                                             (UnalignedWriteOkBlk, "off the write pointer"),
                                             (StaleAfterResetBlk, "old data"), (NoOpenLimitBlk, "max_open_zones")],
                         ids=["zoned-ops", "zoned-no-append", "zoned-secure-erase", "erase-keeps-zone-state",
                              "coarse-writes", "appends-without-max-append", "unaligned-write-ok", "stale-after-reset",
                              "no-open-limit"])
def test_zoned_ops_check(make_backend, request, blk_class, fails):
    results = _vu_run(_blk(make_backend(blk_class=blk_class)), {"virtio-1.2:5.2.6#zoned-ops"})
    _assert_mutant(request, results, "virtio-1.2:5.2.6#zoned-ops")
    result = results["virtio-1.2:5.2.6#zoned-ops"]
    if fails is None:
        assert result.verdict is Verdict.PASS and "not exercised" not in result.reason, result
        assert ("SECURE_ERASE not negotiated" in result.reason) is (blk_class is not SecureEraseZonedBlk), result
    else:
        assert result.verdict is Verdict.FAIL and fails in result.reason, result


# -- IOTLB (vhost-user IOMMU support) --------------------------------------------------------------------
def _permissions_ignored(monkeypatch):
    monkeypatch.setattr(DeviceIotlb, "_access_fail", lambda self, iova, access, entry: None)


def _invalidate_ignored(monkeypatch):
    # INVALIDATE acked but nothing dropped, and entries kept across completions: the old translation stays.
    monkeypatch.setattr(DeviceIotlb, "invalidate", lambda self, iova, size: True)
    monkeypatch.setattr(DeviceIotlb, "forget_unpinned", lambda self: None)


@pytest.mark.parametrize("inject,reason", [(None, None), (_permissions_ignored, "read-only"),
                                           (_invalidate_ignored, "old translation")],
                         ids=["correct", "permissions-ignored", "invalidate-ignored"])
def test_iotlb_check(make_backend, monkeypatch, request, inject, reason):
    if inject is not None:
        inject(monkeypatch)
    b = make_backend()
    results = _vu_run(Target(b.iommu_blk_path, "blk", TIMEOUT), {"vhost-user:IOMMU support"})
    _assert_mutant(request, results, "vhost-user:IOMMU support")
    result = results["vhost-user:IOMMU support"]
    if reason is None:
        assert result.verdict is Verdict.PASS, result
    else:
        assert result.verdict is Verdict.FAIL and reason in result.reason, result


# -- GET_VRING_BASE drains ------------------------------------------------------------------------------
class LateCompletionBlk(VirtioBlk):
    """Takes requests at once and serves them one by one on a thread of their own (GET_VRING_BASE does not wait)."""

    lock = threading.Lock()  # a push never races the ring's release

    def stop_queue(self, index):
        with self.lock:
            return super().stop_queue(index)

    def process_queue(self, index, queue):
        if not self.enabled[index]:
            return
        batches = []
        while True:
            batch = queue.pop_batch(1, None)
            if not len(batch):
                break
            batches.append(batch)

        def finish():
            for batch in batches:
                time.sleep(0.02)
                with self.lock:
                    if self.queues[index] is not queue:
                        return  # the ring was stopped meanwhile (GET_VRING_BASE did not wait): the rest is lost
                    self._serve_left(index, queue, batch, list(range(len(batch))), True)  # served, pushed, signalled

        if batches:
            threading.Thread(target=finish, daemon=True).start()


def test_get_vring_base_drain_mutant(make_backend):
    failed = _failed(_vu_run(_blk(make_backend(blk_class=LateCompletionBlk)), {"vhost-user:GET_VRING_BASE#drain"}))
    assert set(failed) == {"vhost-user:GET_VRING_BASE#drain"} and "in flight" in failed["vhost-user:GET_VRING_BASE#drain"], failed
    assert set(failed) == MUTANT_EXPECTATIONS["late-completion"]


# -- indirect tables ---------------------------------------------------------------------------------------
class ShortIndirectTablesBlk(MutantBlk):
    """Refuses an indirect table of more than 16 descriptors (a limit the spec does not give it)."""

    def mutate(self, queue, chain):
        if any(flags & VIRTQ_DESC_F_INDIRECT and length > 16 * 16 for _addr, length, flags in chain):
            self.fail(IovirtError("indirect table longer than 16 descriptors"))
            return False
        return True


def test_indirect_limits_mutant(make_backend):
    clauses = {"virtio-1.2:2.7.5.3.2#limits", "virtio-1.2:2.7.5.3.2"}
    failed = _failed(_vu_run(_blk(make_backend(blk_class=ShortIndirectTablesBlk)), clauses))
    assert set(failed) == {"virtio-1.2:2.7.5.3.2#limits"} == MUTANT_EXPECTATIONS["short-indirect-tables"], failed


# -- GET_LIFETIME ---------------------------------------------------------------------------------------------
class LifetimeBlk(VirtioBlk):
    """Offers VIRTIO_BLK_F_LIFETIME and reports eMMC-style lifetime metrics."""

    metrics = (1, 3, 11)  # NORMAL, 21-30 % of SLC lifetime used, MLC lifetime exceeded

    def device_features(self):
        return super().device_features() | 1 << VIRTIO_BLK_F_LIFETIME

    def _serve(self, memory, chain):
        request = parse_request(memory, chain)
        if request is not None and request.type == VIRTIO_BLK_T_GET_LIFETIME and request.din:
            memory.write(request.din[0][0], LIFETIME.pack(*self.metrics))
            memory.write(request.status_addr, bytes([VIRTIO_BLK_S_OK]))
            return chain.writable_len
        return super()._serve(memory, chain)


class ReservedLifetimeBlk(LifetimeBlk):
    metrics = (4, 3, 12)


@pytest.mark.parametrize("blk_class,fails", [(LifetimeBlk, False), (ReservedLifetimeBlk, True)],
                         ids=["lifetime", "reserved-lifetime-values"])
def test_lifetime_check(make_backend, request, blk_class, fails):
    results = _vu_run(_blk(make_backend(blk_class=blk_class)), {"virtio-1.2:5.2.6#lifetime"})
    result = results["virtio-1.2:5.2.6#lifetime"]
    assert result.verdict is (Verdict.FAIL if fails else Verdict.PASS), result
    _assert_mutant(request, results, "virtio-1.2:5.2.6#lifetime")


# -- admin virtqueue fields (VIRTIO_F_ADMIN_VQ) ---------------------------------------------------------
def _offers_admin_vq(monkeypatch, index_of, num):
    """The function offers ADMIN_VQ and its common configuration ends with admin_queue_index/num
    (``index_of(num_queues)`` and ``num``)."""
    monkeypatch.setattr(transport_pci, "VIRTIO_PCI_COMMON_CFG_SIZE", VIRTIO_PCI_COMMON_ADMIN_Q_NUM + 2)
    monkeypatch.setattr(common_cfg_module, "TRANSPORT_FEATURES", common_cfg_module.TRANSPORT_FEATURES | 1 << VIRTIO_F_ADMIN_VQ)
    offered, read = transport_pci.VirtioPciFunction.offered_features, CommonCfg.read
    monkeypatch.setattr(transport_pci.VirtioPciFunction, "offered_features", lambda self: offered(self) | 1 << VIRTIO_F_ADMIN_VQ)

    def admin_read(self, offset, size):
        if size == 2 and offset == VIRTIO_PCI_COMMON_ADMIN_Q_INDEX:
            return index_of(len(self.queues))
        if size == 2 and offset == VIRTIO_PCI_COMMON_ADMIN_Q_NUM:
            return num
        return read(self, offset, size)

    monkeypatch.setattr(CommonCfg, "read", admin_read)


@pytest.mark.parametrize("index_of,num,failure", [
    (lambda queues: queues, 1, None),
    (lambda queues: queues - 1, 1, "below num_queues"),
    (lambda queues: 0xFFF0, 0x20, "runs past"),
], ids=["good", "admin-index-among-queues", "admin-num-past-0xffff"])
def test_admin_queue_fields_check(monkeypatch, request, index_of, num, failure):
    _offers_admin_vq(monkeypatch, index_of, num)
    results = _pci_run()
    result = results["virtio-1.2:4.1.4.3.1#admin_queue"]
    assert result.verdict is (Verdict.FAIL if failure else Verdict.PASS), result
    assert failure is None or failure in result.reason
    _assert_mutant(request, results, "virtio-1.2:4.1.4.3.1#admin_queue")


# -- GSO frames to a driver with GUEST_TSO4 --------------------------------------------------------------
class GuestTsoNet(SlowPathNet):
    """Offers GUEST_TSO4 and GUEST_ECN and hands each received TCP/IPv4 segment over as a one-segment GSO
    frame: NEEDS_CSUM with the pseudo-header sum in place, gso_size the segment's payload, the ECN bit for CWR."""

    needs_csum, ecn_bit, rsc, rsc_info = True, True, False, True

    def device_features(self):
        rsc = 1 << VIRTIO_NET_F_RSC_EXT if self.rsc else 0
        return super().device_features() | 1 << VIRTIO_NET_F_GUEST_TSO4 | 1 << VIRTIO_NET_F_GUEST_ECN | rsc

    def _receive_mergeable(self, queue, hdr, frame):
        if self.has_feature(VIRTIO_NET_F_GUEST_TSO4) and frame[12:14] == b"\x08\x00" and frame[ETH_HLEN + 9] == 6:
            l4 = ETH_HLEN + 4 * (frame[ETH_HLEN] & 0xF)
            headers = l4 + 4 * (frame[l4 + 12] >> 4)
            end = ETH_HLEN + struct.unpack_from("!H", frame, ETH_HLEN + 2)[0]
            out = bytearray(frame)
            pseudo = frame[ETH_HLEN + 12 : ETH_HLEN + 20] + struct.pack("!BBH", 0, 6, end - l4)
            words = sum(struct.unpack(f"!{len(pseudo) // 2}H", pseudo))
            while words >> 16:
                words = (words & 0xFFFF) + (words >> 16)
            struct.pack_into("!H", out, l4 + 16, words)
            gso = VIRTIO_NET_HDR_GSO_TCPV4
            if self.ecn_bit and frame[l4 + 13] & 0x80 and self.has_feature(VIRTIO_NET_F_GUEST_ECN):
                gso |= VIRTIO_NET_HDR_GSO_ECN
            flags = VIRTIO_NET_HDR_F_NEEDS_CSUM if self.needs_csum else 0
            hdr, frame = NetHdr(flags, gso, headers, end - headers, l4, 16), bytes(out)
            if self.rsc_info and self.has_feature(VIRTIO_NET_F_RSC_EXT):  # one segment, no duplicated ACK
                hdr = NetHdr(flags | VIRTIO_NET_HDR_F_RSC_INFO, gso, headers, end - headers, 1, 0)
        return super()._receive_mergeable(queue, hdr, frame)


class GsoWithoutNeedsCsumNet(GuestTsoNet):
    needs_csum = False


class GsoWithoutEcnNet(GuestTsoNet):
    ecn_bit = False


class RscNet(GuestTsoNet):
    """Also offers RSC_EXT (its GSO frames then carry RSC_INFO)."""

    rsc = True


class RscWithoutInfoNet(RscNet):
    rsc_info = False


@pytest.mark.parametrize("net_class,fails", [(GuestTsoNet, None), (RscNet, None),
                                             (GsoWithoutNeedsCsumNet, "without NEEDS_CSUM"),
                                             (GsoWithoutEcnNet, "without the ECN bit"), (RscWithoutInfoNet, "without RSC_INFO")],
                         ids=["guest-tso", "rsc", "gso-without-needs-csum", "gso-without-ecn", "rsc-without-info"])
def test_guest_gso_check(make_backend, request, net_class, fails):
    b = make_backend(net_class=net_class)
    target = Target(b.net_paths[0], "net", TIMEOUT, peer_socket=b.net_paths[1])
    results = _vu_run(target, {"virtio-1.2:5.1.6.4#guest-gso"})
    _assert_mutant(request, results, "virtio-1.2:5.1.6.4#guest-gso")
    result = results["virtio-1.2:5.1.6.4#guest-gso"]
    if fails is None:
        assert result.verdict is Verdict.PASS and not result.reason, result
    else:
        assert result.verdict is Verdict.FAIL and fails in result.reason, result


# -- VLAN filter through the control queue (in-process transport) ------------------------------------------
def _ctrl_net(device, scratch):
    return VirtioNet(bytes.fromhex("525400123456"), LearningSwitch(), ctrl_vq=True, label="conform-ctrl")


@pytest.mark.parametrize("allows,failure", [(None, None), (lambda self, frame: True, "not in the filter table"),
                                            (lambda self, frame: frame[12:14] != b"\x81\x00", "was not received")],
                         ids=["correct", "vlan-filter-ignored", "vlan-tagged-dropped"])
def test_ctrl_vlan_check(monkeypatch, request, allows, failure):
    if allows is not None:
        monkeypatch.setattr(NetCtrl, "allows", allows)
    results = {r.clause: r for r in Runner(PlatformTarget("net", make_device=_ctrl_net)).run()}
    _assert_mutant(request, results, "virtio-1.2:5.1.6.5.3#ctrl-vlan")
    result = results["virtio-1.2:5.1.6.5.3#ctrl-vlan"]
    assert result.verdict is (Verdict.FAIL if failure else Verdict.PASS), result
    assert failure is None or failure in result.reason


# -- what each mutant makes fail (tests/conformance/test_every_check_has_a_mutant.py reads it) ----------------
def _table(table: dict) -> dict[str, frozenset[str]]:
    """Name -> expected clauses of a mutant table (the expected set is the last item of each row)."""
    return {name: frozenset(entry[-1]) for name, entry in table.items()}


SINGLE_MUTANTS: dict[str, set[str]] = {
    "refuses-renegotiation": {"virtio-1.2:2.2.2#renegotiate"},
    "ignores-mtu": {"virtio-1.2:5.1.4.1#mtu-rx"},
    "relies-on-hdr-len": {"virtio-1.2:5.1.6.2#hdr_len"},
    "rx-extra-without-ctrl-vq": {"virtio-1.2:5.1.4.1#ctrl_vq"},
    "late-data": {"virtio-1.2:2.7.8#written"},
    **dict.fromkeys(["bad-zoned-model", "zoned-fields-kept", "legacy-zoned", "host-managed-accepts-plain"],
                    {"virtio-1.2:5.2.5#zoned"}),
    **dict.fromkeys(["bad-duplex", "short-rss-key"], {"virtio-1.2:5.1.4.1#feature-fields"}),
    **dict.fromkeys(["first-pair-only", "disabled-rx-still-used"], {"vhost-user:Multiple queue support#data-path"}),
    **dict.fromkeys(["cannot-save-state", "loads-corrupt-state"], {"vhost-user:DEVICE_STATE#round-trip"}),
    **dict.fromkeys(["vendor-0x1af4-odd-size", "shm-beyond-bar", "vendor-read-side-effect"],
                    {"virtio-1.2:4.1.4#shm-vendor"}),
    "ignores-inflight-region": {"vhost-user:Inflight I/O tracking#resubmit"},
    "notify-multiplier-2": {"virtio-1.2:4.1.4.4.1#notification-data"},
    **dict.fromkeys(["erase-keeps-zone-state", "coarse-writes", "appends-without-max-append", "unaligned-write-ok",
                     "stale-after-reset", "no-open-limit"], {"virtio-1.2:5.2.6#zoned-ops"}),
    **dict.fromkeys(["permissions-ignored", "invalidate-ignored"], {"vhost-user:IOMMU support"}),
    "late-completion": {"vhost-user:GET_VRING_BASE#drain"},
    "short-indirect-tables": {"virtio-1.2:2.7.5.3.2#limits"},
    "reserved-lifetime-values": {"virtio-1.2:5.2.6#lifetime"},
    **dict.fromkeys(["admin-index-among-queues", "admin-num-past-0xffff"], {"virtio-1.2:4.1.4.3.1#admin_queue"}),
    **dict.fromkeys(["gso-without-needs-csum", "gso-without-ecn", "rsc-without-info"], {"virtio-1.2:5.1.6.4#guest-gso"}),
    **dict.fromkeys(["vlan-filter-ignored", "vlan-tagged-dropped"], {"virtio-1.2:5.1.6.5.3#ctrl-vlan"}),
}
"""The mutants of the tests above that are not rows of a table, by the name (or parametrize id) the test uses."""

_TABLES = [_table(PCI_MUTANTS), _table(BLK_MUTANTS), _table(LIFECYCLE_MUTANTS), _table(BLK_EDGE_MUTANTS),
           _table(NET_MUTANTS), _table(MESSAGE_MUTANTS), _table(GSO_MUTANTS), _table(PACKED_MUTANTS), _table(QUEUE_RESET_MUTANTS),
           _table({name: (clauses,) for name, clauses in SINGLE_MUTANTS.items()})]
MUTANT_EXPECTATIONS: dict[str, frozenset[str]] = {name: clauses for table in _TABLES for name, clauses in table.items()}
assert len(MUTANT_EXPECTATIONS) == sum(map(len, _TABLES)), "a mutant name is used twice"


def _assert_mutant(request, results: dict, clause: str) -> None:
    """Of ``clause`` (the one the test is about; an in-process run holds every virtio-pci clause, some of which a
    test's scaffolding breaks), a parametrized case whose id names a mutant fails exactly its clauses, any other
    case none."""
    failed = _failed({clause: results[clause]})
    assert set(failed) == MUTANT_EXPECTATIONS.get(request.node.callspec.id, frozenset()), failed
