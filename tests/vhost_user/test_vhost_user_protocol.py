"""The sans-I/O backend connection fed with in-memory bytes.

The fds here are plain numbers: the protocol object only carries them from
input to events and never touches them (the socket tests pass real ones).
"""

from __future__ import annotations

import struct

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iovirt.vhost_user.errors import (
    BadVersionError,
    FdCountError,
    FlagsError,
    LocalProtocolError,
    PayloadSizeError,
    PayloadTooLargeError,
    PayloadValueError,
    TruncatedMessageError,
    UnknownRequestError,
    UnsupportedRequestError,
)
from iovirt.vhost_user.framing import Header, build_message
from iovirt.vhost_user.messages import (
    VHOST_USER_NEED_REPLY_MASK,
    VHOST_USER_REPLY_MASK,
    VHOST_USER_VERSION,
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
    SingleMemRegion,
    TransferDirection,
    U64,
    VringAddr,
    VringFile,
    VringState,
    feature_mask,
)
from iovirt.vhost_user.requests import REQUEST_TYPES, SetMemTable, SetVringCall, SetVringKick
from iovirt.vhost_user.protocol import (
    REQUEST_RULES,
    payload_of,
    BackendConnection,
    ConnectionClosed,
    ConnectionState,
    ProtocolFailure,
    RejectedRequest,
    ReplyKind,
    Request,
)

R = FrontendRequest
PF = ProtocolFeature
V1 = VHOST_USER_VERSION
NEED = VHOST_USER_VERSION | VHOST_USER_NEED_REPLY_MASK
ALL_PF = feature_mask(*ProtocolFeature)


def msg(request, payload=None, flags=V1):
    return build_message(request, flags, payload)


def region(i):
    return MemRegion(i * 0x10000, 0x10000, 0x7F00_0000_0000 + i * 0x10000, 0)


# A QEMU-like bring-up: (bytes, fds) per message.
BRING_UP = [
    (msg(R.VHOST_USER_GET_FEATURES), ()),
    (msg(R.VHOST_USER_GET_PROTOCOL_FEATURES), ()),
    (msg(R.VHOST_USER_SET_PROTOCOL_FEATURES, U64(feature_mask(PF.VHOST_USER_PROTOCOL_F_REPLY_ACK))), ()),
    (msg(R.VHOST_USER_SET_OWNER), ()),
    (msg(R.VHOST_USER_SET_FEATURES, U64(1 << 32 | 1 << 30)), ()),
    (msg(R.VHOST_USER_SET_MEM_TABLE, MemoryTable((region(0), region(1))), NEED), (100, 101)),
    (msg(R.VHOST_USER_SET_VRING_NUM, VringState(0, 256), NEED), ()),
    (msg(R.VHOST_USER_SET_VRING_BASE, VringState(0, 0)), ()),
    (msg(R.VHOST_USER_SET_VRING_ADDR, VringAddr(0, 0, 0x7F00_0000_0000, 0x7F00_0000_2000, 0x7F00_0000_1000)), ()),
    (msg(R.VHOST_USER_SET_VRING_KICK, VringFile(0)), (102,)),
    (msg(R.VHOST_USER_SET_VRING_CALL, VringFile(0, invalid_fd=True)), ()),
    (msg(R.VHOST_USER_SET_VRING_ENABLE, VringState(0, 1)), ()),
    (msg(R.VHOST_USER_GET_CONFIG, Config(0, 0, bytes(8))), ()),
    (msg(R.VHOST_USER_GET_INFLIGHT_FD, Inflight(0, 0, 2, 256)), ()),
    (msg(R.VHOST_USER_SET_INFLIGHT_FD, Inflight(4096, 0, 2, 256)), (103,)),
    (msg(R.VHOST_USER_ADD_MEM_REG, SingleMemRegion(region(3))), (104,)),
    (msg(R.VHOST_USER_REM_MEM_REG, SingleMemRegion(region(3))), ()),
    (msg(R.VHOST_USER_IOTLB_MSG, IotlbMsg(0x1000, 0x1000, 0x7F00_0000_0000, IotlbPerm.VHOST_ACCESS_RW, IotlbType.VHOST_IOTLB_UPDATE)), ()),
    (msg(R.VHOST_USER_SET_LOG_BASE, Log(0x1000, 0)), (105,)),
    (msg(R.VHOST_USER_SET_DEVICE_STATE_FD, DeviceStateTransfer(TransferDirection.SAVE, MigrationPhase.STOPPED)), (106,)),
    (msg(R.VHOST_USER_GET_VRING_BASE, VringState(0, 0)), ()),
    (msg(R.VHOST_USER_RESET_DEVICE), ()),
]


def conn():
    return BackendConnection(supported_protocol_features=ALL_PF)


def feed_whole(c, messages):
    events = []
    for data, fds in messages:
        events += c.feed(data, fds)
    return events


def only(events):
    assert len(events) == 1, events
    return events[0]


def test_bring_up_gives_typed_requests():
    c = conn()
    events = feed_whole(c, BRING_UP)
    assert all(isinstance(e, Request) for e in events), events
    assert [e.request for e in events] == [Header.unpack(d[:12]).request for d, _ in BRING_UP]
    assert [e.fds for e in events] == [fds for _, fds in BRING_UP]
    table = events[5]
    assert isinstance(table, SetMemTable) and table.regions == (region(0), region(1)) and table.need_reply
    assert payload_of(table) == MemoryTable((region(0), region(1)))
    assert isinstance(events[9], SetVringKick) and (events[9].index, events[9].invalid_fd) == (0, False)
    assert isinstance(events[10], SetVringCall) and (events[10].index, events[10].invalid_fd) == (0, True)
    assert payload_of(events[9]) == VringFile(0) and payload_of(events[10]) == VringFile(0, True)
    assert c.protocol_features == feature_mask(PF.VHOST_USER_PROTOCOL_F_REPLY_ACK)
    assert c.state is ConnectionState.OPEN and c.bytes_needed == 12


def test_reply_kinds():
    c = conn()
    events = {e.request: e for e in feed_whole(c, BRING_UP)}
    assert events[R.VHOST_USER_GET_FEATURES].reply is ReplyKind.BODY
    assert events[R.VHOST_USER_SET_MEM_TABLE].reply is ReplyKind.ACK  # NEED_REPLY + REPLY_ACK
    assert events[R.VHOST_USER_SET_VRING_BASE].reply is ReplyKind.NONE  # no NEED_REPLY
    assert events[R.VHOST_USER_GET_CONFIG].reply is ReplyKind.BODY
    assert events[R.VHOST_USER_IOTLB_MSG].reply is ReplyKind.BODY
    # SET_LOG_BASE replies only when LOG_SHMFD was negotiated (it was not here).
    assert events[R.VHOST_USER_SET_LOG_BASE].reply is ReplyKind.NONE


def test_need_reply_without_reply_ack_gets_nothing():
    c = conn()
    event = only(c.feed(msg(R.VHOST_USER_SET_VRING_NUM, VringState(0, 8), NEED)))
    assert event.reply is ReplyKind.NONE and c.ack(event) == b""


def test_set_protocol_features_is_limited_to_supported_and_log_shmfd_reply():
    c = BackendConnection(supported_protocol_features=feature_mask(PF.VHOST_USER_PROTOCOL_F_LOG_SHMFD))
    c.feed(msg(R.VHOST_USER_SET_PROTOCOL_FEATURES, U64(ALL_PF)))
    assert c.protocol_features == feature_mask(PF.VHOST_USER_PROTOCOL_F_LOG_SHMFD)
    event = only(c.feed(msg(R.VHOST_USER_SET_LOG_BASE, Log(8, 0)), [7]))
    assert event.reply is ReplyKind.BODY
    assert c.nack(event) == build_message(R.VHOST_USER_SET_LOG_BASE, V1 | VHOST_USER_REPLY_MASK, U64(1))


def test_reply_bytes_and_misuse():
    c = conn()
    get, set_ = feed_whole(c, BRING_UP[:1] + BRING_UP[3:4])
    out = c.reply(get, U64(0x1234))
    assert out == build_message(R.VHOST_USER_GET_FEATURES, V1 | VHOST_USER_REPLY_MASK, U64(0x1234))
    with pytest.raises(LocalProtocolError):
        c.reply(get, VringState(0, 0))
    with pytest.raises(LocalProtocolError):
        c.reply(set_, U64(0))
    with pytest.raises(LocalProtocolError):
        c.ack(get)
    with pytest.raises(LocalProtocolError):
        c.nack(get, 0)


def test_ack_and_nack_with_reply_ack():
    c = conn()
    c.feed(msg(R.VHOST_USER_SET_PROTOCOL_FEATURES, U64(ALL_PF)))
    event = only(c.feed(msg(R.VHOST_USER_SET_VRING_NUM, VringState(0, 8), NEED)))
    reply = V1 | VHOST_USER_REPLY_MASK
    assert c.ack(event) == build_message(R.VHOST_USER_SET_VRING_NUM, reply, U64(0))
    assert c.nack(event, 22) == build_message(R.VHOST_USER_SET_VRING_NUM, reply, U64(22))


def test_nack_encodings_for_body_replies():
    c = conn()
    reply = V1 | VHOST_USER_REPLY_MASK
    get_config = only(c.feed(msg(R.VHOST_USER_GET_CONFIG, Config(0, 0, bytes(4)))))
    assert c.nack(get_config) == Header(R.VHOST_USER_GET_CONFIG, reply, 0).pack()
    state = only(c.feed(msg(R.VHOST_USER_SET_DEVICE_STATE_FD, DeviceStateTransfer(TransferDirection.LOAD, MigrationPhase.STOPPED)), [9]))
    assert c.nack(state, 5) == build_message(R.VHOST_USER_SET_DEVICE_STATE_FD, reply, U64(0x105))
    # GET_VRING_BASE's reply has no failure encoding: the caller must close.
    base = only(c.feed(msg(R.VHOST_USER_GET_VRING_BASE, VringState(0, 0))))
    assert c.nack(base) is None


# -- framing errors -------------------------------------------------------------


def test_unknown_request_is_rejected_and_can_be_nacked():
    c = conn()
    c.feed(msg(R.VHOST_USER_SET_PROTOCOL_FEATURES, U64(ALL_PF)))
    event = only(c.feed(msg(99, b"abcd", NEED), [5]))
    assert isinstance(event, RejectedRequest) and isinstance(event.error, UnknownRequestError)
    assert event.request == 99 and event.fds == (5,) and event.reply is ReplyKind.ACK
    assert c.nack(event) == build_message(99, V1 | VHOST_USER_REPLY_MASK, U64(1))
    # The stream is still framed: the next message parses.
    assert isinstance(only(c.feed(BRING_UP[0][0])), Request)


def test_unknown_request_without_need_reply_gets_no_reply():
    c = conn()
    event = only(c.feed(msg(0, b"")))
    assert isinstance(event.error, UnknownRequestError) and c.nack(event) == b""


def test_unsupported_request():
    event = only(conn().feed(msg(R.VHOST_USER_GPU_SET_SOCKET), [4]))
    assert isinstance(event.error, UnsupportedRequestError) and event.fds == (4,)
    assert "GPU_SET_SOCKET" in str(event.error)


@pytest.mark.parametrize(
    "request_,body",
    [
        (R.VHOST_USER_SET_FEATURES, b"\0" * 4),
        (R.VHOST_USER_SET_FEATURES, b"\0" * 16),
        (R.VHOST_USER_GET_FEATURES, b"\0" * 8),
        (R.VHOST_USER_SET_VRING_ADDR, b"\0" * 32),
        (R.VHOST_USER_GET_INFLIGHT_FD, b"\0" * 20),
        (R.VHOST_USER_IOTLB_MSG, b"\0" * 26),
    ],
)
def test_wrong_payload_size(request_, body):
    c = conn()
    event = only(c.feed(msg(request_, body)))
    assert isinstance(event, RejectedRequest) and isinstance(event.error, PayloadSizeError)
    assert event.error.request == request_ and event.error.size == len(body)
    assert c.state is ConnectionState.OPEN


def test_truncated_header_then_eof():
    c = conn()
    assert c.feed(BRING_UP[0][0][:5], [8]) == []
    assert c.bytes_needed == 7
    event = c.feed_eof()
    assert isinstance(event, ProtocolFailure) and isinstance(event.error, TruncatedMessageError)
    assert event.fds == (8,) and c.state is ConnectionState.ERROR


def test_eof_mid_body_names_the_request():
    c = conn()
    data = msg(R.VHOST_USER_SET_MEM_TABLE, MemoryTable((region(0),)))
    assert c.feed(data[:20], [3]) == []
    assert c.bytes_needed == len(data) - 20
    event = c.feed_eof()
    assert event.error.request == R.VHOST_USER_SET_MEM_TABLE and event.fds == (3,)
    assert (event.error.received, event.error.expected) == (20, len(data))


def test_clean_eof():
    c = conn()
    c.feed(BRING_UP[0][0])
    assert c.feed_eof() == ConnectionClosed(())
    assert c.state is ConnectionState.CLOSED
    with pytest.raises(LocalProtocolError):
        c.feed(b"x")


def test_bad_version_is_fatal_and_returns_fds():
    c = conn()
    good = msg(R.VHOST_USER_SET_VRING_KICK, VringFile(0))
    bad = msg(R.VHOST_USER_SET_VRING_KICK, VringFile(0), flags=0x2)
    # The fd goes with the first message of the feed; the bad header ends the stream.
    events = c.feed(good + bad + good, [11])
    assert isinstance(events[0], Request) and events[0].fds == (11,)
    failure = events[1]
    assert isinstance(failure, ProtocolFailure) and isinstance(failure.error, BadVersionError)
    assert failure.error.fatal and len(events) == 2
    assert c.state is ConnectionState.ERROR
    with pytest.raises(LocalProtocolError):
        c.feed(good, [12])
    with pytest.raises(LocalProtocolError):
        c.feed_eof()


def test_bad_version_fds_come_back():
    c = conn()
    failure = only(c.feed(msg(R.VHOST_USER_SET_VRING_KICK, VringFile(0), flags=0), [13]))
    assert failure.fds == (13,)


def test_payload_too_large_is_fatal():
    c = conn()
    failure = only(c.feed(Header(R.VHOST_USER_SET_CONFIG, V1, 0x10000).pack()))
    assert isinstance(failure.error, PayloadTooLargeError) and c.state is ConnectionState.ERROR


@pytest.mark.parametrize("flags,reason", [(V1 | VHOST_USER_REPLY_MASK, "reply bit"), (V1 | 0x10, "reserved")])
def test_bad_flags_rejected(flags, reason):
    event = only(conn().feed(msg(R.VHOST_USER_SET_OWNER, flags=flags)))
    assert isinstance(event.error, FlagsError) and reason in str(event.error)


@pytest.mark.parametrize(
    "data,fds",
    [
        (msg(R.VHOST_USER_GET_FEATURES), (1,)),  # fd on a message that carries none
        (msg(R.VHOST_USER_SET_VRING_NUM, VringState(0, 8)), (1, 2)),
        (msg(R.VHOST_USER_SET_VRING_KICK, VringFile(0)), ()),  # none where one is needed
        (msg(R.VHOST_USER_SET_VRING_CALL, VringFile(1, invalid_fd=True)), (1,)),  # no-fd bit but an fd
        (msg(R.VHOST_USER_SET_VRING_ERR, VringFile(1)), (1, 2)),
        (msg(R.VHOST_USER_ADD_MEM_REG, SingleMemRegion(region(0))), ()),
        (msg(R.VHOST_USER_SET_MEM_TABLE, MemoryTable((region(0), region(1)))), (1,)),
        (msg(R.VHOST_USER_SET_INFLIGHT_FD, Inflight(0, 0, 1, 8)), ()),
        (msg(R.VHOST_USER_SET_BACKEND_REQ_FD), ()),
        (msg(R.VHOST_USER_SET_LOG_BASE, Log(8, 0)), ()),
        (msg(R.VHOST_USER_REM_MEM_REG, SingleMemRegion(region(0))), (1, 2)),
    ],
)
def test_fd_count_errors(data, fds):
    c = conn()
    event = only(c.feed(data, fds))
    assert isinstance(event, RejectedRequest) and isinstance(event.error, FdCountError)
    assert event.fds == fds and event.error.count == len(fds)
    assert c.state is ConnectionState.OPEN


def test_rem_mem_reg_may_carry_one_fd():
    c = conn()
    for fds in ((), (6,)):
        event = only(c.feed(msg(R.VHOST_USER_REM_MEM_REG, SingleMemRegion(region(0))), fds))
        assert isinstance(event, Request) and event.fds == fds


def test_more_than_8_regions_rejected_with_all_fds():
    data = build_message(
        R.VHOST_USER_SET_MEM_TABLE, V1, struct.pack("=II", 9, 0) + b"".join(region(i).pack() for i in range(9))
    )
    fds = tuple(range(20, 29))
    event = only(conn().feed(data, fds))
    assert isinstance(event.error, PayloadValueError) and event.error.field == "num regions"
    assert event.fds == fds


def test_fds_in_an_empty_feed_go_to_the_next_message():
    c = conn()
    assert c.feed(b"", [3]) == []
    event = only(c.feed(BRING_UP[9][0]))
    assert event.fds == (3,)


def test_bytes_needed_walks_header_then_body():
    c = conn()
    data = msg(R.VHOST_USER_SET_VRING_ADDR, VringAddr(0, 0, 1, 2, 3))
    assert c.bytes_needed == 12
    c.feed(data[:12])
    assert c.bytes_needed == 40
    c.feed(data[12:30])
    assert c.bytes_needed == 22
    assert isinstance(only(c.feed(data[30:])), Request)
    assert c.bytes_needed == 12


# -- properties -------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_any_byte_split_gives_the_same_events(data):
    stream = b"".join(d for d, fds in BRING_UP if not fds)
    expected = conn().feed(stream)
    cuts = sorted(data.draw(st.sets(st.integers(1, len(stream) - 1), max_size=40)))
    c = conn()
    events = []
    for a, b in zip([0, *cuts], [*cuts, len(stream)]):
        events += c.feed(stream[a:b])
    assert events == expected


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_fds_stay_with_their_message_under_bounded_reads(data):
    # A reader that never reads past bytes_needed, as the server does:
    # fds arrive with the first chunk of their message.
    c = conn()
    events = []
    for message, fds in BRING_UP:
        pos, first = 0, True
        while pos < len(message):
            n = data.draw(st.integers(1, c.bytes_needed), label="read size")
            events += c.feed(message[pos : pos + n], fds if first else ())
            pos += n
            first = False
    assert [e.fds for e in events] == [fds for _, fds in BRING_UP]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.lists(st.integers(3, 1000), max_size=3))
def test_garbage_never_raises_and_never_loses_fds(garbage, fds):
    c = conn()
    events = c.feed(garbage, fds)
    if c.state is ConnectionState.OPEN:
        events.append(c.feed_eof())
    returned = [fd for e in events for fd in e.fds]
    assert sorted(returned) == sorted(fds)


def test_every_rule_has_its_typed_request():
    """REQUEST_RULES and the typed requests agree: same codes, and payload <-> request round-trips."""
    assert set(REQUEST_TYPES) == set(REQUEST_RULES)
    for code, rule in REQUEST_RULES.items():
        cls = REQUEST_TYPES[code]
        assert cls.code is code
        own = [f for f in dataclasses.fields(cls) if not f.kw_only]
        if rule.payload is None:
            assert own == []
        else:
            # The request's fields are the payload's, in its order (only u64 values get spec names).
            assert len(own) == len(dataclasses.fields(rule.payload)), cls
