"""The SR-IOV group's device parts commands (virtio 1.4 2.12.1.4): objects, metadata, get, set, stop and resume."""

from __future__ import annotations

import logging

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iovirt.platform.net import VirtioNetDriver
from iovirt.platform.testing import fake_clock_platform
from iovirt.sriov.device_parts import DEV_PARTS_OBJECTS_LIMIT, GET_PARTS_OBJECTS_LIMIT
from iovirt.sriov.machine import PF_MAC, SriovNetMachine
from iovirt.sriov.virtio_net import vf_mac
from iovirt.virtio.admin.defs import (
    VIRTIO_ADMIN_CMD_DEV_MODE_SET as MODE_SET,
    VIRTIO_ADMIN_CMD_DEV_PARTS_GET as PARTS_GET_OP,
    VIRTIO_ADMIN_CMD_DEV_PARTS_METADATA_GET as METADATA_GET,
    VIRTIO_ADMIN_CMD_DEV_PARTS_SET as PARTS_SET,
    VIRTIO_ADMIN_CMD_LIST_QUERY as LIST_QUERY,
    VIRTIO_ADMIN_CMD_LIST_USE as LIST_USE,
    VIRTIO_ADMIN_CMD_RESOURCE_OBJ_CREATE as OBJ_CREATE,
    VIRTIO_ADMIN_GROUP_TYPE_SRIOV as SRIOV,
    VIRTIO_ADMIN_STATUS_EEXIST as EEXIST,
    VIRTIO_ADMIN_STATUS_EINVAL as EINVAL,
    VIRTIO_ADMIN_STATUS_ENOMEM as ENOMEM,
    VIRTIO_ADMIN_STATUS_ENOSPC as ENOSPC,
    VIRTIO_ADMIN_STATUS_ENXIO as ENXIO,
    VIRTIO_ADMIN_STATUS_OK as OK,
    VIRTIO_ADMIN_STATUS_Q_INVALID_MEMBER as Q_MEMBER,
    opcode_bitmap,
    opcodes_of,
)
from iovirt.virtio.admin.device_parts import (
    DEV_PART_HDR_SIZE,
    DEV_PARTS_OPCODES,
    METADATA_RESULT,
    VIRTIO_ADMIN_CMD_DEV_PARTS_METADATA_TYPE_COUNT as META_COUNT,
    VIRTIO_ADMIN_CMD_DEV_PARTS_METADATA_TYPE_LIST as META_LIST,
    VIRTIO_ADMIN_CMD_DEV_PARTS_METADATA_TYPE_SIZE as META_SIZE,
    VIRTIO_DEV_PART_DEV_FEATURES as DEV_FEATURES,
    VIRTIO_DEV_PART_DEVICE_STATUS as DEVICE_STATUS,
    VIRTIO_DEV_PART_DRV_FEATURES as DRV_FEATURES,
    VIRTIO_DEV_PART_PCI_COMMON_CFG as COMMON_CFG,
    VIRTIO_DEV_PART_VQ_CFG as VQ_CFG_PART,
    VIRTIO_DEV_PART_VQ_NOTIFY_CFG as VQ_NOTIFY_PART,
    VIRTIO_RESOURCE_OBJ_DEV_PARTS_TYPE_GET as GET,
    VIRTIO_RESOURCE_OBJ_DEV_PARTS_TYPE_SET as SET,
    VQ_CFG,
    DevicePart,
    PartsError,
    in_order,
    offset_selector,
    unpack_headers,
    unpack_parts,
    vq_selector,
)
from iovirt.virtio.admin.parts_driver import DevicePartsClient, obj_hdr
from iovirt.virtio.admin.vq import AdminCommand
from iovirt.virtio.defs import VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_NEEDS_RESET
from iovirt.virtio.net.ctrl import VIRTIO_NET_CTRL_VLAN, VIRTIO_NET_CTRL_VLAN_ADD
from iovirt.virtio.net.device import VirtioNet
from iovirt.virtio.net.parts import VIRTIO_NET_DEV_PART_CVQ_CFG_PART, VLAN_TABLE_LEN, VLAN_TABLE_SELECTOR, NetParts
from iovirt.virtio.transport.defs import VIRTIO_PCI_COMMON_NUMQ, VIRTIO_PCI_COMMON_Q_SELECT
from iovirt.virtio.transport.parts import PciDeviceParts

NUM_VFS = 2
ROOM = 4096


def frame(dst: bytes, src: bytes, payload: bytes) -> bytes:
    return dst + src + b"\x08\x00" + payload.ljust(46, b"\0")


@pytest.fixture
def machine():
    with SriovNetMachine(4, platform=fake_clock_platform([]), admin_vq=True) as m:
        yield m


@pytest.fixture
def parts(machine) -> DevicePartsClient:
    admin = machine.bring_up_pf()
    assert machine.admin is not None
    supported = opcodes_of(machine.admin.command(LIST_QUERY, SRIOV, result_size=8).result)
    assert machine.admin.command(LIST_USE, SRIOV, data=opcode_bitmap(set(supported))).status == OK
    machine.sriov_configure(NUM_VFS)
    assert admin is machine.pf_driver
    return DevicePartsClient(machine.admin)


def vf_nic(machine, k: int) -> VirtioNetDriver:
    driver = machine.vf_driver(machine.iov.vfs[k])
    driver.bring_up()
    return VirtioNetDriver(driver)


def get_all(parts: DevicePartsClient, member: int, obj_id: int) -> list[DevicePart]:
    got = parts.get(member, obj_id, ROOM)
    assert (got.status, got.qualifier) == (OK, 0)
    return unpack_parts(got.result)


def the(found: list[DevicePart], part_type: int, selector: bytes | None = None) -> DevicePart:
    [part] = [p for p in found if p.part_type == part_type and (selector is None or p.selector == selector)]
    return part


# -- formats ---------------------------------------------------------------------------------------
def test_part_lists_round_trip_and_refuse_truncation() -> None:
    parts = [DevicePart(DRV_FEATURES, bytes(8)), DevicePart(VQ_CFG_PART, bytes(VQ_CFG.size), vq_selector(1), 1)]
    data = b"".join(p.pack() for p in parts)
    assert unpack_parts(data) == parts
    assert [h.key for h in unpack_headers(b"".join(p.header() for p in parts))] == [p.key for p in parts]
    with pytest.raises(PartsError):
        unpack_parts(data[:-1])  # the last value is short
    with pytest.raises(PartsError):
        unpack_parts(data + bytes(DEV_PART_HDR_SIZE - 1))  # a header cut short
    with pytest.raises(PartsError):
        unpack_headers(bytes(DEV_PART_HDR_SIZE + 3))
    assert in_order(parts) and not in_order(parts[::-1])


# -- support and resource objects --------------------------------------------------------------------
def test_all_device_parts_commands_are_supported(machine, parts) -> None:
    got = machine.admin.command(LIST_QUERY, SRIOV, result_size=8)
    assert DEV_PARTS_OPCODES <= opcodes_of(got.result)


def test_objects_are_created_queried_and_destroyed_by_id(parts) -> None:
    assert parts.create(1, 0, GET).status == OK
    assert parts.create(1, 0, SET).status == EEXIST  # the id is in use
    assert parts.query(1, 0).result == bytes([GET]) + bytes(7)
    assert parts.query(2, 0).status == ENXIO  # another member's object
    assert parts.create(1, DEV_PARTS_OBJECTS_LIMIT, GET).status == EINVAL
    assert parts.create(1, 1, 2).status == EINVAL  # neither GET nor SET
    for obj_id in range(1, GET_PARTS_OBJECTS_LIMIT):
        assert parts.create(2, obj_id, GET).status == OK
    assert parts.create(1, GET_PARTS_OBJECTS_LIMIT, GET).status == ENOSPC
    assert parts.create(1, GET_PARTS_OBJECTS_LIMIT, SET).status == OK
    assert parts.destroy(1, 0).status == OK
    assert parts.destroy(1, 0).status == ENXIO
    assert parts.create(1, 0, SET).status == OK  # the id can be used again


def test_bad_object_type_short_buffer_and_out_of_range_member(parts) -> None:
    assert parts.send(OBJ_CREATE, 1, b"\x01\x00").status == EINVAL  # resource object type 1; the rest reads as 0
    assert parts.create(NUM_VFS + 1, 0, GET).qualifier == Q_MEMBER
    assert parts.mode(NUM_VFS + 1, 1).qualifier == Q_MEMBER
    assert parts.send(MODE_SET, 1, b"").status == OK  # flags missing: 0, resume an active member
    assert parts.mode(1, 2).status == EINVAL  # no mode bit 1 in virtio 1.4


def test_an_owner_reset_destroys_the_objects(machine, parts) -> None:
    assert parts.create(1, 0, GET).status == OK
    assert machine.pf.admin is not None
    machine.pf.admin.reset()
    assert machine.pf.admin.groups[SRIOV].group.parts.objects == {}


# -- get -----------------------------------------------------------------------------------------------
def test_get_returns_the_members_state_in_table_order_every_time(machine, parts) -> None:
    nic = vf_nic(machine, 0)
    assert parts.create(1, 0, GET).status == OK
    first = get_all(parts, 1, 0)
    assert first == get_all(parts, 1, 0)  # gettable again and again
    assert in_order(first)
    assert [p.part_type for p in first[:2]] == [DEV_FEATURES, DRV_FEATURES]
    assert the(first, DEV_FEATURES).optional
    driver = nic.driver
    assert int.from_bytes(the(first, DRV_FEATURES).value, "little") == driver.features
    assert the(first, DEVICE_STATUS).value == bytes([driver.status])
    assert int.from_bytes(the(first, COMMON_CFG, offset_selector(VIRTIO_PCI_COMMON_NUMQ)).value, "little") == 2
    size, vector, enabled, desc, avail, used = VQ_CFG.unpack(the(first, VQ_CFG_PART, vq_selector(1)).value)
    assert (size, vector, enabled) == (nic.tx.size, 2, 1)
    assert (desc, avail, used) == (nic.tx.desc_addr, nic.tx.avail_addr, nic.tx.used_addr)
    assert len([p for p in first if p.part_type == VQ_NOTIFY_PART]) == 2

    # Metadata agrees with the parts.
    count = METADATA_RESULT.unpack(parts.metadata(1, 0, META_COUNT).result)[0]
    assert count == len(first)
    assert parts.parts_size(1, 0) == sum(DEV_PART_HDR_SIZE + len(p.value) for p in first)
    listed = parts.metadata(1, 0, META_LIST, METADATA_RESULT.size + count * DEV_PART_HDR_SIZE)
    assert listed.status == OK
    assert [h.key for h in unpack_headers(listed.result[METADATA_RESULT.size:])] == [p.key for p in first]


def test_selected_parts_come_in_table_order_and_missing_ones_are_skipped(parts) -> None:
    assert parts.create(1, 0, GET).status == OK
    wanted = [DevicePart(VQ_CFG_PART, selector=vq_selector(0)), DevicePart(VQ_CFG_PART, selector=vq_selector(9)),
              DevicePart(DRV_FEATURES), DevicePart(0x5FF)]
    got = parts.get(1, 0, ROOM, wanted)
    assert got.status == OK
    # DRV_FEATURES comes with the DEV_FEATURES it must follow (2.12.1.4.4.1).
    assert [p.key for p in unpack_parts(got.result)] == [
        (DEV_FEATURES, bytes(8)), (DRV_FEATURES, bytes(8)), (VQ_CFG_PART, vq_selector(0))]
    common = parts.get(1, 0, ROOM, [DevicePart(COMMON_CFG, selector=offset_selector(VIRTIO_PCI_COMMON_NUMQ))])
    assert [p.part_type for p in unpack_parts(common.result)] == [DEV_FEATURES, DRV_FEATURES, COMMON_CFG]


def test_results_that_do_not_fit_fail_enomem(parts) -> None:
    assert parts.create(1, 0, GET).status == OK
    size = parts.parts_size(1, 0)
    assert size is not None
    assert parts.get(1, 0, size - 1).status == ENOMEM
    assert parts.metadata(1, 0, META_LIST, METADATA_RESULT.size).status == ENOMEM
    assert parts.metadata(1, 0, META_SIZE, 4).status == ENOMEM
    assert parts.get(1, 0, size).status == OK


def test_objects_are_used_for_what_they_were_created_for(parts) -> None:
    assert parts.create(1, 0, GET).status == OK
    assert parts.create(1, 1, SET).status == OK
    assert parts.get(1, 1, ROOM).status == EINVAL
    assert parts.mode(1, 1).status == OK
    assert parts.set(1, 0, []).status == EINVAL
    assert parts.get(1, 2, ROOM).status == ENXIO


# -- stop and resume ------------------------------------------------------------------------------------
def test_a_stopped_member_touches_no_memory_and_sends_nothing(machine, parts) -> None:
    nic, peer = vf_nic(machine, 0), vf_nic(machine, 1)
    nic.post_rx(4)
    peer.post_rx(4)
    mac, peer_mac = vf_mac(PF_MAC, 0), vf_mac(PF_MAC, 1)
    nic.send(frame(b"\xff" * 6, mac, b"learn me"))
    peer.receive()
    assert nic.tx_completed() == 1
    machine.platform.service_interrupts()
    before = dict(nic.driver.interrupts)
    assert parts.mode(1, 1).status == OK
    assert parts.mode(1, 1).status == OK  # already stopped: OK
    vf = machine.sriov.enabled_vfs[0]
    peer.send(frame(mac, peer_mac, b"while stopped"))  # lands in the backlog, not in the ring
    nic.send(frame(peer_mac, mac, b"queued while stopped"))  # notification accepted, not served
    vf.config_changed()  # held
    machine.platform.service_interrupts()
    assert nic.receive() == [] and nic.tx_completed() == 0
    assert peer.receive() == []
    assert dict(nic.driver.interrupts) == before
    # Reads stay valid while stopped.
    assert nic.driver.common_read(VIRTIO_PCI_COMMON_NUMQ, 2) == 2

    assert parts.mode(1, 0).status == OK
    machine.platform.service_interrupts()
    assert [p[14:27] for _, p in nic.receive()] == [b"while stopped"]
    assert [p[14:34] for _, p in peer.receive()] == [b"queued while stopped"]
    assert nic.driver.interrupts["config"] == before.get("config", 0) + 1
    assert parts.mode(1, 0).status == OK  # not stopped: OK


def test_set_needs_a_stopped_member(parts) -> None:
    assert parts.create(1, 0, SET).status == OK
    assert parts.set(1, 0, []).status == EINVAL
    assert parts.mode(1, 1).status == OK
    assert parts.set(1, 0, []).status == OK


def test_parts_move_a_running_member_to_another(machine, parts) -> None:
    """A migration between two VFs: stop the source, get its parts, set them into the stopped destination, resume."""
    source = vf_nic(machine, 0)
    source.post_rx(4)
    assert parts.create(1, 0, GET).status == OK
    assert parts.create(2, 1, SET).status == OK
    assert parts.mode(1, 1).status == OK
    state = get_all(parts, 1, 0)
    dest = machine.sriov.enabled_vfs[1]
    assert dest.common.status == 0  # never brought up
    assert parts.mode(2, 1).status == OK
    assert parts.set(2, 1, state[:4]).status == OK  # in several commands, the same parts again too
    assert parts.set(2, 1, state).status == OK
    assert dest.common.status == 0  # takes effect at the resume
    assert parts.mode(2, 0).status == OK
    assert dest.common.status == source.driver.status
    assert dest.common.driver_features == source.driver.features
    assert dest.device.driver_features == machine.sriov.enabled_vfs[0].device.driver_features
    assert [(q.desc, q.driver, q.device, q.enabled) for q in dest.common.queues] == [
        (q.desc, q.driver, q.device, q.enabled) for q in machine.sriov.enabled_vfs[0].common.queues]
    # The destination serves the source's rings: a frame for it lands in the buffers the source's driver posted.
    peer = VirtioNetDriver(machine.pf_driver)
    peer.send(frame(vf_mac(PF_MAC, 1), PF_MAC, b"to the destination"))
    assert [p[14:32] for _, p in source.receive()] == [b"to the destination"]


@pytest.mark.parametrize("bad, why", [
    ([DevicePart(DRV_FEATURES, bytes(4))], "length"),
    ([DevicePart(DEV_FEATURES, bytes(8), flags=1)], "device features"),
    ([DevicePart(DEVICE_STATUS, b"\x0f"), DevicePart(DRV_FEATURES, bytes(8))], "order"),
    ([DevicePart(0x106, b"x")], "unknown"),
    ([DevicePart(VQ_CFG_PART, bytes(VQ_CFG.size), vq_selector(7))], "virtqueue 7"),
    ([DevicePart(VQ_CFG_PART, VQ_CFG.pack(3, 0, 1, 0, 0, 0), vq_selector(0))], "queue_size"),
    ([DevicePart(COMMON_CFG, (9).to_bytes(2, "little"), offset_selector(VIRTIO_PCI_COMMON_NUMQ))], "num_queues"),
    ([DevicePart(COMMON_CFG, bytes(1), offset_selector(VIRTIO_PCI_COMMON_Q_SELECT))], "length"),
    ([DevicePart(VIRTIO_NET_DEV_PART_CVQ_CFG_PART, bytes(VLAN_TABLE_LEN), VLAN_TABLE_SELECTOR)], "control queue"),
])
def test_bad_parts_fail_and_change_nothing(machine, parts, caplog, bad, why) -> None:
    nic = vf_nic(machine, 0)
    assert parts.create(1, 0, GET).status == OK
    assert parts.create(1, 1, SET).status == OK
    before = get_all(parts, 1, 0)
    assert parts.mode(1, 1).status == OK
    with caplog.at_level(logging.WARNING):
        got = parts.set(1, 1, [DevicePart(DRV_FEATURES, bytes(8))] + bad if why == "order" else bad)
    assert got.status == EINVAL
    assert why in caplog.text
    assert parts.mode(1, 0).status == OK
    assert get_all(parts, 1, 0) == before
    assert nic.driver.status & VIRTIO_CONFIG_S_DRIVER_OK


def test_a_truncated_part_fails(parts, caplog) -> None:
    assert parts.create(1, 1, SET).status == OK
    assert parts.mode(1, 1).status == OK
    data = obj_hdr(1) + DevicePart(DEVICE_STATUS, b"\x01").pack()[:-1]
    with caplog.at_level(logging.WARNING):
        assert parts.send(0x10, 1, data).status == EINVAL
    assert "device part 0x103 says 1 bytes of value, 0 follow" in caplog.text


def test_an_unknown_optional_part_is_ignored(parts) -> None:
    assert parts.create(1, 1, SET).status == OK
    assert parts.mode(1, 1).status == OK
    assert parts.set(1, 1, [DevicePart(0x1FF, b"whatever", flags=1)]).status == OK


def test_a_member_reset_while_stopped_clears_its_parts(machine, parts) -> None:
    vf_nic(machine, 0)
    assert parts.create(1, 0, GET).status == OK
    assert parts.mode(1, 1).status == OK
    machine.sriov.enabled_vfs[0].reset()  # FLR
    got = get_all(parts, 1, 0)
    assert the(got, DRV_FEATURES).value == bytes(8) and the(got, DEVICE_STATUS).value == b"\0"
    assert all(VQ_CFG.unpack(p.value)[2] == 0 for p in got if p.part_type == VQ_CFG_PART)
    assert parts.mode(1, 0).status == OK
    assert machine.sriov.enabled_vfs[0].device.queues == [None, None]


# -- the net parts -----------------------------------------------------------------------------------------
def test_the_vlan_table_is_a_net_part() -> None:
    device = VirtioNet(PF_MAC, ctrl_vq=True)
    platform = fake_clock_platform([device])
    try:
        function = platform.functions[0]
        member = PciDeviceParts(function, NetParts())
        assert device.ctrl is not None
        device.ctrl.vlans.update({1, 4095})
        [vlan] = [p for p in member.capture() if p.part_type == VIRTIO_NET_DEV_PART_CVQ_CFG_PART]
        assert vlan.selector == bytes([VIRTIO_NET_CTRL_VLAN, VIRTIO_NET_CTRL_VLAN_ADD]) + bytes(6)
        assert vlan.value == ((1 << 1) | (1 << 4095)).to_bytes(VLAN_TABLE_LEN, "little")
        member.stop()
        table = DevicePart(VIRTIO_NET_DEV_PART_CVQ_CFG_PART, (1 << 100).to_bytes(VLAN_TABLE_LEN, "little"),
                           VLAN_TABLE_SELECTOR)
        assert member.stage([table]) is None
        assert device.ctrl.vlans == {1, 4095}  # at the resume
        member.resume()
        assert device.ctrl.vlans == {100}
    finally:
        platform.close()


# -- bad input never escapes the command -------------------------------------------------------------------
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(opcode=st.integers(OBJ_CREATE, MODE_SET), member=st.integers(0, 3), data=st.binary(max_size=96),
       room=st.integers(0, 600))
def test_any_command_bytes_complete_with_a_status(machine, parts, opcode, member, data, room) -> None:
    """Arbitrary device parts commands (objects, parts, modes) complete with a status; the owner keeps serving."""
    group = machine.pf.admin.groups[SRIOV].group
    result = group.execute(AdminCommand(opcode, SRIOV, member, data, room))
    assert result.status in (OK, EINVAL, ENXIO, EEXIST, ENOSPC, ENOMEM)
    if opcode in (METADATA_GET, PARTS_GET_OP):  # these fail ENOMEM rather than be cut (the queue cuts the others)
        assert len(result.data) <= room or not result.ok


_PART = st.builds(
    lambda t, sel, value, flags: DevicePart(t, value, sel, flags),
    st.sampled_from([DEV_FEATURES, DRV_FEATURES, COMMON_CFG, DEVICE_STATUS, VQ_CFG_PART, VQ_NOTIFY_PART,
                     VIRTIO_NET_DEV_PART_CVQ_CFG_PART, 0x106]),
    st.one_of(st.sampled_from([vq_selector(0), vq_selector(1), vq_selector(5), offset_selector(0x10),
                               offset_selector(VIRTIO_PCI_COMMON_NUMQ), offset_selector(0x16)]), st.binary(min_size=8, max_size=8)),
    st.one_of(st.binary(max_size=40), st.builds(lambda *f: VQ_CFG.pack(*f), st.sampled_from([0, 3, 64, 256, 1024]),
                                                st.sampled_from([0, 1, 5, 0xFFFF]), st.integers(0, 2),
                                                st.integers(0, 1 << 40), st.integers(0, 1 << 40), st.integers(0, 1 << 40))),
    st.integers(0, 1),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(found=st.lists(_PART, max_size=6), tail=st.binary(max_size=20))
def test_any_parts_set_on_a_stopped_member_then_resume_keeps_serving(machine, parts, found, tail) -> None:
    """DEV_PARTS_SET of arbitrary parts (and trailing bytes), then a resume: a status for each command, at worst
    DEVICE_NEEDS_RESET on the member, and the owner serves on."""
    vf = machine.sriov.enabled_vfs[0]
    if not vf.common.status:
        vf_nic(machine, 0)
    parts.create(1, 7, SET)
    assert parts.mode(1, 1).status == OK
    parts.send(PARTS_SET, 1, obj_hdr(7) + b"".join(p.pack() for p in found) + tail)
    assert parts.mode(1, 0).status == OK
    assert machine.admin.command(LIST_QUERY, SRIOV, result_size=8).status == OK


def test_a_restored_ring_outside_memory_needs_reset_not_a_crash(machine, parts, caplog) -> None:
    nic = vf_nic(machine, 0)
    assert parts.create(1, 1, SET).status == OK
    assert parts.mode(1, 1).status == OK
    far = 1 << 40  # no guest memory there
    ring = DevicePart(VQ_CFG_PART, VQ_CFG.pack(nic.rx.size, 1, 1, far, far + 0x1000, far + 0x2000), vq_selector(0))
    assert parts.set(1, 1, [ring]).status == OK  # addresses are the driver's business until the queue starts
    with caplog.at_level(logging.WARNING):
        assert parts.mode(1, 0).status == OK
    assert "queue 0 cannot resume" in caplog.text
    assert nic.driver.status & VIRTIO_CONFIG_S_NEEDS_RESET
    assert machine.admin.command(LIST_QUERY, SRIOV, result_size=8).status == OK


def test_an_owner_reset_lets_a_stopped_member_run_again(machine, parts) -> None:
    nic, peer = vf_nic(machine, 0), vf_nic(machine, 1)
    nic.post_rx(2)
    peer.send(frame(b"\xff" * 6, vf_mac(PF_MAC, 1), b"hello"))
    nic.receive()
    assert parts.mode(1, 1).status == OK
    machine.pf_driver.reset()  # a virtio reset of the owner: the VFs stay
    peer.send(frame(vf_mac(PF_MAC, 0), vf_mac(PF_MAC, 1), b"after the owner reset"))
    assert [p[14:35] for _, p in nic.receive()] == [b"after the owner reset"]


def test_an_owner_flr_with_a_stopped_member(machine, parts) -> None:
    vf_nic(machine, 0)
    assert parts.mode(1, 1).status == OK
    machine.pf.reset()  # FLR: the VFs go, and their state with them
    assert machine.sriov.enabled_vfs == []
    assert machine.pf.admin is not None and machine.pf.admin.groups[SRIOV].group.parts.objects == {}


def test_a_member_set_up_again_while_stopped_resumes_on_its_new_rings(machine, parts) -> None:
    """Reset and brought up again while stopped, the member starts no queue (2.12.1.4.4.1: no transport request
    while stopped) and resumes on the new rings, not on the positions it had on the old ones."""
    vf_nic(machine, 0)
    assert parts.mode(1, 1).status == OK
    nic = vf_nic(machine, 0)  # reset, features, new rings, queue_enable, DRIVER_OK
    nic.post_rx(2)
    stopped_vf = machine.sriov.enabled_vfs[0]
    assert [stopped_vf.device.queues[i] for i in (0, 1)] == [None, None]  # enabled by the driver, held
    assert [stopped_vf.common.queues[i].enabled for i in (0, 1)] == [True, True]
    assert parts.mode(1, 0).status == OK
    vf = machine.sriov.enabled_vfs[0]
    assert [vf.device.queues[i].state().desc_addr for i in (0, 1)] == [nic.rx.desc_addr, nic.tx.desc_addr]
    peer = vf_nic(machine, 1)
    peer.send(frame(vf_mac(PF_MAC, 0), vf_mac(PF_MAC, 1), b"new rings"))
    assert [p[14:23] for _, p in nic.receive()] == [b"new rings"]
