"""Table formats: root and context entries, second-level PTEs, and the page walk."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from iovirt.vtd import faults as F
from iovirt.vtd.tables import (
    AW_39,
    AW_48,
    PTE_R,
    PTE_SNP,
    PTE_TM,
    PTE_W,
    ROOT_P,
    TT_PASS_THROUGH,
    context_entry,
    decode_context,
    pte,
    root_entry,
)
from iovirt.vtd.walk import WalkError, walk_second_level

PT = 0x900000  # page-table area inside the conftest memory


def test_root_entry_layout():
    lo, hi = root_entry(0x1234_5000)
    assert lo == 0x1234_5000 | ROOT_P and hi == 0
    assert root_entry(0x5000, present=False) == (0x5000, 0)


def test_context_entry_layout():
    lo, hi = context_entry(0xABC000, did=0x1234, aw=AW_48, tt=TT_PASS_THROUGH, fpd=True)
    assert lo == 0xABC000 | TT_PASS_THROUGH << 2 | 1 << 1 | 1
    assert hi == AW_48 | 0x1234 << 8


@given(
    slptptr=st.integers(0, (1 << 48) - 1).map(lambda a: a & ~0xFFF),
    did=st.integers(0, 0xFFFF),
    aw=st.integers(0, 7),
    tt=st.integers(0, 3),
    fpd=st.booleans(),
    present=st.booleans(),
)
def test_context_entry_round_trip(slptptr, did, aw, tt, fpd, present):
    ce = decode_context(*context_entry(slptptr, did, aw, tt, fpd, present))
    assert ce == (present, fpd, tt, slptptr, aw, did)


def test_pte_layout():
    assert pte(0x7000, PTE_R) == 0x7001
    assert pte(0x20_0000, PTE_R | PTE_W, large=True) == 0x20_0083


def _table(mem, addr, index, value):
    mem.write_u64(addr + index * 8, value)


def _build(mem, levels, leaf_level, iova, leaf):
    """A chain of tables from PT down to ``leaf_level`` whose last entry is ``leaf``."""
    table = PT
    for level in range(levels, leaf_level, -1):
        nxt = table + 0x1000
        _table(mem, table, (iova >> (12 + 9 * (level - 1))) & 0x1FF, pte(nxt, PTE_R | PTE_W))
        table = nxt
    _table(mem, table, (iova >> (12 + 9 * (leaf_level - 1))) & 0x1FF, leaf)
    return table


@pytest.mark.parametrize("levels", [3, 4])
def test_walk_4k_leaf(mem, levels):
    iova = 0x12_3456_7000 & ((1 << (12 + 9 * levels)) - 1)
    _build(mem, levels, 1, iova, pte(0x5000, PTE_R | PTE_W))
    assert walk_second_level(mem, PT, levels, iova) == (0x5000, 12, PTE_R | PTE_W)


@pytest.mark.parametrize("levels", [3, 4])
def test_walk_2m_leaf(mem, levels):
    _build(mem, levels, 2, 0x4020_0000, pte(0x60_0000, PTE_R, large=True))
    assert walk_second_level(mem, PT, levels, 0x4020_0000 + 0x1234) == (0x60_0000, 21, PTE_R)


@pytest.mark.parametrize("levels", [3, 4])
def test_walk_1g_leaf(mem, levels):
    _build(mem, levels, 3, 0x4000_0000, pte(0x4000_0000, PTE_W, large=True))
    assert walk_second_level(mem, PT, levels, 0x4012_3000) == (0x4000_0000, 30, PTE_W)


def test_permissions_are_anded_across_levels(mem):
    _build(mem, 3, 1, 0x1000, pte(0x5000, PTE_R | PTE_W))
    mem.write_u64(PT, pte(PT + 0x1000, PTE_R))  # top level read-only
    assert walk_second_level(mem, PT, 3, 0x1000)[2] == PTE_R


def test_not_present_middle_level_ends_walk_without_permission(mem):
    _build(mem, 4, 1, 0x1000, pte(0x5000, PTE_R | PTE_W))
    mem.write_u64(PT + 0x1000, 0)
    assert walk_second_level(mem, PT, 4, 0x1000)[2] == 0


def test_not_present_entry_is_not_checked_for_reserved_bits(mem):
    _build(mem, 3, 1, 0x1000, PTE_SNP | 1 << 50)  # R = W = 0
    assert walk_second_level(mem, PT, 3, 0x1000)[2] == 0


@pytest.mark.parametrize(
    "leaf_level, entry",
    [
        (1, pte(0x5000, PTE_R) | PTE_SNP),  # SNP reserved: ECAP.SC = 0
        (1, pte(0x5000, PTE_R) | 1 << 48),  # address above HAW
        (2, pte(0x20_0000, PTE_R, large=True) | 0x1000),  # 2M leaf with address bits 20:12
        (3, pte(0x4000_0000, PTE_R, large=True) | 0x20_0000),  # 1G leaf with address bits 29:12
        (4, pte(0, PTE_R, large=True)),  # PS in a level-4 entry
        (2, pte(0x7000, PTE_R) | PTE_TM),  # TM in a non-leaf
    ],
)
def test_reserved_bits_fault(mem, leaf_level, entry):
    _build(mem, 4, leaf_level, 0, entry)
    with pytest.raises(WalkError) as info:
        walk_second_level(mem, PT, 4, 0)
    assert info.value.fault_reason == F.FR_PAGING_ENTRY_RSVD
    assert info.value.level == leaf_level


def test_tm_allowed_in_a_leaf_and_ignored_bits_ignored(mem):
    _build(mem, 3, 1, 0, pte(0x5000, PTE_R) | PTE_TM | 1 << 63 | 1 << 55)
    assert walk_second_level(mem, PT, 3, 0) == (0x5000, 12, PTE_R)


def test_table_outside_memory_faults(mem):
    with pytest.raises(WalkError) as info:
        walk_second_level(mem, 0x7000_0000, 3, 0)
    assert info.value.fault_reason == F.FR_CONTEXT_INVALID  # SLPTPTR itself unreachable
    _build(mem, 3, 2, 0, pte(0x7000_0000, PTE_R))
    with pytest.raises(WalkError) as info:
        walk_second_level(mem, PT, 3, 0)
    assert info.value.fault_reason == F.FR_PAGING_ENTRY_INVALID


def test_39_bit_table_uses_three_levels(mem):
    _build(mem, 3, 1, 0x7F_FFFF_F000, pte(0x8000, PTE_R))
    assert walk_second_level(mem, PT, 3, 0x7F_FFFF_F000) == (0x8000, 12, PTE_R)
    assert AW_39 == 1
