"""``iovirt conform --device scsi`` against iovirt's own virtio-scsi: every scsi clause passes, none fails."""

from __future__ import annotations

import threading

import pytest

from iovirt.conformance.registry import Verdict, all_checks
from iovirt.conformance.runner import Runner
from iovirt.conformance.target import Target
from iovirt.vhost_user.devices.scsi import ScsiConfigAdapter
from iovirt.vhost_user.server import VhostUserServer
from iovirt.virtio.scsi.device import VirtioScsi

from scsi_guest import make_image



@pytest.fixture
def scsi_socket(tmp_path):
    server = VhostUserServer()
    path = str(tmp_path / "scsi.sock")
    device = VirtioScsi([make_image(tmp_path / "lun0.img")], label="conform-scsi")
    # The config clauses read the config space over VHOST_USER_PROTOCOL_F_CONFIG (config=on).
    server.add_socket(path, device, adapter=ScsiConfigAdapter)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield path
    server.stop()
    thread.join(timeout=10)
    device.close()


def test_scsi_clauses_pass(scsi_socket):
    results = {r.clause: r for r in Runner(Target(scsi_socket, "scsi", 2.0)).run()}
    failed = {c: r.reason for c, r in results.items() if r.verdict is Verdict.FAIL}
    assert not failed
    scsi = [c.clause for c in all_checks("vhost-user") if c.devices == frozenset({"scsi"})]
    assert len(scsi) >= 10
    assert all(results[clause].verdict is Verdict.PASS for clause in scsi), {c: results[c] for c in scsi}
