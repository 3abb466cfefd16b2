"""Device specs and ``iovirt serve --config``: flags and TOML mean the same, errors are clear (issue 14)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from iovirt.cli import build_parser
from iovirt.vhost_user.cli import apply_config, serve_plan
from iovirt.vhost_user.specs import DeviceSpec, SpecError, apply_limits, load_config, parse_blk, parse_net

IOVIRT = [sys.executable, "-m", "iovirt"]


def test_net_and_blk_specs():
    assert parse_net("/run/n.sock") == DeviceSpec("net", "/run/n.sock")
    spec = parse_net("client:/run/n.sock,config=on,pps=1000,bps=1e6")
    assert spec.client and spec.socket == "/run/n.sock" and spec.config
    assert spec.limits == {"pps": 1000.0, "bps": 1e6}
    blk = parse_blk("client:/b.sock,/img,ro,size=64M,queues=2,iops=100")
    assert (blk.kind, blk.socket, blk.client, blk.image, blk.read_only) == ("blk", "/b.sock", True, "/img", True)
    assert blk.size == 64 << 20 and blk.queues == 2 and blk.limits == {"iops": 100.0}
    assert parse_blk("/b.sock,/img").queues == 1 and not parse_blk("/b.sock,/img").client


@pytest.mark.parametrize("text,why", [
    ("n.sock,pps=0", "pps: want a positive number"),
    ("n.sock,bps=-5", "bps: want a positive number"),
    ("n.sock,bps=fast", "bps: want a positive number"),
    ("n.sock,iops=5", "unknown option 'iops'"),
    ("n.sock,config=maybe", "config: want on or off"),
    ("client:", "want [client:]SOCKET"),
])
def test_bad_net_specs(text, why):
    with pytest.raises(SpecError, match=None) as info:
        parse_net(text)
    assert why in str(info.value) and text in str(info.value)


@pytest.mark.parametrize("text,why", [
    ("b.sock", "want [client:]SOCKET,IMAGE"),
    ("b.sock,img,queues=0", "queues: want 1..256"),
    ("b.sock,img,pps=3", "unknown option 'pps'"),
    ("b.sock,img,size=-1", "size"),
    ("b.sock,img,iops=nan", "iops: want a positive number"),
])
def test_bad_blk_specs(text, why):
    with pytest.raises(SpecError) as info:
        parse_blk(text)
    assert why in str(info.value)


class Recorder:
    def __init__(self):
        self.limits = []

    def set_limits(self, limits):
        self.limits.append(limits)


def test_apply_limits_hands_them_to_the_device():
    device = Recorder()
    apply_limits(device, parse_net("n.sock,pps=10,bps=20").limits)
    assert device.limits == [{"pps": 10.0, "bps": 20.0}]


FLAGS = [
    "serve", "--net", "client:/run/vmm/n0.sock,config=on,pps=5000", "--net", "/run/iovirt/n1.sock,bps=1e7",
    "--blk", "/run/iovirt/b0.sock,/srv/disk.img,ro,size=64M,queues=2,iops=200,bps=1048576",
    "--blk", "client:/run/vmm/b1.sock,/srv/other.img",
    "--queues", "2", "--mtu", "9000", "--tap", "tap-iovirt", "--mac-table-size", "512", "--mac-table-per-port", "8",
    "--allow-uid", "107", "--allow-gid", "36", "--socket-mode", "0660", "--require-sealed-memory",
    "--sandbox", "log",
]

TOML = """
queues = 2
mtu = 9000
tap = "tap-iovirt"
mac-table-size = 512
mac-table-per-port = 8
allow-uid = [107]
allow-gid = [36]
socket-mode = "0660"
require-sealed-memory = true
sandbox = "log"

[[net]]
socket = "/run/vmm/n0.sock"
client = true
config = true
pps = 5000

[[net]]
socket = "/run/iovirt/n1.sock"
bps = 1e7

[[blk]]
socket = "/run/iovirt/b0.sock"
image = "/srv/disk.img"
ro = true
size = "64M"
queues = 2
iops = 200
bps = 1048576

[[blk]]
socket = "/run/vmm/b1.sock"
client = true
image = "/srv/other.img"
"""


def test_the_same_configuration_by_flags_and_by_toml_gives_the_same_plan(tmp_path):
    config = tmp_path / "iovirt.toml"
    config.write_text(TOML)
    by_flags = build_parser().parse_args(FLAGS)
    by_file = build_parser().parse_args(["serve", "--config", str(config)])
    apply_config(by_file)
    assert serve_plan(by_file) == serve_plan(by_flags)
    assert serve_plan(by_flags)["net"][0] == DeviceSpec("net", "/run/vmm/n0.sock", True,
                                                       options={"config": True, "pps": 5000.0})


def test_a_config_file_with_only_defaults_gives_the_default_plan(tmp_path):
    config = tmp_path / "iovirt.toml"
    config.write_text('[[net]]\nsocket = "n.sock"\n')
    by_file = build_parser().parse_args(["serve", "--config", str(config)])
    apply_config(by_file)
    assert serve_plan(by_file) == serve_plan(build_parser().parse_args(["serve", "--net", "n.sock"]))


@pytest.mark.parametrize("body,why", [
    ("queues = \n", "not valid TOML: Invalid value (at line 1"),
    ("[[net]]\nsocket = \"n.sock\"\n[[net]\n", "not valid TOML"),
    ("mtus = 1500\n", "unknown key 'mtus'"),
    ("queues = \"two\"\n", "queues: want a whole number"),
    ("queues = 1000\n", "queues: want 1..128"),
    ("socket-mode = \"999\"\n", "socket-mode: want octal permission bits"),
    ("allow-uid = 107\n", "allow-uid: want a list of ids"),
    ("require-sealed-memory = \"yes\"\n", "require-sealed-memory: want true or false"),
    ("[[net]]\nclient = true\n", "[[net]] #1: missing key 'socket'"),
    ("[[net]]\nsocket = 5\n", "[[net]] #1: socket: want a non-empty string"),
    ("[[net]]\nsocket = \"n\"\nclient = \"yes\"\n", "[[net]] #1: want true or false"),
    ("[[net]]\nsocket = \"n\"\nspeed = 1\n", "[[net]] #1: unknown option 'speed'"),
    ("[[net]]\nsocket = \"n\"\npps = -1\n", "[[net]] #1: pps: want a positive number"),
    ("[[net]]\nsocket = \"n\"\n[[blk]]\nsocket = \"b\"\n", "[[blk]] #1: missing key 'image'"),
    ("[[blk]]\nsocket = \"b\"\nimage = \"i\"\nqueues = 1.5\n", "[[blk]] #1: queues: want a whole number"),
    ("net = \"n.sock\"\n", "net: want [[net]] tables"),
])
def test_config_file_errors_name_the_line_or_key(tmp_path, body, why):
    config = tmp_path / "bad.toml"
    config.write_text(body)
    with pytest.raises(SpecError) as info:
        load_config(str(config))
    assert why in str(info.value) and str(config) in str(info.value)


def test_serve_with_a_bad_config_exits_2_with_one_clear_line(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("[[net]]\nsocket = \"n.sock\"\ncolour = \"red\"\n")
    out = subprocess.run([*IOVIRT, "serve", "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "unknown option 'colour'" in out.stderr and "Traceback" not in out.stderr
    missing = subprocess.run([*IOVIRT, "serve", "--config", str(tmp_path / "none.toml")], capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode == 2 and "No such file" in missing.stderr and "Traceback" not in missing.stderr


def test_config_is_not_combined_with_device_flags(tmp_path):
    config = tmp_path / "ok.toml"
    config.write_text("[[net]]\nsocket = \"n.sock\"\n")
    out = subprocess.run([*IOVIRT, "serve", "--config", str(config), "--mtu", "9000"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "--mtu" in out.stderr and "Traceback" not in out.stderr
