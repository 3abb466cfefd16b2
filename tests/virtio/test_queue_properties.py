"""Property-based tests: random driver operations against the device side, both implementations.

A hypothesis state machine plays a driver (add direct or indirect chains,
publish, toggle interrupts) and a device (pop batches, push used entries in
any order) and checks the invariants: every chain is popped exactly once and
with the buffers the driver wrote, the used ring carries what the device
pushed, and event-idx notifications happen exactly when the spec's
``vring_need_event`` says so.  A second property feeds random descriptor
tables and checks that both implementations agree on every chain (same
buffers, or the same error: type, text and attributes) and never touch memory outside the map.
"""

from __future__ import annotations

import struct

import hypothesis.strategies as st
from hypothesis import HealthCheck, given, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from iovirt.memory import BumpAllocator, GuestMemory
from iovirt.virtio.defs import vring_need_event
from iovirt.virtio.driver import DriverQueue
from iovirt.virtio.errors import VirtqueueError
from iovirt.virtio.queue import implementations

from twins import error_record

IMPLS = implementations()
MEM = 0x40000


def make_machine(queue_cls):
    class QueueMachine(RuleBasedStateMachine):
        @initialize(size_log=st.integers(0, 5), event_idx=st.booleans())
        def setup(self, size_log, event_idx):
            self.memory = GuestMemory.from_ranges([(0, MEM)], backing="bytearray")
            self.alloc = BumpAllocator(0x1000, MEM - 0x1000)
            self.drv = DriverQueue(self.memory, self.alloc, 1 << size_log, event_idx=event_idx)
            self.dev = queue_cls.from_state(self.memory, self.drv.state())
            self.expected = {}  # head -> buffers, made available not yet popped (FIFO)
            self.order = []
            self.popped = {}  # head -> chain popped, not yet pushed
            self.pushed = []  # (head, len) in push order, not yet read back
            self.last_signal = None

        @precondition(lambda self: self.drv.num_free > 0 and self.alloc.end - self.alloc.next > 0x2000)
        @rule(n_out=st.integers(0, 3), n_in=st.integers(0, 3), indirect=st.booleans(), data=st.data())
        def add(self, n_out, n_in, indirect, data):
            if n_out + n_in == 0:
                n_out = 1
            if not indirect and n_out + n_in > self.drv.num_free:
                return
            if n_out + n_in > self.drv.size:
                indirect = False
                if n_out + n_in > self.drv.num_free:
                    return
            outs = [data.draw(st.binary(min_size=0, max_size=20)) for _ in range(n_out)]
            ins = [data.draw(st.integers(1, 40)) for _ in range(n_in)]
            head = self.drv.add_data(outs, ins, indirect=indirect)
            self.expected[head] = (outs, ins)
            self.order.append(head)

        @rule()
        def publish(self):
            self.drv.publish()

        @rule(k=st.integers(1, 40))
        def pop(self, k):
            published = (self.drv._published_idx - self.dev.last_avail_idx) & 0xFFFF
            batch = self.dev.pop_batch(k)
            assert len(batch) == min(k, published)
            for chain in batch:
                head = self.order.pop(0)
                assert chain.head == head
                outs, ins = self.expected.pop(head)
                assert [self.memory.read(a, n) for a, n in chain.readable] == outs
                assert [n for _, n in chain.writable] == ins
                assert head not in self.popped
                self.popped[head] = chain

        @precondition(lambda self: self.popped)
        @rule(data=st.data())
        def push(self, data):
            head = data.draw(st.sampled_from(sorted(self.popped)))
            chain = self.popped.pop(head)
            length = data.draw(st.integers(0, chain.writable_len))
            self.dev.push(head, length)
            self.pushed.append((head, length))

        @rule(enabled=st.booleans())
        def interrupts(self, enabled):
            self.drv.set_interrupts(enabled)

        @rule()
        def notify(self):
            used_event = self.memory.read_u16(self.drv.avail_addr + 4 + 2 * self.drv.size)
            flags = self.memory.read_u16(self.drv.avail_addr)
            new = self.dev.used_idx
            got = self.dev.need_notify()
            if self.drv.event_idx:
                want = True if self.last_signal is None else vring_need_event(used_event, new, self.last_signal)
                self.last_signal = new
            else:
                want = not flags & 1
            assert got == want

        @rule()
        def reap(self):
            used = self.drv.get_used()
            assert [(u.head, u.len) for u in used] == self.pushed
            self.pushed = []

        @invariant()
        def indexes(self):
            if hasattr(self, "dev"):
                in_flight = len(self.popped)
                assert (self.dev.last_avail_idx - self.dev.used_idx) & 0xFFFF == in_flight

    return QueueMachine


for _name, _cls in IMPLS.items():
    _machine = make_machine(_cls)
    _machine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
    globals()[f"TestQueueMachine_{_name}"] = _machine.TestCase


descs = st.lists(
    st.tuples(
        st.sampled_from([0x800, 0x1000, MEM - 16, MEM, 0xFFFF_FFFF_FFFF_FFF0]),
        st.integers(0, 0x40),
        st.integers(0, 7),
        st.integers(0, 9),
    ),
    min_size=8,
    max_size=8,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(table=descs, indirect_table=descs, heads=st.lists(st.integers(0, 9), min_size=1, max_size=6))
def test_random_tables_agree(table, indirect_table, heads):
    """Both implementations see the same chains and raise the same errors on garbage."""
    results = []
    for cls in IMPLS.values():
        memory = GuestMemory.from_ranges([(0, MEM)], backing="bytearray")
        alloc = BumpAllocator(0x2000, MEM - 0x2000)
        drv = DriverQueue(memory, alloc, 8)
        ind = 0x1000
        for i, (addr, length, flags, nxt) in enumerate(indirect_table):
            memory.write(ind + 16 * i, struct.pack("<QIHH", addr, length, flags & 3, nxt))
        for i, (addr, length, flags, nxt) in enumerate(table):
            if flags & 4:
                addr, length = ind, 16 * (length % 9)
            drv.write_desc(i, addr, length, flags, nxt)
        for h in heads:
            drv.post_head(h)
        drv.publish()
        dev = cls.from_state(memory, drv.state())
        seen = []
        for _ in heads:
            try:
                chain = dev.pop()
            except VirtqueueError as exc:
                seen.append(error_record(exc))
            else:
                seen.append(chain.buffers)
        results.append(seen)
    assert all(r == results[0] for r in results)
