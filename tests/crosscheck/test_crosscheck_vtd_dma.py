"""Area vtd-dma: DMA through QEMU's intel-iommu against iovirt's walk of the same tables (issue 18).

A bounded seed set against QEMU, a hand-written sequence whose result is known, a broken walk that
must be caught, and (without QEMU) the generator's promises: every write a translation allows lands
in the window, and the requests are made in the device's order.
"""

from __future__ import annotations

import logging
import random

import pytest

from iovirt.crosscheck.area import AreaResult, compare, run_area
from iovirt.crosscheck.areas import AREAS
from iovirt.crosscheck.ops import Op, parse_ops
from iovirt.crosscheck.qtest import qemu_available
from iovirt.crosscheck.vtd_dma import DEVICES, VtdDmaArea, requests, runs, window_runs
from iovirt.crosscheck.vtd_dma_tables import WINDOW, WINDOW_SIZE
from iovirt.memory import Access, GuestMemory
from iovirt.vtd.tables import PTE_W
from iovirt.vtd.unit import VtdUnit

needs_qemu = pytest.mark.skipif(not qemu_available(), reason="qemu-system-x86_64 not installed")


@pytest.fixture(scope="module")
def area():
    with VtdDmaArea() as a:
        yield a


@needs_qemu
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vtd_dma_agrees_with_qemu(area, seed):
    result = run_area(area, seed, 1000)
    assert result.compared == 1000
    assert result.by_kind["dma"] > 500
    assert [m.replay_text() for m in result.mismatches] == []


# rng0 (00:03.0) behind a 4-level table of domain 7: IOVA 0x8000_0000 (level-3 index 2) maps RW to the
# window's page 3, IOVA 0x8000_1000 read-only to page 5; the ring pages are identity-mapped RW.
# Root table 0x100000, context table 0x101000, tables 0x102000 (L4) 0x103000 (L3) 0x104000 (L2)
# 0x105000 (ring L1) 0x106000 (L2 of the probes) 0x107000 (L1 of the probes).
TABLES = """
w ram 0x100000 8 0x101001
w ram 0x101180 8 0x102001
w ram 0x101188 8 0x702
w ram 0x102000 8 0x103003
w ram 0x103000 8 0x104003
w ram 0x104008 8 0x105003
w ram 0x105000 8 0x200003
w ram 0x105008 8 0x201003
w ram 0x105010 8 0x202003
w ram 0x105018 8 0x203003
w ram 0x103010 8 0x106003
w ram 0x106000 8 0x107003
w ram 0x107000 8 0x303003
w ram 0x107008 8 0x305001
w reg 0x20 8 0x100000
w reg 0x18 4 0x40000000
w reg 0x28 8 0xa000000000000000
w reg 0xf8 8 0x9000000000000000
w reg 0x18 4 0x80000000
"""
WRITE_OK = "dma rng0 0x80000100 16 0x1"
WRITE_DENIED = "dma rng0 0x80001100 16 0x1"


@needs_qemu
def test_a_write_lands_at_the_translated_address_and_a_denied_one_is_logged(area):
    ops = parse_ops(TABLES + WRITE_OK + "\n" + WRITE_DENIED)
    written = ((WINDOW + 0x3100, 16),)
    denied = (0x2, 0x8000_1000, 1 << 63 | 0x5 << 32 | DEVICES[0].source_id)  # PPF; FRCD: F, write, FR 5
    expected = [None] * (len(ops) - 2) + [(written, 0, 0, 0), ((), *denied)]
    assert area.run_iovirt(ops) == expected
    assert area.run_qemu(ops) == expected


@needs_qemu
def test_a_walk_that_ignores_the_write_permission_is_caught(area, monkeypatch):
    # A mutant: iovirt's walk grants W wherever it grants anything.
    dma = area.unit.dma
    walk = dma._walk

    def grants_write(slptptr, levels, iova):
        leaf, shift, perm = walk(slptptr, levels, iova)
        return leaf, shift, perm | PTE_W if perm else perm

    monkeypatch.setattr(dma, "_walk", grants_write)
    ops = parse_ops(TABLES + WRITE_OK + "\n" + WRITE_DENIED)
    result = AreaResult(area.name)
    compare(area, ops, result)
    [mismatch] = result.mismatches
    assert str(mismatch.ops[-1]) == WRITE_DENIED
    assert mismatch.qemu[0] == () and mismatch.iovirt[0] == ((WINDOW + 0x5100, 16),)
    assert len(mismatch.ops) < len(ops)  # shrunk: the other probe and unneeded writes are gone
    assert parse_ops(mismatch.replay_text()) == mismatch.ops


@needs_qemu
def test_a_random_run_with_the_broken_walk_reports_a_minimal_sequence(area, monkeypatch):
    dma = area.unit.dma
    walk = dma._walk
    monkeypatch.setattr(dma, "_walk", lambda s, lv, i: (lambda r: (r[0], r[1], r[2] | PTE_W if r[2] else 0))(walk(s, lv, i)))
    result = run_area(area, 0, 256)
    assert result.mismatches
    last = result.mismatches[0].ops[-1]
    assert last.kind == "dma" and last.value & 1


def test_the_area_is_registered():
    assert AREAS["vtd-dma"] is VtdDmaArea


# -- without QEMU ------------------------------------------------------------------------------


def _offline_area() -> VtdDmaArea:
    a = VtdDmaArea()
    a.memory = GuestMemory.from_ranges([(0, 64 << 20)], backing="bytes")
    a.unit = VtdUnit(a.memory, num_fault_records=1)
    return a


@pytest.mark.parametrize("seed", range(12))
def test_every_allowed_write_lands_in_the_window(seed, caplog):
    # QEMU's device really writes: a translation outside the window would scribble on the tables or rings.
    caplog.set_level(logging.CRITICAL)
    a = _offline_area()
    rng = random.Random(seed)
    ops = a.generate(rng, 256)
    a._reset_iovirt()
    for op in ops:
        if op.kind != "dma" or not op.value & 1:
            a.run_iovirt_op(op)
            continue
        k, device = k_device(op)
        translated = []
        for request in requests(k, op):
            try:
                translated.append((request, a.unit.translate(device.source_id, request.addr, request.length,
                                                             request.access)))
            except Exception:
                break
        for request, pieces in translated:
            if request.probe:
                assert all(WINDOW <= gpa and gpa + n <= WINDOW + WINDOW_SIZE for gpa, n in pieces), (op, pieces)
        a.run_iovirt_op(op)


def k_device(op: Op):
    k = [d.name for d in DEVICES].index(op.space)
    return k, DEVICES[k]


def test_requests_follow_the_device_order():
    write = requests(0, Op("dma", "rng0", 0x1FF8, 16, 1))
    assert [(r.addr, r.length, r.access, r.probe) for r in write] == [
        (0x201002, 2, Access.READ, False), (0x201004, 2, Access.READ, False), (0x200000, 16, Access.READ, False),
        (0x1FF8, 8, Access.WRITE, True), (0x2000, 8, Access.WRITE, True),
        (0x202004, 8, Access.WRITE, False), (0x202002, 2, Access.WRITE, False),
    ]
    read = requests(1, Op("dma", "rng1", 0x5000, 8, 0))
    assert [(r.addr, r.access) for r in read if not r.probe][4:5] == [(0x207000, Access.WRITE)]
    assert [r.access for r in read if r.probe] == [Access.READ]


def test_runs_merge_and_clip_to_the_window():
    assert runs([(WINDOW + 8, 8), (WINDOW, 8), (WINDOW + 32, 8), (0x1000, 8)]) == ((WINDOW, 16), (WINDOW + 32, 8))
    data = bytearray(WINDOW_SIZE)
    data[0x1008:0x1018] = b"\x01" * 16
    assert window_runs(bytes(data)) == ((WINDOW + 0x1008, 16),)
