"""Issue 19: ``vlan=``/``trunk=`` on ``--net``, ``--router`` and ``--nat``: flags and TOML agree, bad input exits 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from iovirt.cli import build_parser
from iovirt.vhost_user.cli import apply_config, serve_plan
from iovirt.vhost_user.specs import SpecError, load_config, parse_nat, parse_net, parse_router
from iovirt.virtio.net.ipv4 import Subnet
from iovirt.virtio.net.vlan import PortVlan

IOVIRT = [sys.executable, "-m", "iovirt"]


def test_vlan_and_trunk_keys() -> None:
    assert parse_net("/n.sock").vlan is None
    assert parse_net("/n.sock,vlan=10").vlan == PortVlan(access=10)
    assert parse_net("client:/n.sock,trunk=10:20:4094,pps=5").vlan == PortVlan(trunk=frozenset({10, 20, 4094}))


@pytest.mark.parametrize("text,why", [
    ("n.sock,vlan=0", "VLAN id 0 out of range: want 1..4094"),
    ("n.sock,vlan=4095", "VLAN id 4095 out of range"),
    ("n.sock,vlan=-3", "out of range"),
    ("n.sock,vlan=ten", "want a VLAN id 1..4094"),
    ("n.sock,vlan=", "want a VLAN id"),
    ("n.sock,trunk=", "want VLAN ids N:M"),
    ("n.sock,trunk=10:10", "named twice"),
    ("n.sock,trunk=10:5000", "VLAN id 5000 out of range"),
    ("n.sock,vlan=10,trunk=20", "not both"),
])
def test_bad_vlan_specs(text: str, why: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_net(text)
    assert why in str(info.value) and text in str(info.value)


def test_router_and_nat_specs() -> None:
    assert parse_router("10.0.1.1/24") == parse_router("10.0.1.1/24")
    router = parse_router("10.0.1.1/24,vlan=10")
    assert router.subnet == Subnet.parse("10.0.1.1/24") and router.vlan == PortVlan(access=10)
    nat = parse_nat("192.168.77.2/24,gw=192.168.77.1,ports=2000-3000")
    assert str(nat.subnet) == "192.168.77.2/24" and nat.gateway == 0xC0A84D01 and nat.ports == (2000, 3000)
    assert parse_nat("192.168.77.2/24").gateway is None


@pytest.mark.parametrize("parse,text,why", [
    (parse_router, "10.0.1.1", "want an IPv4 address with its prefix"),
    (parse_router, "10.0.1.0/24", "network or broadcast address"),
    (parse_router, "10.0.1.255/24", "network or broadcast address"),
    (parse_router, "10.0.1.1/33", "want an IPv4 address"),
    (parse_router, "10.0.1.1/24,vlan=4095", "vlan: VLAN id 4095 out of range"),
    (parse_router, "10.0.1.1/24,mtu=9000", "unknown option 'mtu'"),
    (parse_nat, "192.168.77.2/24,gw=10.0.0.1", "gw: 10.0.0.1 is not on 192.168.77.2/24"),
    (parse_nat, "192.168.77.2/24,gw=300.1.1.1", "gw:"),
    (parse_nat, "192.168.77.2/24,ports=3000-2000", "ports: empty range"),
    (parse_nat, "192.168.77.2/24,ports=0-10", "ports: want 1..65535"),
    (parse_nat, "192.168.77.2/24,via=1", "unknown option 'via'"),
])
def test_bad_router_and_nat_specs(parse, text: str, why: str) -> None:
    with pytest.raises(SpecError) as info:
        parse(text)
    assert why in str(info.value)


FLAGS = ["serve", "--net", "/n0.sock,vlan=10", "--net", "/n1.sock,trunk=10:20", "--tap", "tap9",
         "--router", "10.0.1.1/24,vlan=10", "--router", "10.0.2.1/24", "--nat", "192.168.77.2/24,gw=192.168.77.1"]
TOML = """
tap = "tap9"
router = ["10.0.1.1/24,vlan=10", "10.0.2.1/24"]
nat = "192.168.77.2/24,gw=192.168.77.1"

[[net]]
socket = "/n0.sock"
vlan = 10

[[net]]
socket = "/n1.sock"
trunk = [10, 20]
"""


def test_flags_and_toml_give_the_same_plan(tmp_path) -> None:
    config = tmp_path / "iovirt.toml"
    config.write_text(TOML)
    by_file = build_parser().parse_args(["serve", "--config", str(config)])
    apply_config(by_file)
    assert serve_plan(by_file) == serve_plan(build_parser().parse_args(FLAGS))
    config.write_text(TOML.replace("trunk = [10, 20]", 'trunk = "10:20"'))
    by_file = build_parser().parse_args(["serve", "--config", str(config)])
    apply_config(by_file)
    assert serve_plan(by_file) == serve_plan(build_parser().parse_args(FLAGS))


@pytest.mark.parametrize("body,why", [
    ('[[net]]\nsocket = "n"\nvlan = 4095\n', "[[net]] #1: vlan: VLAN id 4095 out of range"),
    ('[[net]]\nsocket = "n"\nvlan = 10\ntrunk = "20"\n', "not both"),
    ('router = "10.0.1.1/24"\n', "router: want a list"),
    ('router = ["10.0.1.1"]\n', "router: --router '10.0.1.1': want an IPv4 address"),
    ('nat = "1.2.3.4/24,gw=9.9.9.9"\n', "nat: --nat"),
])
def test_config_file_errors(tmp_path, body: str, why: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(body)
    with pytest.raises(SpecError) as info:
        load_config(str(config))
    assert why in str(info.value)


@pytest.mark.parametrize("args,why", [
    (["--net", "/tmp/n.sock,vlan=4095"], "VLAN id 4095 out of range: want 1..4094"),
    (["--net", "/tmp/n.sock,trunk=1:0"], "VLAN id 0 out of range"),
    (["--net", "/tmp/n.sock", "--router", "10.0.0.1/24", "--nat", "192.168.1.2/24"], "--nat needs --router"),
    (["--net", "/tmp/n.sock", "--tap", "t0", "--nat", "192.168.1.2/24"], "--nat needs --router"),
    (["--net", "/tmp/n.sock,vlan=3", "--isolate"], "--isolate does not take vlan="),
])
def test_serve_exits_2_with_a_clear_line(args: list[str], why: str) -> None:
    out = subprocess.run([*IOVIRT, "serve", *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert why in out.stderr and "Traceback" not in out.stderr
