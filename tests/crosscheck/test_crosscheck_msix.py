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
