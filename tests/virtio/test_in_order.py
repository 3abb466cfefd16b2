"""VIRTIO_F_IN_ORDER (virtio 1.2 2.7.9 split, 2.8.8 packed): both rings, both twins, both sides.

Device side: used entries must follow pop order (a typed error otherwise,
the same in both twins); ``push_batch(coalesce=True)`` returns a run of
chains used whole through one used entry (split: at the run's first slot,
the idx moved by the run; packed: at the run's first slot, the slots of the
whole run skipped).  Driver side: an entry for id N completes every chain
outstanding up to N; an id not outstanding (or, split, a batch past the
used idx) is a typed error.  The drivers use descriptors in ring order.
"""

from __future__ import annotations

import random
import struct

import pytest

from iovirt import _accel
from iovirt.memory import BumpAllocator, GuestMemory
from iovirt.virtio.chain import ChainBatch as RefBatch, DescChain
from iovirt.virtio.defs import VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED, VIRTQ_DESC_SIZE
from iovirt.virtio.driver import DriverQueue, UsedIdError
from iovirt.virtio.errors import AvailIndexError, UsedOrderError
from iovirt.virtio.packed_driver import PackedDriverQueue
from iovirt.virtio.queue import implementations, packed_implementations

from twins import outcome

MEM = 0x100000
LAYOUTS = {"split": implementations(), "packed": packed_implementations()}


@pytest.fixture(params=[(layout, impl) for layout in LAYOUTS for impl in ("python", "cython")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def kind(request):
    """``(layout, device queue class)``; the cython parameter fails if the extension did not load."""
    layout, impl = request.param
    if impl not in LAYOUTS[layout]:
        if _accel.NO_EXTENSIONS:
            pytest.skip("IOVIRT_NO_EXTENSIONS set: pure Python run")
        pytest.fail("the Cython queue extensions did not load")
    return layout, LAYOUTS[layout][impl]


class Ring:
    """A driver and a device ring of one layout over one guest memory, both in order unless told."""

    def __init__(self, layout: str, cls: type, size: int = 8, in_order: bool = True) -> None:
        self.layout = layout
        self.memory = GuestMemory.from_ranges([(0, MEM)])
        self.alloc = BumpAllocator(0x1000, MEM - 0x1000)
        driver_cls = PackedDriverQueue if layout == "packed" else DriverQueue
        self.drv = driver_cls(self.memory, self.alloc, size, index=2, in_order=in_order)
        self.dev = cls.from_state(self.memory, self.drv.state())
        assert self.dev.in_order == in_order

    def post(self, n: int, *, out: int = 1, in_sizes: tuple[int, ...] = ()) -> list[int]:
        heads = [self.drv.add_data([bytes([i]) * 8] * out, list(in_sizes)) for i in range(n)]
        self.drv.publish()
        return heads

    def used_entries(self) -> list[tuple[int, int]]:
        """Raw split used ring ``(id, len)`` of every slot."""
        base = self.drv.used_addr + 4
        return [struct.unpack("<II", self.memory.read(base + 8 * i, 8)) for i in range(self.drv.size)]

    def packed_slot(self, slot: int) -> tuple[int, int, int]:
        """Raw packed descriptor ``(len, id, flags)`` at ``slot``."""
        _, length, buf_id, flags = struct.unpack("<QIHH", self.memory.read(self.drv.desc_addr + VIRTQ_DESC_SIZE * slot,
                                                                          VIRTQ_DESC_SIZE))
        return length, buf_id, flags


# -- device side: order ---------------------------------------------------------------------
def test_push_out_of_pop_order_is_a_typed_error_in_both_twins(kind):
    layout, cls = kind
    results = []
    for impl_cls in LAYOUTS[layout].values():
        ring = Ring(layout, impl_cls)
        heads = ring.post(3)
        assert [c.head for c in ring.dev.pop_batch(8)] == heads
        results.append(outcome(ring.dev.push, heads[1], 0))
        with pytest.raises(UsedOrderError) as err:
            ring.dev.push(heads[2], 0)
        assert (err.value.head, err.value.expected, err.value.queue) == (heads[2], heads[0], 2)
        ring.dev.push(heads[0], 0)  # the order kept is intact after the refusals
        ring.dev.push(heads[1], 0)
        ring.dev.push(heads[2], 0)
        assert [u.head for u in ring.drv.get_used()] == heads
    assert results[0][0] == "raised" and results[0][1][0] is UsedOrderError
    assert len({repr(r) for r in results}) == 1  # the twins fail alike: type, text, attributes


def test_push_batch_out_of_pop_order_is_a_typed_error(kind):
    layout, cls = kind
    ring = Ring(layout, cls)
    ring.post(3)
    batch = ring.dev.pop_batch(8)
    chains = list(batch)
    swapped = RefBatch([chains[1], chains[0], chains[2]])
    for coalesce in (False, True):
        with pytest.raises(UsedOrderError):
            ring.dev.push_batch(swapped, coalesce)
    ring.dev.push_batch(RefBatch(chains))
    assert [u.head for u in ring.drv.get_used()] == [c.head for c in chains]


def test_without_in_order_any_order_goes(kind):
    layout, cls = kind
    ring = Ring(layout, cls, in_order=False)
    heads = ring.post(3)
    ring.dev.pop_batch(8)
    for head in reversed(heads):
        ring.dev.push(head, 0)
    assert [u.head for u in ring.drv.get_used()] == heads[::-1]


def test_rewind_and_resubmit_keep_the_order(kind):
    layout, cls = kind
    ring = Ring(layout, cls)
    heads = ring.post(4)
    ring.dev.pop_batch(4)
    ring.dev.rewind(2)
    with pytest.raises(UsedOrderError):
        ring.dev.push(heads[1], 0)
    ring.dev.push(heads[0], 0)
    again = ring.dev.pop_batch(4)
    assert [c.head for c in again] == heads[2:]
    ring.dev.push_batch(RefBatch([DescChain(h, []) for h in heads[1:]]))
    assert [u.head for u in ring.drv.get_used()] == heads


# -- device side: batched used entries ------------------------------------------------------
def test_split_transmit_batch_goes_back_through_one_used_entry(kind):
    layout, cls = kind
    if layout != "split":
        pytest.skip("split ring layout")
    ring = Ring(layout, cls)
    ring.memory.write(ring.drv.used_addr + 4, b"\xee" * 8 * ring.drv.size)  # sentinel entries
    heads = ring.post(5)
    ring.dev.push_batch(ring.dev.pop_batch(8), True)
    assert ring.dev.used_idx == 5 and ring.drv.used_idx() == 5
    entries = ring.used_entries()
    assert entries[0] == (heads[-1], 0)  # 2.7.9: at the batch's first slot, the last buffer's id
    assert all(e == (0xEEEEEEEE, 0xEEEEEEEE) for e in entries[1:])
    used = ring.drv.get_used()
    assert [(u.head, u.len) for u in used] == [(h, 0) for h in heads]
    assert ring.drv.num_free == ring.drv.size


def test_packed_transmit_batch_goes_back_through_one_used_descriptor(kind):
    layout, cls = kind
    if layout != "packed":
        pytest.skip("packed ring layout")
    ring = Ring(layout, cls, size=16)
    ids = ring.post(3, out=2)  # lists of 2 descriptors: slots 0-5
    before = [ring.packed_slot(s) for s in range(6)]
    ring.dev.push_batch(ring.dev.pop_batch(8), True)
    assert ring.dev.used_idx == 6 | 1 << 15
    length, buf_id, flags = ring.packed_slot(0)
    assert (length, buf_id) == (0, ids[-1])
    assert flags & (VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED) == VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED
    assert [ring.packed_slot(s) for s in range(1, 6)] == before[1:]  # 2.8.8: the rest of the batch skipped
    used = ring.drv.get_used()
    assert [(u.head, u.len) for u in used] == [(i, 0) for i in ids]
    assert ring.drv.num_free == 16 and ring.drv.last_used == 6


@pytest.mark.parametrize("as_list", [False, True], ids=["popped_batch", "chain_list"])
def test_a_chain_not_used_whole_ends_the_run(kind, as_list):
    """Skipped entries count as used whole (2.7.9, 2.8.8): a short one gets an entry of its own."""
    layout, cls = kind
    ring = Ring(layout, cls)
    heads = ring.post(5, out=0, in_sizes=(16,))
    batch = ring.dev.pop_batch(8)
    lens = [16, 16, 5, 16, 16]
    for i, n in enumerate(lens):
        batch.set_used_len(i, n)
    ring.dev.push_batch(RefBatch(list(batch)) if as_list else batch, True)
    if layout == "split":
        entries = ring.used_entries()
        assert entries[0] == (heads[2], 5) and entries[3] == (heads[4], 16)
    used = ring.drv.get_used()
    assert [(u.head, u.len) for u in used] == list(zip(heads, lens))


def test_coalesce_without_in_order_writes_every_entry(kind):
    layout, cls = kind
    ring = Ring(layout, cls, in_order=False)
    heads = ring.post(3)
    ring.dev.push_batch(ring.dev.pop_batch(8), True)
    if layout == "split":
        assert [e[0] for e in ring.used_entries()[:3]] == heads
    else:
        assert [ring.packed_slot(s)[1] for s in range(3)] == heads
    assert [u.head for u in ring.drv.get_used()] == heads


@pytest.mark.parametrize("size", [4, 5, 8])
def test_batches_across_many_wraps_match_in_both_twins(kind, size):
    """Random batch sizes, list lengths and used lengths over many laps; the twins end in the same state."""
    layout, _ = kind
    if layout == "split" and size & (size - 1):
        pytest.skip("a split ring's size is a power of 2")
    states = []
    for cls in LAYOUTS[layout].values():
        rng = random.Random(f"{layout}-{size}")
        ring = Ring(layout, cls, size=size)
        expected: list[tuple[int, int]] = []
        got: list[tuple[int, int]] = []
        for _ in range(200):
            while True:
                out = rng.randint(1, 2) if layout == "packed" else 1
                if ring.drv.num_free < out + 1:
                    break
                writable = rng.random() < 0.5
                head = ring.drv.add_data([b"x"] * out, [8] if writable else [])
                expected.append((head, 0))
                if rng.random() < 0.3:
                    break
            ring.drv.publish()
            batch = ring.dev.pop_batch(rng.randint(1, size))
            for i in range(len(batch)):
                if batch[i].writable_len:
                    n = rng.choice([8, 8, 3])
                    batch.set_used_len(i, n)
                    expected[len(got) + i] = (batch.head(i), n)
            ring.dev.push_batch(batch, rng.random() < 0.8)
            got += [(u.head, u.len) for u in ring.drv.get_used()]
        assert got == expected[: len(got)] and len(got) > 200
        states.append((ring.dev.state(), got))
    assert len({repr(s) for s in states}) == 1


def test_more_chains_than_queue_size_in_flight_is_refused(kind):
    """A driver that reposts heads the device holds (split) cannot grow the in-order list past Queue Size."""
    layout, cls = kind
    if layout != "split":
        pytest.skip("a packed ring's Buffer IDs are checked unique already")
    records = []
    for impl_cls in LAYOUTS[layout].values():
        ring = Ring(layout, impl_cls, size=4)
        heads = ring.post(4)
        ring.dev.pop_batch(4)
        for head in heads[:2]:
            ring.drv.post_head(head)  # again, while in flight
        ring.drv.set_avail_idx(ring.drv.avail_idx)
        records.append(outcome(ring.dev.pop_batch, 4))
        with pytest.raises(AvailIndexError):
            ring.dev.pop_batch(4)
    assert records[0][0] == "raised" and len({repr(r) for r in records}) == 1


# -- driver side ------------------------------------------------------------------------------
def test_split_driver_uses_descriptors_in_ring_order():
    memory = GuestMemory.from_ranges([(0, MEM)])
    drv = DriverQueue(memory, BumpAllocator(0x1000, MEM - 0x1000), 4, in_order=True)
    assert drv.add_data([b"a"], [4]) == 0  # two descriptors: 0 and 1
    assert drv.add_data([b"b"]) == 2
    assert drv.add_data([b"c"]) == 3


def _split_driver(n: int) -> tuple[GuestMemory, DriverQueue, list[int]]:
    memory = GuestMemory.from_ranges([(0, MEM)])
    drv = DriverQueue(memory, BumpAllocator(0x1000, MEM - 0x1000), 8, in_order=True)
    heads = [drv.add_data([b"x"]) for _ in range(n)]
    drv.publish()
    return memory, drv, heads


def _write_used(memory: GuestMemory, drv: DriverQueue, slot: int, head: int, idx: int) -> None:
    memory.write(drv.used_addr + 4 + 8 * slot, struct.pack("<II", head, 0))
    memory.write_u16(drv.used_addr + 2, idx)


def test_split_driver_takes_a_batched_entry():
    memory, drv, heads = _split_driver(3)
    _write_used(memory, drv, 0, heads[1], 2)
    assert [u.head for u in drv.get_used()] == heads[:2]
    _write_used(memory, drv, 2, heads[2], 3)
    assert [u.head for u in drv.get_used()] == heads[2:]


def test_split_driver_refuses_an_id_not_outstanding():
    memory, drv, heads = _split_driver(2)
    _write_used(memory, drv, 0, 7, 1)
    with pytest.raises(UsedIdError) as err:
        drv.get_used()
    assert (err.value.queue, err.value.used_id) == (0, 7)


def test_split_driver_refuses_a_batch_past_the_used_idx():
    memory, drv, heads = _split_driver(3)
    _write_used(memory, drv, 0, heads[2], 1)  # claims three chains, the idx moved by one
    with pytest.raises(UsedIdError, match="completes 3 in-order chains but the used idx moved by 1"):
        drv.get_used()


def test_packed_driver_takes_a_batched_descriptor_and_refuses_an_unknown_id():
    memory = GuestMemory.from_ranges([(0, MEM)])
    drv = PackedDriverQueue(memory, BumpAllocator(0x1000, MEM - 0x1000), 8, in_order=True)
    ids = [drv.add_data([b"x", b"y"]) for _ in range(3)]
    drv.publish()
    assert ids == [0, 1, 2]  # Buffer IDs in order
    used = VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED
    memory.write(drv.desc_addr + 8, struct.pack("<IHH", 0, ids[1], used))
    assert [u.head for u in drv.get_used()] == ids[:2] and drv.last_used == 4
    memory.write(drv.desc_addr + VIRTQ_DESC_SIZE * 4 + 8, struct.pack("<IHH", 0, 6, used))
    with pytest.raises(UsedIdError) as err:
        drv.get_used()
    assert err.value.used_id == 6
