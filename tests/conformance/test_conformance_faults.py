"""The checks catch faults: broken back-ends make the right clauses fail, and the run always finishes."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

import pytest

from iovirt.conformance.registry import Verdict, all_checks
from iovirt.conformance.runner import Runner
from iovirt.conformance.target import Target
from iovirt.vhost_user.messages import FrontendRequest as R
from iovirt.vhost_user.vrings import Vrings
from iovirt.vhost_user.server import VhostUserServer
from iovirt.virtio.blk.device import VirtioBlk

TIMEOUT = 0.5

MUTANT_EXPECTATIONS: dict[str, frozenset[str]] = {
    # SET_VRING_BASE's check restarts from what GET_VRING_BASE returned: a wrong base breaks both clauses.
    "get-vring-base-off-by-one": frozenset({"vhost-user:GET_VRING_BASE", "vhost-user:SET_VRING_BASE"}),
    # One enable flag ignored serves a disabled ring in both directions: both net clauses break.
    "ignores-vring-disable": frozenset({"vhost-user:Ring states#disabled-net-tx", "vhost-user:Ring states#disabled-net-rx"}),
    "bad-used-id": frozenset({"virtio-1.2:2.7.8.2"}),
    "never-replies-to-get-vring-base": frozenset({"vhost-user:GET_VRING_BASE"}),
}
"""The broken back-ends below that fail exactly some clauses (read by tests/conformance/test_every_check_has_a_mutant.py);
the hostile ones, which fail every check, are not mutants of one rule."""


def run(target: Target, clauses: set[str] | None = None) -> dict:
    checks = [c for c in all_checks("vhost-user") if clauses is None or c.clause in clauses]
    return {r.clause: r for r in Runner(target, checks).run()}


def failed(results: dict) -> set[str]:
    return {c for c, r in results.items() if r.verdict is Verdict.FAIL}


def test_wrong_get_vring_base(make_backend, monkeypatch):
    original = Vrings.get_base
    monkeypatch.setattr(Vrings, "get_base", lambda self, index: (original(self, index) + 1) & 0xFFFF)
    b = make_backend()
    res = run(Target(b.blk_path, "blk", TIMEOUT), {"vhost-user:GET_VRING_BASE", "vhost-user:SET_VRING_BASE", "virtio-1.2:5.2.6#in-out"})
    assert failed(res) == {"vhost-user:GET_VRING_BASE", "vhost-user:SET_VRING_BASE"} == MUTANT_EXPECTATIONS["get-vring-base-off-by-one"]
    assert "returned 4" in res["vhost-user:GET_VRING_BASE"].reason


def test_ignores_vring_disable(make_backend, monkeypatch):
    original = Vrings._enable
    monkeypatch.setattr(Vrings, "_enable", lambda self, vring, enabled: original(self, vring, True))
    b = make_backend()
    clauses = {"vhost-user:Ring states#disabled-net-tx", "vhost-user:Ring states#disabled-net-rx", "virtio-1.2:5.1.6.2"}
    res = run(Target(b.net_paths[0], "net", TIMEOUT, b.net_paths[1]), clauses)
    assert failed(res) == {"vhost-user:Ring states#disabled-net-tx", "vhost-user:Ring states#disabled-net-rx"}
    assert failed(res) == MUTANT_EXPECTATIONS["ignores-vring-disable"]
    assert "delivered" in res["vhost-user:Ring states#disabled-net-tx"].reason


class BadUsedIdBlk(VirtioBlk):
    """Returns every request it takes through a used entry whose id was never made available.

    It writes the entries, then the used idx, itself (the queue refuses such an
    id): overwriting an entry after the queue had published it raced with the
    driver, which could read the good id first.  It is the ring's only writer
    of the used idx, so the idx in memory is where its next entry goes.
    """

    def process_queue(self, index, queue):
        state = queue.state()
        used = queue.memory.read_u16(state.used_addr + 2)
        taken = len(queue.pop_batch(state.size))
        for k in range(taken):
            slot = state.used_addr + 4 + 8 * ((used + k) % state.size)
            queue.memory.write(slot, struct.pack("<II", state.size + 7, 0))
        queue.memory.write_u16(state.used_addr + 2, (used + taken) & 0xFFFF)


def test_bad_used_id(make_backend):
    b = make_backend(blk_class=BadUsedIdBlk)
    res = run(Target(b.blk_path, "blk", TIMEOUT), {"virtio-1.2:2.7.8.2", "vhost-user:Header"})
    assert failed(res) == {"virtio-1.2:2.7.8.2"} == MUTANT_EXPECTATIONS["bad-used-id"]
    assert "2.7.8.2" in res["virtio-1.2:2.7.8.2"].reason and "not an in-flight head" in res["virtio-1.2:2.7.8.2"].reason


def test_never_replies_to_get_vring_base(make_backend, monkeypatch):
    original = VhostUserServer._send

    def drop(self, conn, out, fds, failure):
        if out and struct.unpack_from("=I", out)[0] == R.VHOST_USER_GET_VRING_BASE:
            return True
        return original(self, conn, out, fds, failure)

    monkeypatch.setattr(VhostUserServer, "_send", drop)
    b = make_backend()
    res = run(Target(b.blk_path, "blk", TIMEOUT), {"vhost-user:GET_VRING_BASE", "vhost-user:SET_VRING_CALL#nofd"})
    assert failed(res) == {"vhost-user:GET_VRING_BASE"} == MUTANT_EXPECTATIONS["never-replies-to-get-vring-base"]
    assert "no reply within" in res["vhost-user:GET_VRING_BASE"].reason


def test_closes_socket_on_kick(make_backend, monkeypatch):
    def explode(self, index, fd):
        raise RuntimeError("injected fault")  # the server closes the connection on an internal error

    monkeypatch.setattr(Vrings, "set_kick", explode)
    b = make_backend()
    started = time.monotonic()
    res = run(Target(b.blk_path, "blk", TIMEOUT))
    assert res["vhost-user:Header"].verdict is Verdict.PASS
    assert "closed the connection" in res["virtio-1.2:5.2.6#in-out"].reason
    assert {"vhost-user:GET_VRING_BASE", "virtio-1.2:2.7.8.2", "virtio-1.2:5.2.6#unsupp"} <= failed(res)
    assert time.monotonic() - started < 20


class FakeBackend:
    """A UNIX socket server whose every connection gets ``behaviour(conn)``."""

    def __init__(self, path: str, behaviour) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(8)
        self.behaviour = behaviour
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.conns.append(conn)
            self.behaviour(conn)

    def close(self) -> None:
        self.listener.close()
        for conn in self.conns:
            conn.close()


def _garbage(conn: socket.socket) -> None:
    def answer():
        try:
            while conn.recv(4096):
                conn.send(os.urandom(40))
        except OSError:
            pass

    threading.Thread(target=answer, daemon=True).start()


@pytest.mark.parametrize("behaviour,expected", [
    (lambda conn: conn.close(), "closed the connection"),
    (_garbage, ""),
    (lambda conn: None, "no reply within"),
])
def test_hostile_backends_fail_every_check_and_the_run_ends(tmp_path, behaviour, expected):
    path = str(tmp_path / "bad.sock")
    fake = FakeBackend(path, behaviour)
    try:
        started = time.monotonic()
        res = run(Target(path, "blk", TIMEOUT))
        elapsed = time.monotonic() - started
    finally:
        fake.close()
    applicable = {c for c, r in res.items() if r.verdict is not Verdict.NA}
    assert applicable and failed(res) == applicable
    assert all(expected in res[c].reason for c in applicable)
    assert elapsed < 15


def test_socket_gone(tmp_path):
    started = time.monotonic()
    res = run(Target(str(tmp_path / "nothing.sock"), "net", TIMEOUT))
    assert time.monotonic() - started < 5
    applicable = [r for r in res.values() if r.verdict is not Verdict.NA]
    assert applicable and all(r.verdict is Verdict.FAIL and "FileNotFoundError" in r.reason for r in applicable)
