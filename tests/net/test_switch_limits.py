"""Issue 12, failure 10: the learning switch's MAC table is bounded.

One port sending frames from fresh source MACs used to grow the table (and
the process) without bound; ageing only ran on destination lookups.  Now a
global cap and a per-port cap stop learning (frames still switched, the
refusals counted), and aged entries are swept without a lookup.
"""

from __future__ import annotations

import gc

import pytest

from iovirt.virtio.net import datapath
from iovirt.virtio.net.switch import DEFAULT_MAX_ENTRIES, DEFAULT_MAX_PER_PORT, SWEEP_INTERVAL_S, LearningSwitch

FRESH_MACS = 100_000
BATCH = 64
RSS_GROWTH_LIMIT = 4 << 20  # 100k entries took ~18 MiB before the caps
BROADCAST = b"\xff" * 6


class Port:
    """A switch port that counts what it is given, and keeps it while ``keep`` is set."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.frames: list[bytes] = []
        self.count = 0
        self.keep = True

    def deliver(self, frame: bytes, csum: tuple[int, int] | None) -> bool:
        self.count += 1
        if self.keep:
            self.frames.append(frame)
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def mac(n: int, oui: int = 0x02) -> bytes:
    """A locally administered unicast MAC numbered ``n``."""
    return bytes([oui]) + n.to_bytes(5, "big")


def frame(dst: bytes, src: bytes) -> bytes:
    return dst + src + b"\x08\x00" + bytes(46)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def flood_fresh_macs(switch: LearningSwitch, port: Port, count: int, first: int = 0) -> None:
    """``count`` frames from fresh source MACs, in batches as the transmit path switches them."""
    frames = datapath.Frames()
    for n in range(first, first + count):
        frames.append(frame(BROADCAST, mac(n)))
        if len(frames) == BATCH:
            switch.forward_batch(port, frames)
            frames.clear()
    if len(frames):
        switch.forward_batch(port, frames)


def test_defaults_are_capped():
    switch = LearningSwitch()
    assert switch.max_entries == DEFAULT_MAX_ENTRIES == 4096
    assert switch.max_per_port == DEFAULT_MAX_PER_PORT == 1024


@pytest.mark.parametrize("bad", [(0, 10), (10, 0)])
def test_caps_must_be_positive(bad):
    with pytest.raises(ValueError):
        LearningSwitch(max_entries=bad[0], max_per_port=bad[1])


def test_fresh_source_macs_stay_within_the_caps(caplog):
    switch = LearningSwitch()
    attacker, a, b = Port("attacker"), Port("a"), Port("b")
    for port in (attacker, a, b):
        switch.attach(port)
    switch.forward(a, frame(BROADCAST, mac(1, 0x0A)))
    switch.forward(b, frame(BROADCAST, mac(1, 0x0E)))
    for port in (attacker, a, b):
        port.keep = False
        port.count = 0
    gc.collect()
    before = rss_bytes()

    flood_fresh_macs(switch, attacker, FRESH_MACS)

    gc.collect()
    assert rss_bytes() - before < RSS_GROWTH_LIMIT
    assert len(switch.table) <= switch.max_entries
    assert switch.learned_on(attacker) == switch.max_per_port
    assert switch.learn_refused == FRESH_MACS - switch.max_per_port
    # Frames from MACs not learned are still switched (flooded here, being broadcasts).
    assert a.count == b.count == FRESH_MACS
    # Logged once, not once per refusal.
    refusals = [r.getMessage() for r in caplog.records if "not learned" in r.getMessage()]
    assert len(refusals) == 1 and "attacker" in refusals[0]

    # Two known ports still talk directly.
    for port in (attacker, a, b):
        port.keep = True
        port.frames.clear()
    data = frame(mac(1, 0x0E), mac(1, 0x0A))
    assert switch.forward(a, data) == 1
    assert b.frames == [data] and attacker.frames == [] and a.frames == []
    assert switch.forwarded >= 1


def test_global_cap_refuses_and_unlearned_macs_are_reached_by_flooding():
    switch = LearningSwitch(max_entries=8, max_per_port=5)
    p, q, late = Port("p"), Port("q"), Port("late")
    for port in (p, q, late):
        switch.attach(port)
    flood_fresh_macs(switch, p, 5)
    flood_fresh_macs(switch, q, 5, first=100)
    assert len(switch.table) == 8 and switch.learn_refused == 2
    switch.forward(late, frame(BROADCAST, mac(7, 0x0C)))
    assert switch.learn_refused == 3 and switch.lookup(mac(7, 0x0C)) is None
    # A reply to the MAC not learned is flooded as unknown unicast: it still arrives.
    late.frames.clear()
    switch.forward(p, frame(mac(7, 0x0C), mac(0)))
    assert late.frames and switch.flooded >= 1
    # A port reset frees its share of the table.
    switch.forget(p)
    assert len(switch.table) == 3 and switch.learned_on(p) == 0
    switch.forward(late, frame(BROADCAST, mac(7, 0x0C)))
    assert switch.lookup(mac(7, 0x0C)) is late


def test_aged_entries_are_swept_without_a_lookup():
    clock = Clock()
    switch = LearningSwitch(ageing_s=10.0, clock=clock)
    p, q = Port("p"), Port("q")
    switch.attach(p)
    switch.attach(q)
    flood_fresh_macs(switch, p, 500)
    clock.now += 5.0
    switch.forward(q, frame(BROADCAST, mac(1, 0x0E)))
    assert len(switch.table) == 501
    clock.now += 6.0  # p's MACs are 11 s old, q's 6 s
    # Traffic that never looks p's MACs up still sweeps them.
    switch.forward(q, frame(BROADCAST, mac(1, 0x0E)))
    assert len(switch.table) == 1 and switch.aged_out == 500
    assert switch.learned_on(p) == 0 and switch.learned_on(q) == 1


def test_sweeps_are_periodic_not_per_frame():
    clock = Clock()
    switch = LearningSwitch(ageing_s=0.2, clock=clock)
    p, q = Port("p"), Port("q")
    switch.attach(p)
    switch.attach(q)
    switch.forward(p, frame(BROADCAST, mac(1)))
    clock.now += SWEEP_INTERVAL_S
    switch.forward(q, frame(BROADCAST, mac(2)))  # a sweep is due: mac 1 goes
    assert switch.aged_out == 1 and len(switch.table) == 1
    clock.now += SWEEP_INTERVAL_S / 2
    switch.forward(q, frame(BROADCAST, mac(3)))  # mac 2 has aged, but no sweep is due yet
    assert switch.aged_out == 1 and len(switch.table) == 2
    clock.now += SWEEP_INTERVAL_S / 2
    switch.forward(q, frame(BROADCAST, mac(4)))  # the next sweep: macs 2 and 3 go
    assert switch.aged_out == 3 and len(switch.table) == 1


def test_full_table_is_swept_before_refusing():
    clock = Clock()
    switch = LearningSwitch(ageing_s=10.0, clock=clock, max_entries=4, max_per_port=4)
    p = Port("p")
    switch.attach(p)
    flood_fresh_macs(switch, p, 4)
    clock.now += 11.0
    switch._next_sweep = clock.now + SWEEP_INTERVAL_S  # no periodic sweep due
    switch.forward(p, frame(BROADCAST, mac(99)))
    assert switch.learn_refused == 0 and switch.lookup(mac(99)) is p and len(switch.table) == 1


def test_moved_mac_follows_its_port_within_the_caps():
    switch = LearningSwitch(max_entries=4, max_per_port=1)
    p, q = Port("p"), Port("q")
    switch.attach(p)
    switch.attach(q)
    switch.forward(p, frame(BROADCAST, mac(1)))
    switch.forward(q, frame(BROADCAST, mac(1)))
    assert switch.lookup(mac(1)) is q
    assert switch.learned_on(p) == 0 and switch.learned_on(q) == 1 and switch.learn_refused == 0


@pytest.mark.parametrize("program", [["serve", "--net", "n.sock"], ["vhost-user-net", "--socket-path", "n.sock"]])
def test_cli_sets_the_caps(program):
    from iovirt.cli import build_parser
    from iovirt.vhost_user.cli import _switch

    args = build_parser().parse_args([*program, "--mac-table-size", "100", "--mac-table-per-port", "10"])
    switch = _switch(args)
    assert (switch.max_entries, switch.max_per_port) == (100, 10)
    defaults = _switch(build_parser().parse_args(program))
    assert (defaults.max_entries, defaults.max_per_port) == (DEFAULT_MAX_ENTRIES, DEFAULT_MAX_PER_PORT)
    with pytest.raises(SystemExit):
        build_parser().parse_args([*program, "--mac-table-size", "0"])
