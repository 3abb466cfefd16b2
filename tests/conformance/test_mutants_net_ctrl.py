"""Mutants of the net control queue (virtio 1.4 5.1.9.5): each breaks one rule, and exactly its check fails.

The device is iovirt's in-process net with a control queue, behind the virtio-pci transport; every
mutant is a monkeypatch of that device's code, applied for one run of the checks of
``pci_net_ctrl_rx`` and ``pci_net_ctrl_coal``.  ``MUTANT_EXPECTATIONS`` follows issue 17's convention:
mutant name -> the clauses it makes fail.
"""

from __future__ import annotations

import json
import struct
from typing import Callable

import pytest

from iovirt.cli import main
from iovirt.conformance.platform_target import PlatformTarget
from iovirt.conformance.registry import Verdict, all_checks
from iovirt.conformance.runner import Runner
from iovirt.virtio.net import ctrl as ctrl_mod, ctrl_stats, rss
from iovirt.virtio.net.coalesce import Coalescing
from iovirt.virtio.net.ctrl import CommandError, NetCtrl
from iovirt.virtio.net.defs import (
    VIRTIO_NET_CTRL_ANNOUNCE,
    VIRTIO_NET_CTRL_COAL,
    VIRTIO_NET_CTRL_COAL_VQ,
    VIRTIO_NET_CTRL_MQ,
    VIRTIO_NET_CTRL_NOTF_COAL_RX_SET,
    VIRTIO_NET_CTRL_NOTF_COAL_TX_SET,
    VIRTIO_NET_CTRL_NOTF_COAL_VQ_GET,
    VIRTIO_NET_CTRL_NOTF_COAL_VQ_SET,
    VIRTIO_NET_CTRL_RX_ALLMULTI,
    VIRTIO_NET_CTRL_RX_ALLUNI,
    VIRTIO_NET_CTRL_RX_NOBCAST,
    VIRTIO_NET_CTRL_RX_NOMULTI,
    VIRTIO_NET_CTRL_RX_NOUNI,
    VIRTIO_NET_STATS_REPLY_HDR,
    VIRTIO_NET_STATS_TYPE_CVQ,
)
from iovirt.virtio.net.device import VirtioNet
from iovirt.virtio.net.rx_filter import RxFilter
from iovirt.virtio.net.switch import LearningSwitch

PREFIXES = ("virtio-1.4:5.1.9.4.4.4#", "virtio-1.4:5.1.9.5.1.1#", "virtio-1.4:5.1.9.5.2.1#", "virtio-1.4:5.1.9.5.4.2#",
            "virtio-1.4:5.1.9.5.6.2#",
            "virtio-1.4:5.1.9.5.7.3#", "virtio-1.4:5.1.9.5.10.6#", "virtio-1.4:5.1.9.5.11.12#")
CHECKS = [c for c in all_checks("pci") if c.clause.startswith(PREFIXES)]
RX, MAC, ANNOUNCE = "virtio-1.4:5.1.9.5.1.1#", "virtio-1.4:5.1.9.5.2.1#", "virtio-1.4:5.1.9.5.4.2#"
MQ, COAL, STATS = "virtio-1.4:5.1.9.5.6.2#", "virtio-1.4:5.1.9.5.10.6#", "virtio-1.4:5.1.9.5.11.12#"
RSS, TUNNEL = "virtio-1.4:5.1.9.5.7.3#", "virtio-1.4:5.1.9.4.4.4#"
PAIRS = 4


def _ctrl_net(device: str, scratch: str) -> VirtioNet:
    return VirtioNet(bytes.fromhex("525400123456"), LearningSwitch(), queue_pairs=PAIRS, ctrl_vq=True,
                     label="conform-ctrl")


# -- the mutants: each takes pytest's monkeypatch and breaks one rule --------------------------------------
def _promisc_ignored(mp: pytest.MonkeyPatch) -> None:
    original = RxFilter.allows

    def allows(self, frame, mac):
        promisc, self.modes["promisc"] = self.modes["promisc"], False
        try:
            return original(self, frame, mac)
        finally:
            self.modes["promisc"] = promisc

    mp.setattr(RxFilter, "allows", allows)


def _mode_ignored(command: int) -> Callable[[pytest.MonkeyPatch], None]:
    """VIRTIO_NET_CTRL_RX ``command`` acked OK but not carried out."""

    def mutate(mp: pytest.MonkeyPatch) -> None:
        original = RxFilter.set_mode
        mp.setattr(RxFilter, "set_mode", lambda self, cmd, on: None if cmd == command else original(self, cmd, on))

    return mutate


def _table_deferred(mp: pytest.MonkeyPatch) -> None:
    """MAC_TABLE_SET takes effect only at the next receive-mode command, after it was used."""
    set_table, set_mode = RxFilter.set_table, RxFilter.set_mode

    def stash(self, unicast, multicast):
        self.pending = (unicast, multicast)

    def apply_then_set(self, command, on):
        pending = self.__dict__.pop("pending", None)
        if pending is not None:
            set_table(self, *pending)
        set_mode(self, command, on)

    mp.setattr(RxFilter, "set_table", stash)
    mp.setattr(RxFilter, "set_mode", apply_then_set)


def _table_kept_on_reset(mp: pytest.MonkeyPatch) -> None:
    original = RxFilter.reset

    def reset(self):
        kept = (set(self.unicast), set(self.multicast)) if hasattr(self, "unicast") else (set(), set())
        original(self)
        self.unicast, self.multicast = kept

    mp.setattr(RxFilter, "reset", reset)


def _config_mac_stale(mp: pytest.MonkeyPatch) -> None:
    """The filter follows MAC_ADDR_SET, config space keeps showing the old address."""
    original = VirtioNet.config_space

    def config_space(self):
        return self.hw_mac + original(self)[len(self.hw_mac):]

    mp.setattr(VirtioNet, "config_space", config_space)


def _announce_not_cleared(mp: pytest.MonkeyPatch) -> None:
    original = NetCtrl._command

    def command(self, cls, cmd, payload):
        pending = self.device.announce_pending
        result = original(self, cls, cmd, payload)
        if cls == VIRTIO_NET_CTRL_ANNOUNCE:
            self.device.announce_pending = pending
        return result

    mp.setattr(NetCtrl, "_command", command)


def _all_pairs_after_reset(mp: pytest.MonkeyPatch) -> None:
    """Steering spreads over every pair from the start, before any VQ_PAIRS_SET."""
    original = NetCtrl.reset

    def reset(self):
        original(self)
        self.virtqueue_pairs = self.device.queue_pairs

    mp.setattr(NetCtrl, "reset", reset)


def _vq_pairs_ignored(mp: pytest.MonkeyPatch) -> None:
    """VQ_PAIRS_SET is acked but steering then spreads over every pair."""
    original = NetCtrl._command

    def command(self, cls, cmd, payload):
        result = original(self, cls, cmd, payload)
        if cls == VIRTIO_NET_CTRL_MQ:
            self.virtqueue_pairs = self.device.queue_pairs
        return result

    mp.setattr(NetCtrl, "_command", command)


def _reset_queue_flows_dropped(mp: pytest.MonkeyPatch) -> None:
    """A flow whose queue is being reset is dropped instead of going to another queue."""

    def rx_queue(self, flow):
        index = 2 * (flow % self.ctrl.virtqueue_pairs)
        return index if self.queues[index] is not None and self.enabled[index] else None

    mp.setattr(VirtioNet, "_rx_queue", rx_queue)


def _reset_all_held(mp: pytest.MonkeyPatch) -> None:
    """Frames arriving while every receive queue is being reset are held for later instead of dropped."""
    original = VirtioNet._rx_queue

    def rx_queue(self, flow):
        index = original(self, flow)
        return 0 if index is None else index

    mp.setattr(VirtioNet, "_rx_queue", rx_queue)


def _rss_ports_ignored(mp: pytest.MonkeyPatch) -> None:
    """TCPv4 / UDPv4 hash types hash the addresses only, not the ports."""
    original = rss._ipv4_input
    mp.setattr(rss, "_ipv4_input", lambda ip, types: original(ip, rss.VIRTIO_NET_HASH_TYPE_IPv4 if types else 0))


def _rss_reset_reselect(mp: pytest.MonkeyPatch) -> None:
    """A frame whose RSS queue is being reset is steered to another queue instead of dropped."""
    original = VirtioNet._frame_queue

    def frame_queue(self, frame):
        index = original(self, frame)
        return self._rx_queue(int.from_bytes(frame[:12], "big")) if index is None else index

    mp.setattr(VirtioNet, "_frame_queue", frame_queue)


def _tunnel_any_type(mp: pytest.MonkeyPatch) -> None:
    """With any encapsulation type enabled, every supported type is hashed on its inner header."""
    original = rss.inner_ipv4
    mp.setattr(rss, "inner_ipv4", lambda frame, types: original(frame, rss.SUPPORTED_TUNNEL_TYPES if types else 0))


def _tunnel_unsupported_accepted(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(ctrl_mod, "SUPPORTED_TUNNEL_TYPES", 0xFFFFFFFF)


def _tunnel_kept_on_reset(mp: pytest.MonkeyPatch) -> None:
    original = NetCtrl.reset

    def reset(self):
        kept = getattr(self, "tunnel_types", 0)
        original(self)
        self.tunnel_types = kept

    mp.setattr(NetCtrl, "reset", reset)


def _coal_wrap(mp: pytest.MonkeyPatch, before: Callable[[NetCtrl, int, bytes], bytes | None]) -> None:
    """Wrap NetCtrl._coalescing: ``before`` answers the command itself when it returns bytes."""
    original = NetCtrl._coalescing

    def coalescing(self, command, payload):
        result = before(self, command, payload)
        return original(self, command, payload) if result is None else result

    mp.setattr(NetCtrl, "_coalescing", coalescing)


def _coal_reserved_refused(mp: pytest.MonkeyPatch) -> None:
    def before(ctrl, command, payload):
        if command == VIRTIO_NET_CTRL_NOTF_COAL_VQ_SET and payload[2:4] != b"\0\0":
            raise CommandError("reserved is not 0")
        return None

    _coal_wrap(mp, before)


def _coal_short_acked(mp: pytest.MonkeyPatch) -> None:
    """A SET cut short is acked OK (and changes nothing): the driver believes parameters that are not in force."""
    sizes = {VIRTIO_NET_CTRL_NOTF_COAL_TX_SET: VIRTIO_NET_CTRL_COAL.size, VIRTIO_NET_CTRL_NOTF_COAL_RX_SET:
             VIRTIO_NET_CTRL_COAL.size, VIRTIO_NET_CTRL_NOTF_COAL_VQ_SET: VIRTIO_NET_CTRL_COAL_VQ.size}
    _coal_wrap(mp, lambda ctrl, command, payload: b"" if command in sizes and len(payload) < sizes[command] else None)


def _coal_ctrl_queue_served(mp: pytest.MonkeyPatch) -> None:
    """VQ_GET answers for the control queue too."""

    def before(ctrl, command, payload):
        if command == VIRTIO_NET_CTRL_NOTF_COAL_VQ_GET and struct.unpack_from("<H", payload)[0] == 2 * ctrl.device.queue_pairs:
            return VIRTIO_NET_CTRL_COAL.pack(0, 0)
        return None

    _coal_wrap(mp, before)


def _coal_kept_on_re_enable(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(Coalescing, "queue_disabled", lambda self, index: self.armed.discard(index))


def _coal_ignores_suppression(mp: pytest.MonkeyPatch) -> None:
    def notify(self, index):
        queue, notifier = self.queues[index], self.notifiers[index]
        if queue is not None and notifier is not None:
            queue.need_notify()
            notifier()

    mp.setattr(VirtioNet, "_notify", notify)


def _coal_kept_on_reset(mp: pytest.MonkeyPatch) -> None:
    original = Coalescing.reset

    def reset(self):
        kept = (self.tx_set, self.rx_set, list(self.params))
        original(self)
        self.tx_set, self.rx_set, self.params = kept

    mp.setattr(Coalescing, "reset", reset)


def _stats_cvq_unlisted(mp: pytest.MonkeyPatch) -> None:
    """QUERY leaves out the controlq type, which GET still serves."""
    mp.setattr(ctrl_stats, "capabilities",
               lambda: struct.pack("<Q", ctrl_stats.SUPPORTED_STATS_TYPES & ~VIRTIO_NET_STATS_TYPE_CVQ))


def _stats_bad_entries_skipped(mp: pytest.MonkeyPatch) -> None:
    """STATS_GET answers the good entries and leaves the bad ones out instead of failing the command."""
    original = ctrl_stats.parse_request

    def parse(net, payload):
        good = []
        size = ctrl_stats.VIRTIO_NET_CTRL_QUEUE_STATS.size
        for pos in range(0, len(payload) - len(payload) % size, size):
            try:
                good += original(net, payload[pos:pos + size])
            except ctrl_stats.StatsRequestError:
                pass
        return good

    mp.setattr(ctrl_stats, "parse_request", parse)


def _stats_vq_index_zero(mp: pytest.MonkeyPatch) -> None:
    """Every reply header says vq_index 0."""
    original = ctrl_stats.reply

    def reply(net, entries, commands, ok):
        out = bytearray(original(net, entries, commands, ok))
        pos = 0
        while pos < len(out):
            rtype, _, size = VIRTIO_NET_STATS_REPLY_HDR.unpack_from(out, pos)
            VIRTIO_NET_STATS_REPLY_HDR.pack_into(out, pos, rtype, 0, size)
            pos += size
        return bytes(out)

    mp.setattr(ctrl_stats, "reply", reply)


def _stats_padded(mp: pytest.MonkeyPatch) -> None:
    """STATS_GET fills the whole result buffer, zeros after the replies."""
    original = ctrl_stats.reply
    mp.setattr(ctrl_stats, "reply", lambda net, entries, commands, ok: original(net, entries, commands, ok).ljust(4096, b"\0"))


MUTANTS: dict[str, Callable[[pytest.MonkeyPatch], None]] = {
    "promisc-ignored": _promisc_ignored,
    "allmulti-ignored": _mode_ignored(VIRTIO_NET_CTRL_RX_ALLMULTI),
    "alluni-ignored": _mode_ignored(VIRTIO_NET_CTRL_RX_ALLUNI),
    "nomulti-ignored": _mode_ignored(VIRTIO_NET_CTRL_RX_NOMULTI),
    "nouni-ignored": _mode_ignored(VIRTIO_NET_CTRL_RX_NOUNI),
    "nobcast-ignored": _mode_ignored(VIRTIO_NET_CTRL_RX_NOBCAST),
    "mac-table-deferred": _table_deferred,
    "mac-table-kept-on-reset": _table_kept_on_reset,
    "config-mac-stale": _config_mac_stale,
    "announce-not-cleared": _announce_not_cleared,
    "steering-all-pairs-after-reset": _all_pairs_after_reset,
    "steering-vq-pairs-ignored": _vq_pairs_ignored,
    "steering-reset-queue-flows-dropped": _reset_queue_flows_dropped,
    "steering-reset-all-held": _reset_all_held,
    "rss-ports-ignored": _rss_ports_ignored,
    "rss-reset-reselect": _rss_reset_reselect,
    "tunnel-any-type-inner": _tunnel_any_type,
    "tunnel-unsupported-accepted": _tunnel_unsupported_accepted,
    "tunnel-kept-on-reset": _tunnel_kept_on_reset,
    "coal-reserved-refused": _coal_reserved_refused,
    "coal-short-acked": _coal_short_acked,
    "coal-ctrl-queue-served": _coal_ctrl_queue_served,
    "coal-kept-on-re-enable": _coal_kept_on_re_enable,
    "coal-ignores-suppression": _coal_ignores_suppression,
    "coal-kept-on-reset": _coal_kept_on_reset,
    "stats-cvq-unlisted": _stats_cvq_unlisted,
    "stats-bad-entries-skipped": _stats_bad_entries_skipped,
    "stats-vq-index-zero": _stats_vq_index_zero,
    "stats-padded": _stats_padded,
}

MUTANT_EXPECTATIONS: dict[str, frozenset[str]] = {
    "promisc-ignored": frozenset({RX + "promisc"}),
    "allmulti-ignored": frozenset({RX + "allmulti"}),
    "alluni-ignored": frozenset({RX + "alluni"}),
    "nomulti-ignored": frozenset({RX + "nomulti"}),
    "nouni-ignored": frozenset({RX + "nouni"}),
    "nobcast-ignored": frozenset({RX + "nobcast"}),
    "mac-table-deferred": frozenset({MAC + "table-set"}),
    "mac-table-kept-on-reset": frozenset({MAC + "table-reset"}),
    "config-mac-stale": frozenset({MAC + "addr-set"}),
    "announce-not-cleared": frozenset({ANNOUNCE + "announce-ack"}),
    "steering-all-pairs-after-reset": frozenset({MQ + "receiveq1"}),
    "steering-vq-pairs-ignored": frozenset({MQ + "vq-pairs"}),
    "steering-reset-queue-flows-dropped": frozenset({MQ + "reset-reselect"}),
    "steering-reset-all-held": frozenset({MQ + "reset-all"}),
    "rss-ports-ignored": frozenset({RSS + "steering"}),
    "rss-reset-reselect": frozenset({RSS + "reset-drop"}),
    "tunnel-any-type-inner": frozenset({TUNNEL + "outer"}),
    "tunnel-unsupported-accepted": frozenset({TUNNEL + "unsupported"}),
    "tunnel-kept-on-reset": frozenset({TUNNEL + "disable"}),
    "coal-reserved-refused": frozenset({COAL + "reserved"}),
    "coal-short-acked": frozenset({COAL + "ack"}),
    "coal-ctrl-queue-served": frozenset({COAL + "vq_index"}),
    "coal-kept-on-re-enable": frozenset({COAL + "re-enable"}),
    "coal-ignores-suppression": frozenset({COAL + "suppressed"}),
    "coal-kept-on-reset": frozenset({COAL + "reset"}),
    "stats-cvq-unlisted": frozenset({STATS + "query"}),
    "stats-bad-entries-skipped": frozenset({STATS + "bad-request"}),
    "stats-vq-index-zero": frozenset({STATS + "reply-hdr"}),
    "stats-padded": frozenset({STATS + "fill"}),
}


def _run() -> dict[str, Verdict]:
    results = Runner(PlatformTarget("net", make_device=_ctrl_net), CHECKS).run()
    return {r.clause: r.verdict for r in results}


def test_the_checks_pass_on_the_unbroken_device():
    verdicts = _run()
    assert set(verdicts) == {c.clause for c in CHECKS} and len(verdicts) == 29
    assert {c for c, v in verdicts.items() if v is not Verdict.PASS} == set()


def test_every_check_here_has_a_mutant():
    assert set().union(*MUTANT_EXPECTATIONS.values()) == {c.clause for c in CHECKS}
    assert set(MUTANTS) == set(MUTANT_EXPECTATIONS)


@pytest.mark.parametrize("name", sorted(MUTANT_EXPECTATIONS))
def test_mutant_fails_exactly_its_check(monkeypatch, name):
    MUTANTS[name](monkeypatch)
    verdicts = _run()
    failing = {c for c, v in verdicts.items() if v is Verdict.FAIL}
    assert failing == MUTANT_EXPECTATIONS[name]
    assert all(verdicts[c] is Verdict.FAIL for c in MUTANT_EXPECTATIONS[name])
    assert not {c for c, v in verdicts.items() if v is Verdict.NA}  # the others really ran, and passed


def test_conform_cli_runs_the_control_queue_net(capsys, tmp_path):
    report = tmp_path / "ctrl.json"
    assert main(["conform", "--in-process", "net", "--ctrl-queue", "--json", str(report)]) == 0
    verdicts = {r["clause"]: r["verdict"] for r in json.loads(report.read_text())}
    assert {c.clause for c in CHECKS} <= set(verdicts)
    assert {verdicts[c.clause] for c in CHECKS} == {"pass"}
    assert main(["conform", "--in-process", "blk", "--ctrl-queue"]) == 2
    assert main(["conform", "--in-process", "net", "--ctrl-queue", "--sriov-owner"]) == 2
    assert "--ctrl-queue" in capsys.readouterr().err
