"""VLANs, routed and NAT modes with real guests (issue 19; docs/network-modes.md).

* VLANs: three guests on one subnet, two on access VLAN 10 and one on VLAN
  20.  The two on VLAN 10 ping each other; a ping between the VLANs gets no
  answer although the guest on VLAN 20 is up; the switch's table (``iovirt
  ctl fdb``) shows each MAC in its VLAN.
* Routed: two guests on two subnets (VLANs 10 and 20) ping each other through
  ``--router`` gateway ports; the replies arrive with the TTL decremented.
* Trunk: a guest on a trunk port of VLANs 10 and 20 (Linux 8021q
  interfaces) pings a guest on each access VLAN.
* NAT: a guest behind ``--router`` + ``--nat`` pings and fetches a file over
  HTTP from a server in a network namespace on the host side, where iovirt's
  TAP uplink lives; nothing bridges the guest's subnet to the namespace.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from iovirt.guest import Guest, VhostUserNet, free_tcp_port
from iovirt.guest.modules import VIRTIO_MODULES
from iovirt.serve_process import ServeProcess

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86 is not installed"),
]

BOOT = 180.0  # the machine is shared: generous
APPEND = ("no_timer_check",)
"""Under TCG on a loaded host the kernel's IO-APIC timer check can fail ("IO-APIC + timer doesn't work", a panic)."""


def ctl(control, *words: str, timeout: float = 30.0):
    """``iovirt ctl CONTROL WORDS…``: its JSON output (fails the test on an error)."""
    done = subprocess.run([sys.executable, "-m", "iovirt", "ctl", str(control), *words],
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def answered(output: str, label: str) -> int:
    match = re.search(rf"^{label}: (\d+) packets transmitted, (\d+) packets received", output, re.M)
    assert match, output
    return int(match.group(2))


def details(srv: ServeProcess, *guests: Guest) -> str:
    consoles = "\n".join(f"--- {g.name} ---\n{g.console}" for g in guests)
    return f"{consoles}\n--- serve ---\n{srv.log()}"


# b on VLAN 10 waits to be pinged; c on VLAN 20 says it is up, pings a (no answer expected), and waits.
VLAN_A = """
iovirt_wait_ping 10.79.0.2 120 || exit 1
echo "within: $(ping -c 3 -W 5 10.79.0.2 | grep 'packets transmitted')"
iovirt_wait_host c-is-up
echo "across: $(ping -c 3 -W 2 10.79.0.3 | grep 'packets transmitted')"
iovirt_wait_host done
"""
VLAN_C = """
echo "c-up"
echo "c-across: $(ping -c 3 -W 2 10.79.0.1 | grep 'packets transmitted')"
iovirt_wait_host done
"""


def test_two_vlans_on_one_switch_stay_isolated(tmp_path):
    socks = [tmp_path / f"n{i}.sock" for i in range(3)]
    control = tmp_path / "control.sock"
    srv = ServeProcess(["--net", f"{socks[0]},vlan=10", "--net", f"{socks[1]},vlan=10", "--net", f"{socks[2]},vlan=20",
                        "--control", str(control)], tmp_path / "serve.log", [*socks, control]).start()
    macs = ["52:54:00:79:00:01", "52:54:00:79:00:02", "52:54:00:79:00:03"]  # one each: a learning switch
    a = Guest(tmp_path, [VhostUserNet(socks[0], ip="10.79.0.1/24", mac=macs[0])], name="a", append=APPEND,
              script=VLAN_A)
    b = Guest(tmp_path, [VhostUserNet(socks[1], ip="10.79.0.2/24", mac=macs[1])], name="b", append=APPEND,
              script="iovirt_wait_host done")
    c = Guest(tmp_path, [VhostUserNet(socks[2], ip="10.79.0.3/24", mac=macs[2])], name="c", append=APPEND,
              script=VLAN_C)
    try:
        with a, b, c:
            for guest in (b, c, a):
                guest.start()
            c.wait_for(r"^c-across: .*\n", timeout=BOOT)
            a.wait_for(r"^within: .*\n", timeout=BOOT)
            a.release("c-is-up", timeout=BOOT)
            a.wait_for(r"^across: .*\n", timeout=BOOT)
            fdb = ctl(control, "fdb")  # while every guest is up: a driver reset forgets its port's MACs
            stats = ctl(control, "stats")["switch"]
            a.release("done", timeout=BOOT)
            result = a.wait_result(timeout=BOOT)
            for guest in (b, c):
                guest.release("done", timeout=BOOT)
                assert guest.wait_result(timeout=60).status == 0, details(srv, guest)
            detail = details(srv, a, b, c)
    finally:
        srv.stop()
    assert result.status == 0, detail
    assert answered(result.output, "within") == 3, detail
    assert answered(result.output, "across") == 0, detail
    assert answered(c.console, "c-across") == 0, detail
    vlans = {entry["mac"]: entry["vlan"] for entry in fdb}
    assert vlans.get(macs[0]) == 10 and vlans.get(macs[1]) == 10 and vlans.get(macs[2]) == 20, fdb
    assert stats["vlan_dropped"] == 0 and stats["malformed"] == 0, stats
    print(f"VLANs: within {answered(result.output, 'within')}/3 answered, across 0/3; fdb {fdb}")


ROUTED_A = """
ip route add default via 10.81.1.1
iovirt_wait_ping 10.81.2.2 120 || exit 1
ping -c 3 -W 5 10.81.2.2 | tee /tmp/ping
echo "routed: $(grep 'packets transmitted' /tmp/ping)"
"""


def test_two_subnets_through_the_router(tmp_path):
    socks = [tmp_path / "n0.sock", tmp_path / "n1.sock"]
    srv = ServeProcess(["--net", f"{socks[0]},vlan=10", "--net", f"{socks[1]},vlan=20",
                        "--router", "10.81.1.1/24,vlan=10", "--router", "10.81.2.1/24,vlan=20"],
                       tmp_path / "serve.log", socks).start()
    a = Guest(tmp_path, [VhostUserNet(socks[0], ip="10.81.1.2/24")], name="a", append=APPEND, script=ROUTED_A)
    b = Guest(tmp_path, [VhostUserNet(socks[1], ip="10.81.2.2/24")], name="b", append=APPEND,
              script="ip route add default via 10.81.2.1; iovirt_wait_host done")
    try:
        with a, b:
            b.start()
            a.start()
            result = a.wait_result(timeout=BOOT)
            b.release("done", timeout=BOOT)
            b.wait_result(timeout=60)
            detail = details(srv, a, b)
    finally:
        srv.stop()
    assert result.status == 0, detail
    assert answered(result.output, "routed") == 3, detail
    # Each way one hop: b's reply left with TTL 64 and arrives with 63.
    assert re.search(r"from 10\.81\.2\.2: seq=\d+ ttl=63", result.output), detail


NAT_GUEST = """
ip route add default via 10.80.0.1
iovirt_wait_ping 192.168.81.1 120 || exit 1
echo "nat-ping: $(ping -c 3 -W 5 192.168.81.1 | grep 'packets transmitted')"
wget -q -O /tmp/got http://192.168.81.1:{port}/hello.txt || exit 2
echo "got: $(cat /tmp/got)"
iovirt_wait_host done
"""


def _ns(ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, check=check, timeout=30)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2 (ip netns)")
def test_guest_behind_nat_reaches_a_server_in_a_netns(tmp_path):
    ns, tap = f"iovirt-nat-{os.getpid()}", f"ivnat{os.getpid() % 100000}"
    sock, control = tmp_path / "n0.sock", tmp_path / "control.sock"
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "hello.txt").write_text("hello from the namespace\n")
    port = free_tcp_port()
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=30)
    srv = http = None
    try:
        # iovirt runs in the namespace: its TAP uplink appears there, next to the server.
        srv = ServeProcess(["--net", str(sock), "--router", "10.80.0.1/24", "--tap", tap,
                            "--nat", "192.168.81.2/24,gw=192.168.81.1", "--control", str(control)],
                           tmp_path / "serve.log", [sock, control],
                           prefix=["ip", "netns", "exec", ns]).start()
        _ns(ns, "ip", "link", "set", "lo", "up")
        _ns(ns, "ip", "addr", "add", "192.168.81.1/24", "dev", tap)
        _ns(ns, "ip", "link", "set", tap, "up")
        http = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "http.server", str(port),
                                 "--bind", "192.168.81.1", "--directory", str(tmp_path / "www")],
                                stdout=subprocess.DEVNULL, stderr=open(tmp_path / "http.log", "wb"))
        deadline = time.monotonic() + 30
        while "LISTEN" not in _ns(ns, "ss", "-ltn", check=False).stdout:
            assert time.monotonic() < deadline and http.poll() is None, (tmp_path / "http.log").read_text()
            time.sleep(0.2)
        guest = Guest(tmp_path, [VhostUserNet(sock, ip="10.80.0.2/24")], name="g", append=APPEND,
                      script=NAT_GUEST.format(port=port))
        with guest:
            guest.start()
            guest.wait_for(r"^got: .*\n", timeout=BOOT)
            router = ctl(control, "stats")["router"]
            guest.release("done", timeout=BOOT)
            result = guest.wait_result(timeout=BOOT)
        detail = f"{result.console}\n--- http ---\n{(tmp_path / 'http.log').read_text()}\n--- serve ---\n{srv.log()}"
    finally:
        if http is not None:
            http.terminate()
            http.wait(10)
        if srv is not None:
            srv.stop()
        subprocess.run(["ip", "netns", "del", ns], timeout=30)
    assert result.status == 0, detail
    assert answered(result.output, "nat-ping") == 3, detail
    assert "got: hello from the namespace" in result.output, detail
    assert router["nat_out"] > 0 and router["nat_in"] > 0 and router["nat_connections"] >= 2, router
    assert router.get("dropped_malformed", 0) == 0, router
    # The server saw the NAT's outside address, not the guest's.
    assert "192.168.81.2" in (tmp_path / "http.log").read_text(), detail


TRUNK_T = """
ip link set eth0 up
ip link add link eth0 name eth0.10 type vlan id 10 || exit 3
ip addr add 10.82.10.2/24 dev eth0.10 && ip link set eth0.10 up
ip link add link eth0 name eth0.20 type vlan id 20 || exit 3
ip addr add 10.82.20.2/24 dev eth0.20 && ip link set eth0.20 up
iovirt_wait_ping 10.82.10.1 120 || exit 1
echo "vlan10: $(ping -c 3 -W 5 10.82.10.1 | grep 'packets transmitted')"
echo "vlan20: $(ping -c 3 -W 5 10.82.20.1 | grep 'packets transmitted')"
"""


def test_a_guest_on_a_trunk_reaches_both_vlans_tagged(tmp_path):
    """Linux's 8021q in the trunk guest tags; the access guests see untagged frames of their VLAN only."""
    socks = [tmp_path / f"n{i}.sock" for i in range(3)]
    srv = ServeProcess(["--net", f"{socks[0]},trunk=10:20", "--net", f"{socks[1]},vlan=10",
                        "--net", f"{socks[2]},vlan=20"], tmp_path / "serve.log", socks).start()
    modules = (*VIRTIO_MODULES, "8021q")
    t = Guest(tmp_path, [VhostUserNet(socks[0])], name="t", append=APPEND, script=TRUNK_T, modules=modules)
    a = Guest(tmp_path, [VhostUserNet(socks[1], ip="10.82.10.1/24")], name="a", append=APPEND,
              script="iovirt_wait_host done")
    b = Guest(tmp_path, [VhostUserNet(socks[2], ip="10.82.20.1/24")], name="b", append=APPEND,
              script="iovirt_wait_host done")
    try:
        with t, a, b:
            for guest in (a, b, t):
                guest.start()
            result = t.wait_result(timeout=BOOT)
            for guest in (a, b):
                guest.release("done", timeout=BOOT)
                guest.wait_result(timeout=60)
            detail = details(srv, t, a, b)
    finally:
        srv.stop()
    assert result.status == 0, detail
    assert answered(result.output, "vlan10") == 3 and answered(result.output, "vlan20") == 3, detail
