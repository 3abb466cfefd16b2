"""The device IOTLB on its own: UPDATE/INVALIDATE semantics, misses, permissions, bounds.

vhost-user.rst "IOMMU support": IOVAs translate to front-end user addresses
through the entries the front-end sent; the memory table maps those to
guest-physical addresses.  Checked against a page-by-page model with hypothesis.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings, strategies as st

from iovirt.memory import Access, TranslationFault, TranslationPending
from iovirt.vhost_user.memtable import GuestMemoryTable
from iovirt.vhost_user.iotlb import PAGE_SIZE, DeviceIotlb, IotlbError
from iovirt.vhost_user.messages import MemRegion, IotlbMsg, IotlbPerm, IotlbType

RO, WO, RW = IotlbPerm.VHOST_ACCESS_RO, IotlbPerm.VHOST_ACCESS_WO, IotlbPerm.VHOST_ACCESS_RW
USER = 0x7F00_0000_0000  # user address of GPA 0
IOVA = 0xFEED_0000_0000


def memory(regions=((0, 1 << 20),)) -> GuestMemoryTable:
    """A memory table as a front-end shares it: memfd regions at user addresses USER + gpa."""
    table = GuestMemoryTable("t", lambda: None)
    fds = []
    for gpa, size in regions:
        fd = os.memfd_create("iotlb-test")
        os.ftruncate(fd, size)
        fds.append(fd)
    table.set_table([MemRegion(gpa, size, USER + gpa, 0) for gpa, size in regions], fds)
    return table


class Sent(list):
    """The back-end channel: records what the IOTLB sends."""

    def __init__(self, ok: bool = True) -> None:
        super().__init__()
        self.ok = ok

    def __call__(self, msg: IotlbMsg) -> bool:
        self.append(msg)
        return self.ok


def make(**kw) -> tuple[DeviceIotlb, Sent]:
    sent = Sent()
    return DeviceIotlb(memory(), sent, "t", **kw), sent


def test_update_then_translate_goes_iova_to_user_to_gpa():
    tlb, sent = make()
    tlb.update(IOVA, 2 * PAGE_SIZE, USER + 0x5000, RW)
    assert tlb.translate(IOVA + 0x10, 0x20, Access.READ) == [(0x5010, 0x20)]
    assert tlb.translate(IOVA + PAGE_SIZE - 4, 8, Access.WRITE) == [(0x5000 + PAGE_SIZE - 4, 8)]
    assert sent == []


def test_a_miss_is_sent_once_per_page_and_raises_pending():
    tlb, sent = make()
    for _ in range(3):
        with pytest.raises(TranslationPending):
            tlb.translate(IOVA + 0x123, 16, Access.READ)
    assert sent == [IotlbMsg(IOVA + 0x123, 0, 0, RO, IotlbType.VHOST_IOTLB_MISS)]
    assert tlb.outstanding == {IOVA // PAGE_SIZE: RO}
    # A wider access to the same page asks again, for both permissions.
    with pytest.raises(TranslationPending):
        tlb.translate(IOVA + 0x200, 16, Access.WRITE)
    assert sent[-1].perm == RW


def test_a_buffer_over_several_missing_pages_asks_for_all_of_them_at_once():
    tlb, sent = make()
    tlb.update(IOVA + PAGE_SIZE, PAGE_SIZE, USER, RW)  # the middle page is known
    with pytest.raises(TranslationPending):
        tlb.translate(IOVA + 0x800, 2 * PAGE_SIZE, Access.READ)
    assert [m.iova // PAGE_SIZE for m in sent] == [IOVA // PAGE_SIZE, IOVA // PAGE_SIZE + 2]


def test_an_update_answering_a_miss_calls_on_resolved():
    tlb, sent = make()
    calls = []
    tlb.on_resolved = lambda: calls.append(1)
    with pytest.raises(TranslationPending):
        tlb.translate(IOVA, 8, Access.READ)
    tlb.update(IOVA + 0x10_0000, PAGE_SIZE, USER, RW)  # an unrelated page
    assert calls == []
    assert tlb.update(IOVA, PAGE_SIZE, USER, RW)
    assert calls == [1] and tlb.outstanding == {}


def test_invalidate_cuts_entries_and_takes_effect_at_once():
    tlb, sent = make()
    tlb.update(IOVA, 4 * PAGE_SIZE, USER, RW)
    tlb.invalidate(IOVA + PAGE_SIZE, PAGE_SIZE)
    assert [(e.iova - IOVA, e.end - IOVA, e.uaddr - USER) for e in tlb.entries] == [
        (0, PAGE_SIZE, 0), (2 * PAGE_SIZE, 4 * PAGE_SIZE, 2 * PAGE_SIZE)
    ]
    with pytest.raises(TranslationPending):
        tlb.translate(IOVA + PAGE_SIZE, 1, Access.READ)
    assert tlb.translate(IOVA + 2 * PAGE_SIZE, 1, Access.READ) == [(2 * PAGE_SIZE, 1)]


def test_an_update_replaces_what_it_overlaps():
    tlb, _ = make()
    tlb.update(IOVA, 2 * PAGE_SIZE, USER, RO)
    tlb.update(IOVA + PAGE_SIZE, PAGE_SIZE, USER + 0x8000, RW)
    assert tlb.translate(IOVA + PAGE_SIZE, 4, Access.WRITE) == [(0x8000, 4)]
    assert tlb.translate(IOVA, 4, Access.READ) == [(0, 4)]


@pytest.mark.parametrize("perm, access", [(RO, Access.WRITE), (WO, Access.READ), (RO, Access.READ | Access.WRITE)])
def test_a_denied_access_sends_access_fail_and_faults(perm, access):
    tlb, sent = make()
    tlb.update(IOVA, PAGE_SIZE, USER, perm)
    with pytest.raises(TranslationFault) as info:
        tlb.translate(IOVA + 8, 4, access)
    assert not isinstance(info.value, TranslationPending)
    assert sent == [IotlbMsg(IOVA + 8, 0, 0, IotlbPerm(int(access)), IotlbType.VHOST_IOTLB_ACCESS_FAIL)]


def test_without_a_channel_a_miss_is_a_fault():
    tlb = DeviceIotlb(memory(), None)
    with pytest.raises(TranslationFault, match="no back-end channel") as info:
        tlb.translate(IOVA, 4, Access.READ)
    assert not isinstance(info.value, TranslationPending)


def test_a_miss_the_channel_could_not_take_is_asked_again():
    sent = Sent(ok=False)
    tlb = DeviceIotlb(memory(), sent)
    for _ in range(2):
        with pytest.raises(TranslationPending):
            tlb.translate(IOVA, 4, Access.READ)
    assert len(sent) == 2 and tlb.outstanding == {}


def test_an_entry_may_span_two_regions_of_the_memory_table():
    tlb = DeviceIotlb(memory([(0, 0x10000), (0x10000, 0x10000)]), Sent())
    tlb.update(IOVA, 2 * PAGE_SIZE, USER + 0x10000 - PAGE_SIZE, RW)
    assert tlb.translate(IOVA + PAGE_SIZE - 2, 4, Access.READ) == [(0x10000 - 2, 2), (0x10000, 2)]


@pytest.mark.parametrize(
    "iova, size, uaddr, perm, reason",
    [
        (IOVA, 0, USER, RW, "size is 0"),
        ((1 << 64) - PAGE_SIZE, 2 * PAGE_SIZE, USER, RW, "wraps"),
        (IOVA, PAGE_SIZE, (1 << 64) - 16, RW, "wraps"),
        (IOVA, PAGE_SIZE, USER, IotlbPerm.VHOST_ACCESS_NONE, "grant no access"),
        (IOVA, PAGE_SIZE, USER + (1 << 20), RW, "no region"),
        (IOVA, 2 * PAGE_SIZE, USER + (1 << 20) - PAGE_SIZE, RW, "no region"),  # runs off the table
        (IOVA, PAGE_SIZE, 0x1000, RW, "no region"),
    ],
)
def test_bad_updates_are_refused_and_change_nothing(iova, size, uaddr, perm, reason):
    tlb, _ = make()
    tlb.update(IOVA + 0x100000, PAGE_SIZE, USER, RW)
    with pytest.raises(IotlbError, match=reason):
        tlb.update(iova, size, uaddr, perm)
    assert len(tlb.entries) == 1


@pytest.mark.parametrize("iova, size", [(IOVA + PAGE_SIZE, 0), (IOVA + PAGE_SIZE, (1 << 64) - 1)])
def test_invalidate_of_size_zero_or_past_2_64_reaches_the_end(iova, size):
    # As Linux vhost (iova + size - 1 wraps) and as QEMU sends a whole device-TLB
    # flush (addr_mask + 1 overflows to 0): everything from iova on goes.
    tlb, _ = make()
    for i in range(3):
        tlb.update(IOVA + i * PAGE_SIZE, PAGE_SIZE, USER + i * PAGE_SIZE, RW)
    assert tlb.invalidate(iova, size)
    assert [e.iova for e in tlb.entries] == [IOVA]


def test_forget_unpinned_drops_every_buffer_entry_used_or_not():
    """After a completion the driver may remap any buffer IOVA unannounced: only the rings stay."""
    tlb, _ = make()
    tlb.pinned = lambda: [(IOVA, IOVA + PAGE_SIZE)]  # a running ring
    for i in range(3):
        tlb.update(IOVA + i * PAGE_SIZE, PAGE_SIZE, USER + i * PAGE_SIZE, RW)
    tlb.translate(IOVA, 2 * PAGE_SIZE, Access.READ)  # the ring page and a buffer page
    tlb.forget_unpinned()
    # the ring stays; the used buffer entry goes, and so does the unused one
    assert [e.iova for e in tlb.entries] == [IOVA]
    with pytest.raises(TranslationPending):
        tlb.translate(IOVA + 2 * PAGE_SIZE, 1, Access.WRITE)
    tlb.update(IOVA + 3 * PAGE_SIZE, 2 * PAGE_SIZE, USER, RW)  # an entry half over the ring stays whole
    tlb.pinned = lambda: [(IOVA, IOVA + 4 * PAGE_SIZE)]
    tlb.forget_unpinned()
    assert [(e.iova, e.end) for e in tlb.entries] == [(IOVA, IOVA + PAGE_SIZE), (IOVA + 3 * PAGE_SIZE, IOVA + 5 * PAGE_SIZE)]


def test_a_full_table_retires_the_oldest_unpinned_entry():
    tlb, _ = make(max_entries=3)
    tlb.pinned = lambda: [(IOVA, IOVA + PAGE_SIZE)]  # a running ring
    for i in range(5):
        tlb.update(IOVA + i * PAGE_SIZE, PAGE_SIZE, USER, RW)
    assert [(e.iova - IOVA) // PAGE_SIZE for e in tlb.entries] == [0, 3, 4]
    assert tlb.stats["retired"] == 2


def test_the_memory_table_changing_under_an_entry_faults_instead_of_reaching_elsewhere():
    tlb, _ = make()
    tlb.update(IOVA, PAGE_SIZE, USER, RW)
    tlb.table.remove(MemRegion(0, 1 << 20, USER, 0), [])  # REM_MEM_REG
    with pytest.raises(TranslationFault, match="no region"):
        tlb.translate(IOVA, 4, Access.READ)


OPS = st.lists(
    st.tuples(
        st.sampled_from(["update", "invalidate"]),
        st.integers(0, 31),  # first page
        st.integers(1, 6),  # pages
        st.integers(0, 200),  # user page
        st.sampled_from([RO, WO, RW]),
    ),
    max_size=30,
)


@settings(max_examples=150, deadline=None)
@given(OPS)
def test_the_table_agrees_with_a_page_by_page_model(ops):
    tlb, _ = make()
    model: dict[int, tuple[int, int]] = {}
    for op, page, pages, upage, perm in ops:
        if op == "update":
            tlb.update(IOVA + page * PAGE_SIZE, pages * PAGE_SIZE, USER + upage * PAGE_SIZE, perm)
            for k in range(pages):
                model[page + k] = (upage + k, perm)
        else:
            tlb.invalidate(IOVA + page * PAGE_SIZE, pages * PAGE_SIZE)
            for k in range(pages):
                model.pop(page + k, None)
    entries = tlb.entries
    assert all(a.end <= b.iova for a, b in zip(entries, entries[1:]))
    for page in range(40):
        iova = IOVA + page * PAGE_SIZE + 5
        if page in model:
            upage, perm = model[page]
            access = Access.READ if perm & RO else Access.WRITE
            assert tlb.translate(iova, 3, access) == [(upage * PAGE_SIZE + 5, 3)]
        else:
            with pytest.raises(TranslationPending):
                tlb.translate(iova, 3, Access.READ)
