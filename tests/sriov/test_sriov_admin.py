"""The PF's administration virtqueue (virtio 1.4 2.13) and the SR-IOV group's commands (2.12)."""

from __future__ import annotations

import logging
import struct

import pytest

from iovirt.platform.testing import fake_clock_platform
from iovirt.virtio.admin.device_parts import DEV_PARTS_OPCODES
from iovirt.sriov.machine import SriovNetMachine
from iovirt.virtio.admin.defs import (
    LEGACY_NOTIFY_INFO_ENTRY,
    VIRTIO_ADMIN_CMD_LEGACY_COMMON_CFG_READ as COMMON_READ,
    VIRTIO_ADMIN_CMD_LEGACY_COMMON_CFG_WRITE as COMMON_WRITE,
    VIRTIO_ADMIN_CMD_LEGACY_DEV_CFG_READ as DEV_READ,
    VIRTIO_ADMIN_CMD_LEGACY_DEV_CFG_WRITE as DEV_WRITE,
    VIRTIO_ADMIN_CMD_LEGACY_NOTIFY_INFO as NOTIFY_INFO,
    VIRTIO_ADMIN_CMD_LIST_QUERY as LIST_QUERY,
    VIRTIO_ADMIN_CMD_LIST_USE as LIST_USE,
    VIRTIO_ADMIN_GROUP_TYPE_SRIOV as SRIOV,
    VIRTIO_ADMIN_STATUS_EINVAL as EINVAL,
    VIRTIO_ADMIN_STATUS_OK as OK,
    VIRTIO_ADMIN_STATUS_Q_INVALID_FIELD as Q_FIELD,
    VIRTIO_ADMIN_STATUS_Q_INVALID_GROUP as Q_GROUP,
    VIRTIO_ADMIN_STATUS_Q_INVALID_MEMBER as Q_MEMBER,
    VIRTIO_ADMIN_STATUS_Q_INVALID_OPCODE as Q_OPCODE,
    opcode_bitmap,
    opcodes_of,
)
from iovirt.virtio.admin.driver import AdminClient, admin_cmd
from iovirt.virtio.defs import (
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_ADMIN_VQ,
    VIRTIO_F_RING_RESET,
)
from iovirt.virtio.driver import DriverQueue
from iovirt.virtio.net.defs import VIRTIO_NET_F_MRG_RXBUF
from iovirt.virtio.transport.defs import (
    VIRTIO_PCI_COMMON_ADMIN_Q_INDEX,
    VIRTIO_PCI_COMMON_ADMIN_Q_NUM,
    VIRTIO_PCI_COMMON_NUMQ,
    VIRTIO_PCI_COMMON_Q_RESET,
    VIRTIO_PCI_COMMON_Q_SELECT,
    VIRTIO_PCI_COMMON_Q_SIZE,
)
from iovirt.virtio.transport.legacy import (
    VIRTIO_PCI_GUEST_FEATURES,
    VIRTIO_PCI_HOST_FEATURES,
    VIRTIO_PCI_QUEUE_NOTIFY,
    VIRTIO_PCI_QUEUE_NUM,
    VIRTIO_PCI_QUEUE_PFN,
    VIRTIO_PCI_QUEUE_SEL,
    VIRTIO_PCI_STATUS,
    legacy_ring,
)
from iovirt.virtio.transport.pci import LEGACY_NOTIFY_OFFSET

ALL_SRIOV = opcode_bitmap({LIST_QUERY, LIST_USE, COMMON_WRITE, COMMON_READ, DEV_WRITE, DEV_READ, NOTIFY_INFO}
                          | DEV_PARTS_OPCODES)
NUM_VFS = 2


@pytest.fixture
def machine():
    with SriovNetMachine(4, platform=fake_clock_platform([]), admin_vq=True) as m:
        yield m


@pytest.fixture
def admin(machine) -> AdminClient:
    machine.bring_up_pf()
    assert machine.admin is not None
    return machine.admin


def use_all(admin: AdminClient) -> None:
    assert admin.command(LIST_USE, SRIOV, data=ALL_SRIOV).status == OK


def wr(offset: int, data: bytes) -> bytes:
    return bytes([offset]) + bytes(7) + data


# -- the transport -----------------------------------------------------------------------------------
def test_only_an_owner_built_with_an_admin_queue_offers_admin_vq() -> None:
    with SriovNetMachine(2, platform=fake_clock_platform([])) as plain:
        assert not plain.pf.offered_features() >> VIRTIO_F_ADMIN_VQ & 1
    with SriovNetMachine(2, platform=fake_clock_platform([]), admin_vq=True) as owner:
        assert owner.pf.offered_features() >> VIRTIO_F_ADMIN_VQ & 1
        assert not owner.sriov.vfs[0].offered_features() >> VIRTIO_F_ADMIN_VQ & 1  # a VF owns no group


def test_admin_queue_fields_and_the_queue_exists_only_once_admin_vq_is_accepted(machine) -> None:
    d = machine.platform.driver(machine.pf)
    d.probe()
    d.reset()
    numq = d.common_read(VIRTIO_PCI_COMMON_NUMQ, 2)
    assert d.common_read(VIRTIO_PCI_COMMON_ADMIN_Q_INDEX, 2) == numq
    assert d.common_read(VIRTIO_PCI_COMMON_ADMIN_Q_NUM, 2) == 1
    d.common_write(VIRTIO_PCI_COMMON_Q_SELECT, 2, numq)
    assert d.common_read(VIRTIO_PCI_COMMON_Q_SIZE, 2) == 0  # ADMIN_VQ not accepted (yet)
    d.add_status(VIRTIO_CONFIG_S_ACKNOWLEDGE)
    d.add_status(VIRTIO_CONFIG_S_DRIVER)
    d.negotiate()
    d.common_write(VIRTIO_PCI_COMMON_Q_SELECT, 2, numq)
    assert d.common_read(VIRTIO_PCI_COMMON_Q_SIZE, 2) > 0


def test_the_device_never_sees_admin_vq(machine, admin) -> None:
    assert not machine.pf.device.driver_features >> VIRTIO_F_ADMIN_VQ & 1
    assert machine.pf_driver.has_feature(VIRTIO_F_ADMIN_VQ)


# -- 2.12.1.5 general rules ----------------------------------------------------------------------------
def test_list_query_and_the_commands_in_use(machine, admin) -> None:
    got = admin.command(LIST_QUERY, SRIOV, result_size=8)
    assert (got.status, got.qualifier) == (OK, 0)
    assert opcodes_of(got.result) == opcodes_of(ALL_SRIOV)
    machine.sriov_configure(NUM_VFS)
    # Before LIST_USE only LIST_QUERY and LIST_USE are legal.
    assert (admin.command(COMMON_READ, SRIOV, 1, b"\0", 4).status,) == (EINVAL,)
    assert admin.command(COMMON_READ, SRIOV, 1, b"\0", 4).qualifier == Q_OPCODE
    assert admin.command(LIST_USE, SRIOV, data=opcode_bitmap({LIST_QUERY, LIST_USE, COMMON_READ})).status == OK
    assert admin.command(COMMON_READ, SRIOV, 1, b"\0", 4).status == OK
    assert admin.command(DEV_READ, SRIOV, 1, b"\0", 6).qualifier == Q_OPCODE  # not in the list used


def test_list_use_naming_an_unsupported_opcode_fails_and_changes_nothing(admin) -> None:
    use_all(admin)
    got = admin.command(LIST_USE, SRIOV, data=opcode_bitmap({LIST_QUERY, LIST_USE, 0x30}))
    assert (got.status, got.qualifier) == (EINVAL, Q_FIELD)
    assert admin.command(NOTIFY_INFO, SRIOV, 1, result_size=64).qualifier != Q_OPCODE  # the old list stands


def test_validation_order_group_then_opcode_then_member(admin) -> None:
    use_all(admin)
    assert admin.command(0x7FFF, 7, 99).qualifier == Q_GROUP
    assert admin.command(0x7FFF, SRIOV, 99).qualifier == Q_OPCODE
    assert admin.command(COMMON_READ, SRIOV, 99, b"\0", 4).qualifier == Q_GROUP  # VF Enable is clear


def test_members_are_vfs_1_to_numvfs(machine, admin) -> None:
    use_all(admin)
    machine.sriov_configure(NUM_VFS)
    for member, qualifier in ((0, Q_MEMBER), (1, 0), (NUM_VFS, 0), (NUM_VFS + 1, Q_MEMBER), (1 << 63, Q_MEMBER)):
        assert admin.command(COMMON_READ, SRIOV, member, b"\0", 4).qualifier == qualifier, member
    machine.sriov_configure(0)
    assert admin.command(COMMON_READ, SRIOV, 1, b"\0", 4).qualifier == Q_GROUP


def test_a_device_reset_puts_the_list_back(machine, admin) -> None:
    use_all(admin)
    driver = machine.pf_driver
    machine.bring_up_pf()
    assert machine.admin is not None and machine.admin is not admin
    assert machine.admin.command(NOTIFY_INFO, SRIOV, 1, result_size=64).qualifier == Q_OPCODE
    assert driver is not None


# -- 2.13.1 buffers ---------------------------------------------------------------------------------------
def test_short_and_long_buffers(admin) -> None:
    short_header = struct.pack("<HH", LIST_QUERY, SRIOV)  # no reserved1, no group_member_id: read as zero
    tiny, exact, long = admin.submit([(short_header, 4), (short_header + bytes(100), 16), (short_header, 64)])
    assert tiny.used_len == 4 and tiny.written == bytes(4)
    assert exact.used_len == 16 and exact.status == OK and opcodes_of(exact.result) == opcodes_of(ALL_SRIOV)
    assert long.used_len == 16 and long.status == OK  # only the structure is written


def test_commands_complete_in_queue_order(machine, admin) -> None:
    machine.sriov_configure(NUM_VFS)
    read = admin_cmd(COMMON_READ, SRIOV, 1, b"\0")
    done = admin.submit([(read, 12), (admin_cmd(LIST_USE, SRIOV, 0, ALL_SRIOV), 8), (read, 12)])
    assert [c.status for c in done] == [EINVAL, OK, OK]


def test_a_malformed_chain_needs_a_reset_and_is_logged(machine, admin, caplog) -> None:
    queue: DriverQueue = admin.queue
    head = queue._take(1)[0]
    queue.write_desc(head, 1 << 45, 64)  # outside guest memory
    queue._inflight[head] = ([head], [])
    queue.post_head(head)
    queue.publish()
    with caplog.at_level(logging.ERROR):
        admin.notify()
    assert machine.pf_driver.status & VIRTIO_CONFIG_S_NEEDS_RESET
    assert "administration queue" in caplog.text
    assert "Traceback" not in caplog.text


def test_queue_reset_of_the_admin_queue(machine, admin) -> None:
    d = machine.pf_driver
    assert d.has_feature(VIRTIO_F_RING_RESET)
    index = d.common_read(VIRTIO_PCI_COMMON_ADMIN_Q_INDEX, 2)
    d.common_write(VIRTIO_PCI_COMMON_Q_SELECT, 2, index)
    d.common_write(VIRTIO_PCI_COMMON_Q_RESET, 2, 1)
    admin.queue.add_data([admin_cmd(LIST_QUERY, SRIOV)], [16])
    admin.queue.publish()
    admin.notify()
    assert admin.queue.used_idx() == 0  # a reset queue serves nothing
    queue = d.setup_queue(index)
    assert AdminClient(queue, admin.notify).command(LIST_QUERY, SRIOV, result_size=8).status == OK


# -- 2.12.1.1 legacy interface ------------------------------------------------------------------------------
@pytest.fixture
def legacy(machine, admin) -> AdminClient:
    use_all(admin)
    machine.vfs = machine.sriov_configure(NUM_VFS)
    return admin


def read(admin: AdminClient, offset: int, size: int, member: int = 1, opcode: int = COMMON_READ) -> int:
    got = admin.command(opcode, SRIOV, member, bytes([offset]), size)
    assert got.status == OK, got
    return int.from_bytes(got.result, "little")


def test_legacy_common_registers(machine, legacy) -> None:
    vf = machine.sriov.enabled_vfs[0]
    assert read(legacy, VIRTIO_PCI_HOST_FEATURES, 4) == vf.offered_features() & 0xFFFFFFFF
    assert read(legacy, VIRTIO_PCI_HOST_FEATURES + 2, 2) == vf.offered_features() >> 16 & 0xFFFF  # within the field
    assert legacy.command(COMMON_WRITE, SRIOV, 1, wr(VIRTIO_PCI_QUEUE_SEL, (1).to_bytes(2, "little"))).status == OK
    assert read(legacy, VIRTIO_PCI_QUEUE_SEL, 2) == 1
    assert read(legacy, VIRTIO_PCI_QUEUE_NUM, 2) == vf.common.queue_max_size
    legacy.command(COMMON_WRITE, SRIOV, 1, wr(VIRTIO_PCI_QUEUE_SEL, (99).to_bytes(2, "little")))
    assert read(legacy, VIRTIO_PCI_QUEUE_NUM, 2) == 0
    legacy.command(COMMON_WRITE, SRIOV, 1, wr(VIRTIO_PCI_STATUS, bytes([VIRTIO_CONFIG_S_ACKNOWLEDGE])))
    assert vf.common.status == VIRTIO_CONFIG_S_ACKNOWLEDGE
    assert machine.sriov.enabled_vfs[1].common.status == 0  # the other member is untouched


@pytest.mark.parametrize("opcode,offset,size", [
    (COMMON_READ, 2, 4),     # straddles device and driver features
    (COMMON_READ, 20, 2),    # config_msix_vector: MSI-X is not enabled on the VF
    (COMMON_READ, 24, 1),    # past the common part
    (DEV_READ, 4, 4),        # straddles mac and status
    (DEV_READ, 12, 1),       # past the device configuration
])
def test_legacy_accesses_not_within_one_field_fail(legacy, opcode, offset, size) -> None:
    got = legacy.command(opcode, SRIOV, 1, bytes([offset]), size)
    assert (got.status, got.qualifier) == (EINVAL, Q_FIELD)


def test_legacy_device_config_and_the_legacy_mac(machine, legacy) -> None:
    vf = machine.sriov.enabled_vfs[1]
    assert read(legacy, 0, 6, member=2, opcode=DEV_READ).to_bytes(6, "little") == vf.device.mac
    new_mac = bytes.fromhex("02aabbccddee")
    assert legacy.command(DEV_WRITE, SRIOV, 2, wr(0, new_mac)).status == OK  # legacy: mac is driver-writable
    assert vf.device.mac == new_mac
    assert legacy.command(DEV_WRITE, SRIOV, 2, wr(4, bytes(4))).qualifier == Q_FIELD


def test_notify_info_names_the_member_legacy_notification_address(legacy) -> None:
    got = legacy.command(NOTIFY_INFO, SRIOV, 1, result_size=64)
    entries = [LEGACY_NOTIFY_INFO_ENTRY.unpack_from(got.result, 16 * i) for i in range(4)]
    assert entries[0] == (2, 4, LEGACY_NOTIFY_OFFSET)
    assert all(e == (0, 0, 0) for e in entries[1:])


def test_a_legacy_driver_runs_a_vf_through_the_owner(machine, legacy) -> None:
    """Features, queue PFN, DRIVER_OK and notifications through admin commands: the VF transmits."""
    vf = machine.sriov.enabled_vfs[0]
    platform = machine.platform
    size = read(legacy, VIRTIO_PCI_QUEUE_NUM, 2)
    base = platform.dma_alloc.alloc(3 * 4096 + 16 * size, 4096)

    class LegacyRingAlloc:
        """Hands DriverQueue the legacy layout for its rings, then real buffers."""

        def __init__(self) -> None:
            self.rings = list(legacy_ring(base >> 12, size))

        def alloc(self, n: int, align: int = 16) -> int:
            return self.rings.pop(0) if self.rings else platform.dma_alloc.alloc(n, align)

    features = read(legacy, VIRTIO_PCI_HOST_FEATURES, 4) & ~(1 << VIRTIO_NET_F_MRG_RXBUF)
    legacy.command(COMMON_WRITE, SRIOV, 1, wr(VIRTIO_PCI_STATUS, bytes([VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER])))
    legacy.command(COMMON_WRITE, SRIOV, 1, wr(VIRTIO_PCI_GUEST_FEATURES, features.to_bytes(4, "little")))
    legacy.command(COMMON_WRITE, SRIOV, 1, wr(VIRTIO_PCI_QUEUE_SEL, (1).to_bytes(2, "little")))  # transmitq1
    tx = DriverQueue(platform.memory, LegacyRingAlloc(), size, index=1)  # type: ignore[arg-type]
    assert legacy.command(COMMON_WRITE, SRIOV, 1, wr(VIRTIO_PCI_QUEUE_PFN, (base >> 12).to_bytes(4, "little"))).status == OK
    assert read(legacy, VIRTIO_PCI_QUEUE_PFN, 4) == base >> 12
    legacy.command(COMMON_WRITE, SRIOV, 1, wr(VIRTIO_PCI_STATUS, bytes([VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_DRIVER_OK])))
    assert vf.common.status & VIRTIO_CONFIG_S_DRIVER_OK
    assert vf.device.hdr_len == 10  # no VERSION_1, no MRG_RXBUF: the legacy header
    frame = b"\xff" * 6 + vf.device.mac + b"\x88\xb5" + bytes(46)
    notify_bar = machine.vfs[0].bars[4].address  # NOTIFY_INFO: VF BAR4 of member 1

    def through_queue_notify() -> None:
        legacy.command(COMMON_WRITE, SRIOV, 1, wr(VIRTIO_PCI_QUEUE_NOTIFY, (1).to_bytes(2, "little")))

    def through_notify_info_address() -> None:
        platform.host.mmio_write(notify_bar + LEGACY_NOTIFY_OFFSET, 2, 1)

    for notify in (through_queue_notify, through_notify_info_address):
        tx.add_data([bytes(10) + frame], ())
        tx.publish()
        notify()
        assert len(tx.get_used()) == 1, notify.__name__


def test_legacy_status_never_sets_needs_reset_and_features_freeze_at_driver_ok(machine, legacy) -> None:
    vf = machine.sriov.enabled_vfs[0]
    legacy.command(COMMON_WRITE, SRIOV, 1, wr(VIRTIO_PCI_STATUS, bytes([VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_NEEDS_RESET])))
    assert vf.common.status == VIRTIO_CONFIG_S_ACKNOWLEDGE
    legacy.command(COMMON_WRITE, SRIOV, 1, wr(VIRTIO_PCI_GUEST_FEATURES, (1 << 5).to_bytes(4, "little")))  # MAC
    legacy.command(COMMON_WRITE, SRIOV, 1, wr(VIRTIO_PCI_STATUS, bytes([VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_DRIVER_OK])))
    legacy.command(COMMON_WRITE, SRIOV, 1, wr(VIRTIO_PCI_GUEST_FEATURES, (1 << 15).to_bytes(4, "little")))
    assert read(legacy, VIRTIO_PCI_GUEST_FEATURES, 4) == 1 << 5  # unchanged on a live device
    assert vf.device.driver_features == 1 << 5


def test_a_legacy_queue_outside_guest_memory_needs_a_reset(machine, legacy, caplog) -> None:
    vf = machine.sriov.enabled_vfs[0]
    legacy.command(COMMON_WRITE, SRIOV, 1, wr(VIRTIO_PCI_QUEUE_SEL, (0).to_bytes(2, "little")))
    with caplog.at_level(logging.WARNING):
        assert legacy.command(COMMON_WRITE, SRIOV, 1, wr(VIRTIO_PCI_QUEUE_PFN, (0xFFFF_FFFF).to_bytes(4, "little"))).status == OK
    assert vf.common.status & VIRTIO_CONFIG_S_NEEDS_RESET
    assert "cannot be enabled" in caplog.text and "Traceback" not in caplog.text
    assert machine.pf_driver.status & VIRTIO_CONFIG_S_DRIVER_OK  # the owner is unaffected
    assert read(legacy, VIRTIO_PCI_QUEUE_SEL, 2) == 0
