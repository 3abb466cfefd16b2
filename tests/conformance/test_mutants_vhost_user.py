"""Mutants for the vhost-user checks that had none: each breaks one rule of an iovirt back-end.

Issue 17: every check can be seen to fail.  Each mutant below (a device
subclass, or a monkeypatch of the back-end) breaks exactly one rule; its test
runs the checks of the mutant's group (the clauses of one check module, on
one device) and asserts that exactly the clauses in
:data:`MUTANT_EXPECTATIONS` fail.  The convention is in
``tests/conformance/test_every_check_has_a_mutant.py``.
"""

from __future__ import annotations

import os
import struct
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from mutant_queue import MutantBlk, available_chains

from iovirt.errors import IovirtError
from iovirt.conformance.registry import Verdict, all_checks
from iovirt.conformance.runner import Runner
from iovirt.conformance.target import Target
from iovirt.vhost_user.backend import BackendSession
from iovirt.vhost_user.devices.vsock import attach
from iovirt.vhost_user.errors import RequestRefused
from iovirt.vhost_user.framing import build_reply
from iovirt.vhost_user.memtable import GuestMemoryTable
from iovirt.vhost_user.inflight import QueueRegion
from iovirt.vhost_user.messages import VHOST_USER_F_PROTOCOL_FEATURES, VHOST_USER_VERSION_MASK, U64, FrontendRequest as R
from iovirt.vhost_user.protocol import BackendConnection
from iovirt.vhost_user import requests as rq
from iovirt.vhost_user.server import VhostUserServer
from iovirt.vhost_user.vrings import VringError, Vrings
from iovirt.virtio.blk._datapath_py import parse_request
from iovirt.virtio.blk.defs import (
    DISCARD_SEG,
    REQ_HDR,
    SECTOR_SIZE,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
)
from iovirt.virtio.blk.device import VirtioBlk
from iovirt.virtio.chain import read_chain, write_chain
from iovirt.virtio.defs import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
)
from iovirt.virtio.input.defs import EV_ABS, EV_KEY, EV_REL, STATUSQ, VIRTIO_INPUT_CFG_EV_BITS, VIRTIO_INPUT_CFG_ID_NAME
from iovirt.virtio.input.device import VirtioInput
from iovirt.virtio.net.defs import (
    NET_HDR_SIZE,
    VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    NetHdr,
)
from iovirt.virtio.net.device import VirtioNet
from iovirt.virtio.rng.defs import REQUESTQ
from iovirt.virtio.rng.device import VirtioRng
from iovirt.virtio.vsock.defs import (
    HDR_SIZE,
    VIRTIO_VSOCK_F_NO_IMPLIED_STREAM,
    VIRTIO_VSOCK_F_STREAM,
    VIRTIO_VSOCK_OP_RST,
    VIRTIO_VSOCK_TYPE_STREAM,
    VMADDR_CID_HOST,
    Header,
)
from iovirt.virtio.vsock.device import VirtioVsock

TIMEOUT = 0.5
GUEST_CID = 42


def _clauses(module: str, device: str) -> set[str]:
    """The clauses of ``iovirt.conformance.checks.<module>`` that apply to ``device`` (the contrast group)."""
    return {c.clause for c in all_checks("vhost-user")
            if c.func.__module__ == f"iovirt.conformance.checks.{module}" and device in c.devices}


def _failed(target: Target, clauses: set[str]) -> dict[str, str]:
    checks = [c for c in all_checks("vhost-user") if c.clause in clauses]
    return {r.clause: r.reason for r in Runner(target, checks).run() if r.verdict is Verdict.FAIL}


# -- helpers that break one request or one reply of the back-end ------------------------------------
def _handler(monkeypatch, request: type, make: Callable[[BackendSession, Callable], Callable]) -> None:
    """Replace every new session's handler of ``request`` by ``make(session, original handler)``."""
    original_init = BackendSession.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self._handlers[request] = make(self, self._handlers[request])

    monkeypatch.setattr(BackendSession, "__init__", init)


def _extra_reply(monkeypatch, extra: Callable[[Any, Any], bytes | None]) -> None:
    """After each request is answered, send ``extra(conn, event)`` too when it gives bytes."""
    original = VhostUserServer._dispatch

    def dispatch(self, conn, event):
        if not original(self, conn, event):
            return False
        out = extra(conn, event) if isinstance(event, rq.Request) else None
        return out is None or self._send(conn, out, [], "")

    monkeypatch.setattr(VhostUserServer, "_dispatch", dispatch)


# -- vhost-user messages (checks/vhost_user.py, on blk) ----------------------------------------------
def _later_get_features_lack_version(monkeypatch):
    # Once protocol features are negotiated, a GET_FEATURES without need_reply is answered with version bits 0.
    original = BackendConnection.reply

    def reply(self, event, payload):
        out = original(self, event, payload)
        if event.request == R.VHOST_USER_GET_FEATURES and self.protocol_features and not event.need_reply:
            out = out[:4] + struct.pack("=I", struct.unpack_from("=I", out, 4)[0] & ~VHOST_USER_VERSION_MASK) + out[8:]
        return out

    monkeypatch.setattr(BackendConnection, "reply", reply)


def _acks_without_need_reply(monkeypatch):
    # With no protocol feature negotiated, SET_VRING_NUM is answered although nobody asked.
    negotiated_zero: "weakref.WeakSet[BackendSession]" = weakref.WeakSet()

    def make(session, original):
        def set_protocol_features(req):
            original(req)
            if req.features == 0:
                negotiated_zero.add(session)
        return set_protocol_features

    _handler(monkeypatch, rq.SetProtocolFeatures, make)
    _extra_reply(monkeypatch, lambda conn, event: build_reply(R.VHOST_USER_SET_VRING_NUM, U64(0).pack())
                 if event.request == R.VHOST_USER_SET_VRING_NUM and conn.session in negotiated_zero else None)


def _acks_a_get_too(monkeypatch):
    # need_reply on GET_FEATURES: the body, then a u64 ack as well (REPLY_ACK: requests with a reply get only it).
    _extra_reply(monkeypatch, lambda conn, event: build_reply(R.VHOST_USER_GET_FEATURES, U64(0).pack())
                 if event.request == R.VHOST_USER_GET_FEATURES and event.need_reply else None)


def _protocol_features_only_after_set_features(monkeypatch):
    # GET_PROTOCOL_FEATURES before SET_FEATURES answers 0: the back-end "knows" its protocol features only later.
    def make(session, original):
        return lambda req: original(req) if session.features else U64(0)

    _handler(monkeypatch, rq.GetProtocolFeatures, make)


def _waits_for_enable_without_bit30(monkeypatch):
    # Without VHOST_USER_F_PROTOCOL_FEATURES the rings stay disabled (as if SET_VRING_ENABLE were still due).
    def make(session, original):
        def set_features(req):
            original(req)
            if not req.features >> VHOST_USER_F_PROTOCOL_FEATURES & 1:
                session.vrings.auto_enable = False
                session.vrings.enable_all(False)
        return set_features

    _handler(monkeypatch, rq.SetFeatures, make)


class ServesDisabledBlk(VirtioBlk):
    """Serves a started ring whether it is enabled or not."""

    def process_queue(self, index, queue):
        enabled = self.enabled[index]
        self.enabled[index] = True
        try:
            super().process_queue(index, queue)
        finally:
            self.enabled[index] = enabled


def _refuses_call_nofd(monkeypatch):
    original = Vrings.set_eventfd

    def set_eventfd(self, index, name, fd):
        if name == "call_fd" and fd is None:
            raise VringError("a ring needs a call eventfd")
        original(self, index, name, fd)

    monkeypatch.setattr(Vrings, "set_eventfd", set_eventfd)


def _maps_four_regions(monkeypatch):
    # SET_MEM_TABLE: only the first four regions are mapped, the rest acked and dropped.
    original = GuestMemoryTable.set_table

    def set_table(self, regions, fds):
        for fd in fds[4:]:
            os.close(fd)
        original(self, regions[:4], fds[:4])

    monkeypatch.setattr(GuestMemoryTable, "set_table", set_table)


def _ignores_regions_past_eight(monkeypatch):
    # ADD_MEM_REG: acked but ignored once eight regions are mapped (GET_MAX_MEM_SLOTS says more).
    original = GuestMemoryTable.add

    def add(self, region, fds):
        if len(self.memory.regions) >= 8:
            for fd in fds:
                os.close(fd)
            return
        original(self, region, fds)

    monkeypatch.setattr(GuestMemoryTable, "add", add)


def _keeps_rem_mem_reg_fd(monkeypatch):
    # REM_MEM_REG: the fd sent with it stays open (a copy is kept until the test ends).
    kept: list[int] = []
    original = GuestMemoryTable.remove

    def remove(self, region, fds):
        kept.extend(os.dup(fd) for fd in fds)
        original(self, region, fds)

    monkeypatch.setattr(GuestMemoryTable, "remove", remove)
    yield
    for fd in kept:
        os.close(fd)


def _config_rounded_to_dwords(monkeypatch):
    # GET_CONFIG answers whole dwords: a 2-byte read gets 4 bytes.
    original = BackendSession._get_config

    def get_config(self, req):
        config = original(self, req)
        size = -(-req.size // 4) * 4
        return type(config)(req.offset, req.flags, self.device.read_config(req.offset, size)) if size != req.size else config

    monkeypatch.setattr(BackendSession, "_get_config", get_config)


def _config_writes_acked(monkeypatch):
    # SET_CONFIG of read-only bytes: nothing changes, yet the ack says success.
    monkeypatch.setattr(BackendSession, "_set_config", lambda self, req: None)


def _inflight_used_idx_stale(monkeypatch):
    # The queue region's used_idx is never moved on when a batch completes.
    def completed(self, heads, used_idx):
        for head in heads:
            _, nxt, counter = self._desc(head)
            self._set_desc(head, 0, nxt, counter)

    monkeypatch.setattr(QueueRegion, "completed", completed)


def _zero_queues(monkeypatch):
    def make(session, original):
        return lambda req: U64(0)

    _handler(monkeypatch, rq.GetQueueNum, make)


VHOST_USER_MUTANTS: dict[str, tuple[Callable | None, dict]] = {
    "later-get-features-lack-version": (_later_get_features_lack_version, {}),
    "acks-without-need-reply": (_acks_without_need_reply, {}),
    "acks-a-get-too": (_acks_a_get_too, {}),
    "protocol-features-only-after-set-features": (_protocol_features_only_after_set_features, {}),
    "waits-for-enable-without-bit30": (_waits_for_enable_without_bit30, {}),
    "serves-disabled-ring": (None, {"blk_class": ServesDisabledBlk}),
    "refuses-call-nofd": (_refuses_call_nofd, {}),
    "maps-four-regions": (_maps_four_regions, {}),
    "ignores-regions-past-eight": (_ignores_regions_past_eight, {}),
    "keeps-rem-mem-reg-fd": (_keeps_rem_mem_reg_fd, {}),
    "config-rounded-to-dwords": (_config_rounded_to_dwords, {}),
    "config-writes-acked": (_config_writes_acked, {}),
    "inflight-used-idx-stale": (_inflight_used_idx_stale, {}),
    "zero-queues": (_zero_queues, {}),
}

VHOST_USER_EXPECTATIONS = {
    "later-get-features-lack-version": {"vhost-user:Header"},
    "acks-without-need-reply": {"vhost-user:Communication"},
    "acks-a-get-too": {"vhost-user:REPLY_ACK"},
    "protocol-features-only-after-set-features": {"vhost-user:GET_PROTOCOL_FEATURES"},
    "waits-for-enable-without-bit30": {"vhost-user:Ring states#no-bit30"},
    "serves-disabled-ring": {"vhost-user:Ring states#disabled"},
    "refuses-call-nofd": {"vhost-user:SET_VRING_CALL#nofd"},
    "maps-four-regions": {"vhost-user:SET_MEM_TABLE"},
    "ignores-regions-past-eight": {"vhost-user:CONFIGURE_MEM_SLOTS"},
    "keeps-rem-mem-reg-fd": {"vhost-user:REM_MEM_REG"},
    "config-rounded-to-dwords": {"vhost-user:GET_CONFIG"},
    "config-writes-acked": {"vhost-user:SET_CONFIG"},
    "inflight-used-idx-stale": {"vhost-user:Inflight I/O tracking"},
    "zero-queues": {"vhost-user:GET_QUEUE_NUM"},
}


def _inject(monkeypatch, inject):
    """Apply ``inject``; a generator mutant is run to its ``yield`` and finished at teardown."""
    if inject is None:
        return None
    result = inject(monkeypatch)
    if result is not None and hasattr(result, "__next__"):
        next(result)
        return result
    return None


def _finish(gen):
    if gen is not None:
        next(gen, None)


@pytest.mark.parametrize("mutant", sorted(VHOST_USER_EXPECTATIONS))
def test_vhost_user_message_mutant(make_backend, monkeypatch, mutant):
    inject, kwargs = VHOST_USER_MUTANTS[mutant]
    gen = _inject(monkeypatch, inject)
    try:
        b = make_backend(**kwargs)
        failed = _failed(Target(b.blk_path, "blk", TIMEOUT), _clauses("vhost_user", "blk"))
    finally:
        monkeypatch.undo()
        _finish(gen)
    assert set(failed) == MUTANT_EXPECTATIONS[mutant], failed


# -- generic virtqueue rules (checks/virtqueue.py, on blk) ---------------------------------------------
class NoVersion1Blk(VirtioBlk):
    """Offers no VIRTIO_F_VERSION_1 (a legacy-only device)."""

    def device_features(self):
        return super().device_features() & ~(1 << VIRTIO_F_VERSION_1)


def _needs_indirect_desc(monkeypatch):
    # Refuses a driver that does not take VIRTIO_F_INDIRECT_DESC (a valid subset of its features).
    def make(session, original):
        def set_features(req):
            if not req.features >> VIRTIO_F_INDIRECT_DESC & 1:
                raise RequestRefused(req.code, "VIRTIO_F_INDIRECT_DESC is needed")
            original(req)
        return set_features

    _handler(monkeypatch, rq.SetFeatures, make)


class HeaderAloneBlk(MutantBlk):
    """Assumes the request header has a descriptor of its own: a first descriptor longer than the header is
    taken for a malformed request (its type is rewritten to an unknown one, so it completes UNSUPP)."""

    def mutate(self, queue, chain):
        addr, length, flags = chain[0]
        if not flags & (VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_WRITE) and length > REQ_HDR.size:
            queue.memory.write_u32(addr, 0x5A)
        return True


class ScribblesOnHeaderBlk(MutantBlk):
    """Writes into the first device-readable descriptor of each request (the header's ioprio byte)."""

    def mutate(self, queue, chain):
        addr, length, flags = chain[0]
        if not flags & (VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_WRITE) and length > 4:
            queue.memory.write(addr + 4, b"\x01")
        return True


class ShortIndirectOnlyBlk(MutantBlk):
    """Takes an indirect table of fewer than four descriptors for a driver error (and so needs a reset)."""

    def mutate(self, queue, chain):
        if any(flags & VIRTQ_DESC_F_INDIRECT and length < 4 * 16 for _addr, length, flags in chain):
            self.fail(IovirtError("indirect table of fewer than 4 descriptors"))
            return False
        return True


class SilentWithoutEventIdxBlk(VirtioBlk):
    """Sends no used buffer notification when VIRTIO_F_EVENT_IDX is not negotiated."""

    def signal(self, index):
        queue = self.queues[index]
        if self.has_feature(VIRTIO_F_EVENT_IDX) or queue is None:
            super().signal(index)
        else:
            queue.need_notify()  # its bookkeeping kept; the answer ignored


class SilentWithEventIdxBlk(VirtioBlk):
    """Sends no used buffer notification when VIRTIO_F_EVENT_IDX is negotiated, whatever used_event says."""

    def signal(self, index):
        queue = self.queues[index]
        if not self.has_feature(VIRTIO_F_EVENT_IDX) or queue is None:
            super().signal(index)
        else:
            queue.need_notify()


class NoNotifyFlagWithEventIdxBlk(VirtioBlk):
    """Sets VIRTQ_USED_F_NO_NOTIFY in the used flags although VIRTIO_F_EVENT_IDX is negotiated."""

    def process_queue(self, index, queue):
        super().process_queue(index, queue)
        if self.has_feature(VIRTIO_F_EVENT_IDX):
            queue.memory.write_u16(queue.state().used_addr, VIRTQ_USED_F_NO_NOTIFY)


VIRTQUEUE_MUTANTS: dict[str, tuple[Callable | None, dict]] = {
    "no-version-1": (None, {"blk_class": NoVersion1Blk}),
    "needs-indirect-desc": (_needs_indirect_desc, {}),
    "header-alone": (None, {"blk_class": HeaderAloneBlk}),
    "scribbles-on-header": (None, {"blk_class": ScribblesOnHeaderBlk}),
    "short-indirect-only": (None, {"blk_class": ShortIndirectOnlyBlk}),
    "silent-without-event-idx": (None, {"blk_class": SilentWithoutEventIdxBlk}),
    "silent-with-event-idx": (None, {"blk_class": SilentWithEventIdxBlk}),
    "no-notify-flag-with-event-idx": (None, {"blk_class": NoNotifyFlagWithEventIdxBlk}),
}

VIRTQUEUE_EXPECTATIONS = {
    "no-version-1": {"virtio-1.2:6.2"},
    "needs-indirect-desc": {"virtio-1.2:2.2.2"},
    "header-alone": {"virtio-1.2:2.7.4.1"},
    "scribbles-on-header": {"virtio-1.2:2.7.5.1"},
    "short-indirect-only": {"virtio-1.2:2.7.5.3.2"},
    "silent-without-event-idx": {"virtio-1.2:2.7.7.2#flags"},
    "silent-with-event-idx": {"virtio-1.2:2.7.7.2#used_event"},
    "no-notify-flag-with-event-idx": {"virtio-1.2:2.7.10.2"},
}


@pytest.mark.parametrize("mutant", sorted(VIRTQUEUE_EXPECTATIONS))
def test_virtqueue_mutant(make_backend, monkeypatch, mutant):
    inject, kwargs = VIRTQUEUE_MUTANTS[mutant]
    if inject is not None:
        inject(monkeypatch)
    b = make_backend(**kwargs)
    failed = _failed(Target(b.blk_path, "blk", TIMEOUT), _clauses("virtqueue", "blk"))
    assert set(failed) == MUTANT_EXPECTATIONS[mutant], failed


# -- virtio-net (checks/net.py) ----------------------------------------------------------------------------
class SlowPathNet(VirtioNet):
    """Receives every frame through the per-frame path, where the mutants below break one rule."""

    def _deliver_batch(self, frames, indexes):
        return sum(int(self.deliver(frames.frame(i), frames.csum(i))) for i in indexes)


class EcnWithoutTsoNet(VirtioNet):
    """Offers GUEST_ECN without GUEST_TSO4 or GUEST_TSO6, which it requires (5.1.3.1)."""

    def device_features(self):
        return super().device_features() & ~(1 << VIRTIO_NET_F_GUEST_TSO4 | 1 << VIRTIO_NET_F_GUEST_TSO6) \
            | 1 << VIRTIO_NET_F_GUEST_ECN


class ZeroNumBuffersNet(SlowPathNet):
    """Without MRG_RXBUF, writes num_buffers 0 into the receive header."""

    def _receive_single(self, index, queue, hdr, frame):
        chain = queue.pop()
        if chain is None:
            return False
        payload = NetHdr(hdr.flags, hdr.gso_type, hdr.hdr_len, hdr.gso_size, hdr.csum_start, hdr.csum_offset, 0).pack(
            self.hdr_len) + frame
        queue.push(chain.head, write_chain(queue.memory, chain, payload))
        return True


class UsedLenWithoutHeaderNet(SlowPathNet):
    """Without MRG_RXBUF, reports a used length that leaves out the 12-byte header."""

    def _receive_single(self, index, queue, hdr, frame):
        chain = queue.pop()
        if chain is None:
            return False
        payload = NetHdr(hdr.flags, hdr.gso_type, hdr.hdr_len, hdr.gso_size, hdr.csum_start, hdr.csum_offset, 1).pack(
            self.hdr_len) + frame
        write_chain(queue.memory, chain, payload)
        queue.push(chain.head, len(frame))
        return True


class OneBufferCountedNet(SlowPathNet):
    """With MRG_RXBUF, spreads a frame over several buffers yet writes num_buffers 1."""

    def _receive_mergeable(self, queue, hdr, frame):
        total, chains, room = self.hdr_len + len(frame), [], 0
        while room < total:
            chain = queue.pop()
            if chain is None:
                queue.rewind(len(chains))
                return False
            chains.append(chain)
            room += chain.writable_len
        payload = NetHdr(hdr.flags, hdr.gso_type, hdr.hdr_len, hdr.gso_size, hdr.csum_start, hdr.csum_offset, 1).pack() + frame
        pos = 0
        for chain in chains:
            n = write_chain(queue.memory, chain, payload[pos:])
            queue.push(chain.head, n)
            pos += n
        return True


class FlipsLongFramesNet(VirtioNet):
    """Flips the last byte of every transmitted frame of 1000 bytes or more."""

    def _transmit(self, index, queue):
        for chain in available_chains(queue):
            if sum(length for _a, length, _f in chain) >= NET_HDR_SIZE + 1000 and not chain[-1][2] & VIRTQ_DESC_F_INDIRECT:
                addr, length, _flags = chain[-1]
                queue.memory.write(addr + length - 1, bytes([queue.memory.read(addr + length - 1, 1)[0] ^ 0xFF]))
        super()._transmit(index, queue)


class NoQueuePairsNet(VirtioNet):
    """Offers MQ with max_virtqueue_pairs 0 in its config space."""

    def config_space(self):
        config = super().config_space()
        return config[:8] + bytes(2) + config[10:]


NET_MUTANTS: dict[str, type[VirtioNet]] = {
    "ecn-without-tso": EcnWithoutTsoNet,
    "zero-num-buffers": ZeroNumBuffersNet,
    "used-len-without-header": UsedLenWithoutHeaderNet,
    "one-buffer-counted": OneBufferCountedNet,
    "flips-long-frames": FlipsLongFramesNet,
    "no-queue-pairs": NoQueuePairsNet,
}

NET_EXPECTATIONS = {
    "ecn-without-tso": {"virtio-1.2:5.1.3.1"},
    "zero-num-buffers": {"virtio-1.2:5.1.6.4.1#num_buffers"},
    "used-len-without-header": {"virtio-1.2:5.1.6"},
    "one-buffer-counted": {"virtio-1.2:5.1.6.4.1#mrg_rxbuf"},
    "flips-long-frames": {"virtio-1.2:5.1.6.2"},
    "no-queue-pairs": {"virtio-1.2:5.1.4.1"},
}


@pytest.mark.parametrize("mutant", sorted(NET_EXPECTATIONS))
def test_net_mutant(make_backend, mutant):
    b = make_backend(net_class=NET_MUTANTS[mutant])
    failed = _failed(Target(b.net_paths[0], "net", TIMEOUT, peer_socket=b.net_paths[1]), _clauses("net", "net"))
    assert set(failed) == MUTANT_EXPECTATIONS[mutant], failed


# -- virtio-blk (checks/blk.py) ------------------------------------------------------------------------------
def _rewrite_header(queue, chain, rewrite: Callable[[int, int, int], tuple[int, int] | None]) -> bool:
    """Give the request ``chain``, if its header is alone in its first descriptor, the (type, sector) that
    ``rewrite(type, sector, data bytes the device may write)`` returns (``None``: unchanged).

    Returns True (:meth:`MutantBlk.mutate`: the chain may be popped)."""
    addr, length, flags = chain[0]
    if flags & (VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_WRITE) or length != REQ_HDR.size:
        return True
    rtype, reserved, sector = REQ_HDR.unpack(queue.memory.read(addr, REQ_HDR.size))
    writable = sum(n for _a, n, f in chain if f & VIRTQ_DESC_F_WRITE) - 1
    new = rewrite(rtype, sector, writable)
    if new is not None:
        queue.memory.write(addr, REQ_HDR.pack(new[0], reserved, new[1]))
    return True


class ShiftedWritesBlk(MutantBlk):
    """Writes land one sector past the one asked for."""

    def mutate(self, queue, chain):
        return _rewrite_header(queue, chain, lambda t, s, n: (t, s + 1) if t == VIRTIO_BLK_T_OUT else None)


class FlushUnsupportedBlk(MutantBlk):
    """Offers VIRTIO_BLK_F_FLUSH but answers FLUSH as an unknown request (UNSUPP)."""

    def mutate(self, queue, chain):
        return _rewrite_header(queue, chain, lambda t, s, n: (0x5A, s) if t == VIRTIO_BLK_T_FLUSH else None)


class GarbageIdBlk(VirtioBlk):
    """Answers GET_ID with control characters."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.serial = b"\x01\x02id"


class UnknownTypeOkBlk(VirtioBlk):
    """Completes a request of an unknown type with OK."""

    def _serve(self, memory, chain):
        request = parse_request(memory, chain)
        if request is not None and request.type == 0x5A:
            memory.write(request.status_addr, bytes([VIRTIO_BLK_S_OK]))
            return chain.writable_len
        return super()._serve(memory, chain)


class LastSectorUnreadableBlk(MutantBlk):
    """Fails (IOERR) a read of the last sector, as if capacity were one sector less."""

    def mutate(self, queue, chain):
        last = self.capacity - 1
        return _rewrite_header(queue, chain, lambda t, s, n: (t, s + 1) if t == VIRTIO_BLK_T_IN and s == last else None)


class ClampsReadsBlk(MutantBlk):
    """Serves a read past the end from the last sectors instead (OK, not IOERR)."""

    def mutate(self, queue, chain):
        cap = self.capacity

        def clamp(t, s, n):
            count = -(-n // SECTOR_SIZE)
            return (t, max(0, cap - count)) if t == VIRTIO_BLK_T_IN and s + count > cap else None

        return _rewrite_header(queue, chain, clamp)


class WritesDespiteRoBlk(MutantBlk):
    """Read-only, yet completes a write with OK (it is taken for a FLUSH: nothing written)."""

    def mutate(self, queue, chain):
        ro = self.read_only
        return _rewrite_header(queue, chain,
                               lambda t, s, n: (VIRTIO_BLK_T_FLUSH, 0) if ro and t == VIRTIO_BLK_T_OUT else None)


class ZeroesNothingBlk(VirtioBlk):
    """Completes WRITE_ZEROES with OK without zeroing anything."""

    def _discard_or_zero(self, memory, rtype, bufs):
        if rtype != VIRTIO_BLK_T_WRITE_ZEROES:
            super()._discard_or_zero(memory, rtype, bufs)


class DiscardIgnoresUnmapBlk(VirtioBlk):
    """Takes DISCARD with the unmap flag as a plain DISCARD (OK instead of UNSUPP)."""

    def _discard_or_zero(self, memory, rtype, bufs):
        if rtype == VIRTIO_BLK_T_DISCARD:
            for addr, n in bufs:
                for off in range(0, n - n % DISCARD_SEG.size, DISCARD_SEG.size):
                    memory.write_u32(addr + off + 12, 0)
        super()._discard_or_zero(memory, rtype, bufs)


BLK_MUTANTS: dict[str, tuple[type[VirtioBlk], str]] = {
    "shifted-writes": (ShiftedWritesBlk, "rw"),
    "flush-unsupported": (FlushUnsupportedBlk, "rw"),
    "garbage-id": (GarbageIdBlk, "rw"),
    "unknown-type-ok": (UnknownTypeOkBlk, "rw"),
    "last-sector-unreadable": (LastSectorUnreadableBlk, "rw"),
    "clamps-reads": (ClampsReadsBlk, "rw"),
    "writes-despite-ro": (WritesDespiteRoBlk, "ro"),
    "zeroes-nothing": (ZeroesNothingBlk, "rw"),
    "discard-ignores-unmap": (DiscardIgnoresUnmapBlk, "rw"),
}

BLK_EXPECTATIONS = {
    "shifted-writes": {"virtio-1.2:5.2.6#in-out"},
    "flush-unsupported": {"virtio-1.2:5.2.6#flush"},
    "garbage-id": {"virtio-1.2:5.2.6#get-id"},
    "unknown-type-ok": {"virtio-1.2:5.2.6#unsupp"},
    "last-sector-unreadable": {"virtio-1.2:5.2.4"},
    "clamps-reads": {"virtio-1.2:5.2.6#beyond-capacity"},
    "writes-despite-ro": {"virtio-1.2:5.2.6.2#ro"},
    "zeroes-nothing": {"virtio-1.2:5.2.6.2#write-zeroes"},
    "discard-ignores-unmap": {"virtio-1.2:5.2.6.2#discard-unmap"},
}


@pytest.mark.parametrize("mutant", sorted(BLK_EXPECTATIONS))
def test_blk_mutant(make_backend, mutant):
    blk_class, image = BLK_MUTANTS[mutant]
    b = make_backend(blk_class=blk_class)
    failed = _failed(Target(b.blk_path if image == "rw" else b.blk_ro_path, "blk", TIMEOUT), _clauses("blk", "blk"))
    assert set(failed) == MUTANT_EXPECTATIONS[mutant], failed


# -- rng, input, vsock (checks/rng.py, input.py, vsock.py) ------------------------------------------------
@dataclass
class Served:
    """One device behind its own vhost-user server."""

    server: VhostUserServer
    thread: threading.Thread
    socket: str
    detach: Callable[[], None] | None = None

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(timeout=10)
        if self.detach is not None:
            self.detach()


@pytest.fixture
def serve_device(tmp_path):
    served: list[Served] = []

    def serve(device) -> str:
        server = VhostUserServer()
        path = str(tmp_path / f"dev{len(served)}.sock")
        server.add_socket(path, device)
        detach = attach(server.dataplane, device) if isinstance(device, VirtioVsock) else None
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        served.append(Served(server, thread, path, detach))
        return path

    yield serve
    for s in served:
        s.stop()


class RngMutant(VirtioRng):
    """Fills each request by :meth:`fill` (data, used length) instead of from the source."""

    def process_queue(self, index, queue):
        if index != REQUESTQ or not self.enabled[index]:
            return
        served = 0
        while (chain := queue.pop()) is not None:
            data, used = self.fill(chain)
            queue.push(chain.head, used if used is not None else write_chain(queue.memory, chain, data))
            served += 1
        if served:
            self.signal(REQUESTQ)

    def fill(self, chain) -> tuple[bytes, int | None]:
        return os.urandom(chain.writable_len), None


class EmptySmallRequestsRng(RngMutant):
    """Completes requests of fewer than 100 bytes with no bytes at all."""

    def fill(self, chain):
        return (b"", 0) if chain.writable_len < 100 else super().fill(chain)


class ZeroChainsRng(RngMutant):
    """Fills a request of several buffers with zero bytes."""

    def fill(self, chain):
        return (bytes(chain.writable_len), None) if len(chain.writable) > 1 else super().fill(chain)


class ExtraSelectInput(VirtioInput):
    """Answers select 0x7f with a byte of data (an unsupported select must read size 0)."""

    def answer(self, select, subsel):
        return b"\x01" if select == 0x7F else super().answer(select, subsel)


class NamelessInput(VirtioInput):
    """Has an empty ID_NAME."""

    def answer(self, select, subsel):
        return b"" if (select, subsel) == (VIRTIO_INPUT_CFG_ID_NAME, 0) else super().answer(select, subsel)


class NoEventCodesInput(VirtioInput):
    """Reports no EV_KEY, EV_REL or EV_ABS code (LEDs only)."""

    def answer(self, select, subsel):
        if select == VIRTIO_INPUT_CFG_EV_BITS and subsel in (EV_KEY, EV_REL, EV_ABS):
            return b""
        return super().answer(select, subsel)


class IgnoresStatusInput(VirtioInput):
    """Never uses the buffers of the status queue."""

    def process_queue(self, index, queue):
        if index != STATUSQ:
            super().process_queue(index, queue)


class HostCidVsock(VirtioVsock):
    """Gives the guest the host's CID (2, reserved) as guest_cid."""

    def __init__(self, guest_cid, uds, label="vsock0"):
        super().__init__(guest_cid, uds, label)
        self.guest_cid = VMADDR_CID_HOST


class RstFromLocalVsock(VirtioVsock):
    """Sends its RST packets from CID 1 (VMADDR_CID_LOCAL) instead of the host's CID 2."""

    def _reply(self, src_port, dst_port, op, flags=0):
        hdr = super()._reply(src_port, dst_port, op, flags)
        if op == VIRTIO_VSOCK_OP_RST:
            hdr.src_cid = 1
        return hdr


class LongRstVsock(VirtioVsock):
    """Sends RST packets whose len field says 4 though they carry no payload."""

    def _reply(self, src_port, dst_port, op, flags=0):
        hdr = super()._reply(src_port, dst_port, op, flags)
        if op == VIRTIO_VSOCK_OP_RST:
            hdr.len = 4
        return hdr


class DropsUnknownTypeVsock(VirtioVsock):
    """Drops a packet of an unknown type without an answer."""

    def _refuse(self, hdr):
        if hdr.type == VIRTIO_VSOCK_TYPE_STREAM:
            super()._refuse(hdr)


class RstForRstVsock(VirtioVsock):
    """Answers an RST for no connection with an RST."""

    def _tx_packet(self, queue, chain):
        if chain.readable_len >= HDR_SIZE:
            hdr = Header.unpack(read_chain(queue.memory, chain, HDR_SIZE))
            if hdr.op == VIRTIO_VSOCK_OP_RST and (hdr.dst_port, hdr.src_port) not in self.connections:
                self._queue_control(self._reply(hdr.dst_port, hdr.src_port, VIRTIO_VSOCK_OP_RST), None)
                return
        super()._tx_packet(queue, chain)


class ImpliedStreamOnlyVsock(VirtioVsock):
    """Offers neither STREAM nor NO_IMPLIED_STREAM (streams implied, as before virtio 1.3)."""

    def device_features(self):
        return super().device_features() & ~(1 << VIRTIO_VSOCK_F_NO_IMPLIED_STREAM | 1 << VIRTIO_VSOCK_F_STREAM)


def _vsock(cls):
    return lambda tmp: cls(GUEST_CID, str(tmp / "v.sock"))


SMALL_DEVICE_MUTANTS: dict[str, tuple[str, Callable[[Path], Any]]] = {
    "empty-small-requests": ("rng", lambda tmp: EmptySmallRequestsRng()),
    "zero-chains": ("rng", lambda tmp: ZeroChainsRng()),
    "extra-select": ("input", lambda tmp: ExtraSelectInput("keyboard")),
    "nameless": ("input", lambda tmp: NamelessInput("keyboard")),
    "no-event-codes": ("input", lambda tmp: NoEventCodesInput("keyboard")),
    "ignores-status": ("input", lambda tmp: IgnoresStatusInput("keyboard")),
    "host-cid": ("vsock", _vsock(HostCidVsock)),
    "rst-from-local": ("vsock", _vsock(RstFromLocalVsock)),
    "long-rst": ("vsock", _vsock(LongRstVsock)),
    "drops-unknown-type": ("vsock", _vsock(DropsUnknownTypeVsock)),
    "rst-for-rst": ("vsock", _vsock(RstForRstVsock)),
    "implied-stream-only": ("vsock", _vsock(ImpliedStreamOnlyVsock)),
}

SMALL_DEVICE_EXPECTATIONS = {
    "empty-small-requests": {"virtio-1.2:5.4.6.2#bytes"},
    "zero-chains": {"virtio-1.2:5.4.6.2#chain"},
    "extra-select": {"virtio-1.2:5.8.5.2#size-zero"},
    "nameless": {"virtio-1.2:5.8.4#ids"},
    "no-event-codes": {"virtio-1.2:5.8.4#ev-bits"},
    "ignores-status": {"virtio-1.2:5.8.6.1#status"},
    "host-cid": {"virtio-1.2:5.10.4#guest-cid"},
    "rst-from-local": {"virtio-1.2:5.10.6#rst-no-listener"},
    "long-rst": {"virtio-1.2:5.10.6#len"},
    "drops-unknown-type": {"virtio-1.2:5.10.6#unknown-type"},
    "rst-for-rst": {"virtio-1.2:5.10.6#no-rst-for-rst"},
    "implied-stream-only": {"virtio-1.2:5.10.3#no-implied-stream"},
}


@pytest.mark.parametrize("mutant", sorted(SMALL_DEVICE_EXPECTATIONS))
def test_small_device_mutant(serve_device, tmp_path, mutant):
    device, make = SMALL_DEVICE_MUTANTS[mutant]
    failed = _failed(Target(serve_device(make(tmp_path)), device, TIMEOUT), _clauses(device, device))
    assert set(failed) == MUTANT_EXPECTATIONS[mutant], failed


_GROUPS = [(VHOST_USER_MUTANTS, VHOST_USER_EXPECTATIONS), (VIRTQUEUE_MUTANTS, VIRTQUEUE_EXPECTATIONS),
           (NET_MUTANTS, NET_EXPECTATIONS), (BLK_MUTANTS, BLK_EXPECTATIONS), (SMALL_DEVICE_MUTANTS, SMALL_DEVICE_EXPECTATIONS)]
assert all(set(mutants) == set(expected) for mutants, expected in _GROUPS), "a mutant without its expectation or back"

MUTANT_EXPECTATIONS: dict[str, frozenset[str]] = {
    name: frozenset(clauses) for _mutants, expected in _GROUPS for name, clauses in expected.items()
}
"""Mutant name -> the clauses it makes fail (read by tests/conformance/test_every_check_has_a_mutant.py)."""
assert len(MUTANT_EXPECTATIONS) == sum(len(expected) for _mutants, expected in _GROUPS), "a mutant name is used twice"
