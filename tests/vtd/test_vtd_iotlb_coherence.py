"""The devices' C-level IOTLB copies stay coherent with the unit's caches (VT-d 6.5), and the
C page walk gives exactly what the reference walk gives."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iovirt import _accel
from iovirt.memory import Access, BumpAllocator, GuestMemory, MemoryRegion
from iovirt.virtio.chain import read_chain
from iovirt.virtio.driver import DriverQueue
from iovirt.virtio.iotlb import CachedTranslator
from iovirt.virtio.queue import implementations
from iovirt.vtd import VtdDriver, VtdUnit
from iovirt.vtd.tables import PTE_R, PTE_W, pte
from iovirt.vtd.walk import WalkError, table_walker, walk_second_level

SID = 0x0008
RW = PTE_R | PTE_W
IOVA = 0x7F_0000_0000
P = 0x30_0000  # data pages: P, P + 0x1000, ...
RINGS = (0x10_0000, 0x10_0000)


def c_pages(translator) -> list[tuple[int, int, int]]:
    """(iova, gpa, perm) of every entry of the translator's C-level cache."""
    return [(iova, gpa, perm) for iova, gpa, _size, perm in translator.cache.entries()]


@pytest.fixture
def setup(unit, drv):
    dom = drv.create_domain(1)
    drv.attach(SID, dom)
    drv.map(dom, IOVA, P, 0x4000, RW)
    drv.enable_translation()
    return dom, unit.dma_translator(SID)


def warm(translator, pages=range(4)):
    for page in pages:
        translator.translate(IOVA + page * 0x1000, 8, Access.READ)


def test_the_device_translator_is_a_cached_translator(setup):
    dom, t = setup
    assert isinstance(t, CachedTranslator)
    assert t.translate(IOVA + 0xFF8, 16, Access.READ) == [(P + 0xFF8, 8), (P + 0x1000, 8)]  # the unit's answer
    assert c_pages(t) == [(IOVA, P, RW), (IOVA + 0x1000, P + 0x1000, RW)]
    assert t.translate(IOVA + 0xFF8, 16, Access.READ) == [(P + 0xFF8, 16)]  # the cache's: one run
    assert t.did == dom.did


@pytest.mark.parametrize("flush", ["queued", "registers"])
def test_page_selective_invalidation_drops_exactly_those_pages(unit, mem, alloc, flush):
    drv = VtdDriver(unit, mem, alloc, queued_invalidation=flush == "queued")
    drv.init()
    dom = drv.create_domain(1)
    drv.attach(SID, dom)
    drv.map(dom, IOVA, P, 0x4000, RW)
    drv.enable_translation()
    t = unit.dma_translator(SID)
    warm(t)
    drv.flush_iotlb(dom, IOVA + 0x1000, 0x1000)
    assert [e[0] for e in c_pages(t)] == [IOVA, IOVA + 0x2000, IOVA + 0x3000]
    assert {(1, e[0] >> 12) for e in c_pages(t)} == set(unit.dma.iotlb.entries)


@pytest.mark.parametrize("how", ["domain", "global", "context", "disable"])
def test_coarse_invalidations_empty_the_copy(setup, drv, how):
    dom, t = setup
    warm(t)
    assert len(t.cache) == 4
    {"domain": lambda: drv.flush_iotlb_domain(dom), "global": drv.flush_iotlb_global,
     "context": lambda: drv.flush_context_device(SID, dom.did),
     "disable": drv.disable_translation}[how]()
    assert len(t.cache) == 0
    if how == "disable":  # translation off: identity, and nothing cached
        assert t.translate(IOVA, 8, Access.READ) == [(IOVA, 8)]
        assert len(t.cache) == 0


def test_other_domains_keep_their_copies(unit, drv):
    doms = [drv.create_domain(did) for did in (1, 2)]
    translators = []
    for dom, sid in zip(doms, (0x08, 0x10)):
        drv.attach(sid, dom)
        drv.map(dom, IOVA, P, 0x1000, RW)
        translators.append(unit.dma_translator(sid))
    drv.enable_translation()
    for t in translators:
        warm(t, [0])
    drv.flush_iotlb_domain(doms[0])
    assert [len(t.cache) for t in translators] == [0, 1]


def test_eviction_from_the_unit_iotlb_evicts_the_copy(mem, alloc):
    unit = VtdUnit(mem, iotlb_capacity=4)
    drv = VtdDriver(unit, mem, alloc)
    drv.init()
    dom = drv.create_domain(1)
    drv.attach(SID, dom)
    drv.map(dom, IOVA, P, 0x8000, RW)
    drv.enable_translation()
    t = unit.dma_translator(SID)
    warm(t, range(6))
    assert [(iova - IOVA) >> 12 for iova, _, _ in c_pages(t)] == [2, 3, 4, 5]


def test_large_leaf_is_copied_per_page_and_dropped_whole(unit, drv):
    dom = drv.create_domain(1)
    drv.attach(SID, dom)
    drv.map(dom, 0x4000_0000, 0x20_0000, 0x20_0000, RW)  # one 2 MiB leaf
    drv.enable_translation()
    t = unit.dma_translator(SID)
    t.translate(0x4000_0000, 8, Access.READ)
    t.translate(0x401F_F000, 8, Access.READ)
    assert len(t.cache) == 2
    drv.flush_iotlb(dom, 0x4000_0000, 0x1000)  # any part of the leaf drops all of it (as the unit does)
    assert len(t.cache) == 0 and not unit.dma.iotlb.entries


@pytest.mark.skipif("cython" not in implementations(), reason="the accelerated ring is not built")
def test_live_ring_serves_stale_translation_from_c_until_invalidated(unit, mem, alloc, drv):
    dom = drv.create_domain(1)
    drv.attach(SID, dom)
    drv.map(dom, RINGS[0], RINGS[0], RINGS[1], RW)
    drv.map(dom, IOVA, P, 0x1000, PTE_R)
    drv.enable_translation()
    guest = DriverQueue(mem, BumpAllocator(*RINGS), 16)
    t = unit.dma_translator(SID)
    dev_mem = mem.with_translator(t)
    device = implementations()["cython"].from_state(dev_mem, guest.state())

    def send() -> bytes:
        guest.add_chain(readable=[(IOVA, 8)])
        guest.publish()
        chain = device.pop()
        device.push(chain.head, 0)
        guest.get_used()
        return read_chain(dev_mem, chain)

    try:
        mem.write(P, b"first..!")
        assert send() == b"first..!"
        drv.map(dom, IOVA, P + 0x1000, 0x1000, PTE_R)  # remapped, not flushed
        mem.write(P, b"stale..!")
        hits = t.cache.hits
        assert send() == b"stale..!"
        assert t.cache.hits > hits  # served by the C copy
        assert t.cache.lookup(IOVA) == (P, 1, PTE_R)
        drv.flush_iotlb(dom, IOVA, 0x1000)
        assert t.cache.lookup(IOVA) is None
        mem.write(P + 0x1000, b"second.!")
        assert send() == b"second.!"
        assert t.cache.lookup(IOVA) == (P + 0x1000, 1, PTE_R)
    finally:
        device.release()


# -- the C walk against the reference -------------------------------------------------
PT = 0x90_0000
#: R, W, PS, SNP, address bits inside large leaves, HAW and reserved bits, TM.
_INTERESTING_BITS = [0, 1, 7, 11, 12, 20, 21, 29, 47, 48, 51, 52, 62, 63]


def entry_values(next_table: int):
    """A table pointer or a leaf, with any of the bits the rules care about flipped."""
    base = st.sampled_from([next_table, 0x20_0000, 0x4000_0000, 0x7000, 0xFF_FFFF_F000])
    flips = st.lists(st.sampled_from(_INTERESTING_BITS), max_size=3)
    return st.builds(lambda b, perm, ps, bits: pte(b, perm, ps) ^ sum({1 << i for i in bits}),
                     base, st.integers(0, 3), st.booleans(), flips)


@pytest.mark.skipif(_accel.NO_EXTENSIONS, reason="IOVIRT_NO_EXTENSIONS set: no C walk")
@settings(max_examples=200, deadline=None)
@given(levels=st.sampled_from([3, 4]), iova=st.integers(0, (1 << 48) - 1), data=st.data())
def test_c_walk_matches_reference(levels, iova, data):
    mem = GuestMemory.from_ranges([(0, 0x100_0000)], backing="bytearray")
    iova &= (1 << (12 + 9 * levels)) - 1
    table = PT
    for level in range(levels, 0, -1):
        nxt = table + 0x1000
        value = data.draw(entry_values(nxt))
        mem.write_u64(table + ((iova >> (12 + 9 * (level - 1))) & 0x1FF) * 8, value & ((1 << 64) - 1))
        table = nxt
    fast = table_walker(mem)
    assert fast is not walk_second_level
    try:
        expected = walk_second_level(mem, PT, levels, iova)
    except WalkError as exc:
        with pytest.raises(WalkError) as info:
            fast(PT, levels, iova)
        assert (info.value.fault_reason, info.value.level, info.value.entry_addr) == (
            exc.fault_reason, exc.level, exc.entry_addr)
    else:
        assert fast(PT, levels, iova) == expected


def test_c_walk_follows_memory_map_changes():
    mem = GuestMemory.from_ranges([(0, 0x10_0000)])
    walk = table_walker(mem)
    with pytest.raises(WalkError):
        walk(0x20_0000, 3, 0)  # no memory there: the top table is unreachable
    mem.add_region(MemoryRegion.anonymous(0x20_0000, 0x10_0000))
    mem.write_u64(0x20_0000, pte(0x4000_0000, PTE_R, large=True))  # a 1 GiB leaf
    assert walk(0x20_0000, 3, 0x1234) == (0x4000_0000, 30, PTE_R)
    mem.close()  # the walker holds no view of the regions
