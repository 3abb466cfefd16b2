"""More of virtio 1.4 section 4.1 (cited by their virtio 1.2 numbers): IDs, structure placement, the
configuration-access window's writes and the MSI-X table size.

Like :mod:`iovirt.conformance.checks.pci` these run against a
:class:`~iovirt.conformance.platform_target.PlatformTarget`.
"""

from __future__ import annotations

from iovirt.conformance.checks.pci import PCI, _virtio_cap
from iovirt.conformance.platform_target import PciContext
from iovirt.conformance.registry import check, expect
from iovirt.pci.capability import walk_capabilities
from iovirt.pci.regs import PCI_BASE_ADDRESS_0, PCI_CAP_ID_VNDR, PCI_DEVICE_ID, PCI_REVISION_ID, PCI_SUBSYSTEM_ID
from iovirt.virtio.defs import VIRTIO_F_NOTIFICATION_DATA
from iovirt.virtio.transport.caps import find_virtio_caps
from iovirt.virtio.transport.defs import (
    VIRTIO_MSI_NO_VECTOR,
    VIRTIO_PCI_CAP_BAR,
    VIRTIO_PCI_CAP_COMMON_CFG,
    VIRTIO_PCI_CAP_DEVICE_CFG,
    VIRTIO_PCI_CAP_ISR_CFG,
    VIRTIO_PCI_CAP_LENGTH,
    VIRTIO_PCI_CAP_NOTIFY_CFG,
    VIRTIO_PCI_CAP_OFFSET,
    VIRTIO_PCI_CAP_PCI_CFG,
    VIRTIO_PCI_CFG_CAP_DATA,
    VIRTIO_PCI_COMMON_MSIX,
    VIRTIO_PCI_COMMON_Q_SELECT,
    VIRTIO_PCI_COMMON_Q_MSIX,
    VIRTIO_PCI_COMMON_Q_NOFF,
    VIRTIO_PCI_VENDOR_ID,
)

NON_TRANSITIONAL_IDS = range(0x1040, 0x1080)  # 4.1.2.1: SHOULD for non-transitional devices
MIN_REVISION = 1
MIN_SUBSYSTEM_ID = 0x40
MSIX_VECTORS = range(2, 0x801)  # 4.1.5.1.2.1: SHOULD support 2..0x800 vectors


@check(
    "virtio-1.2:4.1.2.1#non-transitional",
    "non-transitional IDs: device ID 0x1040..0x107f, revision >= 1, subsystem device ID >= 0x40",
    transport=PCI,
)
def non_transitional_ids(ctx: PciContext) -> None:
    read = ctx.driver.cfg.read
    device, revision, subsystem = read(PCI_DEVICE_ID, 2), read(PCI_REVISION_ID, 1), read(PCI_SUBSYSTEM_ID, 2)
    expect(device in NON_TRANSITIONAL_IDS, f"device ID {device:#06x} outside 0x1040..0x107f")
    expect(revision >= MIN_REVISION, f"revision ID {revision}, expected >= {MIN_REVISION}")
    expect(subsystem >= MIN_SUBSYSTEM_ID, f"subsystem device ID {subsystem:#06x}, expected >= {MIN_SUBSYSTEM_ID:#x}")


@check(
    "virtio-1.2:4.1.4#structures",
    "an ISR status capability is present; the device configuration offset is 4-byte aligned",
    transport=PCI,
)
def structures(ctx: PciContext) -> None:
    _virtio_cap(ctx, VIRTIO_PCI_CAP_ISR_CFG, "VIRTIO_PCI_CAP_ISR_CFG")
    cap = _virtio_cap(ctx, VIRTIO_PCI_CAP_DEVICE_CFG, "VIRTIO_PCI_CAP_DEVICE_CFG")
    expect(cap.offset % 4 == 0, f"device configuration offset {cap.offset:#x} is not 4-byte aligned")


@check(
    "virtio-1.2:4.1.4.9.1#write",
    "a write to pci_cfg_data performs the BAR write (queue_select set through the window)",
    transport=PCI,
)
def pci_cfg_write(ctx: PciContext) -> None:
    d = ctx.driver
    cap = _virtio_cap(ctx, VIRTIO_PCI_CAP_PCI_CFG, "VIRTIO_PCI_CAP_PCI_CFG")
    common = find_virtio_caps(d.cfg.read)[VIRTIO_PCI_CAP_COMMON_CFG]
    at = cap.cap_offset
    target = ctx.num_queues - 1  # a queue other than the one selected after reset (0), when there are two
    d.common_write(VIRTIO_PCI_COMMON_Q_SELECT, 2, 0)
    d.cfg.write(at + VIRTIO_PCI_CAP_BAR, 1, common.bar)
    d.cfg.write(at + VIRTIO_PCI_CAP_OFFSET, 4, common.offset + VIRTIO_PCI_COMMON_Q_SELECT)
    d.cfg.write(at + VIRTIO_PCI_CAP_LENGTH, 4, 2)
    d.cfg.write(at + VIRTIO_PCI_CFG_CAP_DATA, 4, target | 0xABCD0000)  # only the first cap.length bytes count
    selected = d.common_read(VIRTIO_PCI_COMMON_Q_SELECT, 2)
    expect(selected == target, f"queue_select reads {selected} after writing {target} through pci_cfg_data")


@check(
    "virtio-1.2:4.1.5.1.2.1#table",
    "MSI-X Table Size is 2..0x800 and tells the vectors: the last maps, one beyond reads back NO_VECTOR",
    transport=PCI,
)
def msix_table(ctx: PciContext) -> None:
    ctx.init()
    d = ctx.driver
    size = ctx.msix_table_size()
    expect(size in MSIX_VECTORS, f"MSI-X Table Size {size}, expected 2..0x800")
    for offset, name in ((VIRTIO_PCI_COMMON_MSIX, "config_msix_vector"), (VIRTIO_PCI_COMMON_Q_MSIX, "queue_msix_vector")):
        d.common_write(offset, 2, size - 1)
        back = d.common_read(offset, 2)
        expect(back == size - 1, f"{name}: vector {size - 1} (the last of the table) reads back {back:#x}")
        d.common_write(offset, 2, size)
        back = d.common_read(offset, 2)
        expect(
            back == VIRTIO_MSI_NO_VECTOR,
            f"{name}: vector {size} beyond a table of {size} reads back {back:#x}, expected NO_VECTOR (a failed mapping)",
        )


VIRTIO_PCI_CAP_SHARED_MEMORY_CFG = 8  # virtio 1.4 4.1.4.7 (struct virtio_pci_cap64)
VIRTIO_PCI_CAP_VENDOR_CFG = 9  # virtio 1.4 4.1.4.8 (struct virtio_pci_vndr_data)
CAP64_OFFSET_HI, CAP64_LENGTH_HI = 16, 20
VNDR_DATA_VENDOR_ID = 4
BAR_64BIT = 0x4  # PCI BAR type bits 2:1 = 10b


@check(
    "virtio-1.2:4.1.4#shm-vendor",
    "shared memory capabilities lie inside their BAR with unique ids; vendor data capabilities are "
    "a multiple of 4 bytes and not 0x1AF4's",
    transport=PCI,
)
def optional_caps(ctx: PciContext) -> str:
    read = ctx.driver.cfg.read
    shm_ids: set[int] = set()
    seen = 0
    for cap_id, offset in walk_capabilities(read):
        if cap_id != PCI_CAP_ID_VNDR:
            continue
        cfg_type = read(offset + 3, 1)
        if cfg_type == VIRTIO_PCI_CAP_VENDOR_CFG:
            seen += 1
            length, vendor = read(offset + 2, 1), read(offset + VNDR_DATA_VENDOR_ID, 2)
            expect(length % 4 == 0, f"vendor data capability at {offset:#x}: cap_len {length} is not a multiple of 4")
            expect(vendor != VIRTIO_PCI_VENDOR_ID, f"vendor data capability at {offset:#x} has vendor_id 0x1af4")
        elif cfg_type == VIRTIO_PCI_CAP_SHARED_MEMORY_CFG:
            seen += 1
            bar, shm_id = read(offset + VIRTIO_PCI_CAP_BAR, 1), read(offset + 5, 1)
            start = read(offset + VIRTIO_PCI_CAP_OFFSET, 4) | read(offset + CAP64_OFFSET_HI, 4) << 32
            size = read(offset + VIRTIO_PCI_CAP_LENGTH, 4) | read(offset + CAP64_LENGTH_HI, 4) << 32
            bar_size = _bar_size(ctx, bar)
            expect(start + size <= bar_size, f"shared memory region {shm_id} [{start:#x}, +{size:#x}) exceeds BAR {bar} ({bar_size:#x} bytes)")
            expect(shm_id not in shm_ids, f"shared memory id {shm_id} used twice")
            shm_ids.add(shm_id)
    return "" if seen else "no shared memory or vendor data capability to check"


def _bar_size(ctx: PciContext, bar: int) -> int:
    """The size of BAR ``bar``, by the sizing writes a driver makes (all ones, read back, restore)."""
    cfg = ctx.driver.cfg
    at = PCI_BASE_ADDRESS_0 + 4 * bar
    low = cfg.read(at, 4)
    wide = bool(low & BAR_64BIT)
    high = cfg.read(at + 4, 4) if wide else 0
    cfg.write(at, 4, 0xFFFFFFFF)
    mask = cfg.read(at, 4) & ~0xF
    if wide:
        cfg.write(at + 4, 4, 0xFFFFFFFF)
        mask |= cfg.read(at + 4, 4) << 32
        cfg.write(at + 4, 4, high)
    cfg.write(at, 4, low)
    bits = 64 if wide else 32
    return (~mask & ((1 << bits) - 1)) + 1 if mask else 0


def _notification_data(caps) -> str | None:
    return None if caps.has(VIRTIO_F_NOTIFICATION_DATA) else "VIRTIO_F_NOTIFICATION_DATA not offered"


@check(
    "virtio-1.2:4.1.4.4.1#notification-data",
    "with NOTIFICATION_DATA: notify offset 4-byte aligned, multiplier 0 or a power of 2 that is a multiple of 4, "
    "length at least 4 and reaching every queue's 4-byte notification",
    transport=PCI,
    applies=_notification_data,
)
def notify_cap_data(ctx: PciContext) -> None:
    cap = _virtio_cap(ctx, VIRTIO_PCI_CAP_NOTIFY_CFG, "VIRTIO_PCI_CAP_NOTIFY_CFG")
    mult = cap.notify_off_multiplier
    expect(cap.offset % 4 == 0, f"notify offset {cap.offset:#x} is not 4-byte aligned")
    expect(mult == 0 or (mult % 4 == 0 and mult & (mult - 1) == 0),
           f"notify_off_multiplier {mult} is neither 0 nor a power of 2 that is a multiple of 4")
    expect(cap.length >= 4, f"notify length {cap.length} < 4")
    for index in range(ctx.num_queues):
        ctx.driver.common_write(VIRTIO_PCI_COMMON_Q_SELECT, 2, index)
        off = ctx.driver.common_read(VIRTIO_PCI_COMMON_Q_NOFF, 2)
        expect(cap.length >= off * mult + 4,
               f"queue {index}: queue_notify_off {off} * {mult} + 4 exceeds the notify length {cap.length}")
