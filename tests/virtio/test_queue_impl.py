"""The accelerated queue must be what runs by default (no silent fallback)."""

from iovirt import _accel
from iovirt.virtio import queue


def test_cython_queue_is_default():
    if _accel.NO_EXTENSIONS:
        assert queue.IMPLEMENTATION == "python"
        return
    assert queue.IMPLEMENTATION == "cython", "compiled extension expected but the pure-Python queue was loaded"
    assert "cython" in queue.implementations()


# -- the twins fail alike ----------------------------------------------------------------
# Every raise site of the two SplitQueues, driven the same way on both: the outcomes
# (results, or errors compared whole: type, text, attributes) must be equal.

import struct  # noqa: E402

import pytest  # noqa: E402

from iovirt.memory import BumpAllocator, GuestMemory  # noqa: E402
from iovirt.virtio.defs import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE  # noqa: E402
from iovirt.virtio.driver import DriverQueue  # noqa: E402
from iovirt.virtio.state import QueueState  # noqa: E402

from twins import outcome  # noqa: E402

MEM = 0x10000
NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT
BUF = 0x8000
TABLE = 0x9000  # an indirect table


def _ring(size: int = 8):
    memory = GuestMemory.from_ranges([(0, MEM)], backing="bytearray")
    return memory, DriverQueue(memory, BumpAllocator(0x1000, 0x6000), size, index=3)


def _pop(dev, n: int = 8):
    return outcome(lambda: [(c.head, c.buffers) for c in dev.pop_batch(n)])


def _chains(cls, descs, heads, indirect=(), per_pop=1):
    """Pop ``heads`` from a table of raw ``descs`` (and an indirect table), ``per_pop`` at a time."""
    memory, drv = _ring()
    for i, d in enumerate(indirect):
        memory.write(TABLE + 16 * i, struct.pack("<QIHH", *d))
    for i, d in enumerate(descs):
        drv.write_desc(i, *d)
    for h in heads:
        drv.post_head(h)
    drv.publish()
    dev = cls.from_state(memory, drv.state())
    return [_pop(dev, per_pop) for _ in heads]


BROKEN_CHAINS = {
    "head out of range": ([(BUF, 8)], [9]),
    "next out of range": ([(BUF, 8, NEXT, 12)], [0]),
    "next loop": ([(BUF, 8, NEXT, 1), (BUF, 8, NEXT, 0)], [0]),
    "direct then indirect too long": ([(BUF, 8, NEXT, i + 1) for i in range(4)] + [(TABLE, 16 * 5, INDIRECT)], [0]),
    "order": ([(BUF, 8, WRITE | NEXT, 1), (BUF, 8)], [0]),
    "wraps": ([(0xFFFF_FFFF_FFFF_FFF8, 16)], [0]),
    "outside memory": ([(MEM - 8, 16)], [0]),
    "writable outside": ([(BUF, 8, NEXT, 1), (MEM, 1, WRITE)], [0]),
    "indirect with next": ([(TABLE, 16, INDIRECT | NEXT, 1), (BUF, 8)], [0]),
    "indirect length zero": ([(TABLE, 0, INDIRECT)], [0]),
    "indirect length odd": ([(TABLE, 17, INDIRECT)], [0]),
    "indirect outside": ([(MEM - 16, 32, INDIRECT)], [0]),
    "indirect too long": ([(TABLE, 16 * 9, INDIRECT)], [0]),
    "good then bad": ([(BUF, 8), (BUF, 8, NEXT, 12)], [0, 1, 0]),
}
INDIRECT_TABLES = {
    "nested indirect": [(TABLE, 16, INDIRECT)],
    "indirect next out of range": [(BUF, 8, NEXT, 5)],
    "indirect loop": [(BUF, 8, NEXT, 1), (BUF, 8, NEXT, 0)],
    "indirect order": [(BUF, 8, WRITE | NEXT, 1), (BUF, 8)],
    "indirect buffer outside": [(MEM - 4, 8)],
}


def _both():
    from iovirt.virtio.queue import implementations

    impls = implementations()
    if "cython" not in impls:
        pytest.skip("one implementation only")
    return impls["python"], impls["cython"]


@pytest.mark.parametrize("case", sorted(BROKEN_CHAINS))
def test_broken_chains_fail_alike(case):
    py, c = _both()
    descs, heads = BROKEN_CHAINS[case]
    descs = [d + (0,) * (4 - len(d)) for d in descs]
    for per_pop in (1, 8):  # 8: an error after good chains comes with the next pop
        got = _chains(py, descs, heads, per_pop=per_pop)
        assert got == _chains(c, descs, heads, per_pop=per_pop)
        assert any(kind == "raised" for kind, _ in got)


@pytest.mark.parametrize("case", sorted(INDIRECT_TABLES))
def test_broken_indirect_tables_fail_alike(case):
    py, c = _both()
    table = [d + (0,) * (4 - len(d)) for d in INDIRECT_TABLES[case]]
    descs = [(TABLE, 16 * len(table), INDIRECT, 0)]
    got = _chains(py, descs, [0], table)
    assert got == _chains(c, descs, [0], table)
    assert got[0][0] == "raised"


def _restore(cls, **changes):
    memory, drv = _ring()
    state = QueueState(**{**drv.state().to_dict(), **changes})
    return outcome(lambda: cls.from_state(memory, state).state())


@pytest.mark.parametrize(
    "changes",
    [{"last_avail_idx": -1}, {"used_idx": 0x10000}, {"last_avail_idx": "1"}, {"last_avail_idx": 9},
     {"size": 6}, {"desc_addr": 0x1008}, {"used_addr": MEM - 8}, {"avail_addr": MEM}],
)
def test_bad_saved_state_fails_alike(changes):
    py, c = _both()
    assert _restore(py, **changes) == _restore(c, **changes)
    assert _restore(py, **changes)[0] == "raised"


def test_a_ring_straddling_two_regions_fails_alike():
    py, c = _both()

    def build(cls):
        memory = GuestMemory.from_ranges([(0, 0x1000), (0x1000, 0x1000)], backing="bytearray")
        return outcome(lambda: cls(memory, 16, 0xF80, 0x1100, 0x1200, index=2).state())

    assert build(py) == build(c)
    assert build(py)[0] == "raised"


def _used_side(cls):
    memory, drv = _ring()
    drv.add_chain(readable=[(BUF, 8)])
    drv.add_chain(writable=[(BUF, 8)])
    drv.set_avail_idx(drv.avail_idx)
    dev = cls.from_state(memory, drv.state())
    out = [outcome(dev.push, 0, 0), outcome(dev.rewind, 1)]
    batch = dev.pop_batch(8)
    out += [
        outcome(batch.set_used_len, 0, -1), outcome(batch.set_used_len, 0, 1 << 32),
        outcome(dev.rewind, -1), outcome(dev.rewind, 3), outcome(dev.push, 8, 0), outcome(dev.push, -1, 0),
        outcome(dev.push, 0, -1), outcome(dev.push, 0, 1 << 32), outcome(dev.push, 0, 4),
        outcome(dev.push_batch, batch),
    ]
    drv.set_avail_idx(drv.avail_idx + 9)  # more than Queue Size past last_avail_idx
    out += [outcome(dev.pending), _pop(dev)]
    dev.release()
    out += [outcome(dev.pending), _pop(dev), outcome(dev.push, 1, 0), outcome(dev.refresh),
            outcome(dev.need_notify), outcome(dev.enable_notification), outcome(dev.disable_notification)]
    return out


def test_used_side_and_lifecycle_errors_alike():
    py, c = _both()
    got = _used_side(py)
    assert got == _used_side(c)
    assert sum(kind == "raised" for kind, _ in got) >= 15


def _resubmit(cls, heads):
    """Walk ``heads`` again without popping (inflight resubmission): chains, or the whole error."""
    memory, drv = _ring()
    for i in range(4):
        drv.write_desc(i, BUF + 16 * i, 8 + i)
    drv.write_desc(4, BUF, 8, NEXT, 12)  # next out of range
    dev = cls.from_state(memory, drv.state())
    got = outcome(lambda: [(c.head, c.buffers) for c in dev.resubmit(heads)])
    return got, dev.state().last_avail_idx


@pytest.mark.parametrize("heads", [[2, 0, 3], [9], [1, 4], [70000]])
def test_resubmission_walks_given_heads_alike(heads):
    py, c = _both()
    assert _resubmit(py, heads) == _resubmit(c, heads)
    if heads == [2, 0, 3]:
        chains, last_avail = _resubmit(py, heads)
        assert chains[1] == [(h, [(BUF + 16 * h, 8 + h, False)]) for h in heads] and last_avail == 0
