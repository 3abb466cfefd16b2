"""A hypothesis state machine: a packed-ring driver against the device side, both twins.

The driver adds direct or indirect lists, publishes, reaps used descriptors
and switches interrupts; the device pops batches, rewinds, pushes in any
order (singly or in batches) and switches kicks.  Invariants: every list is
popped exactly once, in ring order, with the buffers the driver wrote; the
driver reads back exactly what the device pushed, in push order; kicks and
interrupts follow the event suppression areas (2.8.10, 2.8.14), checked
against a model that counts the ring slots passed.
"""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import HealthCheck, given, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from iovirt.memory import BumpAllocator, GuestMemory
from iovirt.virtio.defs import PACKED_WRAP_BIT, RING_EVENT_FLAGS_DESC, RING_EVENT_FLAGS_DISABLE
from iovirt.virtio.packed_driver import PackedDriverQueue
from iovirt.virtio.queue import packed_implementations

MEM = 0x40000


def _lap(pos: int, size: int) -> int:
    slot = pos & ~PACKED_WRAP_BIT
    return slot if pos & PACKED_WRAP_BIT else slot + size


def make_machine(queue_cls):
    class PackedMachine(RuleBasedStateMachine):
        @initialize(size=st.integers(1, 9), event_idx=st.booleans())
        def setup(self, size, event_idx):
            self.memory = GuestMemory.from_ranges([(0, MEM)], backing="bytearray")
            self.alloc = BumpAllocator(0x1000, MEM - 0x1000)
            self.drv = PackedDriverQueue(self.memory, self.alloc, size, event_idx=event_idx)
            self.dev = queue_cls.from_state(self.memory, self.drv.state())
            self.written = []  # (id, outs, ins) written, not yet published
            self.available = []  # published, not yet popped (ring order)
            self.popped = {}  # id -> chain, popped not pushed
            self.recent = []  # ids popped since the last push (rewindable), in pop order
            self.pushed = []  # (id, len) in push order, not yet reaped
            self.signalled = None  # device's used position (two-lap count) at the last need_notify
            self.used_since = 0

        @precondition(lambda self: self.alloc.end - self.alloc.next > 0x2000)
        @rule(n_out=st.integers(0, 3), n_in=st.integers(0, 3), indirect=st.booleans(), data=st.data())
        def add(self, n_out, n_in, indirect, data):
            n_out = n_out or (0 if n_in else 1)
            indirect = indirect and n_out + n_in <= self.drv.size  # 2.8.19: no longer than Queue Size
            if (1 if indirect else n_out + n_in) > self.drv.num_free or not self.drv._free_ids:
                return
            outs = [data.draw(st.binary(min_size=0, max_size=20)) for _ in range(n_out)]
            ins = [data.draw(st.integers(1, 40)) for _ in range(n_in)]
            buf_id = self.drv.add_data(outs, ins, indirect=indirect)
            self.written.append((buf_id, outs, ins))

        @rule()
        def publish(self):
            flags = self.memory.read_u16(self.drv.device_addr + 2) & 3
            event = self.memory.read_u16(self.drv.device_addr)
            before = (self.drv._published[0], self.drv._published[1])
            kick = self.drv.publish()
            after = (self.drv.next_avail, self.drv.avail_wrap)
            size = self.drv.size
            if flags == RING_EVENT_FLAGS_DESC and self.drv.event_idx:
                start = _lap(before[0] | (PACKED_WRAP_BIT if before[1] else 0), size)
                end = _lap(after[0] | (PACKED_WRAP_BIT if after[1] else 0), size)
                passed = {(start + k) % (2 * size) for k in range((end - start) % (2 * size))}
                assert kick == (_lap(event, size) in passed)
            else:
                assert kick == (flags != RING_EVENT_FLAGS_DISABLE)
            self.available += self.written
            self.written = []

        @rule(k=st.integers(1, 12))
        def pop(self, k):
            assert self.dev.pending() == len(self.available)
            batch = self.dev.pop_batch(k)
            assert len(batch) == min(k, len(self.available))
            for chain in batch:
                buf_id, outs, ins = self.available.pop(0)
                assert chain.head == buf_id
                assert [self.memory.read(a, n) for a, n in chain.readable] == outs
                assert [n for _, n in chain.writable] == ins
                assert buf_id not in self.popped
                self.popped[buf_id] = (chain, outs, ins)
                self.recent.append(buf_id)

        @precondition(lambda self: self.recent)
        @rule(data=st.data())
        def rewind(self, data):
            n = data.draw(st.integers(1, len(self.recent)))
            self.dev.rewind(n)
            back = self.recent[-n:]
            del self.recent[-n:]
            self.available[:0] = [(i, *self.popped.pop(i)[1:]) for i in back]

        @precondition(lambda self: self.popped)
        @rule(data=st.data(), batch=st.booleans())
        def push(self, data, batch):
            ids = data.draw(st.lists(st.sampled_from(sorted(self.popped)), min_size=1, unique=True))
            if not batch:
                ids = ids[:1]
            chains = []
            for buf_id in ids:
                chain = self.popped.pop(buf_id)[0]
                chain.used_len = data.draw(st.integers(0, chain.writable_len))
                chains.append(chain)
                self.pushed.append((buf_id, chain.used_len))
                self.used_since += self.drv._inflight[buf_id][0]
            if batch:
                from iovirt.virtio.chain import ChainBatch

                self.dev.push_batch(ChainBatch(chains))
            else:
                self.dev.push(chains[0].head, chains[0].used_len)
            self.recent = []

        @rule(enabled=st.booleans())
        def interrupts(self, enabled):
            self.drv.set_interrupts(enabled)

        @rule(enabled=st.booleans())
        def kicks(self, enabled):
            if enabled:
                assert self.dev.enable_notification() == bool(self.available)
            else:
                self.dev.disable_notification()

        @rule()
        def notify(self):
            size = self.drv.size
            flags = self.memory.read_u16(self.drv.driver_addr + 2) & 3
            event = _lap(self.memory.read_u16(self.drv.driver_addr), size)
            got = self.dev.need_notify()
            old, since = self.signalled, self.used_since
            self.signalled, self.used_since = _lap(self.dev.used_idx, size), 0
            if flags == RING_EVENT_FLAGS_DESC and self.drv.event_idx:
                if old is None:
                    assert got
                else:
                    passed = {(old + k) % (2 * size) for k in range(since)}
                    assert got == (event in passed)
            else:
                assert got == (flags != RING_EVENT_FLAGS_DISABLE)

        @rule()
        def reap(self):
            used = self.drv.get_used()
            assert [(u.head, u.len) for u in used] == self.pushed
            self.pushed = []

        @invariant()
        def positions(self):
            if hasattr(self, "dev"):
                state = self.dev.state()
                assert state.used_idx == self.drv.used_event_pos() or self.pushed
                assert self.dev.last_avail_idx == state.last_avail_idx

    return PackedMachine


for _name, _cls in packed_implementations().items():
    _machine = make_machine(_cls)
    _machine.TestCase.settings = settings(max_examples=80, stateful_step_count=50, deadline=None)
    globals()[f"TestPackedMachine_{_name}"] = _machine.TestCase


# -- differential: both twins on the same random rings and operations ----------------------
_descs = st.lists(
    st.tuples(
        st.sampled_from([0x800, 0x2000, MEM - 16, MEM, 0xFFFF_FFFF_FFFF_FFF0]),
        st.integers(0, 0x40),
        st.integers(0, 9),
        st.integers(0, 7),
    ),
    min_size=1,
    max_size=12,
)
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("pop"), st.integers(0, 9)),
        st.tuples(st.just("push"), st.integers(-1, 9)),
        st.tuples(st.just("rewind"), st.integers(-1, 3)),
        st.tuples(st.just("notify"), st.integers(0, 0xFFFF)),
        st.tuples(st.just("kicks"), st.booleans()),
    ),
    max_size=25,
)


def _run(cls, size, event_idx, ring, table, ops):
    from twins import outcome

    memory = GuestMemory.from_ranges([(0, MEM)], backing="bytearray")
    drv = PackedDriverQueue(memory, BumpAllocator(0x1000, 0x8000), size, event_idx=event_idx)
    for i, (addr, length, buf_id, flags) in enumerate(table):
        drv.write_desc(i, addr, length, buf_id, flags & 7, table=0x2000)
    dev = cls.from_state(memory, drv.state())
    drv.post_raw([(0x2000 if f & 4 else a, 16 * (n % 6) if f & 4 else n, i, f) for a, n, i, f in ring[: 2 * size]])
    out = []
    for op, arg in ops:
        if op == "pop":
            out.append(outcome(lambda: [(c.head, c.buffers) for c in dev.pop_batch(arg)]))
        elif op == "push":
            out.append(outcome(dev.push, arg, arg % 3 if arg >= 0 else 0))
        elif op == "rewind":
            out.append(outcome(dev.rewind, arg))
        elif op == "notify":
            memory.write_u16(drv.driver_addr, arg & 0x8007)
            memory.write_u16(drv.driver_addr + 2, arg >> 8 & 3)
            out.append(outcome(dev.need_notify))
        else:
            out.append(outcome(dev.enable_notification if arg else dev.disable_notification))
        out.append((dev.state(), memory.read(drv.desc_addr, 16 * size), memory.read(drv.device_addr, 4)))
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(size=st.integers(1, 8), event_idx=st.booleans(), ring=_descs, table=_descs, ops=_ops)
def test_random_rings_and_operations_agree(size, event_idx, ring, table, ops):
    """Both twins pop the same lists, write the same ring and raise the same errors (type, text, attributes)."""
    impls = packed_implementations()
    if len(impls) < 2:
        return
    results = [_run(cls, size, event_idx, ring, table, ops) for cls in impls.values()]
    assert results[0] == results[1]
