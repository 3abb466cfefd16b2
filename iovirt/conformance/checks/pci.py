"""The virtio-pci transport (virtio 1.2 section 4.1) and the generic device requirements it reaches (2.1, 2.2, 2.4, 2.5).

These run against a :class:`~iovirt.conformance.platform_target.PlatformTarget`:
a device behind iovirt's virtio-pci function, driven through config cycles,
MMIO and MSI-X as a guest kernel drives it.
"""

from __future__ import annotations

from iovirt.conformance.platform_target import PciContext
from iovirt.conformance.registry import CheckFailed, check, expect
from iovirt.pci.capability import walk_capabilities
from iovirt.pci.regs import PCI_CAP_ID_VNDR, PCI_DEVICE_ID, PCI_STATUS, PCI_STATUS_INTERRUPT, PCI_VENDOR_ID
from iovirt.virtio.defs import (
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
)
from iovirt.virtio.transport.caps import VirtioCapInfo, find_virtio_caps
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
    VIRTIO_PCI_CAP_SHARED_MEMORY_CFG,
    VIRTIO_PCI_CAP_SIZE,
    VIRTIO_PCI_CAP_VENDOR_CFG,
    VIRTIO_PCI_CFG_CAP_DATA,
    VIRTIO_PCI_COMMON_CFG_SIZE,
    VIRTIO_PCI_COMMON_CFGGENERATION,
    VIRTIO_PCI_COMMON_DF,
    VIRTIO_PCI_COMMON_DFSELECT,
    VIRTIO_PCI_COMMON_GF,
    VIRTIO_PCI_COMMON_GFSELECT,
    VIRTIO_PCI_COMMON_MSIX,
    VIRTIO_PCI_COMMON_Q_DESC,
    VIRTIO_PCI_COMMON_Q_ENABLE,
    VIRTIO_PCI_COMMON_Q_MSIX,
    VIRTIO_PCI_COMMON_Q_NOFF,
    VIRTIO_PCI_COMMON_Q_SELECT,
    VIRTIO_PCI_COMMON_Q_SIZE,
    VIRTIO_PCI_COMMON_STATUS,
    VIRTIO_PCI_ISR_CONFIG,
    VIRTIO_PCI_ISR_QUEUE,
    VIRTIO_PCI_MODERN_DEVICE_BASE,
    VIRTIO_PCI_VENDOR_ID,
)

PCI = "pci"
VIRTIO_IDS = {"net": 1, "blk": 2}  # 5 Device Types
# The structure each cfg_type's cap_len must cover (4.1.4.2); any other is a struct virtio_pci_cap (16 bytes).
CAP_MIN_LEN = {
    VIRTIO_PCI_CAP_NOTIFY_CFG: 20,  # struct virtio_pci_notify_cap: with notify_off_multiplier
    VIRTIO_PCI_CAP_PCI_CFG: 20,  # struct virtio_pci_cfg_cap: with pci_cfg_data
    VIRTIO_PCI_CAP_SHARED_MEMORY_CFG: 24,  # struct virtio_pci_cap64 (4.1.4.7): with offset_hi and length_hi
    VIRTIO_PCI_CAP_VENDOR_CFG: 6,  # struct virtio_pci_vndr_data (4.1.4.8): through vendor_id, no BAR fields
}


def _select_queue(ctx: PciContext, index: int) -> None:
    ctx.driver.common_write(VIRTIO_PCI_COMMON_Q_SELECT, 2, index)


def _virtio_cap(ctx: PciContext, cfg_type: int, name: str) -> VirtioCapInfo:
    """The first virtio capability of ``cfg_type``; fails the check when the function has none."""
    cap = find_virtio_caps(ctx.driver.cfg.read).get(cfg_type)
    if cap is None:
        raise CheckFailed(f"no {name} capability")
    return cap


def _new_interrupts(ctx: PciContext, before: dict[int | str, int], key: int | str | None = None) -> int:
    """Interrupts taken since ``before`` on the vector of ``key`` (a queue index or ``"config"``), or on any."""
    now = ctx.take_interrupts()
    if key is None:
        return sum(now.values()) - sum(before.values())
    return now.get(key, 0) - before.get(key, 0)


# -- 4.1.2 discovery and 4.1.4 capabilities ---------------------------------------------------------
@check("virtio-1.2:4.1.2.1", "vendor ID 0x1AF4 and device ID 0x1040 + the virtio device ID", transport=PCI)
def discovery(ctx: PciContext) -> None:
    read = ctx.driver.cfg.read
    vendor, device = read(PCI_VENDOR_ID, 2), read(PCI_DEVICE_ID, 2)
    expect(vendor == VIRTIO_PCI_VENDOR_ID, f"vendor ID {vendor:#06x}, expected 0x1af4")
    want = VIRTIO_PCI_MODERN_DEVICE_BASE + VIRTIO_IDS[ctx.caps.device]
    expect(device == want, f"device ID {device:#06x}, expected {want:#06x} for a {ctx.caps.device} device")


@check("virtio-1.2:4.1.4.2", "every virtio capability's cap_len covers its structure", transport=PCI)
def cap_len(ctx: PciContext) -> None:
    read = ctx.driver.cfg.read
    for cap_id, offset in walk_capabilities(read):
        if cap_id != PCI_CAP_ID_VNDR:
            continue
        cfg_type, length = read(offset + 3, 1), read(offset + 2, 1)
        need = CAP_MIN_LEN.get(cfg_type, VIRTIO_PCI_CAP_SIZE)
        expect(length >= need, f"capability at {offset:#x} (cfg_type {cfg_type}): cap_len {length} < {need}")


@check(
    "virtio-1.2:4.1.4.3.1#layout",
    "a common configuration capability, 4-byte aligned, holding the whole structure",
    transport=PCI,
)
def common_layout(ctx: PciContext) -> None:
    cap = _virtio_cap(ctx, VIRTIO_PCI_CAP_COMMON_CFG, "VIRTIO_PCI_CAP_COMMON_CFG")
    expect(cap.offset % 4 == 0, f"common configuration offset {cap.offset:#x} is not 4-byte aligned")
    expect(
        cap.length >= VIRTIO_PCI_COMMON_CFG_SIZE,
        f"common configuration length {cap.length:#x} < {VIRTIO_PCI_COMMON_CFG_SIZE:#x} (through queue_device)",
    )


@check("virtio-1.2:4.1.4.3.1#device_feature", "device_feature shows the offered bits per select, 0 beyond bit 63", transport=PCI)
def device_feature(ctx: PciContext) -> None:
    d = ctx.driver
    words = []
    for select in (0, 1, 2, 0x80):
        d.common_write(VIRTIO_PCI_COMMON_DFSELECT, 4, select)
        words.append(d.common_read(VIRTIO_PCI_COMMON_DF, 4))
    offered = words[0] | words[1] << 32
    expect(offered == ctx.caps.features, f"features {offered:#x} now, {ctx.caps.features:#x} at the probe")
    expect(words[2] == words[3] == 0, f"device_feature {words[2]:#x}/{words[3]:#x} for select 2/0x80, expected 0")


@check("virtio-1.2:4.1.4.3.1#driver_feature", "driver_feature reads back the valid bits the driver wrote", transport=PCI)
def driver_feature(ctx: PciContext) -> None:
    d = ctx.driver
    d.reset()
    d.add_status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER)
    d.write_driver_features(ctx.caps.features)
    back = 0
    for select in (0, 1):
        d.common_write(VIRTIO_PCI_COMMON_GFSELECT, 4, select)
        back |= d.common_read(VIRTIO_PCI_COMMON_GF, 4) << (32 * select)
    expect(back == ctx.caps.features, f"driver_feature reads {back:#x} after writing the offered {ctx.caps.features:#x}")


@check("virtio-1.2:4.1.4.3.1#queue_size", "queue_size is a power of 2 for each queue, 0 beyond num_queues", transport=PCI)
def queue_size(ctx: PciContext) -> None:
    n = ctx.num_queues
    expect(n >= 1, f"num_queues {n}")
    for index in range(n + 1):
        _select_queue(ctx, index)
        size = ctx.driver.common_read(VIRTIO_PCI_COMMON_Q_SIZE, 2)
        if index == n:
            expect(size == 0, f"queue_size {size} for queue {index} = num_queues, expected 0 (unavailable)")
        else:
            expect(size and size & (size - 1) == 0, f"queue {index}: queue_size {size} is not a power of 2")


@check(
    "virtio-1.2:4.1.4.3.1#reset",
    "writing 0 to device_status resets: it reads 0, and every queue_enable reads 0",
    transport=PCI,
)
def common_reset(ctx: PciContext) -> None:
    ctx.bring_up()
    d = ctx.driver
    d.common_write(VIRTIO_PCI_COMMON_STATUS, 1, 0)
    expect(d.status == 0, f"device_status {d.status:#x} after writing 0, expected 0")
    for index in range(ctx.num_queues):
        _select_queue(ctx, index)
        enable = d.common_read(VIRTIO_PCI_COMMON_Q_ENABLE, 2)
        expect(enable == 0, f"queue {index}: queue_enable {enable} after reset, expected 0")


@check(
    "virtio-1.2:4.1.4.3.1#config_generation",
    "config_generation changes when the device configuration changed since it was read",
    transport=PCI,
)
def config_generation(ctx: PciContext) -> None:
    ctx.bring_up()
    d = ctx.driver
    before = d.common_read(VIRTIO_PCI_COMMON_CFGGENERATION, 1)
    old = ctx.read_device_config(0, len(ctx.caps.config or b"") or 8)
    ctx.change_config()
    ctx.read_device_config(0, len(old))
    after = d.common_read(VIRTIO_PCI_COMMON_CFGGENERATION, 1)
    expect(after != before, f"config_generation stayed {before} across a configuration change")


@check("virtio-1.2:4.1.3.2", "64-bit fields: high and low halves are written independently (high first here)", transport=PCI)
def split_64bit(ctx: PciContext) -> None:
    d = ctx.driver
    d.reset()
    d.add_status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER)
    d.negotiate()
    _select_queue(ctx, 0)  # not yet enabled: its addresses may be written (4.1.4.3.2)
    value = 0x0000_0001_2345_6000
    d.common_write(VIRTIO_PCI_COMMON_Q_DESC + 4, 4, value >> 32)
    d.common_write(VIRTIO_PCI_COMMON_Q_DESC, 4, value & 0xFFFFFFFF)
    low = d.common_read(VIRTIO_PCI_COMMON_Q_DESC, 4)
    high = d.common_read(VIRTIO_PCI_COMMON_Q_DESC + 4, 4)
    expect(high << 32 | low == value, f"queue_desc reads {high:#x}:{low:#010x}, wrote {value:#x} high half first")


@check(
    "virtio-1.2:4.1.4.4.1",
    "notify capability: 2-byte aligned, notify_off_multiplier 0 or a power of 2, length reaching every queue",
    transport=PCI,
)
def notify_cap(ctx: PciContext) -> None:
    cap = _virtio_cap(ctx, VIRTIO_PCI_CAP_NOTIFY_CFG, "VIRTIO_PCI_CAP_NOTIFY_CFG")
    mult = cap.notify_off_multiplier
    expect(cap.offset % 2 == 0, f"notify offset {cap.offset:#x} is not 2-byte aligned")
    expect(mult == 0 or (mult >= 2 and mult & (mult - 1) == 0), f"notify_off_multiplier {mult} is neither 0 nor an even power of 2")
    expect(cap.length >= 2, f"notify length {cap.length} < 2")
    for index in range(ctx.num_queues):
        _select_queue(ctx, index)
        off = ctx.driver.common_read(VIRTIO_PCI_COMMON_Q_NOFF, 2)
        expect(
            cap.length >= off * mult + 2,
            f"queue {index}: queue_notify_off {off} * {mult} + 2 exceeds the notify length {cap.length}",
        )


@check(
    "virtio-1.2:4.1.4.5.1#config",
    "a configuration change sets ISR bit 1 before notifying; reading ISR clears it",
    transport=PCI,
)
def isr_config(ctx: PciContext) -> None:
    ctx.bring_up()
    d = ctx.driver
    d.isr_read()
    before = ctx.take_interrupts()
    ctx.change_config()
    isr = d.isr_read()
    expect(isr & VIRTIO_PCI_ISR_CONFIG, f"ISR status {isr:#x} after a configuration change lacks bit 1")
    expect(d.isr_read() == 0, "ISR status not 0 on the read after a read")
    expect(_new_interrupts(ctx, before, "config") >= 1, "no MSI-X interrupt on config_msix_vector after the change")


@check(
    "virtio-1.2:4.1.4.5.1#intx",
    "MSI-X disabled: a used buffer sets ISR bit 0 and PCI Status.Interrupt Status; the ISR read clears both",
    transport=PCI,
)
def isr_intx(ctx: PciContext) -> None:
    ctx.bring_up(msix=False)
    d = ctx.driver
    ctx.post_request()
    ctx.kick()
    expect(ctx.used() == 1, "the request was not completed")
    status = d.cfg.read(PCI_STATUS, 2)
    isr = d.isr_read()
    expect(isr & VIRTIO_PCI_ISR_QUEUE, f"ISR status {isr:#x} after a used buffer lacks bit 0")
    expect(status & PCI_STATUS_INTERRUPT, f"PCI Status {status:#06x} lacks Interrupt Status with ISR {isr:#x}")
    after = d.cfg.read(PCI_STATUS, 2)
    expect(d.isr_read() == 0, "ISR status not 0 on the read after a read")
    expect(not after & PCI_STATUS_INTERRUPT, f"PCI Status {after:#06x} keeps Interrupt Status with ISR read to 0")


@check("virtio-1.2:4.1.4.6.1", "a device configuration capability for a device type that has one", transport=PCI)
def device_cfg_cap(ctx: PciContext) -> None:
    caps = find_virtio_caps(ctx.driver.cfg.read)
    expect(VIRTIO_PCI_CAP_DEVICE_CFG in caps, f"no VIRTIO_PCI_CAP_DEVICE_CFG capability for a {ctx.caps.device} device")
    expect(VIRTIO_PCI_CAP_ISR_CFG in caps, "no VIRTIO_PCI_CAP_ISR_CFG capability (4.1.4.5.1)")


@check(
    "virtio-1.2:4.1.4.9.1",
    "a PCI configuration access capability whose window reads what the BAR holds",
    transport=PCI,
)
def pci_cfg_window(ctx: PciContext) -> None:
    d = ctx.driver
    cap = _virtio_cap(ctx, VIRTIO_PCI_CAP_PCI_CFG, "VIRTIO_PCI_CAP_PCI_CFG")
    common = find_virtio_caps(d.cfg.read)[VIRTIO_PCI_CAP_COMMON_CFG]
    d.common_write(VIRTIO_PCI_COMMON_DFSELECT, 4, 1)
    direct = d.common_read(VIRTIO_PCI_COMMON_DF, 4)
    at = cap.cap_offset
    d.cfg.write(at + VIRTIO_PCI_CAP_BAR, 1, common.bar)
    d.cfg.write(at + VIRTIO_PCI_CAP_OFFSET, 4, common.offset + VIRTIO_PCI_COMMON_DF)
    d.cfg.write(at + VIRTIO_PCI_CAP_LENGTH, 4, 4)
    through = d.cfg.read(at + VIRTIO_PCI_CFG_CAP_DATA, 4)
    expect(through == direct, f"device_feature (select 1) reads {through:#x} through the window, {direct:#x} by MMIO")


# -- 4.1.5 MSI-X vectors and notifications ---------------------------------------------------------
@check(
    "virtio-1.2:4.1.5.1.2.1#map",
    "config and queue events map to any vector of the table and unmap (NO_VECTOR), reading back the mapping",
    transport=PCI,
)
def vector_mapping(ctx: PciContext) -> str:
    ctx.init()
    d = ctx.driver
    size = ctx.msix_table_size()
    fields = [("config_msix_vector", None)] + [(f"queue {i} queue_msix_vector", i) for i in range(ctx.num_queues)]
    for name, index in fields:
        offset = VIRTIO_PCI_COMMON_MSIX if index is None else VIRTIO_PCI_COMMON_Q_MSIX
        for vector in list(range(size)) + [VIRTIO_MSI_NO_VECTOR]:
            if index is not None:
                _select_queue(ctx, index)
            d.common_write(offset, 2, vector)
            back = d.common_read(offset, 2)
            expect(back == vector, f"{name}: mapped {vector:#x}, reads {back:#x}")
    return "" if 2 <= size <= 0x800 else f"Table Size {size} outside the SHOULD range 2..0x800"


@check("virtio-1.2:4.1.5.1.2.1#reset", "every event is unmapped (NO_VECTOR) after a reset", transport=PCI)
def vectors_after_reset(ctx: PciContext) -> None:
    ctx.bring_up()
    d = ctx.driver
    d.reset()
    config = d.common_read(VIRTIO_PCI_COMMON_MSIX, 2)
    expect(config == VIRTIO_MSI_NO_VECTOR, f"config_msix_vector {config:#x} after reset, expected NO_VECTOR")
    for index in range(ctx.num_queues):
        _select_queue(ctx, index)
        vector = d.common_read(VIRTIO_PCI_COMMON_Q_MSIX, 2)
        expect(vector == VIRTIO_MSI_NO_VECTOR, f"queue {index}: queue_msix_vector {vector:#x} after reset")


@check("virtio-1.2:4.1.5.3.1", "MSI-X on and queue_msix_vector NO_VECTOR: no interrupt for that queue", transport=PCI)
def queue_no_vector(ctx: PciContext) -> None:
    ctx.bring_up()
    q = ctx.request_index
    ctx.post_request()
    before = ctx.take_interrupts()
    ctx.kick()
    expect(ctx.used() == 1, "the request was not completed")
    expect(_new_interrupts(ctx, before, q) >= 1, f"no interrupt for queue {q} with its vector mapped")
    ctx.driver.queues[q].get_used()
    _select_queue(ctx, q)
    ctx.driver.common_write(VIRTIO_PCI_COMMON_Q_MSIX, 2, VIRTIO_MSI_NO_VECTOR)
    ctx.post_request()
    before = ctx.take_interrupts()
    ctx.kick()
    expect(ctx.used() == 1, "the request was not completed with the vector unmapped")
    got = _new_interrupts(ctx, before)  # on any vector: nothing else happened meanwhile
    expect(got == 0, f"{got} interrupts after a used buffer on queue {q}, whose queue_msix_vector is NO_VECTOR")


@check("virtio-1.2:4.1.5.4.1", "MSI-X on and config_msix_vector NO_VECTOR: no configuration interrupt", transport=PCI)
def config_no_vector(ctx: PciContext) -> None:
    ctx.bring_up()
    ctx.driver.common_write(VIRTIO_PCI_COMMON_MSIX, 2, VIRTIO_MSI_NO_VECTOR)
    before = ctx.take_interrupts()
    ctx.change_config()
    got = _new_interrupts(ctx, before)
    expect(got == 0, f"{got} interrupts after a configuration change with config_msix_vector NO_VECTOR")


# -- generic device requirements (2.1, 2.2, 2.4, 2.5) -----------------------------------------------------
@check(
    "virtio-1.2:2.1#status",
    "device_status reads back each bit the driver adds through initialisation (3.1.1)",
    transport=PCI,
)
def status_steps(ctx: PciContext) -> None:
    d = ctx.driver
    d.reset()
    for bit in (VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER):
        d.add_status(bit)
        expect(d.status & bit, f"device_status {d.status:#x} lost bit {bit:#x} just set")
    d.negotiate()
    for index in range(ctx.num_queues):
        d.setup_queue(index, 64)
    d.add_status(VIRTIO_CONFIG_S_DRIVER_OK)
    want = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK
    expect(d.status == want, f"device_status {d.status:#x} after initialisation, expected {want:#x}")


@check("virtio-1.2:2.1.2", "no buffer used and no used buffer notification before DRIVER_OK", transport=PCI)
def nothing_before_driver_ok(ctx: PciContext) -> None:
    ctx.init()
    q = ctx.request_index
    ctx.post_request()
    before = ctx.take_interrupts()
    ctx.kick()
    expect(ctx.used() == 0, "a buffer was used before DRIVER_OK")
    expect(_new_interrupts(ctx, before, q) == 0, f"an interrupt for queue {q} before DRIVER_OK")
    ctx.driver.driver_ok()
    ctx.kick()
    expect(ctx.used() == 1, "the request made available before DRIVER_OK was not served after DRIVER_OK and a kick")


@check(
    "virtio-1.2:2.1.2#needs-reset",
    "after an error needing a reset: DEVICE_NEEDS_RESET (SHOULD) and, with DRIVER_OK, a configuration notification",
    transport=PCI,
)
def needs_reset(ctx: PciContext) -> str:
    ctx.bring_up()
    d = ctx.driver
    q = d.queues[ctx.request_index]
    before = ctx.take_interrupts()
    # 2.7.13.3: avail idx more than queue size ahead of the device is a driver error the device cannot recover from.
    d.memory.write_u16(q.avail_addr + 2, (q.size + 5) & 0xFFFF)
    d.host.mmio_write(d.notify_addr[ctx.request_index], 2, ctx.request_index)
    if not d.status & VIRTIO_CONFIG_S_NEEDS_RESET:
        return "the device did not set DEVICE_NEEDS_RESET after avail idx jumped beyond the queue size (a SHOULD)"
    expect(_new_interrupts(ctx, before, "config") >= 1, "DEVICE_NEEDS_RESET set with DRIVER_OK but no configuration notification")
    return ""


@check("virtio-1.2:2.2.2#subset", "a valid subset (VERSION_1 alone) is accepted: FEATURES_OK stays set, the device works", transport=PCI)
def feature_subset(ctx: PciContext) -> None:
    d = ctx.driver
    d.reset()
    d.add_status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER)
    d.write_driver_features(1 << VIRTIO_F_VERSION_1)
    d.add_status(VIRTIO_CONFIG_S_FEATURES_OK)
    expect(d.status & VIRTIO_CONFIG_S_FEATURES_OK, f"FEATURES_OK not kept for VERSION_1 alone (status {d.status:#x})")
    ctx.bring_up(1 << VIRTIO_F_VERSION_1)
    ctx.post_request()
    ctx.kick()
    expect(ctx.used() == 1, "the request was not completed with VERSION_1 alone negotiated")


@check(
    "virtio-1.2:2.2.2#unoffered",
    "features written that were not offered: FEATURES_OK does not stick (the driver's re-read sees it clear)",
    transport=PCI,
)
def feature_unoffered(ctx: PciContext) -> None:
    offered = ctx.caps.features
    bit = next(b for b in range(64) if not offered >> b & 1)
    d = ctx.driver
    d.reset()
    d.add_status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER)
    d.write_driver_features(offered | 1 << bit)
    d.add_status(VIRTIO_CONFIG_S_FEATURES_OK)
    expect(
        not d.status & VIRTIO_CONFIG_S_FEATURES_OK,
        f"FEATURES_OK accepted with bit {bit}, which was not offered (features {offered:#x})",
    )


@check(
    "virtio-1.2:2.4.1",
    "after a reset: status 0, and no queue activity or notification until re-initialised",
    transport=PCI,
)
def reset_quiet(ctx: PciContext) -> None:
    ctx.bring_up()
    d = ctx.driver
    q = ctx.request_index
    d.common_write(VIRTIO_PCI_COMMON_STATUS, 1, 0)  # the driver keeps its ring, as one racing the reset would
    expect(d.status == 0, f"device_status {d.status:#x} after reset, expected 0")
    before = ctx.take_interrupts()
    ctx.post_request()
    ctx.kick()
    expect(ctx.used() == 0, "a buffer was used after the reset, before re-initialisation")
    expect(_new_interrupts(ctx, before, q) == 0 and _new_interrupts(ctx, before, "config") == 0, "a notification after the reset")


@check("virtio-1.2:2.5.2", "device configuration is readable before FEATURES_OK, and the same after", transport=PCI)
def config_before_features_ok(ctx: PciContext) -> None:
    d = ctx.driver
    d.reset()
    d.add_status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER)
    size = len(ctx.caps.config or b"") or 8
    early = ctx.read_device_config(0, size)
    ctx.bring_up()
    late = ctx.read_device_config(0, size)
    expect(early == late, f"device configuration {early.hex()} before FEATURES_OK, {late.hex()} after DRIVER_OK")
