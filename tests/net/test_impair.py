"""Impairments (iovirt/virtio/net/impair.py): the seeded engine, its bounds and its hook in the switch."""

from __future__ import annotations

import collections
import math

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from iovirt.virtio.net import datapath
from iovirt.virtio.net.csum import l4_checksum_valid
from iovirt.virtio.net.impair import (
    DEFAULT_LIMIT,
    Impairer,
    Impairment,
    ImpairmentError,
    corrupt,
    from_options,
    impair_port,
    to_options,
)
from iovirt.virtio.net.switch import LearningSwitch

N = 100_000
MAC_A, MAC_B = bytes.fromhex("02000000000a"), bytes.fromhex("02000000000b")


class Clock:
    """A clock the test moves, and timers (``call_later``) that run when it passes them."""

    def __init__(self) -> None:
        self.now = 100.0
        self.timers: list[tuple[float, object]] = []

    def __call__(self) -> float:
        return self.now

    def call_later(self, delay: float, handler) -> None:
        assert delay >= 0
        self.timers.append((self.now + delay, handler))

    def advance(self, seconds: float) -> None:
        self.now += seconds
        while True:
            due = sorted((t for t in self.timers if t[0] <= self.now), key=lambda t: t[0])
            if not due:
                return
            for timer in due:
                self.timers.remove(timer)
                timer[1]()


def frame(n: int = 0, size: int = 60) -> bytes:
    return MAC_B + MAC_A + b"\x88\xb5" + n.to_bytes(4, "big") + bytes(size - 18)


def passed(impairer: Impairer, frames) -> list[bytes]:
    out: list = []
    for f in frames:
        impairer.admit(f, None, None, out)
    return [f for f, _, _ in out]


def binomial_bounds(n: int, p: float, sigmas: float = 6.0) -> tuple[float, float]:
    sd = math.sqrt(n * p * (1 - p))
    return n * p - sigmas * sd, n * p + sigmas * sd


# -- the engine ----------------------------------------------------------------------------------
def test_drop_rate_is_within_statistical_bounds():
    imp = Impairer(Impairment(drop=0.1, seed=1))
    out = passed(imp, (frame() for _ in range(N)))
    low, high = binomial_bounds(N, 0.1)
    assert low <= N - len(out) <= high
    assert imp.stats["dropped"] == N - len(out)


def test_same_seed_same_decisions_other_seed_others():
    frames = [frame(i) for i in range(5000)]
    settings = dict(drop=0.2, dup=0.1, corrupt=0.05)
    a = passed(Impairer(Impairment(**settings, seed=7)), frames)
    b = passed(Impairer(Impairment(**settings, seed=7)), frames)
    c = passed(Impairer(Impairment(**settings, seed=8)), frames)
    assert a == b
    assert a != c


def test_each_direction_has_its_own_stream():
    frames = [frame(i) for i in range(2000)]
    ingress = passed(Impairer(Impairment(drop=0.5, seed=3), "ingress"), frames)
    egress = passed(Impairer(Impairment(drop=0.5, seed=3), "egress"), frames)
    assert ingress != egress


def test_duplicate_sends_two_copies():
    n = 20_000
    imp = Impairer(Impairment(dup=0.25, seed=2))
    frames = [frame(i) for i in range(n)]
    out = passed(imp, frames)
    low, high = binomial_bounds(n, 0.25)
    assert low <= len(out) - n <= high
    assert imp.stats["duplicated"] == len(out) - n
    counts = collections.Counter(out)
    assert set(counts.values()) == {1, 2}
    assert [f for f in dict.fromkeys(out)] == frames  # order kept, copies next to each other


def test_drop_everything_and_nothing():
    assert passed(Impairer(Impairment(drop=1.0, seed=1)), [frame()] * 100) == []
    assert len(passed(Impairer(Impairment(dup=1.0, seed=1)), [frame()] * 100)) == 200


def tcp_frame(payload: bytes = b"x" * 200) -> bytes:
    return bytes(Ether(dst=MAC_B, src=MAC_A) / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=1, dport=2)
                 / Raw(payload))


@pytest.mark.parametrize("build", [
    lambda: tcp_frame(),
    lambda: bytes(Ether(dst=MAC_B, src=MAC_A) / IP(src="10.0.0.1", dst="10.0.0.2") / UDP() / Raw(b"u" * 300)),
    lambda: bytes(Ether(dst=MAC_B, src=MAC_A) / IP(src="10.0.0.1", dst="10.0.0.2") / ICMP() / Raw(b"i" * 300)),
    lambda: bytes(Ether(dst=MAC_B, src=MAC_A) / IPv6(src="fd00::1", dst="fd00::2") / UDP() / Raw(b"6" * 300)),
], ids=["tcp4", "udp4", "icmp4", "udp6"])
def test_corrupt_flips_one_bit_and_fix_repairs_the_checksums(build):
    import random
    original = build()
    broken = fixed = 0
    for seed in range(100):
        bad, _ = corrupt(original, None, random.Random(seed), fix=False)
        diff = [a ^ b for a, b in zip(original, bad)]
        assert sum(bin(d).count("1") for d in diff) == 1 and not any(diff[:14])  # one bit, past Ethernet
        good, _ = corrupt(original, None, random.Random(seed), fix=True)
        if checksums_ok(good):
            fixed += 1
        if not checksums_ok(bad):
            broken += 1
    # Without the fix nearly every flip is caught by a checksum (a flip in the IP version or protocol
    # makes the frame unparseable for both); with it nearly every frame checks out.
    assert broken >= 90
    assert fixed >= 90


def checksums_ok(raw: bytes) -> bool:
    """What scapy recomputes for the IP header and the L4 header matches what the frame carries."""
    pkt = Ether(raw)
    layer = pkt.getlayer(IP) or pkt.getlayer(IPv6)
    if layer is None:
        return False
    if isinstance(layer, IP):
        again = IP(bytes(layer))
        del again.chksum
        if IP(bytes(again)).chksum != layer.chksum:
            return False
    l4 = layer.payload
    if not isinstance(l4, (TCP, UDP, ICMP)):
        return False
    carried = l4.chksum
    rebuilt = layer.copy()
    del rebuilt.payload.chksum
    if isinstance(layer, IP):
        del rebuilt.chksum
        del rebuilt.len
    return type(layer)(bytes(rebuilt)).payload.chksum == carried


def test_corrupt_completes_a_pending_checksum_first():
    import random
    raw = bytearray(tcp_frame())
    raw[14 + 20 + 16 : 14 + 20 + 18] = b"\0\0"  # a partial checksum: left to the device (NEEDS_CSUM)
    csum = (34, 16)
    fixed, csum_after = corrupt(bytes(raw), csum, random.Random(1), fix=True)
    assert csum_after is None
    assert l4_checksum_valid(fixed)


def test_delay_holds_frames_and_lets_them_go_in_order():
    clock = Clock()
    imp = Impairer(Impairment(delay_ms=10, seed=1), clock=clock)
    assert passed(imp, [frame(i) for i in range(5)]) == []
    assert imp.stats["delayed"] == 5 and len(imp) == 5
    assert imp.next_due() == pytest.approx(clock.now + 0.010)
    clock.now += 0.009
    assert imp.release() == []
    clock.now += 0.002
    assert [f for f, _, _ in imp.release()] == [frame(i) for i in range(5)]
    assert imp.next_due() is None


@pytest.mark.parametrize("dist", ["uniform", "normal"])
def test_jitter_spreads_delays_around_the_mean(dist):
    clock = Clock()
    imp = Impairer(Impairment(delay_ms=50, jitter_ms=10, dist=dist, seed=4, limit=N), clock=clock)
    start = clock.now
    passed(imp, (frame(i) for i in range(20_000)))
    delays = sorted((t - start) * 1000 for t, *_ in imp._held)
    mean = sum(delays) / len(delays)
    sd = math.sqrt(sum((d - mean) ** 2 for d in delays) / len(delays))
    assert mean == pytest.approx(50, abs=0.5)
    if dist == "uniform":
        assert 40 <= delays[0] and delays[-1] <= 60
        assert sd == pytest.approx(10 / math.sqrt(3), rel=0.05)
    else:
        assert sd == pytest.approx(10, rel=0.05)
        assert delays[0] < 20 and delays[-1] > 80  # tails beyond 3 sigma show up in 20k draws


def test_jitter_reorders_frames_as_netem_does():
    clock = Clock()
    imp = Impairer(Impairment(delay_ms=10, jitter_ms=9, seed=5), clock=clock)
    frames = [frame(i) for i in range(200)]
    passed(imp, frames)
    clock.now += 1
    out = [f for f, _, _ in imp.release()]
    assert sorted(out) == sorted(frames) and out != frames


def test_reorder_with_gap_follows_netem():
    """reorder P gap G: G-1 frames are delayed, then each goes ahead with probability P, and the count restarts."""
    clock = Clock()
    imp = Impairer(Impairment(delay_ms=10, reorder=1.0, gap=5, seed=1), clock=clock)
    immediate = passed(imp, [frame(i) for i in range(20)])
    assert immediate == [frame(i) for i in (4, 9, 14, 19)]
    assert imp.stats["reordered"] == 4 and imp.stats["delayed"] == 16
    clock.now += 1
    assert [f for f, _, _ in imp.release()] == [frame(i) for i in range(20) if i % 5 != 4]


def test_reorder_probability_without_gap():
    n = 20_000
    imp = Impairer(Impairment(delay_ms=10, reorder=0.25, seed=9, limit=n), clock=Clock())
    out = passed(imp, (frame() for _ in range(n)))
    low, high = binomial_bounds(n, 0.25)
    assert low <= len(out) <= high
    assert imp.stats["reordered"] == len(out)


def test_rate_spaces_frames_one_frame_time_apart():
    clock = Clock()
    imp = Impairer(Impairment(rate=100, seed=1), clock=clock)
    start = clock.now
    passed(imp, [frame(i) for i in range(10)])
    times = [t - start for t, *_ in sorted(imp._held)]
    assert times == pytest.approx([0.01 * (i + 1) for i in range(10)])
    clock.now += 0.055
    assert len(imp.release()) == 5
    # After a pause the next frame waits one frame time from now, not from the last one.
    clock.now += 10
    imp.release()
    passed(imp, [frame()])
    assert imp.next_due() == pytest.approx(clock.now + 0.01)


def test_rate_adds_to_the_delay():
    clock = Clock()
    imp = Impairer(Impairment(delay_ms=20, rate=1000, seed=1), clock=clock)
    start = clock.now
    passed(imp, [frame(i) for i in range(3)])
    assert [t - start for t, *_ in sorted(imp._held)] == pytest.approx([0.021, 0.022, 0.023])


def test_hold_limit_drops_and_counts_the_excess():
    imp = Impairer(Impairment(delay_ms=10, seed=1), clock=Clock())
    passed(imp, (frame(i) for i in range(DEFAULT_LIMIT + 50)))
    assert len(imp) == DEFAULT_LIMIT
    assert imp.stats["dropped_limit"] == 50
    small = Impairer(Impairment(delay_ms=10, limit=3, seed=1), clock=Clock())
    passed(small, (frame(i) for i in range(10)))
    assert len(small) == 3 and small.stats["dropped_limit"] == 7


# -- options -------------------------------------------------------------------------------------
def test_options_round_trip():
    directions, imp = from_options({"drop": "10%", "delay": "5", "jitter": "1", "dist": "normal", "seed": "3",
                                    "corrupt": "0.01", "corrupt_fix": "1", "dir": "both"})
    assert directions == ("ingress", "egress")
    assert imp == Impairment(drop=0.1, delay_ms=5, jitter_ms=1, dist="normal", seed=3, corrupt=0.01,
                             corrupt_fix=True)
    assert from_options(to_options(imp))[1] == imp
    assert from_options({"drop": 0.5})[0] == ("egress",)  # netem impairs what leaves towards the guest


@pytest.mark.parametrize("options, message", [
    ({"drop": "1.5"}, "drop: want a probability 0..1"),
    ({"drop": "150%"}, "drop: want a probability 0..1"),
    ({"dup": "-0.1"}, "dup: want a probability"),
    ({"delay": "-5"}, "delay: want milliseconds >= 0"),
    ({"jitter": "5"}, "jitter needs a delay"),
    ({"reorder": "0.5"}, "reorder needs a delay"),
    ({"delay": "ten"}, "delay: want a number"),
    ({"delay": "nan"}, "delay: want a finite number"),
    ({"rate": "-1"}, "rate: want frames per second"),
    ({"gap": "0", "delay": "1", "reorder": "0.1"}, "gap: want a whole number 1.."),
    ({"limit": "0"}, "limit: want a whole number 1.."),
    ({"seed": "1.5"}, "seed: want a whole number"),
    ({"dist": "pareto", "delay": "1", "jitter": "1"}, "dist: want one of uniform, normal"),
    ({"dir": "up"}, "dir: want one of ingress, egress, both"),
    ({"loss": "0.1"}, "unknown impairment 'loss'"),
])
def test_bad_options_are_refused_with_a_clear_error(options, message):
    with pytest.raises(ImpairmentError, match=message):
        from_options(options)


# -- in the switch -------------------------------------------------------------------------------
class Port:
    def __init__(self, name: str) -> None:
        self.name = name
        self.frames: list[bytes] = []
        self.stats: collections.Counter[str] = collections.Counter()

    def deliver(self, frame: bytes, csum) -> bool:
        self.frames.append(frame)
        return True


def switched(clock: Clock):
    switch = LearningSwitch(clock=clock)
    a, b = Port("a"), Port("b")
    switch.attach(a)
    switch.attach(b)
    # b has sent once: the switch knows where MAC_B is, so frames to it are forwarded, not flooded.
    switch.forward(b, MAC_A + MAC_B + b"\x88\xb5" + bytes(46))
    a.frames.clear()
    return switch, a, b


def batch(frames) -> object:
    out = datapath.Frames()
    for f in frames:
        out.append(f)
    return out


@pytest.mark.parametrize("direction, impaired", [("ingress", "a"), ("egress", "b")])
def test_switch_port_drop_counts_in_the_port_stats(direction, impaired):
    clock = Clock()
    switch, a, b = switched(clock)
    port = {"a": a, "b": b}[impaired]
    impair_port(switch, port, [direction], Impairment(drop=0.1, seed=1), clock.call_later, port.stats, clock)
    frames = [frame(i) for i in range(10_000)]
    for i in range(0, len(frames), 64):
        switch.forward_batch(a, batch(frames[i : i + 64]))
    dropped = len(frames) - len(b.frames)
    low, high = binomial_bounds(len(frames), 0.1)
    assert low <= dropped <= high
    prefix = "tx" if direction == "ingress" else "rx"
    assert port.stats[f"{prefix}_impair_dropped"] == dropped
    assert port.stats[f"{prefix}_dropped_impair"] == dropped == port.stats[f"{prefix}_dropped"]
    kept = set(b.frames)
    assert b.frames == [f for f in frames if f in kept]  # order kept


@pytest.mark.parametrize("direction, impaired", [("ingress", "a"), ("egress", "b")])
def test_switch_port_delay_goes_through_timers(direction, impaired):
    clock = Clock()
    switch, a, b = switched(clock)
    port = {"a": a, "b": b}[impaired]
    impair_port(switch, port, [direction], Impairment(delay_ms=5, seed=1), clock.call_later, port.stats, clock)
    switch.forward_batch(a, batch([frame(0), frame(1)]))
    assert switch.forward(a, frame(2)) == 0
    assert b.frames == [] and clock.timers
    clock.advance(0.004)
    assert b.frames == []
    clock.advance(0.002)
    assert b.frames == [frame(0), frame(1), frame(2)]
    assert port.stats[("tx" if direction == "ingress" else "rx") + "_impair_delayed"] == 3
    assert not clock.timers


def test_ingress_impairment_does_not_touch_other_ports_or_directions():
    clock = Clock()
    switch, a, b = switched(clock)
    impair_port(switch, a, ["ingress"], Impairment(drop=1.0, seed=1), clock.call_later, a.stats, clock)
    switch.forward(a, frame(1))
    switch.forward(b, MAC_A + MAC_B + b"\x88\xb5" + bytes(46))
    assert b.frames == [] and len(a.frames) == 1  # a's egress is not impaired


def test_clearing_an_impairment_lets_held_frames_go():
    clock = Clock()
    switch, a, b = switched(clock)
    impair_port(switch, b, ["egress"], Impairment(delay_ms=1000, seed=1), clock.call_later, b.stats, clock)
    switch.forward(a, frame(1))
    assert b.frames == []
    assert impair_port(switch, b, ["egress"], None, clock.call_later, b.stats, clock) is None
    assert b.frames == [frame(1)] and id(b) not in switch.impairments
    clock.advance(2)  # the old timer finds nothing to do
    assert b.frames == [frame(1)]


def test_a_detached_port_gets_nothing_from_held_frames():
    clock = Clock()
    switch, a, b = switched(clock)
    impair_port(switch, b, ["egress"], Impairment(delay_ms=10, seed=1), clock.call_later, b.stats, clock)
    switch.forward(a, frame(1))
    switch.detach(b)
    clock.advance(1)
    assert b.frames == [] and id(b) not in switch.impairments


def test_held_frames_to_a_port_are_bounded_by_limit():
    clock = Clock()
    switch, a, b = switched(clock)
    impair_port(switch, b, ["egress"], Impairment(delay_ms=10, limit=100, seed=1), clock.call_later, b.stats, clock)
    for i in range(0, 1000, 50):
        switch.forward_batch(a, batch(frame(j) for j in range(i, i + 50)))
    assert b.stats["rx_impair_dropped_limit"] == 900 == b.stats["rx_dropped_impair_limit"]
    clock.advance(1)
    assert len(b.frames) == 100


def test_timers_are_not_asked_for_each_frame():
    clock = Clock()
    switch, a, b = switched(clock)
    impair_port(switch, b, ["egress"], Impairment(delay_ms=10, seed=1), clock.call_later, b.stats, clock)
    for i in range(500):
        switch.forward(a, frame(i))
    assert len(clock.timers) == 1
    clock.advance(1)
    assert len(b.frames) == 500


# -- with 802.1Q ports (iovirt/virtio/net/vlan.py) -----------------------------------------------
@pytest.mark.parametrize("batched", [False, True])
def test_impairments_wrap_vlan_ports_on_both_sides(batched):
    """An ingress impairment sees the untagged frame before the switch tags it for the trunk;
    an egress impairment sees what the switch delivers, tag and all."""
    from iovirt.virtio.net.vlan import PortVlan, tag_of

    clock = Clock()
    switch = LearningSwitch(clock=clock)
    access, trunk, other = Port("access"), Port("trunk"), Port("other")
    for port, config in ((access, PortVlan(access=10)), (trunk, PortVlan(trunk=frozenset({10, 20}))),
                         (other, PortVlan(access=20))):
        switch.attach(port)
        switch.set_vlan(port, config)
    impair_port(switch, access, ["ingress"], Impairment(delay_ms=5, seed=1), clock.call_later, access.stats, clock)

    def send(frames):
        if batched:
            switch.forward_batch(access, batch(frames))
        else:
            for f in frames:
                switch.forward(access, f)

    send([frame(0), frame(1)])
    assert trunk.frames == [] and other.frames == []
    clock.advance(0.006)
    assert [tag_of(f) & 0xFFF for f in trunk.frames] == [10, 10]  # tagged with the access port's VLAN
    assert other.frames == []  # VLAN 20 never sees VLAN 10's flood
    assert access.stats["tx_impair_delayed"] == 2

    trunk.frames.clear()
    impair_port(switch, trunk, ["egress"], Impairment(drop=1.0, seed=1), clock.call_later, trunk.stats, clock)
    send([frame(2), frame(3), frame(4)])
    clock.advance(0.006)
    assert trunk.frames == []
    assert trunk.stats["rx_impair_dropped"] == 3
    switch.detach(trunk)
    assert id(trunk) not in switch.impairments and switch.vlan_of(trunk) is None
