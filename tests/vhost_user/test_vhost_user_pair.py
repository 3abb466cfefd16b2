"""A BackendConnection and a FrontendConnection paired in memory (no sockets), h11 style.

Both ends share one framer (:mod:`iovirt.vhost_user.framing`): what one
builds the other parses, fds travel beside the bytes as plain numbers, and
every malformed reply is rejected by the front-end with a clear reason.
"""

from __future__ import annotations

import pytest

from iovirt.vhost_user.errors import BadReplyError, BadVersionError, NackError
from iovirt.vhost_user.framing import (
    ConnectionClosed,
    ConnectionState,
    Framer,
    Header,
    Message,
    ProtocolFailure,
    build_message,
    build_reply,
)
from iovirt.vhost_user.messages import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_REPLY_MASK,
    VHOST_USER_VERSION,
    FrontendRequest,
    Inflight,
    MemoryTable,
    MemRegion,
    ProtocolFeature,
    U64,
    VringAddr,
    VringFile,
    VringState,
    feature_mask,
)
from iovirt.vhost_user.protocol import BackendConnection, FrontendConnection, ReplyKind, Request
from iovirt.vhost_user.requests import GetInflightFd, SetMemTable, SetStatus

R = FrontendRequest
PF = ProtocolFeature
OFFERED = 1 << 32 | 1 << VHOST_USER_F_PROTOCOL_FEATURES
SUPPORTED_PF = feature_mask(PF.VHOST_USER_PROTOCOL_F_REPLY_ACK, PF.VHOST_USER_PROTOCOL_F_STATUS,
                            PF.VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD)
REGION = MemRegion(0, 0x10000, 0x7F00_0000_0000, 0)


class Pair:
    """Both ends of one connection; ``answer`` plays the back-end's handler."""

    def __init__(self) -> None:
        self.front = FrontendConnection()
        self.back = BackendConnection(supported_protocol_features=SUPPORTED_PF)
        self.seen: list[Request] = []

    def answer(self, req: Request) -> tuple[bytes, tuple[int, ...]]:
        if req.reply is ReplyKind.BODY:
            if isinstance(req, GetInflightFd):
                return self.back.reply(req, Inflight(4096, 0, req.num_queues, req.queue_size)), (77,)
            value = {R.VHOST_USER_GET_FEATURES: OFFERED, R.VHOST_USER_GET_PROTOCOL_FEATURES: SUPPORTED_PF}
            return self.back.reply(req, U64(value[req.request])), ()
        return self.back.ack(req), ()

    def call(self, request: R, payload=None, fds: tuple[int, ...] = (), *, need_reply: bool | None = None):
        """One request and, when due, its reply, as VhostUserFrontend.call does over a socket."""
        if need_reply is None:
            need_reply = bool(self.front.protocol_features >> PF.VHOST_USER_PROTOCOL_F_REPLY_ACK & 1)
        kind = self.front.reply_due(request, need_reply)
        (req,) = self.back.feed(self.front.request(request, payload, need_reply=need_reply), fds)
        assert isinstance(req, Request) and req.reply is kind, req
        self.seen.append(req)
        data, reply_fds = self.answer(req)
        if kind is ReplyKind.NONE:
            assert data == b""
            return None
        (message,) = self.front.feed(data, reply_fds)
        assert isinstance(message, Message)
        reply = self.front.reply(message, request)
        if kind is ReplyKind.ACK:
            self.front.check_ack(request, reply)
        return reply


def test_full_bring_up_in_memory():
    p = Pair()
    assert p.call(R.VHOST_USER_GET_FEATURES).payload == U64(OFFERED)
    assert p.call(R.VHOST_USER_GET_PROTOCOL_FEATURES).payload == U64(SUPPORTED_PF)
    assert p.call(R.VHOST_USER_SET_PROTOCOL_FEATURES, U64(SUPPORTED_PF), need_reply=False) is None
    assert p.front.protocol_features == p.back.protocol_features == SUPPORTED_PF
    # From here on every request asks for (and gets) a REPLY_ACK.
    p.call(R.VHOST_USER_SET_OWNER)
    p.call(R.VHOST_USER_SET_FEATURES, U64(OFFERED))
    p.call(R.VHOST_USER_SET_STATUS, U64(0xB))
    p.call(R.VHOST_USER_SET_MEM_TABLE, MemoryTable((REGION,)), (10,))
    p.call(R.VHOST_USER_SET_VRING_NUM, VringState(0, 256))
    p.call(R.VHOST_USER_SET_VRING_BASE, VringState(0, 0))
    p.call(R.VHOST_USER_SET_VRING_ADDR, VringAddr(0, 0, 0x7F00_0000_1000, 0x7F00_0000_3000, 0x7F00_0000_2000))
    p.call(R.VHOST_USER_SET_VRING_CALL, VringFile(0), (11,))
    p.call(R.VHOST_USER_SET_VRING_KICK, VringFile(0), (12,))
    p.call(R.VHOST_USER_SET_VRING_ENABLE, VringState(0, 1))
    p.call(R.VHOST_USER_SET_STATUS, U64(0xF))
    reply = p.call(R.VHOST_USER_GET_INFLIGHT_FD, Inflight(0, 0, 1, 256))
    assert reply.payload == Inflight(4096, 0, 1, 256) and reply.fds == (77,)
    assert [r.request for r in p.seen][:5] == [
        R.VHOST_USER_GET_FEATURES, R.VHOST_USER_GET_PROTOCOL_FEATURES, R.VHOST_USER_SET_PROTOCOL_FEATURES,
        R.VHOST_USER_SET_OWNER, R.VHOST_USER_SET_FEATURES,
    ]
    table = next(r for r in p.seen if isinstance(r, SetMemTable))
    assert table.regions == (REGION,) and table.fds == (10,) and table.reply is ReplyKind.ACK
    assert [r.status for r in p.seen if isinstance(r, SetStatus)] == [0xB, 0xF]
    assert p.front.state is p.back.state is ConnectionState.OPEN
    assert p.front.bytes_needed == p.back.bytes_needed == 12


def test_nack_is_raised():
    p = Pair()
    p.call(R.VHOST_USER_SET_PROTOCOL_FEATURES, U64(SUPPORTED_PF), need_reply=False)
    (req,) = p.back.feed(p.front.request(R.VHOST_USER_SET_VRING_NUM, VringState(0, 256), need_reply=True))
    (message,) = p.front.feed(p.back.nack(req, 22))
    reply = p.front.reply(message, R.VHOST_USER_SET_VRING_NUM)
    with pytest.raises(NackError) as info:
        p.front.check_ack(R.VHOST_USER_SET_VRING_NUM, reply)
    assert (info.value.request, info.value.status) == (R.VHOST_USER_SET_VRING_NUM, 22)


def _reply_to(front: FrontendConnection, data: bytes, request: R, fds: tuple[int, ...] = ()):
    (message,) = front.feed(data, fds)
    return front.reply(message, request)


@pytest.mark.parametrize(
    "data,reason",
    [
        (build_reply(R.VHOST_USER_GET_PROTOCOL_FEATURES, U64(1).pack()), "reply is for request 15"),
        (build_message(R.VHOST_USER_GET_FEATURES, VHOST_USER_VERSION, U64(1)), "lack version 1 and REPLY"),
        (build_reply(R.VHOST_USER_GET_FEATURES, bytes(4)), "payload is 4 bytes, expected 8 bytes"),
        (build_reply(R.VHOST_USER_GET_FEATURES, b""), "empty reply payload"),
    ],
    ids=["wrong-code", "no-reply-bit", "bad-size", "empty"],
)
def test_malformed_reply_is_rejected(data, reason):
    front = FrontendConnection()
    front.request(R.VHOST_USER_GET_FEATURES)
    with pytest.raises(BadReplyError) as info:
        _reply_to(front, data, R.VHOST_USER_GET_FEATURES, (5,))
    assert reason in str(info.value) and info.value.request == R.VHOST_USER_GET_FEATURES
    # One bad reply does not break the framing: the next one parses.
    assert _reply_to(front, build_reply(R.VHOST_USER_GET_FEATURES, U64(3).pack()), R.VHOST_USER_GET_FEATURES).payload == U64(3)


def test_reply_body_type_follows_the_rules():
    front = FrontendConnection()
    # GET_INFLIGHT_FD replies with a 24-byte Inflight, not a u64.
    with pytest.raises(BadReplyError, match="payload is 8 bytes, expected 24"):
        _reply_to(front, build_reply(R.VHOST_USER_GET_INFLIGHT_FD, U64(0).pack()), R.VHOST_USER_GET_INFLIGHT_FD)
    # An ack is a u64 even for a request whose body reply depends on a feature (SET_LOG_BASE without LOG_SHMFD).
    assert _reply_to(front, build_reply(R.VHOST_USER_SET_LOG_BASE, U64(0).pack()), R.VHOST_USER_SET_LOG_BASE).payload == U64(0)
    # GET_CONFIG's failure reply is empty.
    assert _reply_to(front, build_reply(R.VHOST_USER_GET_CONFIG, b""), R.VHOST_USER_GET_CONFIG).payload is None


def test_bad_version_reply_is_fatal_for_the_front_end_too():
    front = FrontendConnection()
    (failure,) = front.feed(Header(R.VHOST_USER_GET_FEATURES, VHOST_USER_REPLY_MASK, 8).pack(), (6,))
    assert isinstance(failure, ProtocolFailure) and isinstance(failure.error, BadVersionError)
    assert failure.fds == (6,) and front.state is ConnectionState.ERROR


def test_one_framer_serves_both_directions():
    """The back-end's replies and the front-end's requests are cut by the same Framer."""
    framer = Framer()
    stream = build_message(R.VHOST_USER_SET_OWNER, VHOST_USER_VERSION) + build_reply(R.VHOST_USER_GET_FEATURES, U64(9).pack())
    first, second = framer.feed(stream, (3,))
    assert first == Message(Header(R.VHOST_USER_SET_OWNER, VHOST_USER_VERSION, 0), b"", (3,))
    assert second.header.is_reply and second.body == U64(9).pack() and second.fds == ()
    assert framer.feed_eof() == ConnectionClosed(())
