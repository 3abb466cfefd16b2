"""The translation cache, both implementations: entries, runs across pages, permissions,
large leaves, invalidation, capacity; and a hypothesis run against a dict model."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iovirt import _accel
from iovirt.virtio.iotlb import implementations

from twins import outcome

IMPLS = implementations()
K4, M2, G1 = 1 << 12, 1 << 21, 1 << 30
R, W, RW = 1, 2, 3


@pytest.fixture(params=["python", "cython"])
def cache_cls(request):
    """An ``IotlbCache`` class; the cython parameter fails if the extension did not load."""
    if request.param == "cython" and "cython" not in IMPLS:
        if _accel.NO_EXTENSIONS:
            pytest.skip("IOVIRT_NO_EXTENSIONS set: pure Python run")
        pytest.fail("the Cython IOTLB extension did not load (build it: pip install -e .)")
    return IMPLS[request.param]


def test_hit_miss_and_counters(cache_cls):
    c = cache_cls(16)
    assert c.lookup(0x1000) is None
    c.insert(0x1000, 0x5000, K4, RW)
    assert c.lookup(0x1234, 4) == (0x5234, 4, RW)
    assert c.lookup(0x2000) is None
    assert (c.hits, c.misses, len(c)) == (1, 2, 1)


def test_run_crosses_pages_while_contiguous_in_gpa(cache_cls):
    c = cache_cls(16)
    c.insert(0x1000, 0x5000, K4, RW)
    c.insert(0x2000, 0x6000, K4, R)  # contiguous with the first
    c.insert(0x3000, 0x9000, K4, RW)  # not contiguous
    assert c.lookup(0x1F00, 0x2000) == (0x5F00, 0x1100, R)  # stops where the GPA jumps
    assert c.lookup(0x1F00, 0x200) == (0x5F00, 0x200, R)
    assert c.lookup(0x1F00, 0x100) == (0x5F00, 0x100, RW)  # inside one page
    assert c.lookup(0x3FF0, 0x20) == (0x9FF0, 0x10, RW)  # the next page misses: the run so far


def test_permissions(cache_cls):
    c = cache_cls(16)
    c.insert(0x1000, 0x5000, K4, R)
    c.insert(0x2000, 0x6000, K4, RW)
    assert c.lookup(0x1000, 8, W) is None
    assert c.lookup(0x2000, 8, W) == (0x6000, 8, RW)
    assert c.lookup(0x1FF8, 16, W) is None  # the first page lacks W
    assert c.lookup(0x1FF8, 16, R) == (0x5FF8, 16, R)
    c.insert(0x3000, 0x7000, K4, W)
    assert c.lookup(0x2FF8, 16, R) == (0x6FF8, 8, RW)  # the run stops at the write-only page


def test_large_leaves(cache_cls):
    c = cache_cls(16)
    c.insert(0x20_0000, 0x4000_0000, M2, RW)
    c.insert(0x4000_0000, 0x8000_0000, G1, R)
    assert c.lookup(0x3F_F000, 0x2000) == (0x401F_F000, 0x1000, RW)  # ends with the leaf
    assert c.lookup(0x4123_4567, 0x10) == (0x8123_4567, 0x10, R)
    # A 4 KiB entry inside a large leaf wins for its page.
    c.insert(0x20_1000, 0x9000, K4, R)
    assert c.lookup(0x20_1008) == (0x9008, 1, R)
    assert c.lookup(0x20_2008) == (0x4000_2008, 1, RW)


def test_invalidate_drops_overlapping_entries_and_whole_leaves(cache_cls):
    c = cache_cls(64)
    for page in range(8):
        c.insert(page * K4, 0x10_0000 + page * K4, K4, RW)
    c.insert(0x20_0000, 0x40_0000, M2, RW)
    c.invalidate(0x2800, 0x1000)  # touches pages 2 and 3
    assert [e[0] for e in c.entries()] == [0, 0x1000, 0x4000, 0x5000, 0x6000, 0x7000, 0x20_0000]
    c.invalidate(0x3F_FFFF, 1)  # the last byte of the 2 MiB leaf
    assert c.lookup(0x20_0000) is None
    c.invalidate(0, 0)  # empty: nothing
    assert len(c) == 6
    c.invalidate(0, 1 << 64)  # everything, by a scan
    assert len(c) == 0 and c.entries() == []
    c.insert(0x1000, 0x5000, K4, R)
    c.invalidate_all()
    assert c.lookup(0x1000) is None


def test_full_cache_empties_itself(cache_cls):
    c = cache_cls(4)
    for page in range(4):
        c.insert(page * K4, page * K4, K4, R)
    c.insert(0, 0x9000, K4, R)  # replacing an entry does not count
    assert len(c) == 4 and c.lookup(0) == (0x9000, 1, R)
    c.insert(0x10_0000, 0, K4, R)
    assert c.entries() == [(0x10_0000, 0, K4, R)]


@pytest.mark.parametrize(
    "args",
    [(0x1000, 0x5000, 0x2000, R), (0x1800, 0x5000, K4, R), (0x1000, 0x5800, K4, R),
     (0x20_1000, 0, M2, R), (0x1000, 0x5000, K4, 4)],
)
def test_bad_entries_are_refused(cache_cls, args):
    with pytest.raises(ValueError):
        cache_cls(4).insert(*args)


@pytest.mark.parametrize(
    "call",
    [("insert", 0x1000, 0x5000, 0x2000, R), ("insert", 0x1800, 0x5000, K4, R), ("insert", 0x1000, 0x5800, K4, R),
     ("insert", 0x20_1000, 0, M2, R), ("insert", 0x1000, 0x5000, K4, 4), ("insert", 1 << 64, 0, K4, R),
     ("lookup", 0x1000, 0), ("lookup", (1 << 64) - K4, 2 * K4)],
)
def test_the_twins_refuse_alike(call):
    if "cython" not in IMPLS:
        pytest.skip("one implementation only")
    name, *args = call
    got = [outcome(getattr(cls(4), name), *args) for cls in (IMPLS["python"], IMPLS["cython"])]
    assert got[0] == got[1] and got[0][0] == "raised"
    assert [outcome(cls, 0) for cls in (IMPLS["python"], IMPLS["cython"])] == [outcome(IMPLS["python"], 0)] * 2


# -- against a model ----------------------------------------------------------------------
class Model:
    """The plainest statement of the rules: a dict of leaves, byte-by-page lookups."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.leaves: dict[tuple[int, int], tuple[int, int]] = {}

    def find(self, iova: int):
        for size in (K4, M2, G1):
            hit = self.leaves.get((iova & ~(size - 1), size))
            if hit is not None:
                return iova & ~(size - 1), size, hit[0], hit[1]
        return None

    def insert(self, iova, gpa, size, perm):
        if len(self.leaves) >= self.capacity and self.find(iova) is None:
            self.leaves.clear()
        self.leaves[(iova, size)] = (gpa, perm)

    def invalidate(self, iova, size):
        for key in list(self.leaves):
            if size > 0 and key[0] < iova + size and iova < key[0] + key[1]:
                del self.leaves[key]

    def lookup(self, iova, length, need):
        run, perm, gpa = 0, RW, None
        while run < length:  # one page (or leaf remainder) at a time
            hit = self.find(iova + run)
            if hit is None or hit[3] & need != need:
                break
            here = hit[2] + (iova + run - hit[0])
            if gpa is not None and here != gpa + run:
                break
            if gpa is None:
                gpa = here
            perm &= hit[3]
            run = min(length, hit[0] + hit[1] - iova)
        return None if gpa is None else (gpa, run, perm)


pages = st.integers(0, 40)
ops = st.one_of(
    st.tuples(st.just("insert"), pages, pages, st.sampled_from([K4, M2]), st.integers(0, 3)),
    st.tuples(st.just("invalidate"), pages, st.integers(0, 3 * M2)),
    st.tuples(st.just("lookup"), pages, st.integers(1, 3 * M2), st.integers(0, 3)),
    st.tuples(st.just("all")),
)


@settings(max_examples=150, deadline=None)
@given(capacity=st.integers(1, 12), program=st.lists(ops, max_size=40))
def test_matches_the_model(capacity, program):
    caches = [cls(capacity) for cls in IMPLS.values()]
    model = Model(capacity)
    for op in program:
        if op[0] == "insert":
            _, iova, gpa, size, perm = op
            # Pages near one another, so that runs and large leaves meet.
            iova, gpa = (iova * K4 * 37) & ~(size - 1), (gpa * K4 * 53) & ~(size - 1)
            model.insert(iova, gpa, size, perm)
            for c in caches:
                c.insert(iova, gpa, size, perm)
        elif op[0] == "invalidate":
            _, iova, size = op
            model.invalidate(iova * K4 * 37 + 0x10, size)
            for c in caches:
                c.invalidate(iova * K4 * 37 + 0x10, size)
        elif op[0] == "lookup":
            _, iova, length, need = op
            iova = iova * K4 * 37 + 0xF00
            expected = model.lookup(iova, length, need)
            for c in caches:
                assert c.lookup(iova, length, need) == expected
        else:
            model.leaves.clear()
            for c in caches:
                c.invalidate_all()
        expected_entries = sorted((i, g, s, p) for (i, s), (g, p) in model.leaves.items())
        for c in caches:
            assert c.entries() == expected_entries
