"""Mutants for the device parts checks (virtio 1.4 2.12.1.4; iovirt/conformance/checks/admin_device_parts.py).

Each mutant is a monkeypatch of iovirt's SR-IOV owner (its SR-IOV group's device parts commands, or what they
do to a member: iovirt/sriov/device_parts.py, iovirt/virtio/transport/parts.py) that breaks one rule.  The test
runs every virtio-pci check against ``PlatformTarget("net", owner=True)`` with the mutant in place and asserts
that the failing clauses are exactly the mutant's entry of :data:`MUTANT_EXPECTATIONS` (issue 17: every check
can be seen to fail).
"""

from __future__ import annotations

from typing import Callable

import pytest

from iovirt.conformance.platform_target import PlatformTarget
from iovirt.conformance.registry import Verdict, all_checks
from iovirt.conformance.runner import Runner
from iovirt.sriov import device_parts as sriov_parts
from iovirt.sriov.admin import SriovAdminGroup
from iovirt.sriov.device_parts import SriovDeviceParts
from iovirt.virtio.admin.defs import VIRTIO_ADMIN_CMD_DEV_PARTS_SET, VIRTIO_ADMIN_STATUS_EBUSY
from iovirt.virtio.admin.device_parts import (
    VIRTIO_DEV_PART_DEV_FEATURES,
    VIRTIO_DEV_PART_DEVICE_STATUS,
    VIRTIO_DEV_PART_DRV_FEATURES,
    VIRTIO_DEV_PART_VQ_CFG,
    VQ_CFG,
    DevicePart,
)
from iovirt.virtio.admin.vq import AdminResult
from iovirt.virtio.defs import VIRTIO_CONFIG_S_DRIVER_OK
from iovirt.virtio.state import QueueState
from iovirt.virtio.transport.parts import FEATURES_LEN, HoldingPort, PciDeviceParts, _Stopped

PARTS_MODULE = "iovirt.conformance.checks.admin_device_parts"

MUTANT_EXPECTATIONS: dict[str, frozenset[str]] = {
    "no-dev-parts-set": frozenset({"virtio-1.4:2.12.1.4.4.1#all-or-none"}),
    "selected-parts-in-request-order": frozenset({"virtio-1.4:2.12.1.4.4.1#get"}),
    "selected-parts-without-preceding-parts": frozenset({"virtio-1.4:2.12.1.4.4.1#preceded"}),
    "set-taken-while-running": frozenset({"virtio-1.4:2.12.1.4.4.1#set-stopped"}),
    "each-set-forgets-the-previous-ones": frozenset({"virtio-1.4:2.12.1.4.4.1#set-again"}),
    "part-lengths-fitted-not-checked": frozenset({"virtio-1.4:2.12.1.4.4.1#set-length"}),
    "device-features-not-verified": frozenset({"virtio-1.4:2.12.1.4.4.1#dev-features"}),
    "num-queues-not-verified": frozenset({"virtio-1.4:2.12.1.4.4.1#set-verifies"}),
    "stop-leaves-the-queues-served": frozenset({"virtio-1.4:2.12.1.4.4.1#stopped-quiet"}),
    "notifications-while-stopped-dropped": frozenset({"virtio-1.4:2.12.1.4.4.1#stopped-accepts"}),
    "stopped-member-reads-no-device-features": frozenset({"virtio-1.4:2.12.1.4.4.1#stopped-pci"}),
    "stop-takes-back-the-last-transmit": frozenset({"virtio-1.4:2.12.1.4.4.1#stop-writes-back"}),
    "stopping-a-stopped-member-fails": frozenset({"virtio-1.4:2.12.1.4.4.1#mode-idempotent"}),
    "parts-captured-once": frozenset({"virtio-1.4:2.12.1.4.4.1#reset-defaults"}),
}


# -- the mutants ----------------------------------------------------------------------------------------
def _no_dev_parts_set(mp: pytest.MonkeyPatch) -> None:
    supported = SriovAdminGroup.supported
    mp.setattr(SriovAdminGroup, "supported", lambda self: supported(self) - {VIRTIO_ADMIN_CMD_DEV_PARTS_SET})


def _selected_in_request_order(mp: pytest.MonkeyPatch) -> None:
    """SELECTED answers the parts in the order the driver listed them (after the parts they must follow)."""
    unpack_headers, select = sriov_parts.unpack_headers, sriov_parts.select
    asked: list[tuple[int, bytes]] = []

    def recording(data: bytes) -> list[DevicePart]:
        headers = unpack_headers(data)
        asked[:] = [h.key for h in headers]
        return headers

    def in_request_order(parts: list[DevicePart], wanted: set[tuple[int, bytes]]) -> list[DevicePart]:
        chosen = select(parts, wanted)
        preceding = [p for p in chosen if p.key not in wanted]
        by_key = {p.key: p for p in chosen}
        return preceding + [by_key[key] for key in asked if key in by_key]

    mp.setattr(sriov_parts, "unpack_headers", recording)
    mp.setattr(sriov_parts, "select", in_request_order)


def _selected_without_preceding(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(sriov_parts, "select", lambda parts, wanted: [p for p in parts if p.key in wanted])


def _set_while_running(mp: pytest.MonkeyPatch) -> None:
    """DEV_PARTS_SET on a running member completes OK (and sets nothing)."""
    stage = PciDeviceParts.stage
    mp.setattr(PciDeviceParts, "stopped", property(lambda self: True))
    mp.setattr(PciDeviceParts, "stage", lambda self, parts: None if self._stopped is None else stage(self, parts))


def _each_set_forgets(mp: pytest.MonkeyPatch) -> None:
    stage = PciDeviceParts.stage

    def mutant(self, parts):
        if self._stopped is not None:
            self._stopped.staged.clear()
        return stage(self, parts)

    mp.setattr(PciDeviceParts, "stage", mutant)


def _lengths_fitted(mp: pytest.MonkeyPatch) -> None:
    """A lenient device: values of the wrong length are cut or zero-padded to the device's length."""
    stage = PciDeviceParts.stage
    sizes = {VIRTIO_DEV_PART_DRV_FEATURES: FEATURES_LEN, VIRTIO_DEV_PART_DEVICE_STATUS: 1, VIRTIO_DEV_PART_VQ_CFG: VQ_CFG.size}

    def mutant(self, parts):
        fitted = [DevicePart(p.part_type, p.value[:sizes[p.part_type]].ljust(sizes[p.part_type], b"\0"), p.selector,
                             p.flags) if p.part_type in sizes else p for p in parts]
        return stage(self, fitted)

    mp.setattr(PciDeviceParts, "stage", mutant)


def _device_features_not_verified(mp: pytest.MonkeyPatch) -> None:
    stage = PciDeviceParts.stage

    def mutant(self, parts):
        own = self._features(self._offered())
        return stage(self, [DevicePart(p.part_type, own, p.selector, p.flags)
                            if p.part_type == VIRTIO_DEV_PART_DEV_FEATURES else p for p in parts])

    mp.setattr(PciDeviceParts, "stage", mutant)


def _num_queues_not_verified(mp: pytest.MonkeyPatch) -> None:
    problem = PciDeviceParts._common_problem

    def mutant(self, offset, value):
        found = problem(self, offset, value)
        return None if found is not None and found.startswith("num_queues") else found

    mp.setattr(PciDeviceParts, "_common_problem", mutant)


def _stop_leaves_queues_served(mp: pytest.MonkeyPatch) -> None:
    """Stop only holds the notifications: the queues stay with the device."""

    def stop(self):
        if self._stopped is None:
            common = self.function.common
            self._stopped = _Stopped(HoldingPort(common.port))
            common.port = self._stopped.port

    mp.setattr(PciDeviceParts, "stop", stop)


def _notifications_dropped(mp: pytest.MonkeyPatch) -> None:
    """Resume restarts the queues but never looks at what was made available meanwhile."""

    def restart(self, index, memory, state):
        common, device = self.function.common, self.function.device
        q = common.queues[index]
        if state is None:
            used = memory.read_u16(q.device + 2)
            state = QueueState(size=q.size, desc_addr=q.desc, avail_addr=q.driver, used_addr=q.device,
                               last_avail_idx=used, used_idx=used)
        device.start_queue(index, memory, state, lambda: common.port.queue_interrupt(index))
        if common.status & VIRTIO_CONFIG_S_DRIVER_OK:
            device.set_queue_enabled(index, True)

    mp.setattr(PciDeviceParts, "_restart", restart)


def _stopped_reads_no_features(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(HoldingPort, "offered_features", lambda self: 0)


def _stop_takes_back_last_transmit(mp: pytest.MonkeyPatch) -> None:
    """After a burst (3 or more transmit buffers used), a stop takes the last used entry back; the resume serves
    that buffer again."""
    stop = PciDeviceParts.stop

    def mutant(self):
        stop(self)
        saved = self._stopped.saved if self._stopped is not None else {}
        state = saved.get(1)
        if state is not None and state.used_idx >= 3:
            memory = self.function.common.port.dma_memory(False)
            memory.write_u16(state.used_addr + 2, state.used_idx - 1)
            saved[1] = QueueState(**{**state.to_dict(), "last_avail_idx": state.last_avail_idx - 1,
                                     "used_idx": state.used_idx - 1})

    mp.setattr(PciDeviceParts, "stop", mutant)


def _stopping_stopped_fails(mp: pytest.MonkeyPatch) -> None:
    mode_set = SriovDeviceParts._mode_set

    def mutant(self, vf, command):
        if command.data[:1] == b"\x01" and self.member(vf, command.group_member_id).stopped:
            return AdminResult(VIRTIO_ADMIN_STATUS_EBUSY)
        return mode_set(self, vf, command)

    mp.setattr(SriovDeviceParts, "_mode_set", mutant)  # before the owner is built: its dispatch table binds it


def _parts_captured_once(mp: pytest.MonkeyPatch) -> None:
    capture = PciDeviceParts.capture

    def mutant(self):
        if not hasattr(self, "_first"):
            self._first = capture(self)
        return self._first

    mp.setattr(PciDeviceParts, "capture", mutant)


MUTANTS: dict[str, Callable[[pytest.MonkeyPatch], None]] = {
    "no-dev-parts-set": _no_dev_parts_set,
    "selected-parts-in-request-order": _selected_in_request_order,
    "selected-parts-without-preceding-parts": _selected_without_preceding,
    "set-taken-while-running": _set_while_running,
    "each-set-forgets-the-previous-ones": _each_set_forgets,
    "part-lengths-fitted-not-checked": _lengths_fitted,
    "device-features-not-verified": _device_features_not_verified,
    "num-queues-not-verified": _num_queues_not_verified,
    "stop-leaves-the-queues-served": _stop_leaves_queues_served,
    "notifications-while-stopped-dropped": _notifications_dropped,
    "stopped-member-reads-no-device-features": _stopped_reads_no_features,
    "stop-takes-back-the-last-transmit": _stop_takes_back_last_transmit,
    "stopping-a-stopped-member-fails": _stopping_stopped_fails,
    "parts-captured-once": _parts_captured_once,
}


def _run_owner() -> dict:
    return {r.clause: r for r in Runner(PlatformTarget("net", owner=True)).run()}


def test_every_device_parts_check_has_a_mutant_here():
    parts_checks = {c.clause for c in all_checks("pci") if c.func.__module__ == PARTS_MODULE}
    assert parts_checks == set().union(*MUTANT_EXPECTATIONS.values())
    assert set(MUTANTS) == set(MUTANT_EXPECTATIONS)


def test_the_sr_iov_owner_passes_every_device_parts_check():
    results = _run_owner()
    parts_checks = {c.clause for c in all_checks("pci") if c.func.__module__ == PARTS_MODULE}
    assert {c: (r.verdict, r.reason) for c, r in results.items() if c in parts_checks and r.verdict is not Verdict.PASS} == {}


@pytest.mark.parametrize("mutant", sorted(MUTANT_EXPECTATIONS))
def test_device_parts_mutant_fails_exactly_its_check(monkeypatch, mutant):
    MUTANTS[mutant](monkeypatch)
    results = _run_owner()
    failed = {c: r.reason for c, r in results.items() if r.verdict is Verdict.FAIL}
    assert set(failed) == MUTANT_EXPECTATIONS[mutant], failed
    assert all(results[c].verdict is Verdict.FAIL for c in MUTANT_EXPECTATIONS[mutant])
