"""Each check added for issue 17 fails against a back-end or transport broken in exactly its clause.

A mutant is a monkeypatch (or a device subclass) that breaks one rule; the
test runs the new checks (and, for contrast, the rest of the same transport)
and asserts that exactly the expected clauses fail.
"""

from __future__ import annotations

import pytest

from iovirt.conformance.platform_target import PlatformTarget
from iovirt.conformance.registry import Verdict, all_checks
from iovirt.conformance.runner import Runner
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
