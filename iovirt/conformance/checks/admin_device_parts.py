"""Device parts commands of an SR-IOV owner (virtio 1.4 2.12.1.4, 2.14): stop, get, set and resume a member.

These run against ``PlatformTarget("net", owner=True)`` as
:mod:`iovirt.conformance.checks.admin_vq` does: the owner is brought up with
its administration virtqueue, VFs are enabled, every supported command is put
in use.  A member is brought up by its own virtio-pci driver (as a guest's
would be) and moves frames with the other member through the owner's switch;
the owner's driver then stops it, reads its parts and writes them as a
hypervisor migrating the VF does (Linux's vfio virtio driver), and the checks
compare what the member's own registers, rings and interrupts show.

A member's traffic is observed in guest memory: the used index of a ring says
whether the device touched it.  One environment event is used besides the
driver's: ``config_changed`` on the member (what a link change does), to see
whether a stopped member sends a configuration change notification.

Clause ids cite virtio 1.4 (``virtio-1.4:2.12.1.4.4.1#...``, the device
requirements of "Device parts").
"""

from __future__ import annotations

from iovirt.conformance.checks.admin_vq import NUM_VFS, Owner, _owner_applies
from iovirt.conformance.checks.pci import PCI
from iovirt.conformance.platform_target import PciContext
from iovirt.conformance.registry import CheckFailed, NotApplicable, check, expect
from iovirt.pci.capability import walk_capabilities
from iovirt.pci.pcie import PCI_EXP_DEVCAP, PCI_EXP_DEVCAP_FLR, PCI_EXP_DEVCTL
from iovirt.pci.regs import (
    PCI_CAP_ID_EXP,
    PCI_CAP_ID_PM,
    PCI_COMMAND,
    PCI_COMMAND_INTX_DISABLE,
    PCI_PM_CTRL,
    PCI_PM_CTRL_PME_STATUS,
)
from iovirt.platform.config_access import EcamConfig
from iovirt.platform.net import VirtioNetDriver
from iovirt.platform.virtio_driver import VirtioPciDriver
from iovirt.virtio.admin.defs import (
    VIRTIO_ADMIN_CMD_DEV_MODE_SET as MODE_SET,
    VIRTIO_ADMIN_CMD_DEV_PARTS_GET as PARTS_GET,
    VIRTIO_ADMIN_CMD_DEV_PARTS_METADATA_GET as METADATA_GET,
    VIRTIO_ADMIN_CMD_DEV_PARTS_SET as PARTS_SET,
    VIRTIO_ADMIN_CMD_RESOURCE_OBJ_CREATE as OBJ_CREATE,
    VIRTIO_ADMIN_CMD_RESOURCE_OBJ_DESTROY as OBJ_DESTROY,
    VIRTIO_ADMIN_CMD_RESOURCE_OBJ_MODIFY as OBJ_MODIFY,
    VIRTIO_ADMIN_CMD_RESOURCE_OBJ_QUERY as OBJ_QUERY,
    VIRTIO_ADMIN_STATUS_OK as OK,
)
from iovirt.virtio.admin.device_parts import (
    DEV_PART_HDR_SIZE,
    DEV_PARTS_OPCODES,
    METADATA_RESULT,
    RESOURCE_OBJ_DEV_PARTS,
    RESOURCE_OBJ_FLAGS,
    VIRTIO_ADMIN_CMD_DEV_PARTS_METADATA_TYPE_COUNT as META_COUNT,
    VIRTIO_ADMIN_CMD_DEV_PARTS_METADATA_TYPE_LIST as META_LIST,
    VIRTIO_DEV_PART_DEV_FEATURES as DEV_FEATURES,
    VIRTIO_DEV_PART_DEVICE_STATUS as DEVICE_STATUS,
    VIRTIO_DEV_PART_DRV_FEATURES as DRV_FEATURES,
    VIRTIO_DEV_PART_F_OPTIONAL,
    VIRTIO_DEV_PART_PCI_COMMON_CFG as COMMON_CFG,
    VIRTIO_DEV_PART_VQ_CFG as VQ_CFG_PART,
    VIRTIO_DEV_PART_VQ_NOTIFY_CFG as VQ_NOTIFY_PART,
    VIRTIO_RESOURCE_OBJ_DEV_PARTS_TYPE_GET as GET,
    VIRTIO_RESOURCE_OBJ_DEV_PARTS_TYPE_SET as SET,
    VQ_CFG,
    VQ_NOTIFY_CFG,
    DevicePart,
    PartsError,
    offset_selector,
    unpack_headers,
    unpack_parts,
    vq_selector,
)
from iovirt.virtio.admin.driver import AdminCompletion
from iovirt.virtio.admin.parts_driver import DevicePartsClient, obj_hdr
from iovirt.virtio.defs import VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_NEEDS_RESET
from iovirt.virtio.transport.pci import VirtioPciFunction
from iovirt.virtio.transport.defs import (
    VIRTIO_MSI_NO_VECTOR,
    VIRTIO_PCI_COMMON_NUMQ,
    VIRTIO_PCI_COMMON_Q_NOFF,
    VIRTIO_PCI_COMMON_Q_SELECT,
    VIRTIO_PCI_COMMON_STATUS,
)

ROOM = 4096
"""Result room for a DEV_PARTS_GET when the size is not asked first."""
TABLE_ORDER = (DEV_FEATURES, DRV_FEATURES, COMMON_CFG, DEVICE_STATUS, VQ_CFG_PART, VQ_NOTIFY_PART)
"""2.12.1.4.4 "Device parts order"; device-type parts (0x200-0x5FF) come in no row of it."""
COMMON_FIELDS = ((0x00, 4), (0x04, 4), (0x08, 4), (0x0C, 4), (0x10, 2), (0x12, 2), (0x14, 1), (0x15, 1), (0x16, 2),
                 (0x18, 2), (0x1A, 2), (0x1C, 2), (0x1E, 2), (0x20, 4), (0x24, 4), (0x28, 4), (0x2C, 4), (0x30, 4),
                 (0x34, 4))
"""``struct virtio_pci_common_cfg`` through ``queue_device``, field by field (4.1.4.3)."""
PCI_EXP_DEVCTL_BCR_FLR = 0x8000
"""Device Control bit 15, Initiate Function Level Reset (PCIe 6.6.2)."""
OPCODE_NAMES = {OBJ_CREATE: "RESOURCE_OBJ_CREATE", OBJ_MODIFY: "RESOURCE_OBJ_MODIFY", OBJ_QUERY: "RESOURCE_OBJ_QUERY",
                OBJ_DESTROY: "RESOURCE_OBJ_DESTROY", METADATA_GET: "DEV_PARTS_METADATA_GET", PARTS_GET: "DEV_PARTS_GET",
                PARTS_SET: "DEV_PARTS_SET", MODE_SET: "DEV_MODE_SET"}


def _frame(dst: bytes, src: bytes, payload: bytes) -> bytes:
    return dst + src + b"\x08\x00" + payload.ljust(46, b"\0")


def _rank(part_type: int) -> int:
    return TABLE_ORDER.index(part_type) if part_type in TABLE_ORDER else len(TABLE_ORDER)


def _ok(got: AdminCompletion, what: str) -> AdminCompletion:
    expect((got.status, got.qualifier) == (OK, 0),
           f"{what}: status {got.status} qualifier {got.qualifier}, expected VIRTIO_ADMIN_STATUS_OK")
    return got


def _fails(got: AdminCompletion, what: str) -> None:
    expect(got.status != OK, f"{what}: completed with VIRTIO_ADMIN_STATUS_OK, expected an error status")


class Member:
    """A member brought up by its own driver: a virtio-net NIC with receive buffers posted."""

    def __init__(self, owner: Owner, member: int) -> None:
        self.member = member
        self.driver: VirtioPciDriver = owner.machine.vf_driver(owner.vfs[member - 1])
        self.driver.bring_up()
        self.nic = VirtioNetDriver(self.driver)
        self.nic.post_rx(8)
        self.mac = self.driver.read_device_config(0, 6)

    def used_idx(self, index: int) -> int:
        """``idx`` of queue ``index``'s used ring, as the device last wrote it."""
        queue = self.driver.queues[index]
        return self.driver.memory.read_u16(queue.used_addr + 2)

    def interrupts(self) -> int:
        """MSI-X interrupts the member's driver handled."""
        return sum(self.driver.interrupts.values())


class Parts:
    """The owner with the device parts commands in use and VFs enabled."""

    def __init__(self, ctx: PciContext) -> None:
        self.ctx = ctx
        self.owner = Owner(ctx)
        supported = self.owner.supported()
        if not supported & DEV_PARTS_OPCODES:
            raise NotApplicable("the owner supports no device parts command")
        self.supported = supported
        self.owner.use(supported)
        self.owner.enable_vfs()
        self.client = DevicePartsClient(self.owner.admin)
        self._next_id = 0

    def require(self) -> None:
        """n/a unless every device parts command is supported (their checks need them all)."""
        missing = DEV_PARTS_OPCODES - self.supported
        if missing:
            raise NotApplicable(f"the owner lacks device parts commands {sorted(missing)}")

    def up(self, member: int) -> Member:
        """Bring member ``member`` up with its own driver."""
        return Member(self.owner, member)

    def obj(self, member: int, parts_type: int) -> int:
        """Create a device parts object for ``member``; its id."""
        obj_id = self._next_id
        self._next_id += 1
        _ok(self.client.create(member, obj_id, parts_type),
            f"RESOURCE_OBJ_CREATE of a device parts {'GET' if parts_type == GET else 'SET'} object {obj_id}")
        return obj_id

    def mode(self, member: int, flags: int) -> None:
        """DEV_MODE_SET, which must succeed."""
        _ok(self.client.mode(member, flags), f"DEV_MODE_SET flags {flags} on member {member}")

    def get(self, member: int, obj_id: int, selected: list[DevicePart] | None = None,
            room: int | None = None) -> list[DevicePart]:
        """DEV_PARTS_GET (all, or ``selected``) with ``room`` (default: the parts size), which must succeed and parse."""
        if room is None:
            room = self.client.parts_size(member, obj_id)
            expect(room is not None, "DEV_PARTS_METADATA_GET of the parts size failed")
        got = _ok(self.client.get(member, obj_id, room or ROOM, selected), f"DEV_PARTS_GET of member {member}")
        try:
            return unpack_parts(got.result)
        except PartsError as exc:
            raise CheckFailed(f"DEV_PARTS_GET returned malformed parts: {exc}") from exc

    def set(self, member: int, obj_id: int, parts: list[DevicePart]) -> AdminCompletion:
        """DEV_PARTS_SET (any outcome)."""
        return self.client.set(member, obj_id, parts)

    @staticmethod
    def pci_cap(member: Member, cap_id: int) -> int | None:
        """Offset of capability ``cap_id`` in the member's config space, if it has one."""
        for found, offset in walk_capabilities(member.driver.cfg.read):
            if found == cap_id:
                return offset
        return None


def _one(parts: list[DevicePart], part_type: int, selector: bytes | None = None) -> DevicePart:
    found = [p for p in parts if p.part_type == part_type and (selector is None or p.selector == selector)]
    expect(len(found) == 1, f"{len(found)} parts of type {part_type:#x} where one was expected")
    return found[0]


def _in_table_order(parts: list[DevicePart], what: str) -> None:
    ranks = [_rank(p.part_type) for p in parts]
    expect(ranks == sorted(ranks), f"{what}: parts {[hex(p.part_type) for p in parts]} are not in the order of "
                                   "the device parts order table")


def _preceded(parts: list[DevicePart], what: str) -> None:
    types = [p.part_type for p in parts]
    for part_type, before in ((DRV_FEATURES, (DEV_FEATURES,)), (COMMON_CFG, (DEV_FEATURES, DRV_FEATURES))):
        if part_type in types:
            first = types.index(part_type)
            for needed in before:
                expect(needed in types[:first], f"{what}: part {part_type:#x} is not preceded by {needed:#x}")


# -- all or none ------------------------------------------------------------------------------------------
@check(
    "virtio-1.4:2.12.1.4.4.1#all-or-none",
    "device parts: LIST_QUERY reports all of RESOURCE_OBJ_CREATE/MODIFY/QUERY/DESTROY, DEV_PARTS_METADATA_GET, "
    "DEV_PARTS_GET, DEV_PARTS_SET and DEV_MODE_SET or none, and each works on a device parts object",
    transport=PCI,
    applies=_owner_applies,
)
def all_or_none(ctx: PciContext) -> None:
    parts = Parts(ctx)
    missing = DEV_PARTS_OPCODES - parts.supported
    expect(not missing, f"the owner supports some device parts commands but not {[OPCODE_NAMES[o] for o in sorted(missing)]}")
    client = parts.client
    get_id, set_id = parts.obj(1, GET), parts.obj(1, SET)
    got = _ok(client.query(1, get_id), "RESOURCE_OBJ_QUERY of the GET object")
    expect(got.result[:1] == bytes([GET]), f"RESOURCE_OBJ_QUERY: type {got.result[:1].hex()}, created as GET (0)")
    _ok(client.send(OBJ_MODIFY, 1, obj_hdr(get_id) + RESOURCE_OBJ_FLAGS.pack(0) + RESOURCE_OBJ_DEV_PARTS.pack(GET)),
        "RESOURCE_OBJ_MODIFY of the GET object (to GET)")
    _ok(client.metadata(1, get_id, META_COUNT), "DEV_PARTS_METADATA_GET COUNT")
    parts.get(1, get_id)
    parts.mode(1, 1)
    _ok(parts.set(1, set_id, []), "DEV_PARTS_SET of no part on the stopped member")
    parts.mode(1, 0)
    _ok(client.destroy(1, get_id), "RESOURCE_OBJ_DESTROY of the GET object")
    _ok(client.destroy(1, set_id), "RESOURCE_OBJ_DESTROY of the SET object")


# -- get ---------------------------------------------------------------------------------------------------
@check(
    "virtio-1.4:2.12.1.4.4.1#get",
    "device parts: DEV_PARTS_GET can be repeated and answers the same; its parts (all, or selected in reverse order) "
    "and the metadata list come in the order of the device parts order table",
    transport=PCI,
    applies=_owner_applies,
)
def get(ctx: PciContext) -> None:
    parts = Parts(ctx)
    parts.require()
    parts.up(1)
    obj = parts.obj(1, GET)
    first = parts.get(1, obj)
    expect(len(first) > 1, f"DEV_PARTS_GET ALL returned {len(first)} part(s)")
    for round_ in (2, 3):
        expect(parts.get(1, obj) == first, f"DEV_PARTS_GET number {round_} answered differently on an idle member")
    _in_table_order(first, "DEV_PARTS_GET ALL")
    count = METADATA_RESULT.unpack(_ok(parts.client.metadata(1, obj, META_COUNT), "METADATA_GET COUNT").result[:8])[0]
    listed = _ok(parts.client.metadata(1, obj, META_LIST, METADATA_RESULT.size + count * DEV_PART_HDR_SIZE),
                 "METADATA_GET LIST")
    headers = unpack_headers(listed.result[METADATA_RESULT.size:])
    _in_table_order(headers, "DEV_PARTS_METADATA_GET LIST")
    selected = parts.get(1, obj, list(reversed(first)))
    _in_table_order(selected, "DEV_PARTS_GET SELECTED with the headers in reverse order")
    expect(selected == first, "DEV_PARTS_GET SELECTED of every part differs from DEV_PARTS_GET ALL")


@check(
    "virtio-1.4:2.12.1.4.4.1#preceded",
    "device parts: in DEV_PARTS_GET (all or selected) and the metadata list, VIRTIO_DEV_PART_DRV_FEATURES is "
    "preceded by DEV_FEATURES and PCI_COMMON_CFG by DEV_FEATURES and DRV_FEATURES, even when only it was selected",
    transport=PCI,
    applies=_owner_applies,
)
def preceded(ctx: PciContext) -> None:
    parts = Parts(ctx)
    parts.require()
    parts.up(1)
    obj = parts.obj(1, GET)
    everything = parts.get(1, obj)
    _preceded(everything, "DEV_PARTS_GET ALL")
    count = len(everything)
    listed = _ok(parts.client.metadata(1, obj, META_LIST, METADATA_RESULT.size + count * DEV_PART_HDR_SIZE),
                 "METADATA_GET LIST")
    _preceded(unpack_headers(listed.result[METADATA_RESULT.size:]), "DEV_PARTS_METADATA_GET LIST")
    for selected, with_ in (([DevicePart(DRV_FEATURES)], {DEV_FEATURES}),
                            ([DevicePart(COMMON_CFG, selector=offset_selector(VIRTIO_PCI_COMMON_NUMQ))],
                             {DEV_FEATURES, DRV_FEATURES})):
        # Room for exactly the part and those it must follow (the used length is then the same either way).
        room = sum(DEV_PART_HDR_SIZE + len(p.value) for p in everything
                   if p.key == selected[0].key or p.part_type in with_)
        got = parts.get(1, obj, selected, room)
        expect(any(p.key == selected[0].key for p in got), f"DEV_PARTS_GET SELECTED {selected[0].part_type:#x}: "
                                                           "the part the member has is missing")
        _preceded(got, f"DEV_PARTS_GET SELECTED {selected[0].part_type:#x} alone")


# -- set -----------------------------------------------------------------------------------------------------
@check(
    "virtio-1.4:2.12.1.4.4.1#set-stopped",
    "device parts: DEV_PARTS_SET on a member that is not stopped fails; stopped, the same command completes OK",
    transport=PCI,
    applies=_owner_applies,
)
def set_stopped(ctx: PciContext) -> None:
    parts = Parts(ctx)
    parts.require()
    parts.up(1)
    get_id, set_id = parts.obj(1, GET), parts.obj(1, SET)
    state = [p for p in parts.get(1, get_id) if p.part_type == DRV_FEATURES]
    _fails(parts.set(1, set_id, state), "DEV_PARTS_SET on a running member")
    parts.mode(1, 1)
    _ok(parts.set(1, set_id, state), "DEV_PARTS_SET of the member's own DRV_FEATURES while it is stopped")
    parts.mode(1, 0)


@check(
    "virtio-1.4:2.12.1.4.4.1#set-again",
    "device parts: DEV_PARTS_SET of the same and of different parts, several times, completes OK; resumed, the "
    "destination member answers DEV_PARTS_GET with the parts the source had",
    transport=PCI,
    applies=_owner_applies,
)
def set_again(ctx: PciContext) -> None:
    parts = Parts(ctx)
    parts.require()
    source = parts.up(1)
    source.nic.send(_frame(b"\xff" * 6, source.mac, b"before the move"))
    get_src = parts.obj(1, GET)
    parts.mode(1, 1)
    state = parts.get(1, get_src)
    set_dst, get_dst = parts.obj(2, SET), parts.obj(2, GET)
    parts.mode(2, 1)
    vqs = [p for p in state if p.part_type == VQ_CFG_PART]
    for what, batch in (("every part", state), ("every part again", state), ("the virtqueue parts", vqs),
                        ("the features", [p for p in state if p.part_type in (DEV_FEATURES, DRV_FEATURES)])):
        _ok(parts.set(2, set_dst, batch), f"DEV_PARTS_SET of {what}")
    parts.mode(2, 0)
    moved = parts.get(2, get_dst)
    diff = [hex(p.part_type) for p in state if p not in moved]
    expect(not diff, f"after DEV_PARTS_SET and resume the destination's parts {diff} differ from the source's")
    parts.mode(1, 0)


@check(
    "virtio-1.4:2.12.1.4.4.1#set-length",
    "device parts: DEV_PARTS_SET with a part whose length is not the device's (DRV_FEATURES, DEVICE_STATUS, "
    "VQ_CFG, one byte short or long) fails",
    transport=PCI,
    applies=_owner_applies,
)
def set_length(ctx: PciContext) -> None:
    parts = Parts(ctx)
    parts.require()
    parts.up(1)
    get_id, set_id = parts.obj(1, GET), parts.obj(1, SET)
    state = parts.get(1, get_id)
    parts.mode(1, 1)
    for part in (_one(state, DRV_FEATURES), _one(state, DEVICE_STATUS), _one(state, VQ_CFG_PART, vq_selector(0))):
        for delta in (-1, 1):
            value = part.value[:-1] if delta < 0 else part.value + b"\0"
            bad = DevicePart(part.part_type, value, part.selector, part.flags)
            _fails(parts.set(1, set_id, [bad]), f"DEV_PARTS_SET of part {part.part_type:#x} with length "
                                                f"{len(value)} (the device's is {len(part.value)})")
        _ok(parts.set(1, set_id, [part]), f"DEV_PARTS_SET of part {part.part_type:#x} as the device gave it")
    parts.mode(1, 0)


@check(
    "virtio-1.4:2.12.1.4.4.1#dev-features",
    "device parts: DEV_PARTS_SET with VIRTIO_DEV_PART_DEV_FEATURES other than the device's fails; the same ones "
    "complete OK and the device features stay what they were",
    transport=PCI,
    applies=_owner_applies,
)
def dev_features(ctx: PciContext) -> None:
    parts = Parts(ctx)
    parts.require()
    member = parts.up(1)
    get_id, set_id = parts.obj(1, GET), parts.obj(1, SET)
    own = _one(parts.get(1, get_id), DEV_FEATURES)
    offered = member.driver.device_features()
    parts.mode(1, 1)
    lowest = offered & -offered
    for what, bits in (("without its lowest feature", offered & ~lowest), ("with bit 63 added", offered | 1 << 63)):
        bad = DevicePart(DEV_FEATURES, bits.to_bytes(len(own.value), "little"), own.selector, own.flags)
        _fails(parts.set(1, set_id, [bad]), f"DEV_PARTS_SET of DEV_FEATURES {what} ({bits:#x})")
    _ok(parts.set(1, set_id, [own]), "DEV_PARTS_SET of the device's own DEV_FEATURES")
    parts.mode(1, 0)
    expect(member.driver.device_features() == offered, "the device features changed after DEV_PARTS_SET")
    expect(own.flags >> VIRTIO_DEV_PART_F_OPTIONAL & 1, "DEV_FEATURES is not marked VIRTIO_DEV_PART_F_OPTIONAL")


@check(
    "virtio-1.4:2.12.1.4.4.1#set-verifies",
    "device parts: DEV_PARTS_SET verifies read-only fields (PCI_COMMON_CFG num_queues, VQ_NOTIFY_CFG "
    "queue_notify_off): other values fail, the device's complete OK, and none is written",
    transport=PCI,
    applies=_owner_applies,
)
def set_verifies(ctx: PciContext) -> None:
    parts = Parts(ctx)
    parts.require()
    member = parts.up(1)
    get_id, set_id = parts.obj(1, GET), parts.obj(1, SET)
    state = parts.get(1, get_id)
    numq = _one(state, COMMON_CFG, offset_selector(VIRTIO_PCI_COMMON_NUMQ))
    notify = _one(state, VQ_NOTIFY_PART, vq_selector(1))
    queues = member.driver.common_read(VIRTIO_PCI_COMMON_NUMQ, 2)
    parts.mode(1, 1)
    wrong_numq = DevicePart(COMMON_CFG, (queues + 1).to_bytes(len(numq.value), "little"), numq.selector)
    _fails(parts.set(1, set_id, [wrong_numq]), f"DEV_PARTS_SET of PCI_COMMON_CFG num_queues {queues + 1} "
                                               f"(the device has {queues})")
    off, data = VQ_NOTIFY_CFG.unpack(notify.value)
    wrong_notify = DevicePart(VQ_NOTIFY_PART, VQ_NOTIFY_CFG.pack(off + 1, data), notify.selector)
    _fails(parts.set(1, set_id, [wrong_notify]), f"DEV_PARTS_SET of queue 1's queue_notify_off {off + 1} (is {off})")
    _ok(parts.set(1, set_id, [numq, notify]), "DEV_PARTS_SET of num_queues and queue_notify_off as they are")
    parts.mode(1, 0)
    expect(member.driver.common_read(VIRTIO_PCI_COMMON_NUMQ, 2) == queues, "num_queues changed")
    member.driver.common_write(VIRTIO_PCI_COMMON_Q_SELECT, 2, 1)
    expect(member.driver.common_read(VIRTIO_PCI_COMMON_Q_NOFF, 2) == off, "queue 1's queue_notify_off changed")


# -- stopped ----------------------------------------------------------------------------------------------------
def _two_members(parts: Parts) -> tuple[Member, Member]:
    """Members 1 and 2 up; each has sent a broadcast so the switch knows them; queues and interrupts drained."""
    a, b = parts.up(1), parts.up(NUM_VFS)
    for nic, mac in ((a.nic, a.mac), (b.nic, b.mac)):
        nic.send(_frame(b"\xff" * 6, mac, b"hello"))
    parts.ctx.platform.service_interrupts()
    for m in (a, b):
        m.nic.receive()
        m.nic.tx_completed()
    return a, b


@check(
    "virtio-1.4:2.12.1.4.4.1#stopped-quiet",
    "device parts: a stopped member writes no received frame into its rings, takes no buffer its driver made "
    "available, and sends no used-buffer or configuration change notification (no MSI-X message)",
    transport=PCI,
    applies=_owner_applies,
)
def stopped_quiet(ctx: PciContext) -> None:
    parts = Parts(ctx)
    parts.require()
    a, b = _two_members(parts)
    before = (a.used_idx(0), a.used_idx(1), a.interrupts())
    parts.mode(1, 1)
    b.nic.send(_frame(a.mac, b.mac, b"to the stopped member"))
    a.nic.send(_frame(b.mac, a.mac, b"from the stopped member"))
    vf = parts.owner.machine.sriov.enabled_vfs[0]
    assert isinstance(vf, VirtioPciFunction)
    vf.config_changed()  # what a link change does
    ctx.platform.service_interrupts()
    expect(a.used_idx(0) == before[0], "the stopped member wrote a received frame into its receive queue")
    expect(a.used_idx(1) == before[1], "the stopped member used a transmit buffer")
    expect(b.nic.receive() == [], "the stopped member transmitted a frame")
    expect(a.interrupts() == before[2], f"the stopped member sent {a.interrupts() - before[2]} MSI-X message(s)")
    parts.mode(1, 0)


@check(
    "virtio-1.4:2.12.1.4.4.1#stopped-accepts",
    "device parts: a stopped member accepts its driver's notifications: resumed, it serves what was made available "
    "while it was stopped without a new notification, and it did not enter an error state",
    transport=PCI,
    applies=_owner_applies,
)
def stopped_accepts(ctx: PciContext) -> None:
    parts = Parts(ctx)
    parts.require()
    a, b = _two_members(parts)
    parts.mode(1, 1)
    a.nic.send(_frame(b.mac, a.mac, b"sent while stopped"))  # published and notified
    parts.mode(1, 0)
    got = [payload[14:32] for _, payload in b.nic.receive()]
    expect(got == [b"sent while stopped"], f"after resume the peer received {got}, expected the frame made "
                                           "available (and notified) while the member was stopped")
    status = a.driver.common_read(VIRTIO_PCI_COMMON_STATUS, 1)
    expect(status & VIRTIO_CONFIG_S_DRIVER_OK and not status & VIRTIO_CONFIG_S_NEEDS_RESET,
           f"device_status {status:#x} after notifications to a stopped member")


def _toggle_command(cfg: EcamConfig) -> tuple[int, int]:
    """Write the Command register with Interrupt Disable flipped: (value before, value read back); then restore it."""
    command = cfg.read(PCI_COMMAND, 2)
    cfg.write(PCI_COMMAND, 2, command ^ PCI_COMMAND_INTX_DISABLE)
    after = cfg.read(PCI_COMMAND, 2)
    cfg.write(PCI_COMMAND, 2, command)
    return command, after


@check(
    "virtio-1.4:2.12.1.4.4.1#stopped-pci",
    "device parts: stopped, a member answers config space and common configuration reads as before, answers a "
    "Command register write as when running, and (with a Power Management capability) sets no PME_Status",
    transport=PCI,
    applies=_owner_applies,
)
def stopped_pci(ctx: PciContext) -> None:
    parts = Parts(ctx)
    parts.require()
    a, b = _two_members(parts)
    cfg = a.driver.cfg
    pm = parts.pci_cap(a, PCI_CAP_ID_PM)
    header = [cfg.read(offset, 4) for offset in range(0, 0x100, 4)]
    common = [a.driver.common_read(offset, size) for offset, size in COMMON_FIELDS]
    running = _toggle_command(cfg)
    parts.mode(1, 1)
    b.nic.send(_frame(a.mac, b.mac, b"wake up"))
    expect([cfg.read(offset, 4) for offset in range(0, 0x100, 4)] == header,
           "config space reads differ while the member is stopped")
    expect([a.driver.common_read(offset, size) for offset, size in COMMON_FIELDS] == common,
           "common configuration reads differ while the member is stopped")
    stopped = _toggle_command(cfg)
    expect(stopped == running, f"a Command register write of Interrupt Disable reads back {stopped[1]:#x} while "
                               f"the member is stopped, {running[1]:#x} while it runs")
    if pm is not None:
        expect(not cfg.read(pm + PCI_PM_CTRL, 2) & PCI_PM_CTRL_PME_STATUS,
               "the stopped member set PME_Status (a frame arrived for it)")
    parts.mode(1, 0)


@check(
    "virtio-1.4:2.12.1.4.4.1#stop-writes-back",
    "device parts: when DEV_MODE_SET stops a member, every buffer it took is already in the used ring, and resumed "
    "it does not serve any of them again",
    transport=PCI,
    applies=_owner_applies,
)
def stop_writes_back(ctx: PciContext) -> None:
    parts = Parts(ctx)
    parts.require()
    a, b = _two_members(parts)
    base = a.used_idx(1)
    frames = [_frame(b.mac, a.mac, f"frame {n}".encode()) for n in range(3)]
    for frame in frames:
        a.nic.send(frame)
    parts.mode(1, 1)
    expect(a.used_idx(1) == base + len(frames), f"when DEV_MODE_SET completed the transmit used idx was "
                                                f"{a.used_idx(1) - base} past the start, {len(frames)} buffers taken")
    parts.mode(1, 0)
    got = [payload[14:21] for _, payload in b.nic.receive()]
    expect(got == [f[14:21] for f in frames], f"the peer received {got}: a buffer was served twice or lost")


@check(
    "virtio-1.4:2.12.1.4.4.1#mode-idempotent",
    "device parts: DEV_MODE_SET stopping a stopped member, and resuming a running one, complete OK",
    transport=PCI,
    applies=_owner_applies,
)
def mode_idempotent(ctx: PciContext) -> None:
    parts = Parts(ctx)
    parts.require()
    parts.up(1)
    _ok(parts.client.mode(1, 0), "DEV_MODE_SET flags 0 on a running member")
    _ok(parts.client.mode(1, 1), "DEV_MODE_SET STOPPED on a running member")
    _ok(parts.client.mode(1, 1), "DEV_MODE_SET STOPPED on a stopped member")
    _ok(parts.client.mode(1, 0), "DEV_MODE_SET flags 0 on a stopped member")
    _ok(parts.client.mode(1, 0), "DEV_MODE_SET flags 0 on a running member, again")


@check(
    "virtio-1.4:2.12.1.4.4.1#reset-defaults",
    "device parts: after an FLR, and after a device reset, of a member its parts are back to their defaults "
    "(no driver features, status 0, queues disabled with no vector, queue_select 0)",
    transport=PCI,
    applies=_owner_applies,
)
def reset_defaults(ctx: PciContext) -> None:
    parts = Parts(ctx)
    parts.require()
    obj = parts.obj(1, GET)
    for how in ("an FLR", "a device reset"):
        member = parts.up(1)
        live = parts.get(1, obj)
        expect(_one(live, DEVICE_STATUS).value != b"\0", "a member at DRIVER_OK has device status 0 in its parts")
        exp = parts.pci_cap(member, PCI_CAP_ID_EXP)
        if how == "an FLR":
            if exp is None or not member.driver.cfg.read(exp + PCI_EXP_DEVCAP, 4) & PCI_EXP_DEVCAP_FLR:
                continue  # no FLR to try: the device reset still is
            member.driver.cfg.write(exp + PCI_EXP_DEVCTL, 2, member.driver.cfg.read(exp + PCI_EXP_DEVCTL, 2)
                                    | PCI_EXP_DEVCTL_BCR_FLR)
        else:
            member.driver.reset()
        got = parts.get(1, obj)
        expect(_one(got, DRV_FEATURES).value == bytes(len(_one(got, DRV_FEATURES).value)),
               f"after {how} DRV_FEATURES is {_one(got, DRV_FEATURES).value.hex()}")
        expect(_one(got, DEVICE_STATUS).value == b"\0", f"after {how} DEVICE_STATUS is {_one(got, DEVICE_STATUS).value.hex()}")
        select = _one(got, COMMON_CFG, offset_selector(VIRTIO_PCI_COMMON_Q_SELECT)).value
        expect(select == bytes(len(select)), f"after {how} queue_select is {select.hex()}")
        for part in (p for p in got if p.part_type == VQ_CFG_PART):
            _size, vector, enabled, desc, driver, device = VQ_CFG.unpack(part.value)
            expect((vector, enabled, desc, driver, device) == (VIRTIO_MSI_NO_VECTOR, 0, 0, 0, 0),
                   f"after {how} a VQ_CFG part is vector {vector:#x} enabled {enabled} addresses "
                   f"{desc:#x}/{driver:#x}/{device:#x}")
