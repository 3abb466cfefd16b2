"""Area msix against QEMU's virtio-net-pci through qtest and QMP: a bounded seed set (issue 18)."""

from __future__ import annotations

import pytest

from iovirt.crosscheck.area import AreaResult, compare, run_area
from iovirt.crosscheck.msix import SLOT_BASE, MsixArea, messages_observation
from iovirt.crosscheck.ops import parse_ops
from iovirt.crosscheck.qtest import qemu_available

needs_qemu = pytest.mark.skipif(not qemu_available(), reason="qemu-system-x86_64 not installed")


@pytest.fixture(scope="module")
def area():
    with MsixArea() as a:
        yield a


@needs_qemu
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_msix_agrees_with_qemu(area, seed):
    result = run_area(area, seed, 4000)
    assert result.compared == 4000
    assert [m.replay_text() for m in result.mismatches] == []


DELIVERY = """
w virtio 0x10 2 0x1
w tbl 0x10 4 0x100004
w tbl 0x18 4 0x1234
w cfg 0xde 2 0x8000
fire link 0 0
w tbl 0x1c 4 0
r pba 0 8
"""


@needs_qemu
def test_a_pending_vector_is_sent_on_unmask_on_both_sides(area):
    ops = parse_ops(DELIVERY)
    expected = [(), (), (), (), (), ((1, 0x1234),), 0]
    assert area.run_qemu(ops) == expected
    assert area.run_iovirt(ops) == expected


@needs_qemu
def test_a_model_that_forgets_pending_vectors_is_caught(area, monkeypatch):
    # A mutant: unmasking a vector never sends what is pending.
    assert area.endpoint is not None and area.endpoint.msix is not None
    monkeypatch.setattr(area.endpoint.msix, "_send_pending", lambda vector: None)
    result = AreaResult(area.name)
    compare(area, parse_ops(DELIVERY), result)
    [mismatch] = result.mismatches
    assert str(mismatch.ops[-1]) == "w tbl 0x1c 4 0x0"
    assert mismatch.qemu == ((1, 0x1234),) and mismatch.iovirt == ()
    assert parse_ops(mismatch.replay_text()) == mismatch.ops


def test_messages_fill_slots_in_order():
    assert messages_observation([(SLOT_BASE + 4, 1), (SLOT_BASE + 4, 2), (0xFEE00000, 3)]) == ((1, 2), (0xFEE00000, 3))


# The transmit queue's vector (2) pointed at slot 2 and unmasked: a transmitted frame is signalled there;
# masked, it stays pending in the PBA and goes out on unmask (PCI 3.0 §6.8.2.9-10).
QUEUE_VECTOR = """
w virtio 0x1a 2 0x2
w tbl 0x20 4 0x100008
w tbl 0x28 4 0x5678
w tbl 0x2c 4 0
w cfg 0xde 2 0x8000
fire txq 0 0
w tbl 0x2c 4 1
fire txq 0 0
r pba 0 8
w tbl 0x2c 4 0
"""


@needs_qemu
def test_a_queue_vector_is_delivered_and_held_pending_on_both_sides(area):
    ops = parse_ops(QUEUE_VECTOR)
    expected = [(), (), (), (), (), ((2, 0x5678),), (), (), 0x4, ((2, 0x5678),)]
    assert area.run_qemu(ops) == expected
    assert area.run_iovirt(ops) == expected


@needs_qemu
def test_a_model_that_signals_queues_on_the_config_vector_is_caught(area, monkeypatch):
    # A mutant: the transport sends used-buffer notifications on msix_config's vector.
    endpoint = area.endpoint
    assert endpoint is not None
    monkeypatch.setattr(endpoint, "queue_interrupt", lambda index: endpoint.config_interrupt())
    result = AreaResult(area.name)
    compare(area, parse_ops("w virtio 0x10 2 0x1\nw tbl 0x10 4 0x100004\nw tbl 0x18 4 0x1234\n" + QUEUE_VECTOR), result)
    [mismatch] = result.mismatches
    assert str(mismatch.ops[-1]) == "fire txq 0x0 0 0x0"
    assert parse_ops(mismatch.replay_text()) == mismatch.ops
