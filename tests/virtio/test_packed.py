"""The packed virtqueue's device side (virtio 1.2 section 2.8), both twins.

Every bad-input case is a typed error; each is run on both twins and the
outcomes (chains, or errors compared whole: type, text, attributes) must be
equal.
"""

from __future__ import annotations

import struct

import pytest

from iovirt import _accel
from iovirt.memory import BumpAllocator, GuestMemory
from iovirt.virtio.defs import (
    PACKED_WRAP_BIT,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)
from iovirt.virtio.dirtylog import DirtyLog
from iovirt.virtio.errors import (
    ChainTooLongError,
    DescBufferError,
    DescIndexError,
    DescOrderError,
    IndirectTableError,
    NestedIndirectError,
    QueueConfigError,
    QueueStateError,
    UsedRingError,
)
from iovirt.virtio.packed_driver import PackedDriverQueue
from iovirt.virtio.queue import packed_implementations
from iovirt.virtio.state import QueueState

from twins import outcome

IMPLS = packed_implementations()
MEM = 0x10000
NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT
BUF = 0x8000
TABLE = 0x9000  # an indirect table


@pytest.fixture(params=["python", "cython"])
def packed_cls(request):
    """A ``PackedQueue`` class; the cython parameter fails if the extension did not load."""
    if request.param == "cython" and "cython" not in IMPLS:
        if _accel.NO_EXTENSIONS:
            pytest.skip("IOVIRT_NO_EXTENSIONS set: pure Python run")
        pytest.fail("the Cython packed queue extension did not load (build it: pip install -e .)")
    return IMPLS[request.param]


def _ring(cls, size: int = 8, event_idx: bool = False):
    memory = GuestMemory.from_ranges([(0, MEM)], backing="bytearray")
    drv = PackedDriverQueue(memory, BumpAllocator(0x1000, 0x6000), size, event_idx=event_idx, index=3)
    return memory, drv, cls.from_state(memory, drv.state())


def _pop(dev, n: int = 8):
    return outcome(lambda: [(c.head, c.buffers) for c in dev.pop_batch(n)])


# (ring descriptors (addr, len, id, flags), indirect table, error) per bad-input case
BAD = {
    "buffer outside memory": ([(MEM - 8, 16, 0, 0)], [], DescBufferError),
    "writable buffer outside memory": ([(BUF, 8, 0, NEXT), (MEM, 1, 0, WRITE)], [], DescBufferError),
    "buffer wraps 2^64": ([(0xFFFF_FFFF_FFFF_FFF8, 16, 0, 0)], [], DescBufferError),
    "buffer id out of range": ([(BUF, 8, 8, 0)], [], DescIndexError),
    "list loops the whole ring": ([(BUF, 8, 0, NEXT)] * 8, [], ChainTooLongError),
    "readable after writable": ([(BUF, 8, 0, WRITE | NEXT), (BUF, 8, 0, 0)], [], DescOrderError),
    "indirect with next": ([(TABLE, 16, 0, INDIRECT | NEXT), (BUF, 8, 0, 0)], [], IndirectTableError),
    "indirect inside a list": ([(BUF, 8, 0, NEXT), (TABLE, 16, 0, INDIRECT)], [], IndirectTableError),
    "indirect length zero": ([(TABLE, 0, 0, INDIRECT)], [], IndirectTableError),
    "indirect length odd": ([(TABLE, 17, 0, INDIRECT)], [], IndirectTableError),
    "indirect table outside memory": ([(MEM - 16, 32, 0, INDIRECT)], [], DescBufferError),
    "indirect table too long": ([(TABLE, 16 * 9, 0, INDIRECT)], [], ChainTooLongError),
    "indirect in indirect": ([(TABLE, 16, 0, INDIRECT)], [(TABLE, 16, 0, INDIRECT)], NestedIndirectError),
    "indirect readable after writable": ([(TABLE, 32, 0, INDIRECT)], [(BUF, 8, 0, WRITE), (BUF, 8, 0, 0)], DescOrderError),
    "indirect buffer outside memory": ([(TABLE, 16, 0, INDIRECT)], [(MEM - 4, 8, 0, 0)], DescBufferError),
    "buffer id already in flight": ([(BUF, 8, 2, 0), (BUF, 8, 2, 0)], [], DescIndexError),
}


def _bad(cls, case, per_pop=1, good_first=False):
    descs, table, _ = BAD[case]
    memory, drv, dev = _ring(cls)
    for i, (addr, length, buf_id, flags) in enumerate(table):
        memory.write(TABLE + 16 * i, struct.pack("<QIHH", addr, length, buf_id, flags))
    if good_first:
        drv.post_raw([(BUF, 4, 5, 0)])
    drv.post_raw(descs)
    out = [_pop(dev, per_pop) for _ in range(3)]
    return out, dev.state().last_avail_idx


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_a_typed_error(packed_cls, case):
    (first, *_), _ = _bad(packed_cls, case)
    if case == "buffer id already in flight":
        assert first == ("ok", [(2, [(BUF, 8, False)])])
        (first, *_), _ = _bad(packed_cls, case, per_pop=2)
        assert first[0] == "ok"
        first = _bad(packed_cls, case, per_pop=2)[0][1]
    assert first[0] == "raised", first
    assert first[1][0] is BAD[case][2]
    assert first[1][2]["queue"] == 3


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_fails_alike(case):
    if "cython" not in IMPLS:
        pytest.skip("one implementation only")
    for per_pop in (1, 8):
        for good_first in (False, True):  # an error after a good list comes with the next pop
            got = _bad(IMPLS["python"], case, per_pop, good_first)
            assert got == _bad(IMPLS["cython"], case, per_pop, good_first)


def test_a_broken_list_is_consumed_and_the_next_one_pops(packed_cls):
    memory, drv, dev = _ring(packed_cls)
    drv.post_raw([(BUF, 8, 0, NEXT), (MEM, 8, 0, 0), (BUF, 4, 1, 0)])
    with pytest.raises(DescBufferError) as err:
        dev.pop()
    assert (err.value.head, err.value.desc) == (0, 1)
    chain = dev.pop()
    assert (chain.head, chain.buffers) == (1, [(BUF, 4, False)])


def test_lists_wrap_the_ring_with_both_wrap_counters(packed_cls):
    memory, drv, dev = _ring(packed_cls, size=5)
    for lap in range(7):
        ids = [drv.add_data([b"ab"], [3, 4]), drv.add_data([b"c"], [2], indirect=True)]
        drv.publish()
        assert dev.pending() == 2
        batch = dev.pop_batch(8)
        assert [c.head for c in batch] == ids
        assert [c.readable_len for c in batch] == [2, 1] and [c.writable_len for c in batch] == [7, 2]
        # completed out of order: the used descriptors go to the used slots in completion order
        dev.push(ids[1], 1)
        dev.push(ids[0], 5)
        assert [(u.head, u.len) for u in drv.get_used()] == [(ids[1], 1), (ids[0], 5)]
    assert dev.state().last_avail_idx == dev.state().used_idx == (7 * 4) % 5 | (PACKED_WRAP_BIT * (((7 * 4) // 5 + 1) % 2))


def test_state_round_trip_resumes_the_ring(packed_cls):
    memory, drv, dev = _ring(packed_cls, size=3)
    for _ in range(4):
        buf_id = drv.add_data([b"x"], [1])
        drv.publish()
        dev.push(dev.pop().head, 1)
        drv.get_used()
    state = dev.state()
    assert state.last_avail_idx == state.used_idx == PACKED_WRAP_BIT | 2  # 8 slots: two laps and 2
    again = packed_cls.from_state(memory, state)
    buf_id = drv.add_data([b"y"], [1])
    drv.publish()
    assert again.pop().head == buf_id


@pytest.mark.parametrize(
    "changes, error",
    [
        ({"last_avail_idx": -1}, QueueStateError),
        ({"used_idx": 0x10000}, QueueStateError),
        ({"last_avail_idx": "1"}, QueueStateError),
        ({"last_avail_idx": 8}, QueueStateError),
        ({"used_idx": PACKED_WRAP_BIT | 9}, QueueStateError),
        ({"size": 0}, QueueStateError),
        ({"size": 32769}, QueueConfigError),
        ({"desc_addr": 0x1008}, QueueConfigError),
        ({"avail_addr": 0x1002}, QueueConfigError),
        ({"used_addr": MEM}, QueueConfigError),
    ],
)
def test_bad_saved_state_or_layout(packed_cls, changes, error):
    memory, drv, _ = _ring(packed_cls)
    state = QueueState(**{**drv.state().to_dict(), **changes})
    with pytest.raises(error):
        packed_cls.from_state(memory, state)


def test_queue_size_need_not_be_a_power_of_two(packed_cls):
    _, _, dev = _ring(packed_cls, size=7)
    assert dev.state().size == 7


def _used_side(cls):
    memory, drv, dev = _ring(cls)
    drv.add_chain(readable=[(BUF, 8)])
    drv.add_chain(writable=[(BUF, 8)])
    drv.publish()
    out = [outcome(dev.push, 0, 0), outcome(dev.rewind, 1)]
    batch = dev.pop_batch(8)
    out += [
        outcome(batch.set_used_len, 0, -1), outcome(batch.set_used_len, 0, 1 << 32),
        outcome(dev.rewind, -1), outcome(dev.rewind, 3), outcome(dev.push, 8, 0), outcome(dev.push, -1, 0),
        outcome(dev.push, 5, 0), outcome(dev.push, 0, -1), outcome(dev.push, 0, 1 << 32),
        outcome(dev.push, 0, 4), outcome(dev.push, 0, 4), outcome(dev.push_batch, batch),
        outcome(dev.rewind, 1),
    ]
    dev.release()
    out += [outcome(dev.pending), _pop(dev), outcome(dev.push, 1, 0), outcome(dev.refresh),
            outcome(dev.need_notify), outcome(dev.enable_notification), outcome(dev.disable_notification)]
    return out


def test_used_side_errors(packed_cls):
    got = _used_side(packed_cls)
    kinds = [kind for kind, _ in got]
    assert kinds == ["raised"] * 11 + ["ok"] + ["raised"] * 10
    assert all(rec[0] is UsedRingError for kind, rec in got[:2] + got[4:11] + got[12:15])
    assert got[2][1][0] is got[3][1][0] is ValueError
    assert got[-1][1][0] is QueueStateError


def test_used_side_errors_alike():
    if "cython" not in IMPLS:
        pytest.skip("one implementation only")
    assert _used_side(IMPLS["python"]) == _used_side(IMPLS["cython"])


def test_rewind_gives_back_the_last_lists(packed_cls):
    memory, drv, dev = _ring(packed_cls)
    ids = [drv.add_data([b"a"], [1]) for _ in range(3)]
    drv.publish()
    assert [c.head for c in dev.pop_batch(3)] == ids
    dev.rewind(2)
    assert dev.pending() == 2
    assert [c.head for c in dev.pop_batch(8)] == ids[1:]
    dev.push(ids[2], 0)
    with pytest.raises(UsedRingError):
        dev.rewind(1)  # popped before the last push


def test_device_event_suppression(packed_cls):
    for event_idx in (False, True):
        memory, drv, dev = _ring(packed_cls, event_idx=event_idx)
        dev.disable_notification()
        assert memory.read_u16(drv.device_addr + 2) == RING_EVENT_FLAGS_DISABLE
        drv.add_data([b"a"])
        assert drv.publish() is False
        assert dev.enable_notification() is True  # a list arrived while disabled
        want = RING_EVENT_FLAGS_DESC if event_idx else RING_EVENT_FLAGS_ENABLE
        assert memory.read_u16(drv.device_addr + 2) == want
        dev.pop()
        if event_idx:
            assert memory.read_u16(drv.device_addr) == dev.state().last_avail_idx == PACKED_WRAP_BIT | 1
        drv.add_data([b"b"])
        assert drv.publish() is True


def test_driver_event_suppression(packed_cls):
    memory, drv, dev = _ring(packed_cls, event_idx=True)
    ids = [drv.add_data([b"a"], [1]) for _ in range(3)]
    drv.publish()
    dev.pop_batch(3)
    drv.set_interrupts(False)
    dev.push(ids[0], 1)
    assert dev.need_notify() is False
    assert [u.head for u in drv.get_used()] == ids[:1]
    drv.set_interrupts(True)  # DESC at the driver's next used slot: 2, where the next used goes
    dev.push(ids[1], 1)
    assert dev.need_notify() is True
    memory.write_u16(drv.driver_addr, PACKED_WRAP_BIT | 7)  # a slot the next push (4-5) does not reach
    dev.push(ids[2], 1)
    assert dev.need_notify() is False
    assert [u.head for u in drv.get_used()] == ids[1:]


def test_dirty_log_marks_written_buffers_and_ring(packed_cls):
    memory, drv, dev = _ring(packed_cls)
    log = DirtyLog(bytearray(MEM // 4096 // 8))
    dev.set_dirty_log(log, [(drv.desc_addr, 16 * 8)])
    drv.add_chain(readable=[(0x3000, 8)], writable=[(0xA000, 8)])
    drv.add_chain(writable=[(0xC000, 8)])
    drv.publish()
    batch = dev.pop_batch(1)
    dev.push_batch(batch)
    dev.push(dev.pop().head, 8)
    assert log.dirty_pages() == sorted({drv.desc_addr & ~0xFFF, 0xA000, 0xC000})


def test_cython_packed_queue_is_default():
    from iovirt.virtio import queue

    want = "python" if _accel.NO_EXTENSIONS else "cython"
    assert queue.PackedQueue is IMPLS[want], "compiled packed ring expected but the pure-Python one was loaded"
