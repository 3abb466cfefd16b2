"""Real Linux guests under QEMU whose virtio-net/virtio-blk data path is ``iovirt serve``.

Issue 3's real-guest tests: two guests ping each other through the switch; a
guest reads a blk image (md5 equal to the host's) and writes a pattern the
host then finds; multiqueue net and blk; QEMU reconnecting to a restarted
iovirt; a guest pinging through the TAP uplink into a network namespace.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import uuid

import pytest

from iovirt.guest import Guest, VhostUserBlk, VhostUserNet
from iovirt.serve_process import ServeProcess

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86 is not installed"),
]

BOOT = 120.0


@pytest.fixture
def serve(tmp_path):
    procs = []

    def start(*args, sockets, prefix=()):
        proc = ServeProcess(args, tmp_path / f"serve{len(procs)}.log", sockets, prefix).start()
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        code = proc.stop()
        assert code in (0, -signal.SIGKILL), proc.log()


def test_two_guests_ping_through_the_switch(tmp_path, serve):
    socks = [tmp_path / "n0.sock", tmp_path / "n1.sock"]
    srv = serve("--net", str(socks[0]), "--net", str(socks[1]), sockets=socks)
    a = Guest(tmp_path, [VhostUserNet(socks[0], ip="10.77.0.1/24")], name="a", script="ping -c 3 -W 10 10.77.0.2")
    b = Guest(tmp_path, [VhostUserNet(socks[1], ip="10.77.0.2/24")], name="b", script="iovirt_wait_host done")
    with a, b:
        b.start()
        a.start()
        result = a.wait_result(timeout=BOOT)
        b.release("done", timeout=BOOT)
        assert b.wait_result(timeout=30).status == 0
    assert result.status == 0, result.console
    assert "3 packets transmitted, 3 packets received" in result.output
    assert "negotiated features" in srv.log()
    # No warning on a correct setup: iovirt offers QEMU's net nothing it does not use (issue 14).
    for guest in (a, b):
        stderr = guest.stderr_path.read_text()
        assert "VHOST_USER_PROTOCOL_F_CONFIG" not in stderr, stderr


def test_guest_reads_and_writes_blk(tmp_path, serve):
    image = tmp_path / "disk.img"
    content = os.urandom(8 << 20)
    image.write_bytes(content)
    sock = tmp_path / "b.sock"
    serve("--blk", f"{sock},{image}", sockets=[sock])
    offset, pattern = 3 << 20, "iovirt-blk-pattern-42"
    script = f"""set -e
md5sum /dev/vda
printf '%s' '{pattern}' | dd of=/dev/vda bs=512 seek={offset // 512} conv=notrunc 2>/dev/null
sync
"""
    with Guest(tmp_path, [VhostUserBlk(sock)], script=script, name="blk") as g:
        result = g.start().wait_result(timeout=BOOT)
    assert result.status == 0, result.console
    assert re.search(rf"^{hashlib.md5(content).hexdigest()}  /dev/vda$", result.output, re.M)
    assert image.read_bytes()[offset : offset + len(pattern)] == pattern.encode()


def test_multiqueue_net_and_blk(tmp_path, serve):
    socks = [tmp_path / "n0.sock", tmp_path / "n1.sock"]
    image = tmp_path / "disk.img"
    bsock = tmp_path / "b.sock"
    srv = serve("--queues", "2", "--net", str(socks[0]), "--net", str(socks[1]),
          "--blk", f"{bsock},{image},size=4M,queues=2", sockets=[*socks, bsock])
    script = """set -e
ls /sys/class/net/eth0/queues
ls /sys/block/vda/mq
dd if=/dev/vda of=/dev/null bs=4096 2>/dev/null
ping -c 3 -W 10 10.77.0.2
"""
    # Linux uses min(queues, online CPUs) queue pairs / blk queues: two vCPUs.
    a = Guest(tmp_path, [VhostUserNet(socks[0], queues=2, ip="10.77.0.1/24"), VhostUserBlk(bsock, num_queues=2)],
              name="a", script=script, smp=2)
    b = Guest(tmp_path, [VhostUserNet(socks[1], queues=2, ip="10.77.0.2/24")], name="b", script="iovirt_wait_host done")
    with a, b:
        b.start()
        a.start()
        result = a.wait_result(timeout=BOOT)
        b.release("done", timeout=BOOT)
    assert result.status == 0, result.console
    for q in ("rx-0", "rx-1", "tx-0", "tx-1"):
        assert q in result.output.split()
    assert {"0", "1"} <= set(result.output.split())  # /sys/block/vda/mq/0 and 1
    assert "vring 3 started" in srv.log() and "vring 1 started" in blk_log(srv.log())
    assert "3 packets received" in result.output


def blk_log(log: str) -> str:
    return "\n".join(line for line in log.splitlines() if "blk0" in line)


def test_reconnect_after_backend_restart(tmp_path, serve):
    socks = [tmp_path / "n0.sock", tmp_path / "n1.sock"]
    args = ("--net", str(socks[0]), "--net", str(socks[1]))
    srv = serve(*args, sockets=socks)
    script = """ping -c 2 -W 10 10.77.0.2 || exit 1
iovirt_wait_host restarted
ping -c 30 -w 60 -W 2 10.77.0.2 > /tmp/ping.out; tail -3 /tmp/ping.out
grep -q ' 0 packets received' /tmp/ping.out && exit 2
exit 0
"""
    a = Guest(tmp_path, [VhostUserNet(socks[0], ip="10.77.0.1/24", reconnect=1)], name="a", script=script)
    b = Guest(tmp_path, [VhostUserNet(socks[1], ip="10.77.0.2/24", reconnect=1)], name="b", script="iovirt_wait_host done")
    with a, b:
        b.start()
        a.start()
        a.wait_for(r"^IOVIRT-WAIT restarted\n", timeout=BOOT)
        srv.kill()  # a crash, as QEMU sees it
        serve(*args, sockets=socks)
        a.release("restarted")
        result = a.wait_result(timeout=BOOT)
        b.release("done", timeout=BOOT)
    assert result.status == 0, result.console


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2 for a netns + TAP")
@pytest.mark.skipif(not os.path.exists("/dev/net/tun"), reason="no /dev/net/tun on this machine: TAP devices unavailable")
def test_tap_uplink_into_a_namespace(tmp_path, serve):
    ns = f"iovirt-{uuid.uuid4().hex[:8]}"
    tap = f"ivt{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        sock = tmp_path / "n0.sock"
        serve("--net", str(sock), "--tap", tap, sockets=[sock], prefix=["ip", "netns", "exec", ns])
        for cmd in (["ip", "addr", "add", "10.77.1.1/24", "dev", tap], ["ip", "link", "set", tap, "up"]):
            subprocess.run(["ip", "netns", "exec", ns, *cmd], check=True)
        g = Guest(tmp_path, [VhostUserNet(sock, ip="10.77.1.2/24")], name="tapguest", script="ping -c 3 -W 10 10.77.1.1")
        with g:
            result = g.start().wait_result(timeout=BOOT)
        assert result.status == 0, result.console
        assert "3 packets received" in result.output
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def test_tcp_between_guests_with_host_tso(tmp_path, serve):
    # Linux sends 64 KiB TCP GSO frames once HOST_TSO4 is negotiated; iovirt segments them.
    socks = [tmp_path / "n0.sock", tmp_path / "n1.sock"]
    srv = serve("--net", str(socks[0]), "--net", str(socks[1]), sockets=socks)
    receiver = "nc -l -p 5000 | md5sum; iovirt_wait_host done"
    sender = "iovirt_wait_ping 10.77.0.1 60; sleep 1; dd if=/dev/urandom of=/tmp/blob bs=64k count=64 2>/dev/null; " \
             "md5sum /tmp/blob; nc 10.77.0.1 5000 < /tmp/blob"
    a = Guest(tmp_path, [VhostUserNet(socks[0], ip="10.77.0.1/24")], name="a", script=receiver)
    b = Guest(tmp_path, [VhostUserNet(socks[1], ip="10.77.0.2/24")], name="b", script=sender)
    with a, b:
        a.start()
        b.start()
        sent = b.wait_result(timeout=BOOT)
        a.wait_for(r"IOVIRT-WAIT done\n", timeout=BOOT)
        a.release("done")
        got = a.wait_result(timeout=30)
    assert sent.status == 0, sent.console
    digest = re.search(r"^([0-9a-f]{32})  /tmp/blob$", sent.output, re.M)
    assert digest, sent.output
    assert re.search(rf"^{digest.group(1)}  -$", got.output, re.M), got.output
    negotiated = [int(line.rsplit(" ", 1)[1], 16) for line in srv.log().splitlines() if "negotiated features" in line]
    assert negotiated and all(f >> 11 & 1 for f in negotiated)  # VIRTIO_NET_F_HOST_TSO4
