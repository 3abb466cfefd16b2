"""More of virtio 1.4 section 4.1 (cited by their virtio 1.2 numbers): the PCI header, IDs, structure
placement, the configuration-access window's writes, the MSI-X table size, optional capabilities.

Like :mod:`iovirt.conformance.checks.pci` these run against a
:class:`~iovirt.conformance.platform_target.PlatformTarget`.
"""

from __future__ import annotations

from iovirt.conformance.checks.pci import PCI, _virtio_cap
from iovirt.conformance.platform_target import PciContext
from iovirt.conformance.registry import check, expect
from iovirt.pci.capability import walk_capabilities
from iovirt.pci.regs import (
    PCI_BASE_ADDRESS_0,
    PCI_BASE_ADDRESS_SPACE_IO,
    PCI_CAP_ID_VNDR,
    PCI_CAPABILITY_LIST,
    PCI_CFG_SPACE_SIZE,
    PCI_DEVICE_ID,
    PCI_HEADER_TYPE,
    PCI_HEADER_TYPE_NORMAL,
    PCI_INTERRUPT_PIN,
    PCI_REVISION_ID,
    PCI_STATUS,
    PCI_STATUS_CAP_LIST,
    PCI_SUBSYSTEM_ID,
    PCI_VENDOR_ID,
)
from iovirt.virtio.defs import VIRTIO_F_ADMIN_VQ, VIRTIO_F_NOTIFICATION_DATA
from iovirt.virtio.transport.caps import find_virtio_caps
from iovirt.virtio.transport.defs import (
    VIRTIO_MSI_NO_VECTOR,
    VIRTIO_PCI_COMMON_ADMIN_Q_INDEX,
    VIRTIO_PCI_COMMON_ADMIN_Q_NUM,
    VIRTIO_PCI_CAP_BAR,
    VIRTIO_PCI_CAP_COMMON_CFG,
    VIRTIO_PCI_CAP_DEVICE_CFG,
    VIRTIO_PCI_CAP_ISR_CFG,
    VIRTIO_PCI_CAP_LENGTH,
    VIRTIO_PCI_CAP_NOTIFY_CFG,
    VIRTIO_PCI_CAP_OFFSET,
    VIRTIO_PCI_CAP_PCI_CFG,
    VIRTIO_PCI_CAP_SHARED_MEMORY_CFG,
    VIRTIO_PCI_CAP_VENDOR_CFG,
    VIRTIO_PCI_CFG_CAP_DATA,
    VIRTIO_PCI_COMMON_MSIX,
    VIRTIO_PCI_COMMON_Q_SELECT,
    VIRTIO_PCI_COMMON_Q_MSIX,
    VIRTIO_PCI_COMMON_Q_NOFF,
    VIRTIO_PCI_COMMON_STATUS,
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
def structures(ctx: PciContext) -> str | None:
    _virtio_cap(ctx, VIRTIO_PCI_CAP_ISR_CFG, "VIRTIO_PCI_CAP_ISR_CFG")
    cap = find_virtio_caps(ctx.driver.cfg.read).get(VIRTIO_PCI_CAP_DEVICE_CFG)
    if cap is None:
        return "no device configuration capability to check the offset of (4.1.4.6.1 requires one)"
    expect(cap.offset % 4 == 0, f"device configuration offset {cap.offset:#x} is not 4-byte aligned")
    return None


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


CAP64_OFFSET_HI, CAP64_LENGTH_HI = 16, 20
VNDR_DATA_VENDOR_ID = 4
BAR_64BIT = 0x4  # PCI BAR type bits 2:1 = 10b


@check(
    "virtio-1.2:4.1.4#shm-vendor",
    "shared memory capabilities lie inside their BAR with unique ids; vendor data capabilities are "
    "a multiple of 4 bytes, not 0x1AF4's, and read without side effects",
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
            _reads_change_nothing(ctx, offset, length)
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


VENDOR_READS = 3


def _reads_change_nothing(ctx: PciContext, offset: int, length: int) -> None:
    """4.1.4.8.1 (1.4): reading a vendor data capability, byte by byte and by dwords, has no side effects:
    it reads the same each time, and the rest of config space and device_status stay as they were."""
    read = ctx.driver.cfg.read
    before = [read(at, 4) for at in range(0, PCI_CFG_SPACE_SIZE, 4)]
    status = ctx.driver.common_read(VIRTIO_PCI_COMMON_STATUS, 1)
    first = bytes(read(offset + i, 1) for i in range(length))
    for _ in range(VENDOR_READS):
        again = bytes(read(offset + i, 1) for i in range(length))
        expect(again == first, f"vendor data capability at {offset:#x} reads differently from one read to the next")
        for at in range(offset & ~3, offset + length, 4):
            read(at, 4)
    after = [read(at, 4) for at in range(0, PCI_CFG_SPACE_SIZE, 4)]
    changed = [4 * i for i, (a, b) in enumerate(zip(before, after)) if a != b]
    expect(not changed, f"reading the vendor data capability at {offset:#x} changed config space at {changed}")
    expect(ctx.driver.common_read(VIRTIO_PCI_COMMON_STATUS, 1) == status,
           "reading the vendor data capability changed device_status")


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


MAX_CAPABILITIES = 48  # (256 - 64) / 4: a longer walk of the list has a loop


@check(
    "virtio-1.2:4.1.1",
    "the function's config space follows PCI: a type 0 header, read-only IDs, a well-formed capability list, "
    "BARs that size to a power of two, an interrupt pin of 0..4",
    transport=PCI,
)
def pci_header(ctx: PciContext) -> None:
    cfg = ctx.driver.cfg
    expect(cfg.read(PCI_HEADER_TYPE, 1) & 0x7F == PCI_HEADER_TYPE_NORMAL,
           f"header type {cfg.read(PCI_HEADER_TYPE, 1):#x}, expected a type 0 (endpoint) header")
    ids = cfg.read(PCI_VENDOR_ID, 4)
    cfg.write(PCI_VENDOR_ID, 4, ~ids & 0xFFFFFFFF)
    expect(cfg.read(PCI_VENDOR_ID, 4) == ids, "vendor/device ID changed when written (they are read-only)")
    expect(cfg.read(PCI_STATUS, 2) & PCI_STATUS_CAP_LIST, "Status.Capabilities List is clear: a virtio function needs capabilities")
    seen: set[int] = set()
    at = cfg.read(PCI_CAPABILITY_LIST, 1)
    while at:
        expect(at % 4 == 0 and 0x40 <= at < PCI_CFG_SPACE_SIZE, f"capability pointer {at:#x} is not a dword in [0x40, 0x100)")
        expect(at not in seen and len(seen) < MAX_CAPABILITIES, f"the capability list loops back to {at:#x}")
        seen.add(at)
        at = cfg.read(at + 1, 1)  # its low two bits are reserved: 0 (PCI 3.0 6.7)
    bar = 0
    while bar < 6:
        low = cfg.read(PCI_BASE_ADDRESS_0 + 4 * bar, 4)
        size = _bar_size(ctx, bar)
        wide = not low & PCI_BASE_ADDRESS_SPACE_IO and bool(low & BAR_64BIT)
        expect(size == 0 or size & (size - 1) == 0, f"BAR {bar} sizes to {size:#x}, not a power of two")
        expect(not wide or bar < 5, "BAR 5 claims to be the low half of a 64-bit BAR")
        bar += 2 if wide else 1
    pin = cfg.read(PCI_INTERRUPT_PIN, 1)
    expect(pin <= 4, f"interrupt pin {pin}, expected 0 (none) or 1..4 (INTA..INTD)")


@check(
    "virtio-1.2:4.1.4.3.1#admin_queue",
    "with ADMIN_VQ: admin_queue_index is at least num_queues and admin_queue_num fits below 0x10000 from it",
    transport=PCI,
    applies=lambda caps: None if caps.has(VIRTIO_F_ADMIN_VQ) else "VIRTIO_F_ADMIN_VQ not offered",
)
def admin_queue(ctx: PciContext) -> None:
    ctx.bring_up()
    d = ctx.driver
    expect(d.has_feature(VIRTIO_F_ADMIN_VQ), "VIRTIO_F_ADMIN_VQ offered but not negotiated")
    common = _virtio_cap(ctx, VIRTIO_PCI_CAP_COMMON_CFG, "VIRTIO_PCI_CAP_COMMON_CFG")
    end = VIRTIO_PCI_COMMON_ADMIN_Q_NUM + 2
    expect(common.length >= end, f"common configuration of {common.length:#x} bytes lacks the admin queue fields (to {end:#x})")
    index = d.common_read(VIRTIO_PCI_COMMON_ADMIN_Q_INDEX, 2)
    num = d.common_read(VIRTIO_PCI_COMMON_ADMIN_Q_NUM, 2)
    expect(index >= ctx.num_queues, f"admin_queue_index {index} is below num_queues {ctx.num_queues}")
    expect(num <= 0x10000 - index, f"admin_queue_num {num} from admin_queue_index {index} runs past 0xffff")
