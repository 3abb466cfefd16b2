"""Each check added for issue 17 fails against a back-end or transport broken in exactly its clause.

A mutant is a monkeypatch (or a device subclass) that breaks one rule; the
test runs the new checks (and, for contrast, the rest of the same transport)
and asserts that exactly the expected clauses fail.
"""

from __future__ import annotations

import pytest

from conftest import IovirtBackend
from iovirt.conformance.platform_target import PlatformTarget
from iovirt.conformance.registry import Verdict, all_checks
from iovirt.conformance.runner import Runner
from iovirt.conformance.target import Target
from iovirt.errors import IovirtError
from iovirt.virtio.blk.device import VirtioBlk
from iovirt.virtio.defs import VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_WRITE
from iovirt.virtio.transport import pci as transport_pci
from iovirt.virtio.transport.caps import VirtioPciCfgCap
from iovirt.virtio.transport.common_cfg import CommonCfg
from iovirt.virtio.transport.defs import VIRTIO_PCI_CAP_DEVICE_CFG


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


PCI_MUTANTS = {
    "subsystem-id-below-0x40": (_low_subsystem_id, {"virtio-1.2:4.1.2.1#non-transitional"}),
    "device-cfg-unaligned": (_unaligned_device_cfg, {"virtio-1.2:4.1.4#structures"}),
    "pci-cfg-window-write-ignored": (_window_write_ignored, {"virtio-1.2:4.1.4.9.1#write"}),
    "vector-beyond-table-sticks": (_any_vector_sticks, {"virtio-1.2:4.1.5.1.2.1#table"}),
}


@pytest.mark.parametrize("mutant", sorted(PCI_MUTANTS))
def test_pci_mutant_fails_exactly_its_check(monkeypatch, mutant):
    inject, expected = PCI_MUTANTS[mutant]
    inject(monkeypatch)
    failed = _failed(_pci_run())
    assert set(failed) == expected, failed


# -- vhost-user back-ends (iovirt's, broken) -----------------------------------------------------------
TIMEOUT = 0.5


@pytest.fixture
def make_backend(tmp_path):
    made = []

    def make(**kwargs):
        made.append(IovirtBackend(tmp_path, **kwargs))
        return made[-1]

    yield make
    for b in made:
        b.stop()


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


class IndirectWriteFlagFailsBlk(VirtioBlk):
    """Rejects an indirect descriptor that also carries the write flag."""

    def process_queue(self, index, queue):
        state = queue.state()
        end = queue.memory.read_u16(state.avail_addr + 2)
        i = state.last_avail_idx
        while i != end:
            flags = queue.memory.read_u16(state.desc_addr + 16 * _avail(queue, state, i) + 12)
            if flags & VIRTQ_DESC_F_INDIRECT and flags & VIRTQ_DESC_F_WRITE:
                self.fail(IovirtError("indirect descriptor with the write flag"))
                return
            i = (i + 1) & 0xFFFF
        super().process_queue(index, queue)


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
    blk_class, expected = BLK_MUTANTS[mutant]
    failed = _failed(_vu_run(_blk(make_backend(blk_class=blk_class)), NOTIFY_CLAUSES))
    assert set(failed) == expected, failed
