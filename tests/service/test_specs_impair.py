"""Impairments on ``--net`` and in ``[[net]]`` tables: one parser, clear errors, exit 2 (issue 19)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from iovirt.vhost_user.specs import SpecError, load_config, parse_net
from iovirt.virtio.net.impair import Impairment

IOVIRT = [sys.executable, "-m", "iovirt"]


def test_net_impairment_keys_sit_beside_the_qos_limits():
    spec = parse_net("n.sock,pps=1000,drop=0.1,dup=0.01,corrupt=0.001,reorder=0.2,delay=10,jitter=2,rate=500,seed=7")
    assert spec.limits == {"pps": 1000.0}
    assert spec.impairment == (("egress",), Impairment(drop=0.1, dup=0.01, corrupt=0.001, reorder=0.2, delay_ms=10,
                                                       jitter_ms=2, rate=500, seed=7))
    assert parse_net("n.sock,drop=10%,dir=ingress").impairment == (("ingress",), Impairment(drop=0.1))
    assert parse_net("n.sock").impairment is None
    assert parse_net("n.sock,drop=0").impairment is None


def test_toml_takes_the_same_keys(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[[net]]\nsocket = "n.sock"\ndrop = 0.1\ndelay = 5\ndir = "both"\nseed = 3\n')
    (spec,) = load_config(str(config))["net"]
    assert spec.impairment == (("ingress", "egress"), Impairment(drop=0.1, delay_ms=5, seed=3))


@pytest.mark.parametrize("text,why", [
    ("n.sock,drop=1.5", "drop: want a probability 0..1"),
    ("n.sock,drop=101%", "drop: want a probability 0..1"),
    ("n.sock,delay=-10", "delay: want milliseconds >= 0"),
    ("n.sock,jitter=10", "jitter needs a delay"),
    ("n.sock,reorder=0.1", "reorder needs a delay"),
    ("n.sock,delay=soon", "delay: want a number"),
    ("n.sock,loss=0.1", "unknown option 'loss'"),
    ("n.sock,dir=left,drop=0.1", "dir: want one of ingress, egress, both"),
    ("n.sock,rate=-3", "rate: want frames per second"),
])
def test_bad_impairments_are_clear_errors(text, why):
    with pytest.raises(SpecError) as info:
        parse_net(text)
    assert why in str(info.value) and text in str(info.value)


@pytest.mark.parametrize("body,why", [
    ('[[net]]\nsocket = "n"\ndrop = 2\n', "[[net]] #1: drop: want a probability"),
    ('[[net]]\nsocket = "n"\ndelay = -1\n', "[[net]] #1: delay: want milliseconds"),
    ('[[net]]\nsocket = "n"\njitter = 1\n', "[[net]] #1: jitter needs a delay"),
    ('[[net]]\nsocket = "n"\ndrop = "x"\n', "[[net]] #1: drop: want a number"),
])
def test_bad_impairments_in_a_config_file(tmp_path, body, why):
    config = tmp_path / "bad.toml"
    config.write_text(body)
    with pytest.raises(SpecError) as info:
        load_config(str(config))
    assert why in str(info.value)


@pytest.mark.parametrize("net,why", [
    ("drop=1.5", "drop: want a probability 0..1"),
    ("delay=-5", "delay: want milliseconds >= 0"),
    ("flaky=1", "unknown option 'flaky'"),
    ("drop=abc", "drop: want a number"),
])
def test_serve_exits_2_on_a_bad_impairment(tmp_path, net, why):
    out = subprocess.run([*IOVIRT, "serve", "--net", f"{tmp_path / 'n.sock'},{net}"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2
    assert why in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "n.sock").exists()


def test_isolate_refuses_impairments(tmp_path):
    out = subprocess.run([*IOVIRT, "serve", "--isolate", "--net", f"{tmp_path / 'n.sock'},drop=0.1"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "impairments" in out.stderr


def test_a_vlan_port_takes_impairments_too():
    spec = parse_net("/tmp/a.sock,vlan=10,drop=0.25,seed=3")
    assert spec.vlan is not None and spec.vlan.access == 10
    directions, impairment = spec.impairment
    assert impairment == Impairment(drop=0.25, seed=3)
    with pytest.raises(SpecError, match="not both"):
        parse_net("/tmp/a.sock,vlan=10,trunk=20:30,delay=5")
