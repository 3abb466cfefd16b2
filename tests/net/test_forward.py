"""The whole transmit loop of one flow in C (``datapath.forward``), against the Python loop it shortcuts.

While the batches a port transmits are of one flow that the switch sends to
one port, ``VirtioNet._transmit`` hands its rings and the receiver's to
``datapath.forward``, which pops, gathers, returns, writes and asks for the
notifications without the interpreter (issue 15: "the whole batch loop
(pop, switch, push, notify) runs in C with the GIL released").  Wherever it
stops, the Python loop takes over.  Each scenario here runs twice, once
with ``forward`` and once with it answering None (the Python loop alone),
and the guests must see the same: the same bytes in the same receive
buffers, the same used transmit chains, the same counters on both ports and
the switch, the same notifications.  Bad input keeps its owner: a broken
transmit ring fails the sender, a broken receive ring the receiver.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import pytest

from iovirt.memory import BumpAllocator, GuestMemory
from iovirt.virtio.defs import VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1
from iovirt.virtio.driver import DriverQueue
from iovirt.virtio.net import datapath
from iovirt.virtio.net.defs import (
    NET_HDR_SIZE,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_TCPV4,
)
from iovirt.virtio.net.device import TX_BATCH, VirtioNet
from iovirt.virtio.net.switch import LearningSwitch
from iovirt.virtio.net.vlan import PortVlan

MEM = 8 << 20
A = bytes.fromhex("525400000001")
B = bytes.fromhex("525400000002")
BROADCAST = b"\xff" * 6

pytestmark = pytest.mark.skipif(datapath.accel is None, reason="the C data path is not built (IOVIRT_NO_EXTENSIONS)")


def udp_frame(dst: bytes, src: bytes, n: int, payload: int = 18) -> bytes:
    """An Ethernet / IPv4 / UDP frame numbered ``n`` (UDP checksum left 0: the sender offloads it)."""
    udp_len = 8 + payload
    ip = bytes([0x45, 0, 0, 20 + udp_len]) + bytes(4) + bytes([64, 17, 0, 0]) + bytes([10, 0, 0, 1, 10, 0, 0, 2])
    udp = (1000 + n % 1000).to_bytes(2, "big") + b"\x00\x35" + udp_len.to_bytes(2, "big") + b"\x00\x00"
    return dst + src + b"\x08\x00" + ip + udp + n.to_bytes(4, "big") + bytes(payload - 4)


def csum_hdr() -> bytes:
    """A virtio_net_hdr asking for the UDP checksum (NEEDS_CSUM, csum_start 34, csum_offset 6)."""
    return bytes([VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 0, 0, 34, 0, 6, 0, 0, 0])


class Guest:
    """A started virtio-net port on ``switch`` with a driver on its receive (0) and transmit (1) rings."""

    def __init__(self, mac: bytes, switch: LearningSwitch, features: int = 0, mtu: int = 1500,
                 in_order: bool = False) -> None:
        self.memory = GuestMemory.from_ranges([(0, MEM)])
        alloc = BumpAllocator(0x1000, MEM - 0x1000)
        event_idx = bool(features >> VIRTIO_F_EVENT_IDX & 1)
        self.rx = DriverQueue(self.memory, alloc, 512, event_idx=event_idx, index=0, in_order=in_order)
        self.tx = DriverQueue(self.memory, alloc, 512, event_idx=event_idx, index=1, in_order=in_order)
        self.dev = VirtioNet(mac, switch, mtu=mtu, label=f"net-{mac[-1]}")
        self.dev.set_features(1 << VIRTIO_F_VERSION_1 | features)
        self.calls = [0, 0]
        for index, drv in ((0, self.rx), (1, self.tx)):
            drv.publish()
            self.dev.start_queue(index, self.memory, drv.state(), notify=self._notifier(index), in_order=in_order)
            self.dev.set_queue_enabled(index, True)

    def _notifier(self, index: int) -> Callable[[], None]:
        def notify() -> None:
            self.calls[index] += 1
        return notify

    def post_rx(self, n: int, size: int = 2048) -> None:
        for _ in range(n):
            self.rx.add_chain(writable=[(self.rx.alloc.alloc(size), size)])
        self.rx.publish()
        self.dev.kick(0)

    def queue_tx(self, frames: list[bytes], hdr: bytes = bytes(NET_HDR_SIZE)) -> None:
        for frame in frames:
            buf = self.tx.alloc.alloc(len(hdr) + len(frame))
            self.memory.write(buf, hdr + frame)
            self.tx.add_chain(readable=[(buf, len(hdr) + len(frame))])

    def send(self, frames: list[bytes], hdr: bytes = bytes(NET_HDR_SIZE)) -> None:
        self.queue_tx(frames, hdr)
        self.tx.publish()
        self.dev.kick(1)


@dataclass
class Seen:
    """What the two guests and the switch saw."""

    received: list[bytes] = field(default_factory=list)
    tx_used: int = 0
    stats: list[dict[str, int]] = field(default_factory=list)
    queue_stats: list[Any] = field(default_factory=list)
    switch: tuple[int, ...] = ()
    calls: list[list[int]] = field(default_factory=list)
    held: int = 0
    needs_reset: tuple[bool, bool] = (False, False)


def observe(a: Guest, b: Guest, switch: LearningSwitch) -> Seen:
    seen = Seen()
    seen.received = [u.data for u in b.rx.get_used()]
    seen.tx_used = len(a.tx.get_used())
    seen.stats = [dict(a.dev.stats), dict(b.dev.stats)]
    seen.queue_stats = [[dict(q) for q in a.dev.queue_stats], [dict(q) for q in b.dev.queue_stats]]
    seen.switch = (switch.flooded, switch.forwarded, switch.filtered, switch.learn_refused)
    seen.calls = [list(a.calls), list(b.calls)]
    seen.held = len(b.dev.backlog)
    seen.needs_reset = (a.dev.needs_reset, b.dev.needs_reset)
    return seen


Scenario = Callable[[Guest, Guest], None]


def run(scenario: Scenario, fast: bool, monkeypatch: pytest.MonkeyPatch, features: tuple[int, int] = (0, 0),
        mtu: int = 1500, in_order: bool = False) -> tuple[Seen, list[Any]]:
    """Learn both MACs, then run ``scenario``; with ``fast`` False ``datapath.forward`` answers None."""
    answers: list[Any] = []
    real = datapath.forward

    def spy(*args: Any) -> Any:
        answer = real(*args) if fast else None
        answers.append(answer)
        return answer

    monkeypatch.setattr(datapath, "forward", spy)
    switch = LearningSwitch()
    a = Guest(A, switch, features[0], in_order=in_order)
    b = Guest(B, switch, features[1], mtu=mtu, in_order=in_order)
    a.post_rx(8)
    b.send([udp_frame(A, B, 0)])  # B learned on b
    a.send([udp_frame(B, A, 0)])  # A learned on a; a's transmit flow is A -> B from now on
    scenario(a, b)
    monkeypatch.undo()
    return observe(a, b, switch), answers


def took(answers: list[Any]) -> int:
    """Transmit batches ``forward`` took."""
    return sum(answer[1] for answer in answers if answer is not None)


def forwarded(answers: list[Any]) -> int:
    """Frames ``forward`` wrote into the receiver."""
    return sum(answer[4] for answer in answers if answer is not None)


def same_both_ways(scenario: Scenario, monkeypatch: pytest.MonkeyPatch, **kw: Any) -> tuple[Seen, list[Any]]:
    fast, answers = run(scenario, True, monkeypatch, **kw)
    slow, _ = run(scenario, False, monkeypatch, **kw)
    assert fast == slow
    return fast, answers


def test_one_flow_goes_through_forward_and_the_guests_see_what_the_python_loop_gives(monkeypatch):
    def scenario(a: Guest, b: Guest) -> None:
        b.post_rx(500)
        a.send([udp_frame(B, A, n) for n in range(1, 3 * TX_BATCH + 5)])

    seen, answers = same_both_ways(scenario, monkeypatch)
    assert forwarded(answers) == 3 * TX_BATCH + 4, "the flow did not go through forward"
    assert len(seen.received) == 1 + 3 * TX_BATCH + 4
    assert seen.received[-1][NET_HDR_SIZE:] == udp_frame(B, A, 3 * TX_BATCH + 4)
    assert seen.stats[1]["rx_packets"] == len(seen.received)


def test_receive_buffers_running_out_hold_the_rest_in_order(monkeypatch):
    def scenario(a: Guest, b: Guest) -> None:
        b.post_rx(100)
        a.send([udp_frame(B, A, n) for n in range(1, 401)])  # 256 held, 44 dropped
        b.post_rx(400)  # the backlog goes first, then what comes next
        a.send([udp_frame(B, A, n) for n in range(401, 451)])

    seen, answers = same_both_ways(scenario, monkeypatch)
    assert forwarded(answers) > 0
    numbers = [int.from_bytes(data[NET_HDR_SIZE + 42 : NET_HDR_SIZE + 46], "big") for data in seen.received]
    assert numbers == sorted(numbers), "frames overtook those held in the backlog"
    assert seen.stats[1]["rx_dropped_no_buffers"] > 0


def test_a_batch_of_another_flow_or_with_malformed_chains_is_switched(monkeypatch):
    def scenario(a: Guest, b: Guest) -> None:
        b.post_rx(500)
        a.send([udp_frame(B, A, n) for n in range(1, 131)])
        a.send([udp_frame(BROADCAST, A, n) for n in range(131, 141)] + [udp_frame(B, A, n) for n in range(141, 300)])
        a.queue_tx([udp_frame(B, A, n) for n in range(300, 310)])
        a.queue_tx([b"short"], hdr=b"")  # shorter than a virtio_net_hdr and an Ethernet header
        a.send([udp_frame(B, A, n) for n in range(310, 320)])

    seen, answers = same_both_ways(scenario, monkeypatch)
    assert forwarded(answers) > 0
    assert seen.stats[0]["tx_error_short"] == 1
    assert seen.switch[0] >= 2  # flooded: the first frame, the broadcasts


@pytest.mark.parametrize(
    "features, mtu, size",
    [
        pytest.param((0, 1 << VIRTIO_NET_F_MTU), 100, 2048, id="over-mtu"),
        pytest.param((1 << VIRTIO_NET_F_CSUM, 1 << VIRTIO_NET_F_GUEST_CSUM), 1500, 2048, id="guest-csum"),
        pytest.param((1 << VIRTIO_NET_F_CSUM, 0), 1500, 2048, id="checksum-completed"),
        pytest.param((0, 1 << VIRTIO_NET_F_MRG_RXBUF), 1500, 64, id="mergeable-spans"),
        pytest.param((0, 0), 1500, 40, id="buffer-too-small"),
        pytest.param((1 << VIRTIO_F_EVENT_IDX, 1 << VIRTIO_F_EVENT_IDX), 1500, 2048, id="event-idx"),
    ],
)
def test_receiver_features_give_what_the_python_loop_gives(monkeypatch, features, mtu, size):
    def scenario(a: Guest, b: Guest) -> None:
        b.post_rx(300, size)
        hdr = csum_hdr() if features[0] >> VIRTIO_NET_F_CSUM & 1 else bytes(NET_HDR_SIZE)
        frames = [udp_frame(B, A, n, payload=18 if n % 50 else 120) for n in range(1, 201)]
        a.send(frames, hdr)
        b.post_rx(100, size)
        a.send([udp_frame(B, A, n) for n in range(201, 261)], hdr)

    _, answers = same_both_ways(scenario, monkeypatch, features=features, mtu=mtu)
    assert took(answers) >= 1, "the flow did not go through forward"


def test_in_order_rings_go_through_forward_as_through_the_python_loop(monkeypatch):
    """VIRTIO_F_IN_ORDER (2.7.9): a transmit batch goes back through one used entry, receive chains one each."""
    def scenario(a: Guest, b: Guest) -> None:
        b.post_rx(300)
        a.send([udp_frame(B, A, n) for n in range(1, 201)])

    seen, answers = same_both_ways(scenario, monkeypatch, in_order=True)
    assert forwarded(answers) == 200 and len(seen.received) == 201


def test_in_order_rings_running_out_of_receive_buffers(monkeypatch):
    """Receive chains popped and not used go back (rewound), the order ring with them."""
    def scenario(a: Guest, b: Guest) -> None:
        b.post_rx(100)
        a.send([udp_frame(B, A, n) for n in range(1, 401)])
        b.post_rx(400)
        a.send([udp_frame(B, A, n) for n in range(401, 451)])

    seen, answers = same_both_ways(scenario, monkeypatch, in_order=True)
    assert forwarded(answers) > 0
    numbers = [int.from_bytes(data[NET_HDR_SIZE + 42 : NET_HDR_SIZE + 46], "big") for data in seen.received]
    assert numbers == sorted(numbers)


def test_a_broken_transmit_ring_fails_the_sender_only(monkeypatch):
    def scenario(a: Guest, b: Guest) -> None:
        b.post_rx(300)
        a.queue_tx([udp_frame(B, A, n) for n in range(1, 41)])
        a.tx.add_chain(readable=[(MEM + 4096, 64)])  # outside guest memory
        a.send([udp_frame(B, A, n) for n in range(41, 51)])

    seen, _ = same_both_ways(scenario, monkeypatch)
    assert seen.needs_reset == (True, False)
    assert len(seen.received) == 41  # the good chains before it were used, so their frames went


def test_a_broken_receive_ring_fails_the_receiver_only(monkeypatch):
    def scenario(a: Guest, b: Guest) -> None:
        b.post_rx(20)
        b.rx.set_avail_idx(b.rx.avail_idx + 1000)  # more chains than Queue Size
        a.send([udp_frame(B, A, n) for n in range(1, 101)])
        a.send([udp_frame(B, A, n) for n in range(101, 111)])

    seen, _ = same_both_ways(scenario, monkeypatch)
    assert seen.needs_reset == (False, True)
    assert seen.tx_used == 1 + 110 and seen.stats[0]["tx_packets"] == 111


@dataclass
class Port:
    name: str

    def deliver(self, frame: bytes, csum: Any) -> bool:  # noqa: ARG002
        return True


def test_the_switch_gives_no_shortcut_where_it_looks_at_each_batch():
    switch = LearningSwitch()
    a, b, c = Port("a"), Port("b"), Port("c")
    for port in (a, b, c):
        switch.attach(port)
    src, dst = int.from_bytes(A, "big"), int.from_bytes(B, "big")
    assert switch.shortcut(a, src, dst) is None  # nothing learned
    switch._learn(a, src, switch.clock())
    switch._learn(b, dst, switch.clock())
    assert switch.shortcut(a, src, dst) is b
    assert switch.shortcut(c, src, dst) is None  # src is learned on another port
    assert switch.shortcut(a, src, int.from_bytes(BROADCAST, "big")) is None
    assert switch.shortcut(b, dst, dst) is None  # to itself: filtered
    switch.impairments[id(b)] = object()  # what the port's impairments are does not matter here
    assert switch.shortcut(a, src, dst) is None
    del switch.impairments[id(b)]
    switch.set_vlan(c, PortVlan(access=10))
    assert switch.shortcut(a, src, dst) is None
    switch.set_vlan(c, None)
    switch.clock = lambda: 1e12  # long past the ageing time
    assert switch.shortcut(a, src, dst) is None


def tcp_frame(dst: bytes, src: bytes, payload: int) -> bytes:
    """An Ethernet / IPv4 / TCP frame carrying ``payload`` bytes (checksums left to the offloads)."""
    ip = bytes([0x45, 0]) + (40 + payload).to_bytes(2, "big") + bytes(4) + bytes([64, 6, 0, 0]) + \
        bytes([10, 0, 0, 1, 10, 0, 0, 2])
    tcp = b"\x04\x00\x00\x50" + bytes(8) + bytes([0x50, 0x18]) + b"\xff\xff" + bytes(4)
    return dst + src + b"\x08\x00" + ip + tcp + bytes(range(256)) * (payload // 256) + bytes(payload % 256)


def test_a_tso_batch_cut_into_more_frames_than_chains(monkeypatch):
    """One chain can become hundreds of frames (5.1.6.2): the receive batch must not be popped past its room."""
    mss = 100
    hdr = bytes([VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4]) + (54).to_bytes(2, "little") + \
        mss.to_bytes(2, "little") + (34).to_bytes(2, "little") + (16).to_bytes(2, "little") + bytes(2)

    def scenario(a: Guest, b: Guest) -> None:
        b.post_rx(500)
        a.send([tcp_frame(B, A, 300 * mss)], hdr)  # 300 segments from one chain

    seen, answers = same_both_ways(
        scenario, monkeypatch, features=(1 << VIRTIO_NET_F_CSUM | 1 << VIRTIO_NET_F_HOST_TSO4, 0))
    assert took(answers) >= 1
    assert len(seen.received) == 1 + 300


# -- random rounds: forward against the Python loop ----------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FEATURE_SETS = [
    (0, 0),
    (0, 1 << VIRTIO_NET_F_MRG_RXBUF),
    (1 << VIRTIO_NET_F_CSUM, 1 << VIRTIO_NET_F_GUEST_CSUM),
    (1 << VIRTIO_NET_F_CSUM, 0),
    (0, 1 << VIRTIO_NET_F_MTU),
    (1 << VIRTIO_F_EVENT_IDX, 1 << VIRTIO_F_EVENT_IDX | 1 << VIRTIO_NET_F_MRG_RXBUF),
]

rounds = st.lists(
    st.tuples(
        st.sampled_from(["send"] * 5 + ["post"] * 3 + ["broadcast", "bad-tx", "bad-rx-buffer", "bad-rx-idx"]),
        st.integers(1, 300),  # frames, or buffers
        st.sampled_from([30, 64, 200, 1500, 2048]),  # frame or buffer bytes
    ),
    min_size=1,
    max_size=8,
)


def sized_udp_frame(dst: bytes, src: bytes, n: int, payload: int) -> bytes:
    """:func:`udp_frame` of any size (its IPv4 total length in two bytes)."""
    udp_len = 8 + payload
    ip = bytes([0x45, 0]) + (20 + udp_len).to_bytes(2, "big") + bytes(4) + bytes([64, 17, 0, 0]) + \
        bytes([10, 0, 0, 1, 10, 0, 0, 2])
    udp = (1000 + n % 1000).to_bytes(2, "big") + b"\x00\x35" + udp_len.to_bytes(2, "big") + b"\x00\x00"
    return dst + src + b"\x08\x00" + ip + udp + n.to_bytes(4, "big") + bytes(payload - 4)


def rounds_mtu(features: tuple[int, int]) -> int:
    """b's MTU in the random rounds: small where b offers VIRTIO_NET_F_MTU, so frames past it are dropped."""
    return 200 if features[1] >> VIRTIO_NET_F_MTU & 1 else 1500


def rounds_of(script: list[tuple[str, int, int]], features: tuple[int, int]) -> Scenario:
    """The random rounds of ``script`` as a scenario; its frames are numbered from 1001 again on each play."""
    hdr = csum_hdr() if features[0] >> VIRTIO_NET_F_CSUM & 1 else bytes(NET_HDR_SIZE)

    def scenario(a: Guest, b: Guest) -> None:
        counter = [1000]

        def frames(count: int, size: int, dst: bytes = B) -> list[bytes]:
            out = []
            for _ in range(count):
                counter[0] += 1
                out.append(sized_udp_frame(dst, A, counter[0], max(8, min(size, 1450) - 42)))
            return out

        play_rounds(a, b, script, frames, hdr)

    return scenario


def play_rounds(a: Guest, b: Guest, script: list[tuple[str, int, int]], frames: Callable[..., list[bytes]],
                hdr: bytes) -> None:
    """b posts 128 buffers, then the rounds of ``script`` (``rounds``): sends (``frames(count, size[, dst])``),
    buffers posted, and broken chains on either ring."""
    b.post_rx(128, 2048)
    for what, count, size in script:
        count = min(count, a.tx.num_free - 3)  # the guests take nothing back in between: descriptors run out
        if count < 1:
            break
        if what == "send":
            a.send(frames(count, size), hdr)
        elif what == "broadcast":
            a.send(frames(count // 4, size) + frames(1, size, BROADCAST) + frames(count // 4, size), hdr)
        elif what == "post":
            b.post_rx(min(count, b.rx.num_free), size)
        elif what == "bad-tx":
            a.queue_tx(frames(count % 20, size), hdr)
            a.tx.add_chain(readable=[(MEM + 4096, 64)])  # outside guest memory: the sender fails
            a.tx.publish()
            a.dev.kick(1)
        elif what == "bad-rx-buffer":
            if not b.rx.num_free:
                continue
            b.rx.add_chain(writable=[(MEM + 8192, 2048)])  # outside guest memory: the receiver fails
            b.rx.publish()
            a.send(frames(count % 20 + 1, size), hdr)
        else:  # bad-rx-idx: more chains announced than the ring holds
            b.rx.set_avail_idx(b.rx.avail_idx + 600)
            a.send(frames(count % 20 + 1, size), hdr)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(features=st.sampled_from(FEATURE_SETS), in_order=st.booleans(), script=rounds)
def test_random_rounds_give_what_the_python_loop_gives(monkeypatch, features, in_order, script):
    """Random sends (frame lengths, flows), receive buffers (counts, sizes) and broken chains on either ring:
    forward and the Python loop leave the guests, the counters and the device states the same."""
    scenario = rounds_of(script, features)
    fast, _ = run(scenario, True, monkeypatch, features=features, mtu=rounds_mtu(features), in_order=in_order)
    slow, _ = run(scenario, False, monkeypatch, features=features, mtu=rounds_mtu(features), in_order=in_order)
    assert fast == slow
