"""Group administration commands on an SR-IOV owner's administration virtqueue (virtio 1.4 2.12.1, 2.13).

These run against ``PlatformTarget("net", owner=True)``: the owner (a PF offering VIRTIO_F_ADMIN_VQ and
SR-IOV) is brought up with its administration virtqueue at ``admin_queue_index``, its VFs are enabled
through the SR-IOV capability as Linux enables them, and the checks send ``struct virtio_admin_cmd``
chains as Linux's ``virtio_pci_admin_*`` helpers do.  The legacy interface checks compare what the
owner's commands do to a member with what the member's own virtio-pci registers show.

Clause ids cite virtio 1.4 (``virtio-1.4:<section>``): these sections exist from 1.3 on.
"""

from __future__ import annotations

from typing import Callable

from iovirt.conformance.checks.pci import PCI
from iovirt.conformance.platform_target import PciContext
from iovirt.conformance.registry import NotApplicable, check, expect
from iovirt.conformance.target import Capabilities
from iovirt.pci.regs import PCI_DEVICE_ID, PCI_REVISION_ID, PCI_SUBSYSTEM_ID
from iovirt.platform.virtio_driver import VirtioPciDriver
from iovirt.sriov.driver import EnumeratedVf
from iovirt.sriov.machine import SriovNetMachine, bring_up_owner
from iovirt.sriov.regs import PCI_SRIOV_BAR
from iovirt.virtio.admin.defs import (
    ADMIN_CMD_RESULT_HDR_SIZE,
    LEGACY_NOTIFY_INFO_ENTRIES,
    LEGACY_NOTIFY_INFO_ENTRY,
    LEGACY_OPCODES,
    LEGACY_WR_DATA_OFFSET,
    VIRTIO_ADMIN_CMD_LEGACY_COMMON_CFG_READ as COMMON_READ,
    VIRTIO_ADMIN_CMD_LEGACY_COMMON_CFG_WRITE as COMMON_WRITE,
    VIRTIO_ADMIN_CMD_LEGACY_DEV_CFG_READ as DEV_READ,
    VIRTIO_ADMIN_CMD_LEGACY_DEV_CFG_WRITE as DEV_WRITE,
    VIRTIO_ADMIN_CMD_LEGACY_NOTIFY_INFO as NOTIFY_INFO,
    VIRTIO_ADMIN_CMD_LIST_QUERY as LIST_QUERY,
    VIRTIO_ADMIN_CMD_LIST_USE as LIST_USE,
    VIRTIO_ADMIN_GROUP_TYPE_SRIOV as SRIOV,
    VIRTIO_ADMIN_LEGACY_NOTIFY_INFO_FLAGS_END,
    VIRTIO_ADMIN_LEGACY_NOTIFY_INFO_FLAGS_MEMBER,
    VIRTIO_ADMIN_STATUS_EINVAL as EINVAL,
    VIRTIO_ADMIN_STATUS_OK as OK,
    VIRTIO_ADMIN_STATUS_Q_INVALID_GROUP as Q_GROUP,
    VIRTIO_ADMIN_STATUS_Q_INVALID_MEMBER as Q_MEMBER,
    VIRTIO_ADMIN_STATUS_Q_INVALID_OPCODE as Q_OPCODE,
    opcode_bitmap,
    opcodes_of,
)
from iovirt.virtio.admin.driver import AdminClient, AdminCompletion, admin_cmd
from iovirt.virtio.defs import (
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_ADMIN_VQ,
    VIRTIO_F_SR_IOV,
)
from iovirt.virtio.driver import DriverQueue
from iovirt.virtio.net.defs import NetHdr
from iovirt.virtio.transport.defs import (
    VIRTIO_PCI_COMMON_DF,
    VIRTIO_PCI_COMMON_DFSELECT,
    VIRTIO_PCI_COMMON_STATUS,
    VIRTIO_PCI_MODERN_DEVICE_BASE,
)

NUM_VFS = 2
BAD_GROUP_TYPE = 0x7FFF
BAD_OPCODE = 0x7FFE  # in the range of commands using struct virtio_admin_cmd, and defined by no spec
STATUS_HDR = ADMIN_CMD_RESULT_HDR_SIZE

# The legacy common configuration (4.1.4.10): device features, queue select, queue size, queue notify, status.
L_HOST_FEATURES, L_QUEUE_NUM, L_QUEUE_SEL, L_QUEUE_NOTIFY, L_STATUS = 0, 12, 14, 16, 18
L_COMMON_END = 20  # where the device-specific configuration starts without MSI-X
LEGACY_PAGE = 4096  # 4.1.4.10: queue address is a page frame number; rings aligned to 4096
NET_MAC, NET_STATUS = (0, 6), (6, 2)  # struct virtio_net_config (5.1.4)
LEGACY_HDR_SIZE = 10  # 5.1.6: without VERSION_1 and MRG_RXBUF


def _owner_applies(caps: Capabilities) -> str | None:
    if not caps.has(VIRTIO_F_ADMIN_VQ):
        return "VIRTIO_F_ADMIN_VQ not offered"
    if not caps.has(VIRTIO_F_SR_IOV):
        return "VIRTIO_F_SR_IOV not offered: no SR-IOV group to administer"
    return None


class Owner:
    """The owner brought up with its administration virtqueue; VFs enabled on demand."""

    def __init__(self, ctx: PciContext) -> None:
        if ctx.machine is None:
            raise NotApplicable("the target is not an SR-IOV owner (PlatformTarget(..., owner=True))")
        self.ctx = ctx
        self.machine: SriovNetMachine = ctx.machine
        self.admin = self.bring_up()
        self.vfs: list[EnumeratedVf] = []

    def bring_up(self) -> AdminClient:
        """(Re)initialize the owner: device reset, features, queues, the administration virtqueue, DRIVER_OK."""
        self.admin = bring_up_owner(self.ctx.driver)
        self.machine.pf_driver = self.ctx.driver
        return self.admin

    def enable_vfs(self, num_vfs: int = NUM_VFS) -> list[EnumeratedVf]:
        """``echo N > sriov_numvfs`` (0 disables)."""
        self.vfs = self.machine.sriov_configure(num_vfs)
        return self.vfs

    def cmd(self, opcode: int, member: int = 0, data: bytes = b"", result: int = 0,
            group_type: int = SRIOV) -> AdminCompletion:
        """Send one command with room for ``result`` bytes of result."""
        return self.admin.command(opcode, group_type, member, data, result)

    def supported(self) -> frozenset[int]:
        """VIRTIO_ADMIN_CMD_LIST_QUERY for the SR-IOV group."""
        got = self.cmd(LIST_QUERY, result=8)
        expect(got.status == OK, f"VIRTIO_ADMIN_CMD_LIST_QUERY failed: status {got.status}, qualifier {got.qualifier}")
        return opcodes_of(got.result)

    def use(self, opcodes: frozenset[int] | set[int]) -> None:
        """VIRTIO_ADMIN_CMD_LIST_USE ``opcodes``, which must succeed."""
        got = self.cmd(LIST_USE, data=opcode_bitmap(set(opcodes)))
        expect(got.status == OK, f"VIRTIO_ADMIN_CMD_LIST_USE {sorted(opcodes)} failed: status {got.status}, "
                                 f"qualifier {got.qualifier}")

    def use_legacy(self, *needed: int) -> None:
        """Use every supported command; n/a when the device does not support ``needed``."""
        supported = self.supported()
        missing = set(needed) - supported
        if missing:
            raise NotApplicable(f"the owner does not support admin opcodes {sorted(missing)}")
        self.use(supported)

    def vf_driver(self, member: int) -> VirtioPciDriver:
        """A probed virtio-pci driver on member ``member`` (VF number): its own registers, for comparison."""
        driver = self.machine.vf_driver(self.vfs[member - 1])
        driver.probe()
        return driver


def _einval(got: AdminCompletion, qualifier: int, what: str) -> None:
    expect(got.status != OK, f"{what}: completed with VIRTIO_ADMIN_STATUS_OK")
    expect((got.status, got.qualifier) == (EINVAL, qualifier),
           f"{what}: status {got.status} qualifier {got.qualifier}, expected EINVAL ({EINVAL}) with qualifier {qualifier}")


def _ok(got: AdminCompletion, what: str) -> AdminCompletion:
    expect((got.status, got.qualifier) == (OK, 0),
           f"{what}: status {got.status} qualifier {got.qualifier}, expected VIRTIO_ADMIN_STATUS_OK with qualifier 0")
    return got


def _wr(offset: int, data: bytes) -> bytes:
    """``struct virtio_admin_cmd_legacy_*_wr_data``."""
    return bytes([offset]) + bytes(LEGACY_WR_DATA_OFFSET - 1) + data


def _common_read(owner: Owner, member: int, offset: int, size: int) -> int:
    got = _ok(owner.cmd(COMMON_READ, member, bytes([offset]), size), f"LEGACY_COMMON_CFG_READ {size}@{offset}")
    expect(len(got.result) == size, f"LEGACY_COMMON_CFG_READ {size}@{offset} returned {len(got.result)} bytes")
    return int.from_bytes(got.result, "little")


def _common_write(owner: Owner, member: int, offset: int, size: int, value: int) -> None:
    _ok(owner.cmd(COMMON_WRITE, member, _wr(offset, value.to_bytes(size, "little"))),
        f"LEGACY_COMMON_CFG_WRITE {value:#x} ({size} bytes) at {offset}")


# -- 2.12.1.5: rules for every command ---------------------------------------------------------------
@check(
    "virtio-1.4:2.12.1.5#validate",
    "admin: an invalid group_type fails EINVAL/INVALID_GROUP (before the opcode), an unsupported opcode "
    "EINVAL/INVALID_OPCODE (before the member), a member outside the group EINVAL/INVALID_MEMBER",
    transport=PCI,
    applies=_owner_applies,
)
def validate(ctx: PciContext) -> None:
    owner = Owner(ctx)
    _einval(owner.cmd(LIST_QUERY, result=8, group_type=BAD_GROUP_TYPE), Q_GROUP, "LIST_QUERY for group type 0x7fff")
    _einval(owner.cmd(BAD_OPCODE, 99, group_type=BAD_GROUP_TYPE), Q_GROUP,
            "opcode 0x7ffe for group type 0x7fff (the group type is checked first)")
    _einval(owner.cmd(BAD_OPCODE), Q_OPCODE, "opcode 0x7ffe for the SR-IOV group")
    _einval(owner.cmd(BAD_OPCODE, 99), Q_OPCODE, "opcode 0x7ffe for member 99 (the opcode is checked before the member)")
    owner.use_legacy(COMMON_READ)
    owner.enable_vfs()
    _einval(owner.cmd(COMMON_READ, NUM_VFS + 1, b"\0", 4), Q_MEMBER,
            f"LEGACY_COMMON_CFG_READ for member {NUM_VFS + 1} with NumVFs {NUM_VFS}")


@check(
    "virtio-1.4:2.12.1.5#list-use",
    "admin: after reset only LIST_QUERY and LIST_USE are in use; LIST_USE completes OK and sets the list: a command "
    "in it runs, one outside it fails EINVAL/INVALID_OPCODE; a reset puts the list back",
    transport=PCI,
    applies=_owner_applies,
)
def list_use(ctx: PciContext) -> None:
    owner = Owner(ctx)
    supported = owner.supported()
    if not {COMMON_READ, DEV_READ} <= supported:
        raise NotApplicable("the owner supports no two member commands to tell a list apart")
    owner.enable_vfs()
    _einval(owner.cmd(COMMON_READ, 1, b"\0", 4), Q_OPCODE, "LEGACY_COMMON_CFG_READ before any LIST_USE")
    _ok(owner.cmd(LIST_USE, data=opcode_bitmap({LIST_QUERY, LIST_USE, COMMON_READ})), "LIST_USE {0, 1, 3}")
    _ok(owner.cmd(COMMON_READ, 1, b"\0", 4), "LEGACY_COMMON_CFG_READ after LIST_USE named it")
    _einval(owner.cmd(DEV_READ, 1, b"\0", 1), Q_OPCODE, "LEGACY_DEV_CFG_READ, supported but not in the list used")
    owner.machine.sriov_configure(0)
    owner.bring_up()  # device reset
    owner.enable_vfs()
    _einval(owner.cmd(COMMON_READ, 1, b"\0", 4), Q_OPCODE, "LEGACY_COMMON_CFG_READ after a device reset, before LIST_USE")


@check(
    "virtio-1.4:2.12.1.5#einval-no-side-effects",
    "admin: a command failing with EINVAL changes nothing: a rejected LIST_USE leaves the list in use, a rejected "
    "legacy write leaves the member's registers, the owner enters no error state",
    transport=PCI,
    applies=_owner_applies,
)
def einval_no_side_effects(ctx: PciContext) -> None:
    owner = Owner(ctx)
    supported = owner.supported()
    if not {COMMON_READ, COMMON_WRITE} <= supported:
        raise NotApplicable("the owner does not support the legacy common configuration commands")
    unsupported = min(set(range(64)) - supported, default=None)  # within the first word: never beyond what is read
    if unsupported is None:
        raise NotApplicable("the owner supports every opcode below 64: no LIST_USE it must reject")
    owner.enable_vfs()
    owner.use({LIST_QUERY, LIST_USE, COMMON_READ, COMMON_WRITE})
    got = owner.cmd(LIST_USE, data=opcode_bitmap({LIST_QUERY, LIST_USE, unsupported}))
    expect(got.status == EINVAL, f"LIST_USE naming unsupported opcode {unsupported:#x}: status {got.status}, expected EINVAL")
    _ok(owner.cmd(COMMON_READ, 1, b"\0", 4), "LEGACY_COMMON_CFG_READ (in the list) after a LIST_USE that failed")
    before = _common_read(owner, 1, L_QUEUE_SEL, 2)
    # A write that straddles queue select and queue notify: not a single field, must fail and write nothing.
    got = owner.cmd(COMMON_WRITE, 1, _wr(L_QUEUE_SEL, (0x0101_0101).to_bytes(4, "little")))
    expect(got.status == EINVAL, f"LEGACY_COMMON_CFG_WRITE across two fields: status {got.status}, expected EINVAL")
    expect(_common_read(owner, 1, L_QUEUE_SEL, 2) == before,
           "a LEGACY_COMMON_CFG_WRITE that failed with EINVAL changed queue select")
    expect(not ctx.driver.status & VIRTIO_CONFIG_S_NEEDS_RESET, "the owner set DEVICE_NEEDS_RESET after EINVAL commands")
    _ok(owner.cmd(LIST_QUERY, result=8), "LIST_QUERY after the failed commands")


@check(
    "virtio-1.4:2.12.1.5#list-stable",
    "admin: the commands LIST_QUERY reports never shrink (VFs enabled or not, across a device reset), and after a "
    "reset the same LIST_USE completes OK again",
    transport=PCI,
    applies=_owner_applies,
)
def list_stable(ctx: PciContext) -> None:
    owner = Owner(ctx)
    first = owner.supported()
    owner.use(first)
    owner.enable_vfs()
    expect(owner.supported() >= first, "LIST_QUERY lost commands once VFs were enabled")
    owner.machine.sriov_configure(0)
    for round_ in (1, 2):
        owner.bring_up()  # device reset
        now = owner.supported()
        expect(now >= first, f"after device reset {round_} LIST_QUERY no longer reports {sorted(first - now)}")
        got = owner.cmd(LIST_USE, data=opcode_bitmap(set(first)))
        expect(got.status == OK, f"after device reset {round_} the LIST_USE that had succeeded fails: "
                                 f"status {got.status}, qualifier {got.qualifier}")


@check(
    "virtio-1.4:2.12.1.5#sriov-members",
    "admin, SR-IOV group: with VF Enable clear member commands fail EINVAL/INVALID_GROUP; with it set members 1 to "
    "NumVFs are valid and 0 or NumVFs+1 fail EINVAL/INVALID_MEMBER",
    transport=PCI,
    applies=_owner_applies,
)
def sriov_members(ctx: PciContext) -> None:
    owner = Owner(ctx)
    owner.use_legacy(COMMON_READ)
    _einval(owner.cmd(COMMON_READ, 1, b"\0", 4), Q_GROUP, "LEGACY_COMMON_CFG_READ for member 1 with VF Enable clear")
    owner.enable_vfs()
    for member in range(1, NUM_VFS + 1):
        _ok(owner.cmd(COMMON_READ, member, b"\0", 4), f"LEGACY_COMMON_CFG_READ for member {member} of {NUM_VFS}")
    for member in (0, NUM_VFS + 1):
        _einval(owner.cmd(COMMON_READ, member, b"\0", 4), Q_MEMBER,
                f"LEGACY_COMMON_CFG_READ for member {member} with NumVFs {NUM_VFS}")
    owner.machine.sriov_configure(0)
    _einval(owner.cmd(COMMON_READ, 1, b"\0", 4), Q_GROUP, "LEGACY_COMMON_CFG_READ for member 1 after VF Enable cleared")


# -- 2.13.1: the administration virtqueue ---------------------------------------------------------------
@check(
    "virtio-1.4:2.13.1#buffers",
    "admin queue: short readable parts read as zero, long ones are ignored; the result is cut to a short writable "
    "buffer and nothing is written past it; the used length is what was written; status, status_qualifier and "
    "reserved2 are initialized; no command fails for its buffer sizes",
    transport=PCI,
    applies=_owner_applies,
)
def buffers(ctx: PciContext) -> None:
    owner = Owner(ctx)
    expected = owner.supported()
    memory, alloc = ctx.driver.memory, ctx.platform.dma_alloc
    queue: DriverQueue = owner.admin.queue
    short_cmd = admin_cmd(LIST_QUERY, SRIOV)[:4]  # opcode and group_type only
    cases = (("a 4-byte readable part", short_cmd, STATUS_HDR + 8),
             ("a readable part with 100 extra bytes", admin_cmd(LIST_QUERY, SRIOV) + b"\xa5" * 100, STATUS_HDR + 8),
             ("a 12-byte writable part", admin_cmd(LIST_QUERY, SRIOV), STATUS_HDR + 4),
             ("a 64-byte writable part", admin_cmd(LIST_QUERY, SRIOV), 64))
    guard = b"\x5a" * 16
    for what, readable, room in cases:
        rd = alloc.alloc(len(readable))
        memory.write(rd, readable)
        wr = alloc.alloc(room + len(guard))
        memory.write(wr, b"\xff" * room + guard)  # status and the rest pre-set to what the device must overwrite
        queue.add_chain([(rd, len(readable))], [(wr, room)])
        queue.publish()
        owner.admin.notify()
        used = queue.get_used()
        expect(len(used) == 1, f"LIST_QUERY with {what}: {len(used)} used entries")
        written = memory.read(wr, room)
        expect(memory.read(wr + room, len(guard)) == guard, f"LIST_QUERY with {what}: the device wrote past the buffer")
        expect(written[:4] == bytes(4), f"LIST_QUERY with {what}: status/status_qualifier {written[:4].hex()}, "
                                        "expected OK (0) and 0: a command must not fail for its buffer sizes")
        want = min(room, STATUS_HDR + 8)
        expect(used[0].len == want, f"LIST_QUERY with {what}: used length {used[0].len}, expected {want} "
                                    "(the result structure cut to the buffer)")
        expect(written[4:min(room, STATUS_HDR)] == bytes(min(room, STATUS_HDR) - 4),
               f"LIST_QUERY with {what}: reserved2 not initialized to zero ({written[4:STATUS_HDR].hex()})")
        full = opcode_bitmap(set(expected))[:8]
        expect(written[STATUS_HDR:want] == full[:want - STATUS_HDR],
               f"LIST_QUERY with {what}: result {written[STATUS_HDR:want].hex()}, expected {full[:want - STATUS_HDR].hex()}")


@check(
    "virtio-1.4:2.13.1#order",
    "admin queue: commands queued together are processed in queue order",
    transport=PCI,
    applies=_owner_applies,
)
def order(ctx: PciContext) -> None:
    owner = Owner(ctx)
    owner.use_legacy(COMMON_READ, COMMON_WRITE)
    owner.enable_vfs()

    def write(value: int) -> tuple[bytes, int]:
        return admin_cmd(COMMON_WRITE, SRIOV, 1, _wr(L_QUEUE_SEL, value.to_bytes(2, "little"))), STATUS_HDR

    read = (admin_cmd(COMMON_READ, SRIOV, 1, bytes([L_QUEUE_SEL])), STATUS_HDR + 2)
    heads_before = owner.admin.queue.avail_idx
    done = owner.admin.submit([write(1), read, write(0), read, write(2), read])
    expect(owner.admin.queue.avail_idx - heads_before == 6, "not every command was queued")
    expect([c.status for c in done] == [OK] * 6, f"statuses {[c.status for c in done]}")
    seen = [int.from_bytes(c.result, "little") for c in done[1::2]]
    expect(seen == [1, 0, 2], f"queue select read back {seen} between writes of 1, 0, 2: commands ran out of order")


# -- 2.12.1.1: the legacy interface -------------------------------------------------------------------------
@check(
    "virtio-1.4:2.12.1.1.6#all-or-none",
    "admin, legacy: LIST_QUERY reports all four legacy configuration commands or none, and all four with "
    "LEGACY_NOTIFY_INFO",
    transport=PCI,
    applies=_owner_applies,
)
def all_or_none(ctx: PciContext) -> None:
    supported = Owner(ctx).supported()
    legacy = supported & LEGACY_OPCODES
    expect(legacy in (frozenset(), LEGACY_OPCODES), f"LIST_QUERY reports legacy opcodes {sorted(legacy)} of "
                                                   f"{sorted(LEGACY_OPCODES)}: all or none")
    if NOTIFY_INFO in supported:
        expect(legacy == LEGACY_OPCODES, "LEGACY_NOTIFY_INFO is supported without all four legacy configuration commands")


@check(
    "virtio-1.4:2.12.1.1.6#offsets",
    "admin, legacy: an access that is not within a single field, or not within the common (resp. device-specific) "
    "configuration, fails",
    transport=PCI,
    applies=_owner_applies,
)
def offsets(ctx: PciContext) -> None:
    owner = Owner(ctx)
    owner.use_legacy(*LEGACY_OPCODES)
    owner.enable_vfs()
    bad = (
        (COMMON_READ, bytes([2]), 4, "a common read across device and driver features"),
        (COMMON_READ, bytes([L_QUEUE_NUM]), 4, "a common read across queue size and queue select"),
        (COMMON_READ, bytes([L_COMMON_END]), 2, "a common read past the common part (MSI-X is off)"),
        (COMMON_WRITE, _wr(L_QUEUE_NOTIFY, bytes(4)), 0, "a common write across queue notify and status"),
        (DEV_READ, bytes([4]), 4, "a device read across mac and status"),
        (DEV_READ, bytes([len(ctx.device.config_space())]), 1, "a device read past the device configuration"),
        (DEV_WRITE, _wr(4, bytes(4)), 0, "a device write across mac and status"),
    )
    for opcode, data, result, what in bad:
        got = owner.cmd(opcode, 1, data, result)
        expect(got.status != OK, f"{what}: completed OK, expected a failure")
    _ok(owner.cmd(COMMON_READ, 1, bytes([L_HOST_FEATURES + 1]), 2), "a common read of 2 bytes within device features")
    _ok(owner.cmd(DEV_READ, 1, bytes([2]), 1), "a device read of one byte of mac")


@check(
    "virtio-1.4:2.12.1.1.6#common-cfg",
    "admin, legacy: LEGACY_COMMON_CFG_READ/WRITE act on the member's registers as its legacy interface would, "
    "little-endian: device features match the member's, queue select round-trips, device status is the member's",
    transport=PCI,
    applies=_owner_applies,
)
def common_cfg(ctx: PciContext) -> None:
    owner = Owner(ctx)
    owner.use_legacy(COMMON_READ, COMMON_WRITE)
    owner.enable_vfs()
    member = owner.vf_driver(1)
    member.common_write(VIRTIO_PCI_COMMON_DFSELECT, 4, 0)
    modern = member.common_read(VIRTIO_PCI_COMMON_DF, 4)
    legacy = _common_read(owner, 1, L_HOST_FEATURES, 4)
    expect(legacy == modern, f"legacy device features {legacy:#010x}, the member's device_feature word 0 is {modern:#010x}")
    _common_write(owner, 1, L_QUEUE_SEL, 2, 0x0102)
    sel = _common_read(owner, 1, L_QUEUE_SEL, 2)
    expect(sel == 0x0102, f"queue select written 0x0102 (bytes 02 01) reads back {sel:#06x}")
    expect(_common_read(owner, 1, L_QUEUE_NUM, 2) == 0, "queue size of queue 0x102, which does not exist, is not 0")
    _common_write(owner, 1, L_QUEUE_SEL, 2, 0)
    expect(_common_read(owner, 1, L_QUEUE_NUM, 2) > 0, "queue size of queue 0 reads 0")
    _common_write(owner, 1, L_STATUS, 1, VIRTIO_CONFIG_S_ACKNOWLEDGE)
    status = member.common_read(VIRTIO_PCI_COMMON_STATUS, 1)
    expect(status == VIRTIO_CONFIG_S_ACKNOWLEDGE, f"legacy status write ACKNOWLEDGE: the member's device_status is {status:#x}")
    expect(_common_read(owner, 1, L_STATUS, 1) == VIRTIO_CONFIG_S_ACKNOWLEDGE, "legacy status does not read back")
    other = owner.vf_driver(2).common_read(VIRTIO_PCI_COMMON_STATUS, 1)
    expect(other == 0, f"a command for member 1 changed member 2's device_status to {other:#x}")
    _common_write(owner, 1, L_STATUS, 1, 0)
    expect(member.common_read(VIRTIO_PCI_COMMON_STATUS, 1) == 0, "legacy status write 0 did not reset the member")


class _LegacyRingAlloc:
    """Gives a DriverQueue the legacy ring layout (desc, avail, used at 4096 alignment) at ``base``, then buffers."""

    def __init__(self, base: int, size: int, fallback: Callable[[int, int], int]) -> None:
        avail = base + 16 * size
        used = (avail + 6 + 2 * size + LEGACY_PAGE - 1) & ~(LEGACY_PAGE - 1)
        self.rings = [base, avail, used]
        self.fallback = fallback

    def alloc(self, n: int, align: int = 16) -> int:
        return self.rings.pop(0) if self.rings else self.fallback(n, align)


def _legacy_tx_queue(ctx: PciContext, owner: Owner, member: int) -> DriverQueue:
    """A legacy driver's bring-up of the member's transmitq1 through the owner: status, features, PFN, DRIVER_OK."""
    if ctx.target.device != "net":
        raise NotApplicable("the legacy data path is checked with a net member")
    _common_write(owner, member, L_STATUS, 1, VIRTIO_CONFIG_S_ACKNOWLEDGE)
    _common_write(owner, member, L_STATUS, 1, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER)
    _common_write(owner, member, 4, 4, 0)  # driver features: none (so the 10-byte header, 5.1.6)
    _common_write(owner, member, L_QUEUE_SEL, 2, 1)
    size = _common_read(owner, member, L_QUEUE_NUM, 2)
    expect(size > 0 and not size & (size - 1), f"legacy queue size of transmitq1 is {size}")
    alloc = ctx.platform.dma_alloc
    base = alloc.alloc(3 * LEGACY_PAGE + 16 * size, LEGACY_PAGE)
    queue = DriverQueue(ctx.driver.memory, _LegacyRingAlloc(base, size, alloc.alloc), size, index=1)  # type: ignore[arg-type]
    _common_write(owner, member, 8, 4, base // LEGACY_PAGE)
    _common_write(owner, member, L_STATUS, 1, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_DRIVER_OK)
    return queue


def _send(queue: DriverQueue, notify: Callable[[], None], what: str) -> None:
    frame = b"\xff" * 6 + bytes.fromhex("525400000001") + b"\x88\xb5" + what.encode().ljust(46, b"\0")
    queue.add_data([NetHdr().pack(LEGACY_HDR_SIZE) + frame], ())
    queue.publish()
    notify()
    used = queue.get_used()
    expect(len(used) == 1, f"a frame made available on the member's legacy transmitq1 was not used after {what}")


@check(
    "virtio-1.4:2.12.1.1.6#legacy-driver",
    "admin, legacy: a legacy driver brings a member up through LEGACY_COMMON_CFG_WRITE (status, features, queue "
    "PFN with the legacy ring layout, DRIVER_OK) and the member transmits on a Queue Notify write",
    transport=PCI,
    applies=_owner_applies,
)
def legacy_driver(ctx: PciContext) -> None:
    owner = Owner(ctx)
    owner.use_legacy(COMMON_READ, COMMON_WRITE)
    owner.enable_vfs()
    queue = _legacy_tx_queue(ctx, owner, 1)
    expect(_common_read(owner, 1, 8, 4) == queue.desc_addr // LEGACY_PAGE, "queue address does not read back")
    _send(queue, lambda: _common_write(owner, 1, L_QUEUE_NOTIFY, 2, 1), "a LEGACY_COMMON_CFG_WRITE of Queue Notify")


@check(
    "virtio-1.4:2.12.1.1.6#notify-info",
    "admin, legacy: LEGACY_NOTIFY_INFO ends its entries with flags 0; valid entries name a BAR that is not "
    "hardwired to zero and a 2-byte aligned offset in it; a notification there acts as a Queue Notify write",
    transport=PCI,
    applies=_owner_applies,
)
def notify_info(ctx: PciContext) -> None:
    owner = Owner(ctx)
    owner.use_legacy(NOTIFY_INFO, COMMON_READ, COMMON_WRITE)
    vfs = owner.enable_vfs()
    got = _ok(owner.cmd(NOTIFY_INFO, 1, result=16 * LEGACY_NOTIFY_INFO_ENTRIES), "LEGACY_NOTIFY_INFO for member 1")
    expect(len(got.result) == 16 * LEGACY_NOTIFY_INFO_ENTRIES, f"LEGACY_NOTIFY_INFO returned {len(got.result)} bytes")
    entries = [LEGACY_NOTIFY_INFO_ENTRY.unpack_from(got.result, 16 * i) for i in range(LEGACY_NOTIFY_INFO_ENTRIES)]
    expect(entries[-1][0] == VIRTIO_ADMIN_LEGACY_NOTIFY_INFO_FLAGS_END,
           f"the last LEGACY_NOTIFY_INFO entry has flags {entries[-1][0]:#x}, expected 0")
    valid = []
    for flags, bar, offset in entries:
        if flags == VIRTIO_ADMIN_LEGACY_NOTIFY_INFO_FLAGS_END:
            break
        expect(flags in (1, 2), f"LEGACY_NOTIFY_INFO entry flags {flags:#x} is reserved")
        expect(offset % 2 == 0, f"LEGACY_NOTIFY_INFO entry offset {offset:#x} is not 2-byte aligned")
        if flags == VIRTIO_ADMIN_LEGACY_NOTIFY_INFO_FLAGS_MEMBER:
            resource = vfs[0].bars.get(bar)
            expect(resource is not None and resource.size > 0, f"LEGACY_NOTIFY_INFO names VF BAR{bar}, hardwired to zero")
            assert resource is not None
            expect(offset + 2 <= resource.size, f"LEGACY_NOTIFY_INFO offset {offset:#x} is outside VF BAR{bar}")
            valid.append(resource.address + offset)
        else:
            valid.append(ctx.driver.bar_address.get(bar, 0) + offset)
            expect(ctx.driver.bar_address.get(bar, 0) != 0, f"LEGACY_NOTIFY_INFO names owner BAR{bar}, not assigned")
    expect(valid, "LEGACY_NOTIFY_INFO has no valid entry")
    queue = _legacy_tx_queue(ctx, owner, 1)
    _send(queue, lambda: ctx.platform.host.mmio_write(valid[0], 2, 1), "a write of 1 to the LEGACY_NOTIFY_INFO address")


@check(
    "virtio-1.4:2.12.1.1.6#dev-cfg",
    "admin, legacy: LEGACY_DEV_CFG_READ returns the member's device configuration (little-endian, byte by byte "
    "too); LEGACY_DEV_CFG_WRITE of the net mac (driver-writable in legacy) changes it",
    transport=PCI,
    applies=_owner_applies,
)
def dev_cfg(ctx: PciContext) -> None:
    owner = Owner(ctx)
    owner.use_legacy(DEV_READ, DEV_WRITE)
    owner.enable_vfs()
    member = owner.vf_driver(2)
    modern = member.read_device_config(0, NET_MAC[1] + NET_STATUS[1])
    got = _ok(owner.cmd(DEV_READ, 2, bytes([NET_MAC[0]]), NET_MAC[1]), "LEGACY_DEV_CFG_READ of mac")
    expect(got.result == modern[:6], f"legacy mac {got.result.hex(':')}, the member's is {modern[:6].hex(':')}")
    bytewise = b"".join(_ok(owner.cmd(DEV_READ, 2, bytes([i]), 1), f"LEGACY_DEV_CFG_READ of mac byte {i}").result
                        for i in range(6))
    expect(bytewise == modern[:6], f"mac read byte by byte {bytewise.hex(':')}, the member's is {modern[:6].hex(':')}")
    got = _ok(owner.cmd(DEV_READ, 2, bytes([NET_STATUS[0]]), NET_STATUS[1]), "LEGACY_DEV_CFG_READ of status")
    expect(got.result == modern[6:8], f"legacy net status {got.result.hex()}, the member's is {modern[6:8].hex()}")
    new_mac = bytes.fromhex("02a1b2c3d4e5")
    _ok(owner.cmd(DEV_WRITE, 2, _wr(NET_MAC[0], new_mac)), "LEGACY_DEV_CFG_WRITE of mac")
    got = _ok(owner.cmd(DEV_READ, 2, bytes([NET_MAC[0]]), NET_MAC[1]), "LEGACY_DEV_CFG_READ of mac after the write")
    expect(got.result == new_mac, f"mac after LEGACY_DEV_CFG_WRITE {new_mac.hex(':')} reads {got.result.hex(':')}")
    expect(member.read_device_config(0, 6) == new_mac, "the member's own device configuration does not show the new mac")


@check(
    "virtio-1.4:2.12.1.1.6#ids",
    "admin, legacy: with the legacy commands the owner hardwires VF BAR0 to zero, owner and members have "
    "Revision ID >= 1 and Subsystem ID >= 0x40, and the owner the non-transitional Device ID",
    transport=PCI,
    applies=_owner_applies,
)
def ids(ctx: PciContext) -> None:
    owner = Owner(ctx)
    if not LEGACY_OPCODES | {NOTIFY_INFO} <= owner.supported():
        raise NotApplicable("the owner does not support the legacy interface commands")
    iov = owner.machine.iov
    bar0 = iov.pos + PCI_SRIOV_BAR
    old = iov.cfg.read(bar0, 4)
    iov.cfg.write(bar0, 4, 0xFFFFFFFF)
    sized = iov.cfg.read(bar0, 4)
    iov.cfg.write(bar0, 4, old)
    expect(sized == 0, f"VF BAR0 reads {sized:#010x} after writing all ones: not hardwired to zero")
    owner.enable_vfs()
    pf = ctx.driver.cfg
    for name, cfg in (("owner", pf), ("member 1", owner.vf_driver(1).cfg)):
        revision, subsystem = cfg.read(PCI_REVISION_ID, 1), cfg.read(PCI_SUBSYSTEM_ID, 2)
        expect(revision >= 1, f"{name}: Revision ID {revision} (non-transitional devices: >= 1)")
        expect(subsystem >= 0x40, f"{name}: Subsystem ID {subsystem:#x} (non-transitional devices: >= 0x40)")
    device_id = pf.read(PCI_DEVICE_ID, 2)
    expect(device_id >= VIRTIO_PCI_MODERN_DEVICE_BASE, f"owner Device ID {device_id:#x} is a transitional one")
