"""Mutants for the virtio-pci checks (virtio 1.2 4.1 and the 2.x rules the in-process transport reaches) and the
virtio-scsi checks (5.6): each breaks one rule and fails exactly its check (issue 17, "every check can be seen
to fail").

A pci mutant is a monkeypatch of iovirt's virtio-pci transport; the test runs every pci check against a net
device behind it.  A scsi mutant is a :class:`~iovirt.virtio.scsi.device.VirtioScsi` subclass (or a patch of
its module) served over vhost-user; the test runs every scsi check against it.  Both assert that the failing
clauses are exactly the mutant's entry of :data:`MUTANT_EXPECTATIONS`.
"""

from __future__ import annotations

import threading
from typing import Callable

import pytest

from iovirt.conformance.platform_target import PlatformTarget
from iovirt.conformance.registry import Verdict, all_checks
from iovirt.conformance.runner import Runner
from iovirt.conformance.target import Target
from iovirt.memory import GuestMemory
from iovirt.pci.vendor import VendorCapability
from iovirt.vhost_user.devices.scsi import ScsiConfigAdapter
from iovirt.vhost_user.server import VhostUserServer
from iovirt.virtio.chain import DescChain
from iovirt.virtio.defs import VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET
from iovirt.virtio.scsi import defs as scsi_defs
from iovirt.virtio.scsi import device as scsi_device
from iovirt.virtio.scsi._datapath_py import gather, scatter
from iovirt.virtio.scsi.device import VirtioScsi
from iovirt.virtio.scsi.target import Outcome
from iovirt.virtio.transport import common_cfg as common_cfg_module
from iovirt.virtio.transport import pci as transport_pci
from iovirt.virtio.transport.caps import VirtioPciCap, VirtioPciCfgCap
from iovirt.virtio.transport.common_cfg import CommonCfg
from iovirt.virtio.transport.defs import (
    VIRTIO_MSI_NO_VECTOR,
    VIRTIO_PCI_CAP_COMMON_CFG,
    VIRTIO_PCI_CAP_NOTIFY_CFG,
    VIRTIO_PCI_COMMON_GF,
    VIRTIO_PCI_COMMON_Q_MSIX,
    VIRTIO_PCI_COMMON_Q_SIZE,
    VIRTIO_PCI_COMMON_STATUS,
    VIRTIO_PCI_ISR_CONFIG,
)


def _failed(results: dict) -> dict:
    return {c: r.reason for c, r in results.items() if r.verdict is Verdict.FAIL}


# -- virtio-pci: the transport, broken one rule at a time -----------------------------------------------
Inject = Callable[[pytest.MonkeyPatch], None]


def _wrong_device_id(monkeypatch):
    # Device ID 0x1040 + virtio ID + 1: still a non-transitional ID, but another device type's.
    monkeypatch.setattr(transport_pci, "VIRTIO_PCI_MODERN_DEVICE_BASE", transport_pci.VIRTIO_PCI_MODERN_DEVICE_BASE + 1)


def _patch_cap(monkeypatch, cfg_type: int, **changes: int) -> None:
    """The transport builds its ``cfg_type`` capability with the fields in ``changes`` (``offset``, ``length``)."""
    original = transport_pci.VirtioPciCap

    def cap(kind, bar, offset, length, **kwargs):
        if kind == cfg_type:
            offset, length = changes.get("offset", offset), changes.get("length", length)
        return original(kind, bar, offset, length, **kwargs)

    monkeypatch.setattr(transport_pci, "VirtioPciCap", cap)


def _notify_cap_len_without_multiplier(monkeypatch):
    # cap_len 16 (struct virtio_pci_cap) for the notify capability, whose notify_off_multiplier makes it 20.
    original = VendorCapability.install

    def install(self, function, offset):
        original(self, function, offset)
        if self.cfg_type == VIRTIO_PCI_CAP_NOTIFY_CFG:
            function.config.set(offset + 2, 1, 16)

    monkeypatch.setattr(VirtioPciCap, "install", install)


def _short_common_cfg(monkeypatch):
    # The region stays mapped in full; the capability tells 4 bytes less (queue_device's high half left out).
    _patch_cap(monkeypatch, VIRTIO_PCI_CAP_COMMON_CFG, length=transport_pci.VIRTIO_PCI_COMMON_CFG_SIZE - 4)


def _device_feature_mirrors(monkeypatch):
    # device_feature_select 2 and up show the low and high words again instead of 0.
    monkeypatch.setattr(common_cfg_module, "_feature_word", lambda features, select: features >> (32 * (select & 1)) & 0xFFFFFFFF)


def _patch_common_read(monkeypatch, override: Callable[[CommonCfg, int, int], "int | None"]) -> None:
    """Common configuration reads give ``override(cfg, offset, size)`` when it is not None."""
    original = CommonCfg.read

    def read(self, offset, size):
        value = override(self, offset, size)
        return original(self, offset, size) if value is None else value

    monkeypatch.setattr(CommonCfg, "read", read)


def _driver_feature_write_only(monkeypatch):
    _patch_common_read(monkeypatch, lambda cfg, offset, size: 0 if offset == VIRTIO_PCI_COMMON_GF else None)


def _absent_queue_has_size(monkeypatch):
    # queue_select = num_queues (a queue that does not exist) reads the maximum queue size instead of 0.
    _patch_common_read(monkeypatch, lambda cfg, offset, size: cfg.queue_max_size
                       if offset == VIRTIO_PCI_COMMON_Q_SIZE and cfg.queue_select >= len(cfg.queues) else None)


def _patch_reset(monkeypatch, keep: Callable[[CommonCfg, list, int], None]) -> None:
    """After a device reset, ``keep(cfg, queue registers before the reset, status before)`` puts some back."""
    original = CommonCfg.reset

    def reset(self):
        before, status = list(self.queues), self.status
        original(self)
        keep(self, before, status)

    monkeypatch.setattr(CommonCfg, "reset", reset)


def _queue_enable_survives_live_reset(monkeypatch):
    # The reset of a live device (DRIVER_OK set) stops its queues but leaves queue_enable reading 1.  (Only
    # a live one: a driver cannot set a queue up again while it reads enabled, so any check that resets and
    # re-initialises would fail too, and the checks do that only before DRIVER_OK.)
    def keep(cfg, before, status):
        if status & VIRTIO_CONFIG_S_DRIVER_OK:
            for queue, old in zip(cfg.queues, before):
                queue.enabled = old.enabled

    _patch_reset(monkeypatch, keep)


def _queue_vectors_survive_reset(monkeypatch):
    # Only the queue vectors: config_msix_vector is unmapped as it should be.
    def keep(cfg, before, status):
        for queue, old in zip(cfg.queues, before):
            queue.msix_vector = old.msix_vector

    _patch_reset(monkeypatch, keep)


def _generation_frozen(monkeypatch):
    original = CommonCfg.config_changed
    monkeypatch.setattr(CommonCfg, "config_changed", lambda self, generation=True: original(self, generation=False))


def _low_half_write_clears_high(monkeypatch):
    # A 32-bit write of a queue address's low half is taken as the whole 64-bit value: written high half
    # first (4.1.3.2 allows either order), the high half is lost.  Low then high, as Linux writes, works.
    original = CommonCfg._write_address

    def write_address(self, field, offset, size, value):
        if size == 4 and offset == field:
            original(self, field, offset, 8, value)
        else:
            original(self, field, offset, size, value)

    monkeypatch.setattr(CommonCfg, "_write_address", write_address)


def _config_change_isr_only_without_msix(monkeypatch):
    # ISR bit 1 set only on the INTx path: with MSI-X the configuration change reaches the vector alone.
    monkeypatch.setattr(transport_pci.VirtioPciFunction, "config_interrupt",
                        lambda self: self._interrupt(self.common.config_msix_vector, VIRTIO_PCI_ISR_CONFIG))


def _isr_read_keeps_intx(monkeypatch):
    # Reading ISR status clears it but leaves INTx asserted (Status.Interrupt Status stays set).
    def isr_read(self, offset, size):
        value, self.isr_status = self.isr_status, 0
        return value

    monkeypatch.setattr(transport_pci.VirtioPciFunction, "_isr_read", isr_read)


def _no_device_cfg_cap(monkeypatch):
    original = transport_pci.VirtioPciFunction.__init__
    layout = tuple(entry for entry in transport_pci.DEFAULT_LAYOUT if entry[0] != "device")

    def init(self, device, memory, **kwargs):
        original(self, device, memory, **{**kwargs, "capability_layout": layout})

    monkeypatch.setattr(transport_pci.VirtioPciFunction, "__init__", init)


def _notify_cap_too_short(monkeypatch):
    # The notify region stays mapped in full; the capability tells only queue 0's two bytes.
    _patch_cap(monkeypatch, VIRTIO_PCI_CAP_NOTIFY_CFG, length=2)


def _window_read_stale(monkeypatch):
    # A read of pci_cfg_data returns what is stored there without performing the BAR read.
    monkeypatch.setattr(VirtioPciCfgCap, "config_read", lambda self, offset, size: self.function.config.get(offset, size))


def _queue_vector_0_refused(monkeypatch):
    # Entry 0 is taken for configuration changes only: a queue mapped to it reads NO_VECTOR (a failed mapping).
    original = CommonCfg.write

    def write(self, offset, size, value):
        if offset == VIRTIO_PCI_COMMON_Q_MSIX and size == 2 and value == 0:
            value = VIRTIO_MSI_NO_VECTOR
        original(self, offset, size, value)

    monkeypatch.setattr(CommonCfg, "write", write)


def _queue_no_vector_uses_vector_0(monkeypatch):
    def queue_interrupt(self, index):
        vector = self.common.queues[index].msix_vector
        self._interrupt(0 if vector == VIRTIO_MSI_NO_VECTOR else vector, transport_pci.VIRTIO_PCI_ISR_QUEUE)

    monkeypatch.setattr(transport_pci.VirtioPciFunction, "queue_interrupt", queue_interrupt)


def _config_no_vector_uses_vector_0(monkeypatch):
    def config_interrupt(self):
        self.isr_status |= VIRTIO_PCI_ISR_CONFIG
        vector = self.common.config_msix_vector
        self._interrupt(0 if vector == VIRTIO_MSI_NO_VECTOR else vector, VIRTIO_PCI_ISR_CONFIG)

    monkeypatch.setattr(transport_pci.VirtioPciFunction, "config_interrupt", config_interrupt)


def _features_ok_hidden_once_live(monkeypatch):
    # device_status reads without FEATURES_OK once DRIVER_OK is set (the bit is kept inside).
    def status(cfg, offset, size):
        if offset == VIRTIO_PCI_COMMON_STATUS and cfg.status & VIRTIO_CONFIG_S_DRIVER_OK:
            return cfg.status & ~VIRTIO_CONFIG_S_FEATURES_OK
        return None

    _patch_common_read(monkeypatch, status)


def _live_on_queue_enable(monkeypatch):
    # A queue goes live when the driver enables it, before DRIVER_OK: a notification then is served.
    original_enable, original_notify = CommonCfg._write_queue_enable, CommonCfg.notify

    def write_queue_enable(self, value):
        original_enable(self, value)
        index = self.queue_select
        if index < len(self.queues) and self.queues[index].enabled:
            self.device.set_queue_enabled(index, True)

    def notify(self, index):
        if not self.driver_ok and index < len(self.device.enabled) and self.device.enabled[index]:
            self.device.kick(index)
            return
        original_notify(self, index)

    monkeypatch.setattr(CommonCfg, "_write_queue_enable", write_queue_enable)
    monkeypatch.setattr(CommonCfg, "notify", notify)


def _needs_reset_silent(monkeypatch):
    # DEVICE_NEEDS_RESET is set, but the configuration change notification 2.1.2 requires is not sent.
    def set_needs_reset(self):
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET

    monkeypatch.setattr(CommonCfg, "set_needs_reset", set_needs_reset)


def _only_all_features(monkeypatch):
    # FEATURES_OK only for exactly the offered set: a valid subset is refused.
    original = CommonCfg._accept_features

    def accept(self):
        return self.driver_features == self.port.offered_features() and original(self)

    monkeypatch.setattr(CommonCfg, "_accept_features", accept)


def _device_bits_unchecked(monkeypatch):
    # Only the transport range (bits 24 and up) is checked against the offer; unoffered device-type bits
    # (0-23) are dropped silently and FEATURES_OK sticks.
    original = CommonCfg._accept_features

    def accept(self):
        self.driver_features &= self.port.offered_features() | ~0xFFFFFF
        return original(self)

    monkeypatch.setattr(CommonCfg, "_accept_features", accept)


def _lazy_reset(monkeypatch):
    # The driver's reset (device_status 0) puts the registers back (status reads 0) but leaves the device
    # running its queues: a notification after the reset is still served.  (A function reset still resets
    # the device, so the machine can be torn down.)
    original_write_status, original_notify = CommonCfg._write_status, CommonCfg.notify

    def write_status(self, value):
        if value:
            original_write_status(self, value)
            return
        self.device_feature_select = self.driver_feature_select = self.driver_features = 0
        self.config_msix_vector = VIRTIO_MSI_NO_VECTOR
        self.status = self.queue_select = 0
        self.queues = [common_cfg_module.VirtqueueConfig(self.queue_max_size) for _ in self.queues]

    def notify(self, index):
        if not self.driver_ok and index < len(self.device.enabled) and self.device.enabled[index]:
            self.device.kick(index)
            return
        original_notify(self, index)

    monkeypatch.setattr(CommonCfg, "_write_status", write_status)
    monkeypatch.setattr(CommonCfg, "notify", notify)


def _config_zero_before_features_ok(monkeypatch):
    original = transport_pci.VirtioPciFunction._device_cfg_read

    def read(self, offset, size):
        return original(self, offset, size) if self.common.status & VIRTIO_CONFIG_S_FEATURES_OK else 0

    monkeypatch.setattr(transport_pci.VirtioPciFunction, "_device_cfg_read", read)


PCI_MUTANTS: dict[str, Inject] = {
    "device-id-of-another-type": _wrong_device_id,
    "notify-cap-len-without-multiplier": _notify_cap_len_without_multiplier,
    "common-cfg-cap-too-short": _short_common_cfg,
    "device-feature-mirrors-beyond-63": _device_feature_mirrors,
    "driver-feature-write-only": _driver_feature_write_only,
    "absent-queue-has-size": _absent_queue_has_size,
    "queue-enable-survives-live-reset": _queue_enable_survives_live_reset,
    "config-generation-frozen": _generation_frozen,
    "low-half-write-clears-high": _low_half_write_clears_high,
    "notify-cap-too-short": _notify_cap_too_short,
    "config-change-isr-without-bit-1": _config_change_isr_only_without_msix,
    "isr-read-keeps-intx": _isr_read_keeps_intx,
    "no-device-cfg-cap": _no_device_cfg_cap,
    "pci-cfg-window-read-stale": _window_read_stale,
    "queue-vector-0-refused": _queue_vector_0_refused,
    "queue-vectors-survive-reset": _queue_vectors_survive_reset,
    "queue-no-vector-uses-vector-0": _queue_no_vector_uses_vector_0,
    "config-no-vector-uses-vector-0": _config_no_vector_uses_vector_0,
    "features-ok-hidden-once-live": _features_ok_hidden_once_live,
    "live-on-queue-enable": _live_on_queue_enable,
    "needs-reset-without-notification": _needs_reset_silent,
    "only-all-features-accepted": _only_all_features,
    "unoffered-device-bits-unchecked": _device_bits_unchecked,
    "lazy-reset": _lazy_reset,
    "config-zero-before-features-ok": _config_zero_before_features_ok,
}


@pytest.mark.parametrize("mutant", sorted(PCI_MUTANTS))
def test_pci_mutant_fails_exactly_its_check(monkeypatch, mutant):
    PCI_MUTANTS[mutant](monkeypatch)
    failed = _failed({r.clause: r for r in Runner(PlatformTarget("net")).run()})
    assert set(failed) == MUTANT_EXPECTATIONS[mutant], failed


# -- virtio-scsi over vhost-user: the device, broken one rule at a time ---------------------------------------
class BigSenseDefaultScsi(VirtioScsi):
    """Starts (and resets) with a sense_size of 252 instead of 96 (and uses it consistently)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sense_size = 252

    def _reset(self):
        super()._reset()
        self.sense_size = 252


class BusyTurScsi(VirtioScsi):
    """Answers TEST UNIT READY to an existing LUN with VIRTIO_SCSI_S_BUSY (status GOOD left as is)."""

    def _command(self, memory, chain, header, dataout, datain, out_len, in_len):
        response, outcome, buf_len = super()._command(memory, chain, header, dataout, datain, out_len, in_len)
        if response == scsi_defs.VIRTIO_SCSI_S_OK and header[scsi_defs.REQ_CMD_HDR.size] == scsi_defs.TEST_UNIT_READY:
            response = scsi_defs.VIRTIO_SCSI_S_BUSY
        return response, outcome, buf_len


class NoSenseScsi(VirtioScsi):
    """Reports CHECK CONDITION without its sense data (sense_len 0)."""

    def _command(self, memory, chain, header, dataout, datain, out_len, in_len):
        response, outcome, buf_len = super()._command(memory, chain, header, dataout, datain, out_len, in_len)
        if outcome.status == scsi_defs.CHECK_CONDITION:
            outcome = Outcome(outcome.status, b"", outcome.transferred, outcome.overrun, outcome.message)
        return response, outcome, buf_len


class NoResidualScsi(VirtioScsi):
    """Reports a residual of 0 whatever was transferred."""

    def _command(self, memory, chain, header, dataout, datain, out_len, in_len):
        response, outcome, _buf_len = super()._command(memory, chain, header, dataout, datain, out_len, in_len)
        return response, outcome, outcome.transferred


class ShortBufferOkScsi(VirtioScsi):
    """Completes a command whose data does not fit the buffers with VIRTIO_SCSI_S_OK (nothing moved) instead of
    VIRTIO_SCSI_S_OVERRUN."""

    def _command(self, memory, chain, header, dataout, datain, out_len, in_len):
        response, outcome, buf_len = super()._command(memory, chain, header, dataout, datain, out_len, in_len)
        if response == scsi_defs.VIRTIO_SCSI_S_OVERRUN:
            response = scsi_defs.VIRTIO_SCSI_S_OK
        return response, outcome, buf_len


class AnyTargetScsi(VirtioScsi):
    """Takes a well-formed lun field naming any target as target 0 on the request queues."""

    def _command(self, memory, chain, header, dataout, datain, out_len, in_len):
        if len(header) > 1 and header[0] == scsi_defs.LUN_FIRST_BYTE:
            header = header[:1] + b"\0" + header[2:]
        return super()._command(memory, chain, header, dataout, datain, out_len, in_len)


class InoutScsi(VirtioScsi):
    """Executes a request with both data-out and data-in though VIRTIO_SCSI_F_INOUT is not offered."""

    def _command(self, memory, chain, header, dataout, datain, out_len, in_len):
        return super()._command(memory, chain, header, dataout if not in_len else [], datain, 0 if in_len else out_len,
                                in_len)


class AnyLunFieldCtrlScsi(VirtioScsi):
    """Takes a control request's lun field that is not a single-level address as LUN 0."""

    def _address_response(self, lun):
        return None if scsi_device.parse_lun(lun) is None else super()._address_response(lun)


class UnrequestedEventsScsi(VirtioScsi):
    """Answers an asynchronous notification query with every bit of event_actual set."""

    def _serve_ctrl(self, memory: GuestMemory, chain: DescChain) -> int:
        used = super()._serve_ctrl(memory, chain)
        request = gather(memory, chain.readable, scsi_defs.CTRL_TYPE.size)
        if used == scsi_defs.CTRL_AN_RESP.size and scsi_defs.CTRL_TYPE.unpack(request)[0] == scsi_defs.VIRTIO_SCSI_T_AN_QUERY:
            scatter(memory, chain.writable, (0xFFFFFFFF).to_bytes(4, "little"))
        return used


def _no_lu_reset(monkeypatch):
    # LOGICAL UNIT RESET is not implemented: rejected like an unknown function.
    monkeypatch.setattr(scsi_device, "TMF_COMPLETE", scsi_device.TMF_COMPLETE - {scsi_defs.VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET})


class _Everything:
    def __contains__(self, subtype):
        return True


def _any_tmf_completes(monkeypatch):
    monkeypatch.setattr(scsi_device, "TMF_COMPLETE", _Everything())


SCSI_MUTANTS: dict[str, tuple[type[VirtioScsi], "Inject | None"]] = {
    "sense-size-default-252": (BigSenseDefaultScsi, None),
    "test-unit-ready-busy": (BusyTurScsi, None),
    "check-condition-without-sense": (NoSenseScsi, None),
    "residual-always-0": (NoResidualScsi, None),
    "short-buffer-ok": (ShortBufferOkScsi, None),
    "any-target-is-target-0": (AnyTargetScsi, None),
    "inout-without-feature": (InoutScsi, None),
    "lu-reset-rejected": (VirtioScsi, _no_lu_reset),
    "unknown-tmf-completes": (VirtioScsi, _any_tmf_completes),
    "tmf-any-lun-field": (AnyLunFieldCtrlScsi, None),
    "an-query-unrequested-events": (UnrequestedEventsScsi, None),
}

SCSI_TIMEOUT = 1.0


@pytest.fixture
def serve_scsi(tmp_path):
    """``serve_scsi(device_class)``: the path of a socket serving a device of that class (config=on)."""
    served = []

    def serve(device_class: type[VirtioScsi]) -> str:
        image = tmp_path / "lun0.img"
        with open(image, "wb") as f:
            f.truncate(1 << 20)
        server = VhostUserServer()
        device = device_class([str(image)], label="mutant-scsi")
        path = str(tmp_path / "scsi.sock")
        # The 5.6.4 check reads the config space over VHOST_USER_PROTOCOL_F_CONFIG.
        server.add_socket(path, device, adapter=ScsiConfigAdapter)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        served.append((server, thread, device))
        return path

    yield serve
    for server, thread, device in served:
        server.stop()
        thread.join(timeout=10)
        device.close()


@pytest.mark.parametrize("mutant", sorted(SCSI_MUTANTS))
def test_scsi_mutant_fails_exactly_its_check(serve_scsi, monkeypatch, mutant):
    device_class, inject = SCSI_MUTANTS[mutant]
    if inject is not None:
        inject(monkeypatch)
    checks = [c for c in all_checks("vhost-user") if "scsi" in c.devices]
    failed = _failed({r.clause: r for r in Runner(Target(serve_scsi(device_class), "scsi", SCSI_TIMEOUT), checks).run()})
    assert set(failed) == MUTANT_EXPECTATIONS[mutant], failed


def test_every_mutant_has_its_expectation():
    assert set(MUTANT_EXPECTATIONS) == set(PCI_MUTANTS) | set(SCSI_MUTANTS)
    assert not set(PCI_MUTANTS) & set(SCSI_MUTANTS)


MUTANT_EXPECTATIONS: dict[str, frozenset[str]] = {
    "device-id-of-another-type": frozenset({"virtio-1.2:4.1.2.1"}),
    "notify-cap-len-without-multiplier": frozenset({"virtio-1.2:4.1.4.2"}),
    "common-cfg-cap-too-short": frozenset({"virtio-1.2:4.1.4.3.1#layout"}),
    "device-feature-mirrors-beyond-63": frozenset({"virtio-1.2:4.1.4.3.1#device_feature"}),
    "driver-feature-write-only": frozenset({"virtio-1.2:4.1.4.3.1#driver_feature"}),
    "absent-queue-has-size": frozenset({"virtio-1.2:4.1.4.3.1#queue_size"}),
    "queue-enable-survives-live-reset": frozenset({"virtio-1.2:4.1.4.3.1#reset"}),
    "config-generation-frozen": frozenset({"virtio-1.2:4.1.4.3.1#config_generation"}),
    "low-half-write-clears-high": frozenset({"virtio-1.2:4.1.3.2"}),
    "notify-cap-too-short": frozenset({"virtio-1.2:4.1.4.4.1"}),
    "config-change-isr-without-bit-1": frozenset({"virtio-1.2:4.1.4.5.1#config"}),
    "isr-read-keeps-intx": frozenset({"virtio-1.2:4.1.4.5.1#intx"}),
    "no-device-cfg-cap": frozenset({"virtio-1.2:4.1.4.6.1"}),
    "pci-cfg-window-read-stale": frozenset({"virtio-1.2:4.1.4.9.1"}),
    "queue-vector-0-refused": frozenset({"virtio-1.2:4.1.5.1.2.1#map"}),
    "queue-vectors-survive-reset": frozenset({"virtio-1.2:4.1.5.1.2.1#reset"}),
    "queue-no-vector-uses-vector-0": frozenset({"virtio-1.2:4.1.5.3.1"}),
    "config-no-vector-uses-vector-0": frozenset({"virtio-1.2:4.1.5.4.1"}),
    "features-ok-hidden-once-live": frozenset({"virtio-1.2:2.1#status"}),
    "live-on-queue-enable": frozenset({"virtio-1.2:2.1.2"}),
    "needs-reset-without-notification": frozenset({"virtio-1.2:2.1.2#needs-reset"}),
    "only-all-features-accepted": frozenset({"virtio-1.2:2.2.2#subset"}),
    "unoffered-device-bits-unchecked": frozenset({"virtio-1.2:2.2.2#unoffered"}),
    "lazy-reset": frozenset({"virtio-1.2:2.4.1"}),
    "config-zero-before-features-ok": frozenset({"virtio-1.2:2.5.2"}),
    "sense-size-default-252": frozenset({"virtio-1.2:5.6.4"}),
    "test-unit-ready-busy": frozenset({"virtio-1.2:5.6.6.1#ok"}),
    "check-condition-without-sense": frozenset({"virtio-1.2:5.6.6.1#sense-len"}),
    "residual-always-0": frozenset({"virtio-1.2:5.6.6.1#residual"}),
    "short-buffer-ok": frozenset({"virtio-1.2:5.6.6.1#overrun"}),
    "any-target-is-target-0": frozenset({"virtio-1.2:5.6.6.1#bad-target"}),
    "inout-without-feature": frozenset({"virtio-1.2:5.6.6.1#inout"}),
    "lu-reset-rejected": frozenset({"virtio-1.2:5.6.6.2#tmf"}),
    "unknown-tmf-completes": frozenset({"virtio-1.2:5.6.6.2#tmf-rejected"}),
    "tmf-any-lun-field": frozenset({"virtio-1.2:5.6.6.2#tmf-bad-target"}),
    "an-query-unrequested-events": frozenset({"virtio-1.2:5.6.6.2#an-query"}),
}
"""Mutant name -> the clauses it makes fail (the convention of issue 17's mutant tests)."""
