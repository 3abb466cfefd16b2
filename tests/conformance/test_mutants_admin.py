"""Mutants for the administration virtqueue checks (virtio 1.4 2.12.1, 2.13; iovirt/conformance/checks/admin_vq.py).

Each mutant is a monkeypatch of iovirt's SR-IOV owner (its administration virtqueue, its SR-IOV group, the
legacy register view of its VFs) that breaks one rule.  The test runs every virtio-pci check against
``PlatformTarget("net", owner=True)`` with the mutant in place and asserts that the failing clauses are exactly
the mutant's entry of :data:`MUTANT_EXPECTATIONS` (issue 17: every check can be seen to fail).
"""

from __future__ import annotations

from typing import Callable

import pytest

from iovirt.cli import main
from iovirt.conformance.platform_target import PlatformTarget
from iovirt.conformance.registry import Verdict, all_checks
from iovirt.conformance.runner import Runner
from iovirt.sriov.admin import SriovAdminGroup
from iovirt.sriov.capability import SriovCapability
from iovirt.virtio.admin import vq as vq_module
from iovirt.virtio.admin.defs import (
    LEGACY_NOTIFY_INFO_ENTRY,
    VIRTIO_ADMIN_CMD_LEGACY_DEV_CFG_WRITE,
    VIRTIO_ADMIN_CMD_LEGACY_NOTIFY_INFO,
    VIRTIO_ADMIN_CMD_LIST_USE,
    VIRTIO_ADMIN_STATUS_Q_INVALID_FIELD,
    VIRTIO_ADMIN_STATUS_Q_INVALID_MEMBER,
    VIRTIO_ADMIN_STATUS_Q_INVALID_OPCODE,
    opcodes_of,
)
from iovirt.virtio.admin.vq import LIST_COMMANDS, AdminResult, AdminVirtqueue, einval
from iovirt.virtio.transport.legacy import VIRTIO_PCI_HOST_FEATURES, VIRTIO_PCI_QUEUE_NOTIFY, LegacyInterface
from iovirt.virtio.transport.pci import LEGACY_NOTIFY_OFFSET, VIRTIO_BAR

NET_CTRL_CHECKS = {c.clause for c in all_checks("pci") if c.func.__module__.startswith("iovirt.conformance.checks.pci_net_ctrl")}
# The PF has no control queue (iovirt/sriov/virtio_net.py); its checks are in tests/conformance/test_mutants_net_ctrl.py.
NOT_OFFERED_ON_THE_OWNER = {"virtio-1.2:4.1.4.4.1#notification-data"} | NET_CTRL_CHECKS
ADMIN_CHECKS = {c.clause for c in all_checks("pci") if c.func.__module__ == "iovirt.conformance.checks.admin_vq"}

MUTANT_EXPECTATIONS: dict[str, frozenset[str]] = {
    "opcode-checked-before-group-type": frozenset({"virtio-1.4:2.12.1.5#validate"}),
    "list-use-not-enforced": frozenset({"virtio-1.4:2.12.1.5#list-use"}),
    "failed-list-use-still-changes-the-list": frozenset({"virtio-1.4:2.12.1.5#einval-no-side-effects"}),
    "supported-list-shrinks-after-a-reset": frozenset({"virtio-1.4:2.12.1.5#list-stable"}),
    "vf-enable-ignored": frozenset({"virtio-1.4:2.12.1.5#sriov-members"}),
    "used-length-is-the-buffer-size": frozenset({"virtio-1.4:2.13.1#buffers"}),
    "commands-served-last-first": frozenset({"virtio-1.4:2.13.1#order"}),
    "no-legacy-dev-cfg-write": frozenset({"virtio-1.4:2.12.1.1.6#all-or-none"}),
    "device-config-one-field": frozenset({"virtio-1.4:2.12.1.1.6#offsets"}),
    "legacy-device-features-zero": frozenset({"virtio-1.4:2.12.1.1.6#common-cfg"}),
    "legacy-queue-notify-ignored": frozenset({"virtio-1.4:2.12.1.1.6#legacy-driver"}),
    "notify-info-without-end-entry": frozenset({"virtio-1.4:2.12.1.1.6#notify-info"}),
    "legacy-device-config-big-endian": frozenset({"virtio-1.4:2.12.1.1.6#dev-cfg"}),
    "vf-bar0-latches": frozenset({"virtio-1.4:2.12.1.1.6#ids"}),
}


# -- the mutants ----------------------------------------------------------------------------------------
def _opcode_before_group(mp: pytest.MonkeyPatch) -> None:
    execute = AdminVirtqueue.execute

    def mutant(self, command):
        if command.group_type not in self.groups and command.opcode not in LIST_COMMANDS:
            return einval(VIRTIO_ADMIN_STATUS_Q_INVALID_OPCODE)
        return execute(self, command)

    mp.setattr(AdminVirtqueue, "execute", mutant)


def _list_use_not_enforced(mp: pytest.MonkeyPatch) -> None:
    execute = AdminVirtqueue.execute

    def mutant(self, command):
        for state in self.groups.values():
            state.in_use = LIST_COMMANDS | state.group.supported()
        return execute(self, command)

    mp.setattr(AdminVirtqueue, "execute", mutant)


def _failed_list_use_changes_the_list(mp: pytest.MonkeyPatch) -> None:
    execute = AdminVirtqueue.execute

    def mutant(self, command):
        state = self.groups.get(command.group_type)
        if command.opcode == VIRTIO_ADMIN_CMD_LIST_USE and state is not None:
            supported = LIST_COMMANDS | state.group.supported()
            wanted = opcodes_of(command.data)
            if wanted - supported:
                state.in_use = wanted & supported  # takes what it knows, then reports the failure
                return einval(VIRTIO_ADMIN_STATUS_Q_INVALID_FIELD)
        return execute(self, command)

    mp.setattr(AdminVirtqueue, "execute", mutant)


def _supported_shrinks(mp: pytest.MonkeyPatch) -> None:
    reset, supported = SriovAdminGroup.reset, SriovAdminGroup.supported

    def mutant_reset(self):
        self.resets = getattr(self, "resets", 0) + 1
        reset(self)

    def mutant_supported(self):
        if getattr(self, "resets", 0) >= 2:  # from the second reset on, NOTIFY_INFO is gone
            return supported(self) - {VIRTIO_ADMIN_CMD_LEGACY_NOTIFY_INFO}
        return supported(self)

    mp.setattr(SriovAdminGroup, "reset", mutant_reset)
    mp.setattr(SriovAdminGroup, "supported", mutant_supported)


def _vf_enable_ignored(mp: pytest.MonkeyPatch) -> None:
    execute = SriovAdminGroup.execute

    def mutant(self, command):
        if not self.sriov.vf_enabled:
            return einval(VIRTIO_ADMIN_STATUS_Q_INVALID_MEMBER)  # as if the group existed, empty
        return execute(self, command)

    mp.setattr(SriovAdminGroup, "execute", mutant)


def _used_length_is_buffer_size(mp: pytest.MonkeyPatch) -> None:
    write_chain = vq_module.write_chain

    def mutant(memory, chain, data):
        write_chain(memory, chain, data)
        return chain.writable_len

    mp.setattr(vq_module, "write_chain", mutant)


def _served_last_first(mp: pytest.MonkeyPatch) -> None:
    def kick(self):
        queue = self.queue
        if queue is None or not self.enabled:
            return
        chains = []
        while (chain := queue.pop()) is not None:
            chains.append(chain)
        for chain in reversed(chains):
            request = vq_module.read_chain(queue.memory, chain)
            reply = self.reply(request, chain.writable_len)
            queue.push(chain.head, vq_module.write_chain(queue.memory, chain, reply[: chain.writable_len]))
        if chains and self.notify is not None and queue.need_notify():
            self.notify()

    mp.setattr(AdminVirtqueue, "kick", kick)


def _no_legacy_dev_cfg_write(mp: pytest.MonkeyPatch) -> None:
    supported = SriovAdminGroup.supported
    mp.setattr(SriovAdminGroup, "supported", lambda self: supported(self) - {VIRTIO_ADMIN_CMD_LEGACY_DEV_CFG_WRITE})


def _device_config_one_field(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(LegacyInterface, "device_fields", lambda self: {0: len(self.function.device.config_space())})


def _legacy_device_features_zero(mp: pytest.MonkeyPatch) -> None:
    read_field = LegacyInterface._read_field
    mp.setattr(LegacyInterface, "_read_field",
               lambda self, start: 0 if start == VIRTIO_PCI_HOST_FEATURES else read_field(self, start))


def _legacy_queue_notify_ignored(mp: pytest.MonkeyPatch) -> None:
    write_field = LegacyInterface._write_field
    mp.setattr(LegacyInterface, "_write_field",
               lambda self, start, value: None if start == VIRTIO_PCI_QUEUE_NOTIFY else write_field(self, start, value))


def _notify_info_without_end(mp: pytest.MonkeyPatch) -> None:
    entry = LEGACY_NOTIFY_INFO_ENTRY.pack(2, VIRTIO_BAR, LEGACY_NOTIFY_OFFSET)
    mp.setattr(SriovAdminGroup, "_notify_info", lambda self, vf, command: AdminResult(data=entry * 4))


def _device_config_big_endian(mp: pytest.MonkeyPatch) -> None:
    device_read = LegacyInterface.device_read

    def mutant(self, offset, size):
        data = device_read(self, offset, size)
        return data[::-1] if data is not None else None

    mp.setattr(LegacyInterface, "device_read", mutant)


def _vf_bar0_latches(mp: pytest.MonkeyPatch) -> None:
    write_vf_bar = SriovCapability._write_vf_bar

    def mutant(self, offset, size, value):
        if offset & ~3 == self._bar_register(0):
            self.pf.config.set(offset & ~3, 4, value & 0xFFFFF000)  # a 4 KiB VF BAR0
            return
        write_vf_bar(self, offset, size, value)

    mp.setattr(SriovCapability, "_write_vf_bar", mutant)


MUTANTS: dict[str, Callable[[pytest.MonkeyPatch], None]] = {
    "opcode-checked-before-group-type": _opcode_before_group,
    "list-use-not-enforced": _list_use_not_enforced,
    "failed-list-use-still-changes-the-list": _failed_list_use_changes_the_list,
    "supported-list-shrinks-after-a-reset": _supported_shrinks,
    "vf-enable-ignored": _vf_enable_ignored,
    "used-length-is-the-buffer-size": _used_length_is_buffer_size,
    "commands-served-last-first": _served_last_first,
    "no-legacy-dev-cfg-write": _no_legacy_dev_cfg_write,
    "device-config-one-field": _device_config_one_field,
    "legacy-device-features-zero": _legacy_device_features_zero,
    "legacy-queue-notify-ignored": _legacy_queue_notify_ignored,
    "notify-info-without-end-entry": _notify_info_without_end,
    "legacy-device-config-big-endian": _device_config_big_endian,
    "vf-bar0-latches": _vf_bar0_latches,
}


def _run_owner() -> dict:
    return {r.clause: r for r in Runner(PlatformTarget("net", owner=True)).run()}


def test_every_admin_check_has_a_mutant_here():
    assert ADMIN_CHECKS == set().union(*MUTANT_EXPECTATIONS.values())
    assert set(MUTANTS) == set(MUTANT_EXPECTATIONS)


def test_the_sr_iov_owner_passes_every_pci_check():
    results = _run_owner()
    assert set(results) == {c.clause for c in all_checks("pci")}
    for clause in NOT_OFFERED_ON_THE_OWNER:
        assert results[clause].verdict is Verdict.NA and "not offered" in results[clause].reason
    assert {c: r.reason for c, r in results.items() if r.verdict is not Verdict.PASS and c not in NOT_OFFERED_ON_THE_OWNER} == {}
    assert results["virtio-1.2:4.1.4.3.1#admin_queue"].verdict is Verdict.PASS  # the fields, now offered


def test_conform_cli_runs_the_sr_iov_owner(capsys):
    assert main(["conform", "--in-process", "net", "--sriov-owner"]) == 0
    assert "2.12.1.1.6#legacy-driver" in capsys.readouterr().out
    assert main(["conform", "--in-process", "blk", "--sriov-owner"]) == 2


@pytest.mark.parametrize("mutant", sorted(MUTANT_EXPECTATIONS))
def test_admin_mutant_fails_exactly_its_check(monkeypatch, mutant):
    MUTANTS[mutant](monkeypatch)
    results = _run_owner()
    failed = {c: r.reason for c, r in results.items() if r.verdict is Verdict.FAIL}
    assert set(failed) == MUTANT_EXPECTATIONS[mutant], failed
    assert all(results[c].verdict is Verdict.FAIL for c in MUTANT_EXPECTATIONS[mutant])
