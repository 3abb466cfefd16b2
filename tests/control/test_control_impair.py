"""``iovirt ctl PATH impair DEVICE key=value...``: the same keys and checks as ``--net``, counters in stats and metrics."""

from __future__ import annotations

import json

from iovirt.cli import main
from iovirt.vhost_user.driver import VhostUserDriver
from iovirt.virtio.net.defs import NetHdr

from backend_helpers import wait_until
from control_helpers import ALL, MAC_A, MAC_B, error, ok


def frame(dst: bytes, src: bytes, n: int = 0) -> bytes:
    return dst + src + b"\x88\xb5" + n.to_bytes(2, "big") + bytes(48)


def driver(path: str) -> VhostUserDriver:
    drv = VhostUserDriver(path, features=ALL, memory_size=8 << 20)
    drv.start_queues([0, 1], size=256)
    return drv


def send(drv: VhostUserDriver, frames: list[bytes]) -> None:
    for data in frames:
        drv.queues[1].add_data([NetHdr().pack() + data])
    drv.kick(1)
    done: list = []
    assert wait_until(lambda: done.extend(drv.queues[1].get_used()) or len(done) == len(frames))
    drv.frontend.wait_call(1, timeout=0)


def test_impair_sets_reports_and_clears(backend):
    reply = ok(backend.control_path, "impair", {"device": "net0", "impairment": {"drop": "0.1", "seed": "1"}})
    assert reply == {"name": "net0", "impairments": {"ingress": {}, "egress": {"drop": 0.1, "seed": 1}}}
    reply = ok(backend.control_path, "impair", {"device": "net0",
                                                "impairment": {"dir": "ingress", "delay": "5", "jitter": "1"}})
    assert reply["impairments"] == {"ingress": {"delay": 5.0, "jitter": 1.0}, "egress": {"drop": 0.1, "seed": 1}}
    reply = ok(backend.control_path, "impair", {"device": "net0", "impairment": {"dir": "egress"}})
    assert reply["impairments"] == {"ingress": {"delay": 5.0, "jitter": 1.0}, "egress": {}}
    reply = ok(backend.control_path, "impair", {"device": "net0", "impairment": {}})
    assert reply["impairments"] == {"ingress": {}, "egress": {}}
    assert id(backend.net[0]) not in backend.switch.impairments


def test_impair_bad_input_gets_an_error_reply(backend):
    for impairment, why in [
        ({"drop": "1.5"}, "drop: want a probability 0..1"),
        ({"delay": "-1"}, "delay: want milliseconds >= 0"),
        ({"jitter": "3"}, "jitter needs a delay"),
        ({"loss": "0.1"}, "unknown impairment 'loss'"),
        ({"drop": "lots"}, "drop: want a number"),
        ({"drop": True}, "'impairment' must be an object"),
        ([1, 2], "'impairment' must be an object"),
    ]:
        err = error(backend.control_path, "impair", {"device": "net0", "impairment": impairment})
        assert err["class"] == "BadRequest" and why in err["desc"], (impairment, err)
    err = error(backend.control_path, "impair", {"device": "blk0", "impairment": {"drop": "0.1"}})
    assert "takes no impairments" in err["desc"]
    assert error(backend.control_path, "impair", {"device": "net9", "impairment": {}})["class"] == "DeviceNotFound"
    assert backend.switch.impairments == {}


def test_impaired_traffic_counts_in_stats_and_metrics(backend):
    with driver(backend.net_paths[0]) as a, driver(backend.net_paths[1]) as b:
        for _ in range(64):
            b.queues[0].add_data([], [2048])
        b.kick(0)
        send(b, [frame(MAC_A, MAC_B)])  # the switch learns where B is
        ok(backend.control_path, "impair", {"device": "net0",
                                            "impairment": {"dir": "ingress", "drop": "0.5", "seed": "2"}})
        send(a, [frame(MAC_B, MAC_A, n) for n in range(200)])
        stats = ok(backend.control_path, "stats", {"device": "net0"})["counters"]
        dropped = stats["tx_impair_dropped"]
        assert 60 < dropped < 140 and stats["tx_dropped_impair"] == dropped
        text = ok(backend.control_path, "metrics")
        assert f'iovirt_tx_dropped_by_reason_total{{device="net0",type="net",reason="impair"}} {dropped}' in text
        assert "iovirt_tx_impair_dropped_total" in text


def test_delay_through_the_data_plane_timers(backend):
    with driver(backend.net_paths[0]) as a, driver(backend.net_paths[1]) as b:
        for _ in range(64):
            b.queues[0].add_data([], [2048])
        b.kick(0)
        send(b, [frame(MAC_A, MAC_B)])
        ok(backend.control_path, "impair", {"device": "net1", "impairment": {"delay": "200"}})
        send(a, [frame(MAC_B, MAC_A, n) for n in range(5)])
        assert b.queues[0].get_used() == []  # held for 200 ms
        got: list = []
        assert wait_until(lambda: got.extend(b.queues[0].get_used()) or len(got) == 5, timeout=5)
        assert ok(backend.control_path, "stats", {"device": "net1"})["counters"]["rx_impair_delayed"] == 5


def test_ctl_impair_command_line(backend, capsys):
    assert main(["ctl", backend.control_path, "impair", "net0", "drop=10%", "dir=both", "seed=4"]) == 0
    assert json.loads(capsys.readouterr().out)["impairments"]["ingress"] == {"drop": 0.1, "seed": 4}
    assert main(["ctl", backend.control_path, "impair", "net0", "drop=2"]) == 1
    assert "drop: want a probability" in capsys.readouterr().err
    assert main(["ctl", backend.control_path, "impair", "net0", "drop"]) == 2
    assert "impair wants KEY=VALUE" in capsys.readouterr().err
    assert main(["ctl", backend.control_path, "impair"]) == 2
    assert main(["ctl", backend.control_path, "impair", "net0"]) == 0
