"""Split virtqueue device side, against both implementations (queue_cls fixture)."""

from __future__ import annotations

import pytest

from iovirt.memory import BumpAllocator, GuestMemory, MemoryRegion, TranslationFault
from iovirt.virtio.defs import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_USED_F_NO_NOTIFY
from iovirt.virtio.driver import DriverQueue
from iovirt.virtio.errors import (
    AvailIndexError,
    ChainTooLongError,
    DescBufferError,
    DescIndexError,
    DescLoopError,
    DescOrderError,
    IndirectTableError,
    NestedIndirectError,
    QueueConfigError,
    QueueStateError,
    UsedRingError,
)
from iovirt.virtio.state import QueueState

MEM = 0x100000


class Ring:
    """A driver queue and a device queue over one real mmap'd guest memory."""

    def __init__(self, queue_cls, size=8, event_idx=False, memory=None):
        self.memory = memory or GuestMemory.from_ranges([(0, MEM)])
        self.alloc = BumpAllocator(0x1000, MEM - 0x1000)
        self.drv = DriverQueue(self.memory, self.alloc, size, event_idx=event_idx, index=3)
        self.dev = queue_cls.from_state(self.memory, self.drv.state())


@pytest.fixture
def ring(queue_cls):
    return Ring(queue_cls)


def test_pop_push_roundtrip(ring):
    head = ring.drv.add_data([b"hello", b"world"], [16])
    assert ring.drv.publish()
    chain = ring.dev.pop()
    assert chain.head == head
    assert [n for _, n in chain.readable] == [5, 5]
    assert chain.writable_len == 16
    assert ring.memory.read(chain.readable[0][0], 5) == b"hello"
    ring.memory.write(chain.writable[0][0], b"reply")
    ring.dev.push(chain.head, 5)
    used = ring.drv.get_used()
    assert [(u.head, u.len, u.data) for u in used] == [(head, 5, b"reply")]
    assert ring.dev.pop() is None


def test_batch_and_wraparound(queue_cls):
    r = Ring(queue_cls, size=4)
    seen = []
    for round_ in range(70):  # wraps the 16-bit indexes' ring slots many times
        heads = [r.drv.add_data([bytes([round_, k])]) for k in range(3)]
        r.drv.publish()
        batch = r.dev.pop_batch(32)
        assert [batch.head(i) for i in range(len(batch))] == heads
        for i in range(len(batch)):
            batch.set_used_len(i, i)
        r.dev.push_batch(batch)
        used = r.drv.get_used()
        assert [(u.head, u.len) for u in used] == [(h, i) for i, h in enumerate(heads)]
        seen.append(len(batch))
    assert seen == [3] * 70
    assert r.dev.state().last_avail_idx == 210


def test_pop_batch_limit(ring):
    for k in range(5):
        ring.drv.add_data([b"x"])
    ring.drv.publish()
    assert len(ring.dev.pop_batch(2)) == 2
    assert ring.dev.pending() == 3
    assert len(ring.dev.pop_batch(32)) == 3
    assert len(ring.dev.pop_batch(32)) == 0


def test_indirect_chain(ring):
    head = ring.drv.add_data([b"ab", b"cd"], [8, 8], indirect=True)
    ring.drv.publish()
    chain = ring.dev.pop()
    assert chain.head == head
    assert [(n, w) for _, n, w in chain.buffers] == [(2, False), (2, False), (8, True), (8, True)]
    assert ring.drv.num_free == ring.drv.size - 1


def test_direct_then_indirect(ring):
    data = ring.alloc.alloc(4)
    ring.memory.write(data, b"head")
    table = ring.alloc.alloc(32)
    ring.drv.write_desc(0, data, 2, VIRTQ_DESC_F_NEXT, 1, table=table)
    ring.drv.write_desc(1, data + 2, 2, VIRTQ_DESC_F_WRITE, 0, table=table)
    ring.drv.write_desc(0, data, 4, VIRTQ_DESC_F_NEXT, 1)
    ring.drv.write_desc(1, table, 32, VIRTQ_DESC_F_INDIRECT, 0)
    ring.drv.post_head(0)
    ring.drv.publish()
    chain = ring.dev.pop()
    assert [(a - data, n, w) for a, n, w in chain.buffers] == [(0, 4, False), (0, 2, False), (2, 2, True)]


# -- bad input: every case detected with queue + descriptor index -------------


def _post_raw(ring, *descs, head=0):
    for i, (addr, length, flags, nxt) in enumerate(descs):
        ring.drv.write_desc(i, addr, length, flags, nxt)
    ring.drv.post_head(head)
    ring.drv.publish()


def test_head_out_of_range(ring):
    _post_raw(ring, head=8)
    with pytest.raises(DescIndexError) as exc:
        ring.dev.pop()
    assert exc.value.queue == 3 and exc.value.head == 8


def test_next_out_of_range(ring):
    _post_raw(ring, (0x2000, 4, VIRTQ_DESC_F_NEXT, 9))
    with pytest.raises(DescIndexError) as exc:
        ring.dev.pop()
    assert exc.value.desc == 0


def test_next_loop(ring):
    _post_raw(ring, (0x2000, 4, VIRTQ_DESC_F_NEXT, 1), (0x2000, 4, VIRTQ_DESC_F_NEXT, 0))
    with pytest.raises(DescLoopError) as exc:
        ring.dev.pop()
    assert exc.value.queue == 3 and exc.value.head == 0


def test_self_loop(ring):
    _post_raw(ring, (0x2000, 4, VIRTQ_DESC_F_NEXT, 0))
    with pytest.raises(DescLoopError):
        ring.dev.pop()


def test_indirect_inside_indirect(ring):
    table = ring.alloc.alloc(32)
    ring.drv.write_desc(0, table, 16, VIRTQ_DESC_F_INDIRECT, 0, table=table)
    _post_raw(ring, (table, 16, VIRTQ_DESC_F_INDIRECT, 0))
    with pytest.raises(NestedIndirectError) as exc:
        ring.dev.pop()
    assert exc.value.desc == 0


@pytest.mark.parametrize("length", [0, 15, 17, 33])
def test_indirect_bad_length(ring, length):
    _post_raw(ring, (0x3000, length, VIRTQ_DESC_F_INDIRECT, 0))
    with pytest.raises(IndirectTableError):
        ring.dev.pop()


def test_indirect_with_next(ring):
    _post_raw(ring, (0x3000, 16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 1))
    with pytest.raises(IndirectTableError):
        ring.dev.pop()


def test_indirect_longer_than_queue(ring):
    table = ring.alloc.alloc(16 * 9)
    for k in range(9):
        ring.drv.write_desc(k, 0x2000, 1, VIRTQ_DESC_F_NEXT if k < 8 else 0, k + 1, table=table)
    _post_raw(ring, (table, 16 * 9, VIRTQ_DESC_F_INDIRECT, 0))
    with pytest.raises(ChainTooLongError):
        ring.dev.pop()


def test_indirect_loop(ring):
    table = ring.alloc.alloc(32)
    ring.drv.write_desc(0, 0x2000, 1, VIRTQ_DESC_F_NEXT, 1, table=table)
    ring.drv.write_desc(1, 0x2000, 1, VIRTQ_DESC_F_NEXT, 0, table=table)
    _post_raw(ring, (table, 32, VIRTQ_DESC_F_INDIRECT, 0))
    with pytest.raises(DescLoopError):
        ring.dev.pop()


def test_indirect_table_outside_memory(ring):
    _post_raw(ring, (MEM - 8, 16, VIRTQ_DESC_F_INDIRECT, 0))
    with pytest.raises(DescBufferError):
        ring.dev.pop()


@pytest.mark.parametrize(
    "addr,length",
    [(MEM, 1), (MEM - 4, 8), (0xFFFF_FFFF_FFFF_FFF0, 0x20), (0xFFFF_FFFF_FFFF_FFFF, 2), (1 << 40, 4)],
)
def test_buffer_outside_memory_or_wrapping(ring, addr, length):
    _post_raw(ring, (addr, length, 0, 0))
    with pytest.raises(DescBufferError) as exc:
        ring.dev.pop()
    assert exc.value.addr == addr and exc.value.length == length and exc.value.desc == 0


def test_readable_after_writable(ring):
    _post_raw(ring, (0x2000, 4, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1), (0x2000, 4, 0, 0))
    with pytest.raises(DescOrderError) as exc:
        ring.dev.pop()
    assert exc.value.desc == 1


def test_avail_index_jump(ring):
    ring.drv.set_avail_idx(9)
    with pytest.raises(AvailIndexError):
        ring.dev.pop()
    with pytest.raises(AvailIndexError):  # the queue stays broken
        ring.dev.pending()


def test_bad_chain_after_good_ones_is_raised_next(ring):
    good = ring.drv.add_data([b"good"])
    ring.drv.post_head(7)
    ring.drv.write_desc(7, MEM + 5, 4)
    ring.drv.publish()
    batch = ring.dev.pop_batch(8)
    assert [c.head for c in batch] == [good]
    with pytest.raises(DescBufferError) as exc:
        ring.dev.pop_batch(8)
    assert exc.value.head == 7
    # the bad chain was consumed: the device may return it with len 0
    ring.dev.push(7, 0)
    ring.dev.push_batch(batch)
    assert ring.dev.used_idx == 2


def test_push_more_than_popped(ring):
    with pytest.raises(UsedRingError):
        ring.dev.push(0, 0)
    ring.drv.add_data([b"x"])
    ring.drv.publish()
    ring.dev.pop()
    with pytest.raises(UsedRingError):
        ring.dev.push(99, 0)


def test_zero_length_buffer_is_allowed(ring):
    _post_raw(ring, (0x2000, 0, 0, 0))
    assert ring.dev.pop().buffers == [(0x2000, 0, False)]


def test_buffer_spanning_two_regions(queue_cls):
    memory = GuestMemory([MemoryRegion.anonymous(0, 0x10000), MemoryRegion(0x10000, 0x10000, bytearray(0x10000))])
    r = Ring(queue_cls, memory=memory)
    memory.write(0xFFF0, b"A" * 32)
    r.drv.add_chain([(0xFFF0, 32)])
    r.drv.publish()
    chain = r.dev.pop()
    assert chain.readable == [(0xFFF0, 32)]
    assert memory.read(0xFFF0, 32) == b"A" * 32


def test_buffer_in_hole_between_regions(queue_cls):
    memory = GuestMemory([MemoryRegion.anonymous(0, 0x10000), MemoryRegion.anonymous(0x20000, 0x1000)])
    r = Ring(queue_cls, memory=memory)
    r.drv.add_chain([(0xFFF0, 0x20)])
    r.drv.publish()
    with pytest.raises(DescBufferError):
        r.dev.pop()


# -- setup and state ------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 3, 6, 65536, 32768 * 2])
def test_size_must_be_power_of_two(queue_cls, size):
    memory = GuestMemory.from_ranges([(0, 0x200000)])
    with pytest.raises(QueueConfigError):
        queue_cls(memory, size, 0x1000, 0x10000, 0x20000)


@pytest.mark.parametrize("desc,avail,used", [(0x1008, 0x10000, 0x20000), (0x1000, 0x10001, 0x20000), (0x1000, 0x10000, 0x20002)])
def test_alignment(queue_cls, desc, avail, used):
    memory = GuestMemory.from_ranges([(0, 0x200000)])
    with pytest.raises(QueueConfigError):
        queue_cls(memory, 8, desc, avail, used)


def test_rings_outside_memory(queue_cls):
    memory = GuestMemory.from_ranges([(0, 0x10000)])
    with pytest.raises(QueueConfigError):
        queue_cls(memory, 256, 0x1000, 0x2000, 0xFFF0)


def test_state_roundtrip_and_validation(ring, queue_cls):
    for _ in range(3):
        ring.drv.add_data([b"x"])
    ring.drv.publish()
    chains = ring.dev.pop_batch(2)
    ring.dev.push_batch(chains)
    state = ring.dev.state()
    assert (state.last_avail_idx, state.used_idx, state.index) == (2, 2, 3)
    again = queue_cls.from_state(ring.memory, QueueState.from_dict(state.to_dict()))
    assert again.pop().head == ring.dev.pop().head
    with pytest.raises(QueueStateError):
        queue_cls.from_state(ring.memory, QueueState(**{**state.to_dict(), "last_avail_idx": 70000}))
    with pytest.raises(QueueStateError):
        queue_cls.from_state(ring.memory, QueueState(**{**state.to_dict(), "last_avail_idx": 100, "used_idx": 0}))
    with pytest.raises(QueueConfigError):
        queue_cls.from_state(ring.memory, QueueState(**{**state.to_dict(), "size": 12}))


def test_refresh_after_memory_change(queue_cls):
    memory = GuestMemory.from_ranges([(0, MEM)])
    extra = MemoryRegion.anonymous(0x200000, 0x1000)
    r = Ring(queue_cls, memory=memory)
    r.drv.add_chain([(0x200000, 4)])
    r.drv.publish()
    with pytest.raises(DescBufferError):
        r.dev.pop()
    r.dev.push(0, 0)
    memory.add_region(extra)
    r.drv.add_chain([(0x200000, 4)])
    r.drv.publish()
    assert r.dev.pop().readable == [(0x200000, 4)]
    memory.remove_region(0x200000)
    r.dev.refresh()
    extra.close()  # the queue let go of its views


# -- notification suppression -----------------------------------------------------------


def test_flags_suppression(ring):
    ring.drv.add_data([b"x"])
    ring.drv.publish()
    chain = ring.dev.pop()
    ring.dev.push(chain.head, 0)
    assert ring.dev.need_notify()
    ring.drv.set_interrupts(False)
    assert not ring.dev.need_notify()
    ring.dev.disable_notification()
    assert ring.memory.read_u16(ring.drv.used_addr) & VIRTQ_USED_F_NO_NOTIFY
    ring.drv.add_data([b"y"])
    assert not ring.drv.publish()
    assert ring.dev.enable_notification() is True
    assert ring.drv.add_data([b"z"]) and ring.drv.publish()


def test_event_idx(queue_cls):
    r = Ring(queue_cls, size=8, event_idx=True)
    notes = []
    r.drv.set_used_event(2)  # driver wants an interrupt once used idx passes 2
    for k in range(5):
        r.drv.add_data([b"x"])
        r.drv.publish()
        r.dev.push(r.dev.pop().head, 0)
        notes.append(r.dev.need_notify())
    # first notification is always sent; then only when crossing used_event=2
    assert notes == [True, False, True, False, False]
    # avail_event: device asks to be kicked at its last_avail_idx
    assert r.memory.read_u16(r.drv.used_addr + 4 + 8 * 8) == 5
    r.drv.add_data([b"x"])
    assert r.drv.publish()  # crossing avail_event 5 -> kick
    r.drv.add_data([b"x"])
    assert not r.drv.publish()  # device has not caught up: no kick


# -- translation hook ----------------------------------------------------------------------


class OffsetTranslator:
    """IOVA = GPA + 0x1_0000_0000 for the first 1 MiB; everything else faults."""

    BASE = 0x1_0000_0000

    def translate(self, addr, length, access):
        if not self.BASE <= addr or addr + length > self.BASE + MEM:
            raise TranslationFault(addr, length, access, "not-present")
        return [(addr - self.BASE, length)] if length else []


def test_queue_through_translator(queue_cls):
    phys = GuestMemory.from_ranges([(0, MEM)])
    iova = phys.with_translator(OffsetTranslator())
    alloc = BumpAllocator(OffsetTranslator.BASE + 0x1000, MEM - 0x1000)
    drv = DriverQueue(iova, alloc, 8)
    dev = queue_cls.from_state(iova, drv.state())
    head = drv.add_data([b"dma!"], [4])
    drv.publish()
    chain = dev.pop()
    assert iova.read(chain.readable[0][0], 4) == b"dma!"
    dev.push(head, 0)
    drv.add_chain([(0x2000, 4)])  # a GPA, not a mapped IOVA
    drv.publish()
    with pytest.raises(DescBufferError):
        dev.pop()


def test_rewind_gives_chains_back(ring):
    heads = [ring.drv.add_data([], [8]) for _ in range(3)]
    ring.drv.publish()
    batch = ring.dev.pop_batch(3)
    assert [c.head for c in batch] == heads
    ring.dev.rewind(2)
    assert [c.head for c in ring.dev.pop_batch(8)] == heads[1:]
    with pytest.raises(UsedRingError):
        ring.dev.rewind(4)


class PendingTranslator:
    """Identity, except that a chosen page is not known yet (an IOTLB miss in flight)."""

    def __init__(self, pending_page):
        self.pending_page = pending_page

    def translate(self, addr, length, access):
        from iovirt.memory import TranslationPending

        if self.pending_page is not None and addr >> 12 <= self.pending_page <= (addr + max(length, 1) - 1) >> 12:
            raise TranslationPending(addr, length, access)
        return [(addr, length)] if length else []


def test_pending_translation_leaves_the_chain_available(queue_cls):
    phys = GuestMemory.from_ranges([(0, MEM)])
    translator = PendingTranslator(None)
    mem = phys.with_translator(translator)
    alloc = BumpAllocator(0x1000, MEM - 0x1000)
    drv = DriverQueue(mem, alloc, 8)
    dev = queue_cls.from_state(mem, drv.state())
    good = drv.add_chain([(0x20000, 4)])
    late = drv.add_chain([(0x30000, 4)])
    drv.publish()
    translator.pending_page = 0x30
    batch = dev.pop_batch(8)
    assert [c.head for c in batch] == [good]  # stopped before the pending chain, no error
    assert dev.pending() == 1
    translator.pending_page = None  # the mapping arrived
    assert [c.head for c in dev.pop_batch(8)] == [late]
