"""Wire format: payload pack/unpack round trips and syntax checks."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iovirt.vhost_user.errors import PayloadSizeError, PayloadValueError, VhostUserProtocolError
from iovirt.vhost_user.framing import HEADER_SIZE, Header, build_message
from iovirt.vhost_user.messages import (
    VHOST_USER_NEED_REPLY_MASK,
    VHOST_USER_VERSION,
    BackendRequest,
    Config,
    DeviceStateTransfer,
    FrontendRequest,
    Inflight,
    IotlbMsg,
    IotlbPerm,
    IotlbType,
    Log,
    MemoryTable,
    MemRegion,
    MigrationPhase,
    ProtocolFeature,
    Rarp,
    SharedObject,
    SingleMemRegion,
    TransferDirection,
    U64,
    VringAddr,
    VringArea,
    VringFile,
    VringState,
    feature_mask,
)

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, 0xFFFF_FFFF_FFFF_FFFF)
regions = st.builds(MemRegion, u64, u64, u64, u64)

payloads = st.one_of(
    st.builds(U64, u64),
    st.builds(VringFile, u8, st.booleans()),
    st.builds(Rarp, st.binary(min_size=6, max_size=6)),
    st.builds(VringState, u32, u32),
    st.builds(VringAddr, u32, st.sampled_from([0, 1]), u64, u64, u64, u64),
    regions,
    st.builds(MemoryTable, st.lists(regions, max_size=8).map(tuple)),
    st.builds(SingleMemRegion, regions),
    st.builds(Log, u64, u64),
    st.builds(IotlbMsg, u64, u64, u64, st.sampled_from(IotlbPerm), st.sampled_from(IotlbType)),
    st.builds(Config, u32, st.sampled_from([0, 1]), st.binary(max_size=256)),
    st.builds(Inflight, u64, u64, u16, u16),
    st.builds(VringArea, u64, u64, u64),
    st.builds(SharedObject, st.binary(min_size=16, max_size=16)),
    st.builds(DeviceStateTransfer, st.sampled_from(TransferDirection), st.sampled_from(MigrationPhase)),
)


@given(payloads)
def test_payload_round_trip(payload):
    assert type(payload).unpack(payload.pack(), 5) == payload


@given(payloads, st.integers(1, 8))
def test_payload_with_a_byte_missing_or_extra_is_rejected(payload, extra):
    data = payload.pack()
    for bad in (data[:-1], data + bytes(extra)):
        with pytest.raises(VhostUserProtocolError) as info:
            type(payload).unpack(bad, 7)
        assert info.value.request == 7


@given(u32, u32, u32)
def test_header_round_trip(request, flags, size):
    header = Header(request, flags, size)
    data = header.pack()
    assert len(data) == HEADER_SIZE
    assert Header.unpack(data) == header


def test_header_layout_is_native_u32s():
    data = build_message(FrontendRequest.VHOST_USER_SET_FEATURES, VHOST_USER_VERSION | VHOST_USER_NEED_REPLY_MASK, U64(5))
    assert struct.unpack("=IIIQ", data) == (2, 0x9, 8, 5)
    header = Header.unpack(data[:12])
    assert header.version == 1 and header.need_reply and not header.is_reply


def test_spec_numbers():
    assert FrontendRequest.VHOST_USER_SET_VRING_KICK == 12
    assert FrontendRequest.VHOST_USER_SET_BACKEND_REQ_FD == 21
    assert FrontendRequest.VHOST_USER_GET_MAX_MEM_SLOTS == 36
    assert FrontendRequest.VHOST_USER_CHECK_DEVICE_STATE == 43
    assert BackendRequest.VHOST_USER_BACKEND_SHARED_OBJECT_LOOKUP == 8
    assert ProtocolFeature.VHOST_USER_PROTOCOL_F_REPLY_ACK == 3
    assert ProtocolFeature.VHOST_USER_PROTOCOL_F_CONFIG == 9
    assert ProtocolFeature.VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD == 12
    assert ProtocolFeature.VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS == 15
    assert ProtocolFeature.VHOST_USER_PROTOCOL_F_DEVICE_STATE == 19
    assert feature_mask(0, 3, 30) == 0x4000_0009


def test_wire_sizes_match_the_c_structs():
    # QEMU sends sizeof() of these C structs, including tail padding.
    assert len(VringAddr(0, 0, 0, 0, 0, 0).pack()) == 40
    assert len(IotlbMsg(0, 0, 0, IotlbPerm.VHOST_ACCESS_RO, IotlbType.VHOST_IOTLB_UPDATE).pack()) == 32
    assert len(Inflight(0, 0, 0, 0).pack()) == 24
    assert len(SingleMemRegion(MemRegion(0, 0, 0, 0)).pack()) == 40
    assert len(MemoryTable((MemRegion(0, 1, 2, 3),) * 2).pack()) == 8 + 2 * 32


def test_memory_table_more_than_8_regions():
    data = struct.pack("=II", 9, 0) + MemRegion(0, 0x1000, 0, 0).pack() * 9
    with pytest.raises(PayloadValueError) as info:
        MemoryTable.unpack(data, FrontendRequest.VHOST_USER_SET_MEM_TABLE)
    assert info.value.field == "num regions" and info.value.value == 9
    assert "VHOST_USER_SET_MEM_TABLE" in str(info.value)


def test_memory_table_count_disagrees_with_size():
    data = struct.pack("=II", 2, 0) + MemRegion(0, 0x1000, 0, 0).pack()
    with pytest.raises(PayloadSizeError) as info:
        MemoryTable.unpack(data, 5)
    assert info.value.size == 40 and "72 bytes" in info.value.expected


def test_memory_table_too_short_for_its_prefix():
    with pytest.raises(PayloadSizeError):
        MemoryTable.unpack(b"\1\0\0", 5)


def test_vring_file_bits():
    assert VringFile.unpack(struct.pack("=Q", 0x103)) == VringFile(3, True)
    assert VringFile(2).pack() == struct.pack("=Q", 2)
    with pytest.raises(PayloadValueError):
        VringFile.unpack(struct.pack("=Q", 0x203))


def test_vring_addr_unknown_flag():
    with pytest.raises(PayloadValueError) as info:
        VringAddr.unpack(VringAddr(0, 2, 0, 0, 0, 0).pack())
    assert info.value.field == "vring flags"


def test_config_checks():
    with pytest.raises(PayloadValueError):
        Config.unpack(struct.pack("=III", 0, 257, 0) + bytes(257))
    with pytest.raises(PayloadValueError):
        Config.unpack(struct.pack("=III", 0, 4, 2) + bytes(4))
    with pytest.raises(PayloadSizeError):
        Config.unpack(struct.pack("=III", 0, 4, 0) + bytes(3))
    with pytest.raises(PayloadSizeError):
        Config.unpack(b"\0" * 11)
    assert Config.unpack(struct.pack("=III", 8, 2, 1) + b"ab") == Config(8, 1, b"ab")


@pytest.mark.parametrize("perm,type_", [(4, 2), (1, 0), (1, 5)])
def test_iotlb_enums(perm, type_):
    with pytest.raises(PayloadValueError):
        IotlbMsg.unpack(struct.pack("=QQQBB6x", 0, 0, 0, perm, type_))


def test_device_state_enums():
    with pytest.raises(PayloadValueError):
        DeviceStateTransfer.unpack(struct.pack("=II", 2, 0))
    with pytest.raises(PayloadValueError):
        DeviceStateTransfer.unpack(struct.pack("=II", 0, 1))


def test_rarp_mac():
    assert Rarp.unpack(b"\x52\x54\x00\x12\x34\x56\xff\xff").mac == bytes.fromhex("525400123456")
    with pytest.raises(ValueError):
        Rarp(b"\1\2")


@given(st.binary(max_size=64))
def test_unpack_never_raises_anything_but_protocol_errors(data):
    for cls in (U64, VringFile, Rarp, VringState, VringAddr, MemoryTable, SingleMemRegion, Log,
                IotlbMsg, Config, Inflight, VringArea, SharedObject, DeviceStateTransfer):
        try:
            cls.unpack(data)
        except VhostUserProtocolError:
            pass
