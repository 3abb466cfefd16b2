"""Config space: access widths and alignment, masks, Command/Status semantics."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iovirt.pci import (
    ConfigSpace,
    PciConfigAccessError,
    PciConfigValueError,
    PciFunction,
    PciLayoutError,
    VendorCapability,
)
from iovirt.pci.regs import PCI_COMMAND_WRITABLE, PCI_STATUS_CAP_LIST, PCI_STATUS_W1C


def make_function(**kwargs: object) -> PciFunction:
    return PciFunction(0x1B36, 0x0005, 0x00FF00, revision=3, **kwargs)  # type: ignore[arg-type]


def test_identity_reads_at_every_width() -> None:
    fn = make_function()
    assert fn.config_read(0, 4) == 0x00051B36
    assert fn.config_read(0, 2) == 0x1B36
    assert fn.config_read(2, 2) == 0x0005
    assert [fn.config_read(i, 1) for i in range(4)] == [0x36, 0x1B, 0x05, 0x00]
    assert fn.config_read(8, 4) == 0x00FF0003


@pytest.mark.parametrize(
    ("offset", "size", "reason"),
    [(1, 2, "aligned"), (2, 4, "aligned"), (3, 4, "aligned"), (0, 3, "width"), (0, 8, "width"),
     (0x100, 4, "range"), (0xFE, 4, "range"), (-4, 4, "range")],
)
def test_bad_accesses_raise_typed_error(offset: int, size: int, reason: str) -> None:
    fn = make_function()
    with pytest.raises(PciConfigAccessError) as err:
        fn.config_read(offset, size)
    assert reason in str(err.value)
    assert err.value.offset == offset and err.value.size == size and err.value.space_size == 0x100
    with pytest.raises(PciConfigAccessError):
        fn.config_write(offset, size, 0)


def test_value_wider_than_access_is_rejected() -> None:
    fn = make_function()
    with pytest.raises(PciConfigValueError):
        fn.config_write(0x0C, 1, 0x100)


def test_pcie_space_is_4k() -> None:
    fn = make_function(pcie=True)
    assert fn.config.size == 0x1000
    assert fn.config_read(0xFFC, 4) == 0
    with pytest.raises(PciConfigAccessError):
        fn.config_read(0x1000, 1)


def test_read_only_identity_survives_all_ones() -> None:
    fn = make_function(subsystem_vendor_id=0x1AF4, subsystem_id=0x1100, interrupt_pin=1)
    before = {off: fn.config_read(off, 4) for off in (0x00, 0x08, 0x2C, 0x34)}
    for off in before:
        fn.config_write(off, 4, 0xFFFFFFFF)
    assert {off: fn.config_read(off, 4) for off in before} == before
    # Interrupt Line is writable, Interrupt Pin is not.
    fn.config_write(0x3C, 2, 0xFFFF)
    assert fn.config_read(0x3C, 2) == 0x01FF


def test_odd_width_write_to_cache_line_and_latency() -> None:
    # libvfio-user#570: a 2-byte write to 0x0C-0x0D must work.
    fn = make_function()
    fn.config_write(0x0C, 2, 0x4010)
    assert fn.config_read(0x0C, 1) == 0x10
    assert fn.config_read(0x0D, 1) == 0x40
    assert fn.config_read(0x0E, 2) == 0  # header type and BIST untouched


def test_latency_timer_hardwired_on_pcie() -> None:
    fn = make_function(pcie=True)
    fn.config_write(0x0C, 2, 0x4010)
    assert fn.config_read(0x0C, 2) == 0x0010


def test_only_defined_command_bits_are_writable() -> None:
    fn = make_function()
    fn.config_write(0x04, 2, 0xFFFF)
    assert fn.config_read(0x04, 2) == PCI_COMMAND_WRITABLE == 0x0547
    fn.config_write(0x04, 2, 0)
    assert fn.config_read(0x04, 2) == 0


def test_status_error_bits_are_write_one_to_clear() -> None:
    fn = make_function()
    fn.config.set(0x06, 2, PCI_STATUS_W1C | 0x0020)  # device raised every error, 66 MHz set
    fn.config_write(0x06, 2, 0)
    assert fn.config_read(0x06, 2) == PCI_STATUS_W1C | 0x0020  # writing 0 leaves them
    fn.config_write(0x06, 2, 0x2000)  # clear Received Master Abort only
    assert fn.config_read(0x06, 2) == (PCI_STATUS_W1C & ~0x2000) | 0x0020
    fn.config_write(0x04, 4, 0xFFFF_0000)  # a dword write clears the rest, keeps Command 0
    assert fn.config_read(0x06, 2) == 0x0020
    assert fn.config_read(0x04, 2) == 0


def test_capability_list_bit_iff_capability() -> None:
    fn = make_function()
    assert not fn.config_read(0x06, 2) & PCI_STATUS_CAP_LIST
    assert fn.config_read(0x34, 1) == 0
    fn.add_capability(VendorCapability(b"\x01\x02"))
    assert fn.config_read(0x06, 2) & PCI_STATUS_CAP_LIST
    assert fn.config_read(0x34, 1) == 0x40
    fn.config_write(0x06, 2, 0xFFFF)
    assert fn.config_read(0x06, 2) & PCI_STATUS_CAP_LIST
    fn.reset()
    assert fn.config_read(0x06, 2) & PCI_STATUS_CAP_LIST


def test_hooks_must_be_dword_aligned_and_exclusive() -> None:
    cfg = ConfigSpace()

    class Hook:
        def config_read(self, offset: int, size: int) -> int:
            return 0xAB

        def config_write(self, offset: int, size: int, value: int) -> None:
            pass

    with pytest.raises(PciLayoutError):
        cfg.add_hook(0x42, 4, Hook())
    cfg.add_hook(0x40, 8, Hook())
    with pytest.raises(PciLayoutError):
        cfg.add_hook(0x44, 4, Hook())
    assert cfg.read(0x47, 1) == 0xAB
    assert cfg.read(0x48, 1) == 0


def test_bad_config_space_size() -> None:
    with pytest.raises(PciLayoutError):
        ConfigSpace(512)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([1, 2, 4]), st.integers(0, 0xFF), st.integers(0, 0xFFFFFFFF))))
def test_random_writes_never_change_read_only_bits(
    writes: list[tuple[int, int, int]]
) -> None:
    fn = make_function()
    fn.add_capability(VendorCapability(b"\x11\x22\x33\x44\x55", wmask=b"\x00\xff\x00\x00\x00"))
    cfg = fn.config
    ro = [(~cfg.wmask(i, 1) & ~cfg.w1cmask(i, 1)) & 0xFF for i in range(0x100)]
    before = cfg.snapshot()
    for size, offset, value in writes:
        offset &= ~(size - 1)
        fn.config_write(offset, size, value & ((1 << (8 * size)) - 1))
    after = cfg.snapshot()
    for i in range(0x100):
        assert before[i] & ro[i] == after[i] & ro[i], hex(i)
