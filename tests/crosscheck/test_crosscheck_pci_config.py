"""Area pci-config against QEMU's virtio-net-pci through qtest: a bounded seed set (issue 18)."""

from __future__ import annotations

import json

import pytest

from iovirt.cli import main
from iovirt.crosscheck.area import run_area
from iovirt.crosscheck.ops import Op, parse_ops, shrink
from iovirt.crosscheck.pci_config import PciConfigArea
from iovirt.crosscheck.qtest import qemu_available
from iovirt.pci.regs import PCI_COMMAND

needs_qemu = pytest.mark.skipif(not qemu_available(), reason="qemu-system-x86_64 not installed")


@pytest.fixture(scope="module")
def area():
    with PciConfigArea() as a:
        yield a


@needs_qemu
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_pci_config_agrees_with_qemu(area, seed):
    result = run_area(area, seed, 5000)
    assert result.compared == 5000
    assert [m.replay_text() for m in result.mismatches] == []


@needs_qemu
def test_a_broken_model_gives_a_minimal_replayable_sequence(area):
    # A mutant: iovirt's Command register loses Memory Space Enable's writability.
    assert area.host is not None
    endpoint = area.host.find_function(1, 0, 0)
    cfg = endpoint.config
    wmask = cfg.wmask(PCI_COMMAND, 2)
    cfg.set_wmask(PCI_COMMAND, 2, wmask & ~0x2)
    try:
        ops = [Op("r", "cfg", 0, 4), Op("w", "cfg", 0x3C, 1, 5), Op("w", "cfg", 4, 2, 0x6), Op("r", "cfg", 0x3C, 1),
               Op("r", "cfg", 4, 2)]
        result = run_area_on(area, ops)
    finally:
        cfg.set_wmask(PCI_COMMAND, 2, wmask)
    [mismatch] = result.mismatches
    assert [str(op) for op in mismatch.ops] == ["w cfg 0x4 2 0x6", "r cfg 0x4 2"]
    assert parse_ops(mismatch.replay_text()) == mismatch.ops


def run_area_on(area, ops):
    from iovirt.crosscheck.area import AreaResult, compare

    result = AreaResult(area.name)
    compare(area, ops, result)
    return result


def test_shrink_keeps_only_what_the_failure_needs():
    ops = [Op("w", "cfg", i, 1, i) for i in range(10)] + [Op("r", "cfg", 0, 1)]
    small = shrink(ops, lambda seq: Op("w", "cfg", 3, 1, 3) in seq and Op("w", "cfg", 7, 1, 7) in seq)
    assert small == [Op("w", "cfg", 3, 1, 3), Op("w", "cfg", 7, 1, 7), Op("r", "cfg", 0, 1)]


@needs_qemu
def test_cli_writes_the_json_report(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["crosscheck", "--area", "pci-config", "--seed", "5", "--ops", "2000", "--json", str(out)]) == 0
    counts = json.loads(out.read_text())["areas"]["pci-config"]
    assert counts["compared"] == 2000 and counts["mismatches"] == 0
    assert counts["expected_differences"] > 0
