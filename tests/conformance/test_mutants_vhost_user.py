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

from conftest import IovirtBackend
from iovirt.conformance.registry import Verdict, all_checks
from iovirt.conformance.runner import Runner
from iovirt.conformance.target import Target
from iovirt.vhost_user.backend import BackendSession
from iovirt.vhost_user.devices.vsock import attach
from iovirt.vhost_user.errors import RequestRefused
from iovirt.vhost_user.framing import build_reply
from iovirt.vhost_user.memtable import GuestMemoryTable
from iovirt.vhost_user.protocol import BackendConnection
from iovirt.vhost_user.messages import VHOST_USER_F_PROTOCOL_FEATURES, VHOST_USER_VERSION_MASK, U64, FrontendRequest as R
from iovirt.vhost_user import requests as rq
from iovirt.vhost_user.inflight import QueueRegion
from iovirt.vhost_user.server import VhostUserServer
from iovirt.vhost_user.vrings import VringError, Vrings
from iovirt.virtio.blk.defs import REQ_HDR, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from iovirt.virtio.blk.device import VirtioBlk
from iovirt.virtio.chain import write_chain
from iovirt.virtio.defs import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
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
    VIRTIO_NET_F_MRG_RXBUF,
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
from iovirt.virtio.chain import read_chain

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


@pytest.fixture
def make_backend(tmp_path):
    made = []

    def make(**kwargs):
        made.append(IovirtBackend(tmp_path, **kwargs))
        return made[-1]

    yield make
    for b in made:
        b.stop()


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


@pytest.mark.parametrize("mutant", sorted(VHOST_USER_MUTANTS))
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


MUTANT_EXPECTATIONS: dict[str, frozenset[str]] = {
    name: frozenset(clauses) for table in (VHOST_USER_EXPECTATIONS,) for name, clauses in table.items()
}
