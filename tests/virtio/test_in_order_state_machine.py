"""A hypothesis state machine for VIRTIO_F_IN_ORDER: an in-order driver against the device side, both rings and twins.

The driver adds lists (direct or indirect, readable and writable buffers),
publishes and reaps; the device pops batches, rewinds, pushes singly or in
batches, coalesced or not, with any used length up to the writable one, and
tries pushes out of pop order.  Invariants: lists are popped in the order
they were made available; a push out of order is refused
(:class:`~iovirt.virtio.errors.UsedOrderError`) and changes nothing; the
driver reads back exactly the (id, len) pushed, in order, however many used
entries carried them (2.7.9, 2.8.8: a coalesced run ends at every chain not
used whole, so every length the driver infers is the one pushed).
"""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from iovirt import _accel
from iovirt.memory import BumpAllocator, GuestMemory
from iovirt.virtio.chain import ChainBatch as RefBatch
from iovirt.virtio.driver import DriverQueue
from iovirt.virtio.errors import UsedOrderError
from iovirt.virtio.packed_driver import PackedDriverQueue
from iovirt.virtio.queue import implementations, packed_implementations

MEM = 0x40000


def make_machine(layout: str, queue_cls: type) -> type:
    class InOrderMachine(RuleBasedStateMachine):
        @initialize(size_log=st.integers(0, 3), event_idx=st.booleans())
        def setup(self, size_log, event_idx):
            size = 1 << size_log if layout == "split" else size_log * 2 + 1
            self.memory = GuestMemory.from_ranges([(0, MEM)], backing="bytearray")
            self.alloc = BumpAllocator(0x1000, MEM - 0x1000)
            driver_cls = PackedDriverQueue if layout == "packed" else DriverQueue
            self.drv = driver_cls(self.memory, self.alloc, size, event_idx=event_idx, in_order=True)
            self.dev = queue_cls.from_state(self.memory, self.drv.state())
            self.added: list[int] = []  # ids made available (written), in order, not yet popped
            self.published = 0  # how many of ``added`` are published
            self.popped: list = []  # chains popped, not pushed, in pop order
            self.pushed: list[tuple[int, int]] = []  # (id, len) pushed, not yet reaped
            self.since_push = 0  # lists popped since the last push

        @precondition(lambda self: self.alloc.end - self.alloc.next > 0x2000)
        @rule(n_out=st.integers(0, 2), n_in=st.integers(0, 2), indirect=st.booleans())
        def add(self, n_out, n_in, indirect):
            n_out = n_out or (0 if n_in else 1)
            indirect = indirect and n_out + n_in <= self.drv.size
            if (1 if indirect else n_out + n_in) > self.drv.num_free:
                return
            if layout == "packed" and not self.drv._free_ids:
                return
            self.added.append(self.drv.add_data([b"o"] * n_out, [16] * n_in, indirect=indirect))

        @rule()
        def publish(self):
            self.drv.publish()
            self.published = len(self.added)

        @rule(k=st.integers(1, 9))
        def pop(self, k):
            batch = self.dev.pop_batch(k)
            want = self.added[: min(k, self.published)]
            assert [c.head for c in batch] == want  # in the order made available
            del self.added[: len(want)]
            self.published -= len(want)
            self.popped += list(batch)
            self.since_push += len(batch)

        @precondition(lambda self: self.since_push)
        @rule(data=st.data())
        def rewind(self, data):
            # Only lists popped since the last push (all a packed ring can give back).
            n = data.draw(st.integers(0, self.since_push))
            self.dev.rewind(n)
            back = self.popped[len(self.popped) - n:]
            del self.popped[len(self.popped) - n:]
            self.added[:0] = [c.head for c in back]
            self.published += n
            self.since_push -= n

        @precondition(lambda self: len(self.popped) >= 2)
        @rule(data=st.data())
        def push_out_of_order(self, data):
            i = data.draw(st.integers(1, len(self.popped) - 1))
            chain = self.popped[i]
            state = self.dev.state()
            with pytest.raises(UsedOrderError):
                self.dev.push(chain.head, 0)
            assert self.dev.state() == state

        @precondition(lambda self: self.popped)
        @rule(data=st.data(), coalesce=st.booleans())
        def push(self, data, coalesce):
            n = data.draw(st.integers(1, len(self.popped)))
            chains = self.popped[:n]
            for chain in chains:
                chain.used_len = data.draw(st.sampled_from(sorted({0, chain.writable_len // 2, chain.writable_len})))
            if n == 1 and data.draw(st.booleans()):
                self.dev.push(chains[0].head, chains[0].used_len)
            else:
                self.dev.push_batch(RefBatch(chains), coalesce)
            del self.popped[:n]
            self.pushed += [(c.head, c.used_len) for c in chains]
            self.since_push = 0

        @rule()
        def reap(self):
            used = self.drv.get_used()
            assert [(u.head, u.len) for u in used] == self.pushed
            self.pushed = []

        @invariant()
        def nothing_lost(self):
            if hasattr(self, "drv"):
                free = self.drv.num_free
                assert 0 <= free <= self.drv.size

    return InOrderMachine


LAYOUTS = {"split": implementations(), "packed": packed_implementations()}


@pytest.mark.parametrize("layout,impl", [(layout, impl) for layout in LAYOUTS for impl in ("python", "cython")])
def test_in_order_state_machine(layout, impl):
    if impl not in LAYOUTS[layout]:
        if _accel.NO_EXTENSIONS:
            pytest.skip("IOVIRT_NO_EXTENSIONS set: pure Python run")
        pytest.fail("the Cython queue extensions did not load")
    machine = make_machine(layout, LAYOUTS[layout][impl])
    machine.TestCase.settings = settings(
        max_examples=60, stateful_step_count=40, deadline=None, suppress_health_check=list(HealthCheck)
    )
    machine.TestCase().runTest()
