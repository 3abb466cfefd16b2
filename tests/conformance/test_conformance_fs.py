"""``--device fs`` (vhost-user-fs, e.g. QEMU's virtiofsd): only message-level vhost-user checks run, no request
is ever made available on a device queue (the suite has no FUSE driver)."""

from __future__ import annotations

import pytest

from conformance_backend import IovirtBackend
from iovirt.conformance.checks.common import Workload
from iovirt.conformance.link import Link
from iovirt.conformance.registry import Verdict, all_checks
from iovirt.conformance.runner import Runner
from iovirt.conformance.target import Capabilities, Target

FS_CHECKS = {
    "vhost-user:Header",
    "vhost-user:Communication",
    "vhost-user:REPLY_ACK",
    "vhost-user:GET_PROTOCOL_FEATURES",
    "vhost-user:GET_VRING_BASE",
    "vhost-user:SET_VRING_BASE",
    "vhost-user:SET_MEM_TABLE",
    "vhost-user:CONFIGURE_MEM_SLOTS",
    "vhost-user:REM_MEM_REG",
    "vhost-user:GET_CONFIG",
    "vhost-user:GET_QUEUE_NUM",
    "vhost-user:SET_SLAVE_REQ_FD",
    "virtio-1.2:2.2#reserved",
    "vhost-user:Multiple queue support",
    "virtio-1.2:6.2",
}


def test_fs_gets_only_message_level_checks():
    assert {c.clause for c in all_checks("vhost-user") if c.other_device("fs") is None} == FS_CHECKS


def test_workload_refuses_a_device_without_requests():
    ctx = Target("/nonexistent", "fs").context(Capabilities("fs"))
    with pytest.raises(ValueError, match="fs device"):
        Workload(ctx, None)  # type: ignore[arg-type]


def test_fs_run_makes_no_request_available(tmp_path, monkeypatch):
    """Against iovirt's blk back-end told it is fs: no chain is added to a ring, every other check is n/a."""
    added: list[int] = []
    for name in ("add", "add_buffers"):
        original = getattr(Link, name)

        def record(self, index, *args, _original=original, **kwargs):
            added.append(index)
            return _original(self, index, *args, **kwargs)

        monkeypatch.setattr(Link, name, record)
    backend = IovirtBackend(tmp_path)
    try:
        results = Runner(Target(backend.blk_path, "fs", 2.0)).run()
    finally:
        backend.stop()
    assert added == []
    ran = {r.clause: r for r in results if not r.reason.startswith("only for ")}
    assert set(ran) == FS_CHECKS
    failed = {c for c, r in ran.items() if r.verdict is Verdict.FAIL}
    # blk's feature bits (SEG_MAX, ...) are not defined for fs (5.11.3): the reserved-bits check uses fs's table.
    assert failed == {"virtio-1.2:2.2#reserved"}, {c: ran[c].reason for c in failed}
    assert ran["vhost-user:GET_VRING_BASE"].verdict is Verdict.PASS


def test_dead_backend_keeps_other_device_checks_na(tmp_path):
    results = Runner(Target(str(tmp_path / "missing.sock"), "fs", 0.5)).run()
    for r in results:
        if r.clause in FS_CHECKS:
            assert r.verdict is Verdict.FAIL
        else:
            assert r.verdict is Verdict.NA and r.reason.startswith("only for "), (r.clause, r.reason)
