"""The virtio-pci checks against iovirt's in-process platform, and against deliberately broken transports."""

from __future__ import annotations

import json

import pytest

from iovirt.cli import main
from iovirt.conformance.platform_target import PlatformTarget
from iovirt.conformance.registry import Verdict, all_checks
from iovirt.conformance.runner import Runner
from iovirt.virtio.transport.common_cfg import CommonCfg
from iovirt.virtio.transport.defs import VIRTIO_MSI_NO_VECTOR
from iovirt.virtio.transport.pci import VirtioPciFunction


def _run(device: str) -> dict:
    return {r.clause: r for r in Runner(PlatformTarget(device)).run()}


ADMIN_VQ_CHECKS = {c.clause for c in all_checks("pci") if c.func.__module__ in (
    "iovirt.conformance.checks.admin_vq", "iovirt.conformance.checks.admin_device_parts")}
NOT_OFFERED = {"virtio-1.2:4.1.4.4.1#notification-data", "virtio-1.2:4.1.4.3.1#admin_queue"} | ADMIN_VQ_CHECKS
# NOTIFICATION_DATA, ADMIN_VQ: only the SR-IOV owner target offers ADMIN_VQ (tests/conformance/test_mutants_admin.py)
NET_CTRL = {"virtio-1.2:5.1.6.5.3#ctrl-vlan"} | {  # iovirt's in-process net has a control queue only with ctrl_vq=True
    c.clause for c in all_checks("pci") if c.clause.startswith(("virtio-1.4:5.1.9.5", "virtio-1.4:5.1.9.4.4"))}


@pytest.mark.parametrize("device", ["net", "blk"])
def test_iovirt_passes_every_pci_check(device):
    results = _run(device)
    assert set(results) == {c.clause for c in all_checks("pci")}
    assert len(results) >= 20
    # Checks of a feature iovirt's transport does not offer are n/a, for that reason only.
    for clause in NOT_OFFERED | (NET_CTRL if device == "net" else set()):
        assert results[clause].verdict is Verdict.NA and "not offered" in results[clause].reason
    for clause in NET_CTRL if device != "net" else set():
        assert results[clause].verdict is Verdict.NA and "only for net" in results[clause].reason
    failed = {c: r.reason for c, r in results.items()
              if r.verdict is not Verdict.PASS and c not in NOT_OFFERED | NET_CTRL}
    assert not failed


def test_pci_checks_stay_out_of_socket_runs():
    assert not {c.clause for c in all_checks("vhost-user")} & {c.clause for c in all_checks("pci") if "4.1" in c.clause}
    assert all(c.transport == "vhost-user" for c in all_checks("vhost-user"))


# -- faults: each broken transport fails exactly the clauses it breaks ------------------------------
def _accept_unoffered(monkeypatch):
    original = CommonCfg._accept_features

    def accept(self):
        self.driver_features &= self.port.offered_features()  # drops the unoffered bits instead of refusing
        return original(self)

    monkeypatch.setattr(CommonCfg, "_accept_features", accept)


def _vectors_survive_reset(monkeypatch):
    original = CommonCfg.reset

    def reset(self):
        vector = self.config_msix_vector
        original(self)
        self.config_msix_vector = vector

    monkeypatch.setattr(CommonCfg, "reset", reset)


def _isr_sticky(monkeypatch):
    monkeypatch.setattr(VirtioPciFunction, "_isr_read", lambda self, offset, size: self.isr_status)


def _serves_before_driver_ok(monkeypatch):
    def notify(self, index):
        if index < len(self.queues) and self.queues[index].enabled:
            self.device.set_queue_enabled(index, True)
            self.device.kick(index)

    monkeypatch.setattr(CommonCfg, "notify", notify)


def _generation_frozen(monkeypatch):
    original = CommonCfg.config_changed
    monkeypatch.setattr(CommonCfg, "config_changed", lambda self, generation=True: original(self, generation=False))


def _ignores_no_vector(monkeypatch):
    original = VirtioPciFunction._interrupt

    def interrupt(self, vector, isr_bit):
        original(self, 0 if vector == VIRTIO_MSI_NO_VECTOR else vector, isr_bit)

    monkeypatch.setattr(VirtioPciFunction, "_interrupt", interrupt)


FAULTS = {
    "accepts-unoffered-features": (_accept_unoffered, {"virtio-1.2:2.2.2#unoffered"}),
    "vectors-survive-reset": (_vectors_survive_reset, {"virtio-1.2:4.1.5.1.2.1#reset"}),
    "isr-not-cleared-on-read": (_isr_sticky, {"virtio-1.2:4.1.4.5.1#config", "virtio-1.2:4.1.4.5.1#intx"}),
    "serves-before-driver-ok": (_serves_before_driver_ok, {"virtio-1.2:2.1.2"}),
    "config-generation-frozen": (_generation_frozen, {"virtio-1.2:4.1.4.3.1#config_generation"}),
    "interrupts-on-no-vector": (_ignores_no_vector, {"virtio-1.2:4.1.5.3.1", "virtio-1.2:4.1.5.4.1"}),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_broken_transport_fails_the_right_clauses(monkeypatch, fault):
    inject, expected = FAULTS[fault]
    inject(monkeypatch)
    results = _run("net")
    failed = {c for c, r in results.items() if r.verdict is Verdict.FAIL}
    assert failed == expected, {c: results[c].reason for c in failed}


def test_conform_cli_in_process(tmp_path, capsys):
    report = tmp_path / "pci.json"
    assert main(["conform", "--in-process", "blk", "--json", str(report)]) == 0
    rows = json.loads(report.read_text())
    assert {row["clause"] for row in rows} == {c.clause for c in all_checks("pci")}
    assert "virtio-1.2:4.1.5.3.1" in capsys.readouterr().out


def test_conform_cli_in_process_fails_a_broken_transport(monkeypatch, capsys):
    _isr_sticky(monkeypatch)
    assert main(["conform", "--in-process", "net"]) == 1
    assert "4.1.4.5.1#config" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv", [["--in-process", "net", "--device", "net"], ["--socket", "/nonexistent"]], ids=["in-process+device", "socket-no-device"]
)
def test_conform_cli_usage_errors(argv):
    assert main(["conform", *argv]) == 2
