"""Live migration and suspend/resume of real guests whose devices ``iovirt serve`` serves.

Issue 13, "Live migration with real guests" and "Suspend to disk and resume".
Guest X (net + blk) runs two loops while it moves: it pings guest Y through
iovirt's switch every 100 ms, and it writes distinct patterned 4 KiB blocks
to its virtio-blk disk with O_DIRECT and reads each back. QEMU A (the source)
and QEMU B (the destination, started with ``-incoming``) have the same
devices on other vhost-user sockets of the same image and switch.

A test passes when X's MAC has moved to B's port (the switch logs the move:
QEMU's SEND_RARP, or X's own traffic, arrives from B's port), at most 5 % of
the pings over the whole run are lost, every block is verified by the guest
(during the loop and again afterwards) and the host finds every block in the
image. Each test prints the downtime and total time QMP ``query-migrate``
reports.

Variants: the destination is served by a second ``iovirt serve`` process
(the two switches are joined by their TAP uplinks and a bridge in a network
namespace, so X still reaches Y, which stays on the first process); X behind
an emulated VT-d (every address iovirt logs is an IOVA translated to a GPA);
suspend to disk (``migrate "exec:cat > FILE"``, QEMU and iovirt stop, both
start again and QEMU resumes from the file).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from iovirt.guest import Guest, GuestTimeout, VhostUserBlk, VhostUserNet, wait_unix_listen
from iovirt.guest.qemu import random_mac
from iovirt.serve_process import ServeProcess

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86 is not installed"),
]

BOOT = 180.0  # generous: three TCG guests share two cores with other work
MIGRATE = 180.0
BLOCK = 4096
IMAGE_BLOCKS = 8192  # 32 MiB: more than the loop writes in a run
CHUNK = 64 << 10  # the reader's unit
READ_BASE = IMAGE_BLOCKS * BLOCK // CHUNK  # the read area follows the written one (in chunks)
READ_CHUNKS = 256  # 16 MiB of random data the host puts there
MAX_LOSS = 0.05
BEFORE_S = 4.0  # loop time on the source before the migration starts
AFTER_S = 6.0  # loop time on the destination before the host stops the loops
X_IP, Y_IP = "10.79.0.1/24", "10.79.0.2/24"
#: Pre-copy bandwidth: QEMU 7.2's default, 32 MiB/s, spelled out: the ~90 MiB a guest sends take a
#: few seconds, so the device keeps writing (and logging) through several dirty-sync rounds.
MAX_BANDWIDTH = 32 << 20

# X: ping Y every 100 ms in the background; write+read-verify blocks in
# another, and in a third read the random read area chunk by chunk into the
# page cache (buffered: only the device writes those pages, the guest's CPU
# never does, so only iovirt's dirty log gets them to the destination if the
# source sent them before the device filled them), until the host says "done";
# then stop the ping (SIGINT prints its statistics), take the md5 of what the
# page cache holds of the read area, verify every block again and report.
X_SCRIPT = rf"""
iovirt_wait_ping {Y_IP.split('/')[0]} 90 || exit 1
dmesg -c > /dev/null
ping -i 0.1 {Y_IP.split('/')[0]} > /tmp/ping.out 2>&1 &
pinger=$!
pattern() {{ yes "iovirt-mig-$1" | head -c {BLOCK}; }}
(
    i=0
    while [ ! -e /tmp/stop ] && [ $i -lt {IMAGE_BLOCKS} ]; do
        pattern $i > /tmp/p
        dd if=/tmp/p of=/dev/vda bs={BLOCK} seek=$i count=1 oflag=direct conv=notrunc 2>/tmp/err \
            || {{ echo "write $i failed: $(cat /tmp/err)"; echo x >> /tmp/fail; }}
        want=$(md5sum < /tmp/p)
        got=$(dd if=/dev/vda bs={BLOCK} skip=$i count=1 iflag=direct 2>/tmp/err | md5sum)
        [ "$want" = "$got" ] || {{ echo "verify $i failed: $(cat /tmp/err)"; echo x >> /tmp/fail; }}
        [ $((i % 10)) -eq 0 ] && echo "blk-written $i"
        i=$((i + 1))
    done
    echo $i > /tmp/count
) &
looper=$!
(
    k=0
    while [ ! -e /tmp/stop ] && [ $k -lt {READ_CHUNKS} ]; do
        dd if=/dev/vda of=/dev/null bs={CHUNK} skip=$(({READ_BASE} + k)) count=1 2>/dev/null
        k=$((k + 1))
        sleep 0.05
    done
    echo $k > /tmp/rcount
) &
reader=$!
echo mig-loops-started
iovirt_wait_host done
touch /tmp/stop
wait $looper $reader
k=$(cat /tmp/rcount)
echo "cache-md5 $k $(dd if=/dev/vda bs={CHUNK} skip={READ_BASE} count=$k 2>/dev/null | md5sum)"
kill -INT $pinger
wait $pinger
tail -n 2 /tmp/ping.out
n=$(cat /tmp/count)
i=0
while [ $i -lt $n ]; do
    want=$(pattern $i | md5sum)
    got=$(dd if=/dev/vda bs={BLOCK} skip=$i count=1 iflag=direct 2>/dev/null | md5sum)
    [ "$want" = "$got" ] || {{ echo "reverify $i failed"; echo x >> /tmp/fail; }}
    i=$((i + 1))
done
echo "blk-count $n"
fails=$(cat /tmp/fail 2>/dev/null | wc -l)
echo "blk-failures $fails"
dmesg | grep -i "error\|I/O" && exit 3
[ "$fails" -eq 0 ]
"""
Y_SCRIPT = "iovirt_wait_host done"
#: Debian's kernel zeroes every page it allocates (CONFIG_INIT_ON_ALLOC_DEFAULT_ON): the CPU's write
#: would dirty a page-cache page just before the device fills it and hide a write iovirt did not log.
X_APPEND = ("init_on_alloc=0",)


def block_pattern(i: int) -> bytes:
    """Block ``i`` as the guest's ``yes iovirt-mig-$i | head -c 4096`` makes it."""
    line = f"iovirt-mig-{i}\n".encode()
    return (line * (BLOCK // len(line) + 1))[:BLOCK]


def make_image(image: Path) -> None:
    """Zeros where X writes, then the random read area."""
    image.write_bytes(bytes(IMAGE_BLOCKS * BLOCK) + os.urandom(READ_CHUNKS * CHUNK))


@dataclass
class Run:
    """What one test measured, for its assertions and its printed summary."""

    name: str
    migrate: dict = field(default_factory=dict)
    transmitted: int = 0
    received: int = 0
    blocks: int = 0
    chunks: int = 0

    @property
    def loss(self) -> float:
        return 1.0 - self.received / self.transmitted if self.transmitted else 1.0

    def summary(self) -> str:
        return (f"{self.name}: downtime {self.migrate.get('downtime')} ms, total time "
                f"{self.migrate.get('total-time')} ms, {self.transmitted - self.received} of "
                f"{self.transmitted} pings lost ({100 * self.loss:.1f} %), {self.blocks} blocks verified, "
                f"{self.chunks} read chunks intact in the page cache")


@pytest.fixture
def serve(tmp_path):
    procs: list[ServeProcess] = []

    def start(*args: str, sockets, prefix=(), name: str | None = None) -> ServeProcess:
        log = tmp_path / f"{name or 'serve' + str(len(procs))}.log"
        proc = ServeProcess(args, log, sockets, prefix).start()
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        code = proc.stop()
        assert code in (0, -signal.SIGKILL, None), proc.log()


def x_guest(tmp_path: Path, name: str, net: Path, blk: Path, mac: str, *, viommu: bool = False,
            incoming: str | None = None, initrd: Path | None = None) -> Guest:
    """Guest X (or its destination QEMU): one NIC with ``mac``, one vhost-user-blk disk, a QMP socket."""
    return Guest(tmp_path, [VhostUserNet(net, ip=X_IP, mac=mac), VhostUserBlk(blk)], name=name,
                 script=X_SCRIPT, viommu=viommu, qmp=True, incoming=incoming, initrd=initrd, append=X_APPEND)


def wait_loops(g: Guest, timeout: float = BOOT) -> None:
    """Wait until X's loops run, and let them run a while on this QEMU."""
    g.wait_for(r"^mig-loops-started\n", timeout)
    g.wait_for(r"^blk-written 10\n", timeout)
    time.sleep(BEFORE_S)


def migrate(src: Guest, uri: str, dst: Guest | None = None) -> dict:
    """Migrate ``src`` to ``uri`` over QMP; wait for completion; return ``query-migrate``.

    The destination (if any) gets the same capabilities first.
    """
    caps = [{"capability": "events", "state": True}]
    for g in (dst, src):
        if g is not None:
            g.qmp().execute("migrate-set-capabilities", capabilities=caps)
    qmp = src.qmp()
    qmp.execute("migrate-set-parameters", max_bandwidth=MAX_BANDWIDTH)
    qmp.execute("migrate", uri=uri)
    deadline = time.monotonic() + MIGRATE
    while True:
        info = qmp.execute("query-migrate")
        status = info.get("status")
        if status == "completed":
            break
        if status in ("failed", "cancelled") or time.monotonic() > deadline:
            raise AssertionError(f"migration {status}: {info}\n--- source ---\n{src.tail()}")
        time.sleep(0.2)
    print(f"query-migrate: {info}")
    if dst is not None:
        wait_running(dst)
    return info


def wait_running(g: Guest, timeout: float = MIGRATE) -> None:
    """Wait until the destination QEMU has loaded the state and runs the guest."""
    deadline = time.monotonic() + timeout
    while (status := g.qmp().execute("query-status")["status"]) != "running":
        assert time.monotonic() < deadline, f"{g.name} still {status!r}\n{g.tail()}"
        time.sleep(0.2)


def wait_end(x: Guest, timeout: float) -> int:
    """The script's exit status; fails at once when QEMU reports a vring error from iovirt or a failed translation.

    After either the device's request never completes (it needs a reset, or
    waits for an IOTLB entry for ever), and the script waits with it.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            return x.wait_end(2.0)
        except GuestTimeout:
            stderr = x.stderr_path.read_text(errors="replace")
            if "translation failure" in stderr or "vring error" in stderr or time.monotonic() > deadline:
                raise


def finish_x(x: Guest, consoles: str, run: Run, image: Path) -> str:
    """Let X's loops run on ``x`` a while, stop them, check X's report and the image; return the console."""
    x.wait_for(r"^blk-written \d+\n", BOOT)  # the loop runs on this QEMU
    time.sleep(AFTER_S)
    x.send("done\n")
    status = wait_end(x, BOOT)
    console = consoles + x.console
    stats = re.search(r"^(\d+) packets transmitted, (\d+) packets received", console, re.M)
    count = re.search(r"^blk-count (\d+)\n", console, re.M)
    assert status == 0 and stats and count and "blk-failures 0" in console, console[-6000:]
    run.transmitted, run.received = int(stats.group(1)), int(stats.group(2))
    run.blocks = int(count.group(1))
    data = image.read_bytes()
    cache = re.search(r"^cache-md5 (\d+) ([0-9a-f]{32})  -\n", console, re.M)
    assert cache, console[-6000:]
    run.chunks = int(cache.group(1))
    area = data[READ_BASE * CHUNK:(READ_BASE + run.chunks) * CHUNK]
    assert cache.group(2) == hashlib.md5(area).hexdigest(), \
        f"the guest's page cache of the read area differs from the image\n{console[-6000:]}"
    missing = [i for i in range(run.blocks) if data[i * BLOCK:(i + 1) * BLOCK] != block_pattern(i)]
    assert not missing, f"blocks not in the image: {missing}\n{console[-6000:]}"
    return console


def check(run: Run, console: str, logs: str) -> None:
    print(run.summary())
    assert "downtime" in run.migrate and "total-time" in run.migrate, run.migrate
    assert run.blocks > 0, console
    assert run.loss <= MAX_LOSS, f"{run.summary()}\n{console[-6000:]}"
    assert "Traceback" not in logs, logs


def mac_moved(mac: str, log: str, src: str, dst: str) -> bool:
    """Whether the switch logged that ``mac`` moved from port ``src`` to port ``dst``."""
    return f"MAC {mac.replace(':', '')} moved from {src} to {dst}" in log


def live_migration(tmp_path: Path, serve, *, viommu: bool) -> None:
    mac = random_mac()
    image = tmp_path / "disk.img"
    make_image(image)
    na, nb, ny = (tmp_path / f"{n}.sock" for n in ("na", "nb", "ny"))
    ba, bb = tmp_path / "ba.sock", tmp_path / "bb.sock"
    srv = serve("--net", str(na), "--net", str(nb), "--net", str(ny),
                "--blk", f"{ba},{image}", "--blk", f"{bb},{image}", sockets=[na, nb, ny, ba, bb])
    run = Run("viommu live migration" if viommu else "live migration")
    y = Guest(tmp_path, [VhostUserNet(ny, ip=Y_IP)], name="y", script=Y_SCRIPT)
    xa = x_guest(tmp_path, "xa", na, ba, mac, viommu=viommu)
    mig = tmp_path / "mig.sock"
    xb = x_guest(tmp_path, "xb", nb, bb, mac, viommu=viommu, incoming=f"unix:{mig}", initrd=xa.machine.initrd)
    with y, xa, xb:
        y.start()
        xa.start()
        wait_loops(xa)
        xb.start()
        wait_unix_listen(mig, timeout=60)
        run.migrate = migrate(xa, f"unix:{mig}", xb)
        xa.qmp().execute("quit")
        console = finish_x(xb, xa.console, run, image)
        y.release("done", BOOT)
        assert y.wait_result(60).status == 0
    log = srv.log()
    check(run, console, log)
    # Ports are numbered in --net order: A's is net0, B's net1.
    assert mac_moved(mac, log, "net0", "net1"), f"no move of {mac} to B's port in the switch's log\n{log}"


def test_live_migration_same_process(tmp_path, serve):
    live_migration(tmp_path, serve, viommu=False)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2 for a netns + TAPs")
@pytest.mark.skipif(not os.path.exists("/dev/net/tun"), reason="no /dev/net/tun on this machine: TAP devices unavailable")
def test_live_migration_to_a_second_process(tmp_path, serve):
    """B's devices are served by another ``iovirt serve``; the two switches meet at a bridge in a netns.

    Y stays on the first process. Its switch reaches the second one through
    its TAP uplink, a Linux bridge in a private network namespace, and the
    second process's TAP uplink, so once X runs on B the first switch learns
    X's MAC on its uplink.
    """
    mac = random_mac()
    image = tmp_path / "disk.img"
    make_image(image)
    na, nb, ny = (tmp_path / f"{n}.sock" for n in ("na", "nb", "ny"))
    ba, bb = tmp_path / "ba.sock", tmp_path / "bb.sock"
    tag = uuid.uuid4().hex[:6]
    ns, tap1, tap2, bridge = f"iovirt-{tag}", f"ivm{tag}a", f"ivm{tag}b", f"ivm{tag}br"
    in_ns = ["ip", "netns", "exec", ns]
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        srv1 = serve("--net", str(na), "--net", str(ny), "--blk", f"{ba},{image}", "--tap", tap1,
                     sockets=[na, ny, ba], prefix=in_ns, name="serve-a")
        srv2 = serve("--net", str(nb), "--blk", f"{bb},{image}", "--tap", tap2, sockets=[nb, bb], prefix=in_ns,
                     name="serve-b")
        for cmd in (["ip", "link", "add", bridge, "type", "bridge"], ["ip", "link", "set", tap1, "master", bridge],
                    ["ip", "link", "set", tap2, "master", bridge], ["ip", "link", "set", tap1, "up"],
                    ["ip", "link", "set", tap2, "up"], ["ip", "link", "set", bridge, "up"]):
            subprocess.run([*in_ns, *cmd], check=True)
        run = Run("live migration to a second process")
        y = Guest(tmp_path, [VhostUserNet(ny, ip=Y_IP)], name="y", script=Y_SCRIPT)
        xa = x_guest(tmp_path, "xa", na, ba, mac)
        mig = tmp_path / "mig.sock"
        xb = x_guest(tmp_path, "xb", nb, bb, mac, incoming=f"unix:{mig}", initrd=xa.machine.initrd)
        with y, xa, xb:
            y.start()
            xa.start()
            wait_loops(xa)
            xb.start()
            wait_unix_listen(mig, timeout=60)
            run.migrate = migrate(xa, f"unix:{mig}", xb)
            xa.qmp().execute("quit")
            console = finish_x(xb, xa.console, run, image)
            y.release("done", BOOT)
            assert y.wait_result(60).status == 0
        logs = srv1.log() + srv2.log()
        check(run, console, logs)
        # The first switch now reaches X through its uplink, toward the second process.
        assert mac_moved(mac, srv1.log(), "net0", f"tap:{tap1}"), f"X's MAC did not move to the uplink\n{logs}"
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def test_live_migration_behind_a_viommu(tmp_path, serve):
    """X's devices sit behind an emulated VT-d: iovirt logs IOVAs translated to guest-physical pages."""
    live_migration(tmp_path, serve, viommu=True)


def test_suspend_to_disk_and_resume(tmp_path, serve):
    """``migrate "exec:cat > FILE"``; QEMU and iovirt stop; both start again and QEMU resumes from FILE.

    Y's QEMU re-dials the restarted back-end (``reconnect=1``) while X is
    on disk; X's destination QEMU uses the same sockets as its source.
    """
    mac = random_mac()
    image = tmp_path / "disk.img"
    make_image(image)
    nx, ny, bx = tmp_path / "nx.sock", tmp_path / "ny.sock", tmp_path / "bx.sock"
    args = ("--net", str(nx), "--net", str(ny), "--blk", f"{bx},{image}")
    state = tmp_path / "x.state"
    run = Run("suspend to disk and resume")
    srv1 = serve(*args, sockets=[nx, ny, bx], name="serve-before")
    y = Guest(tmp_path, [VhostUserNet(ny, ip=Y_IP, reconnect=1)], name="y", script=Y_SCRIPT)
    xa = x_guest(tmp_path, "xa", nx, bx, mac)
    xb = x_guest(tmp_path, "xb", nx, bx, mac, incoming=f"exec:cat {state}", initrd=xa.machine.initrd)
    with y, xa, xb:
        y.start()
        xa.start()
        wait_loops(xa)
        run.migrate = migrate(xa, f"exec:cat > {state}")
        xa.qmp().execute("quit")
        xa.stop()
        assert srv1.stop() == 0, srv1.log()
        time.sleep(2.0)  # both are down for a while
        srv2 = serve(*args, sockets=[nx, ny, bx], name="serve-after")
        # Y's QEMU re-dials: its receive and transmit rings run again before X comes back.
        deadline = time.monotonic() + BOOT
        while srv2.log().count("net1 (") < 1 or "vring 1 started" not in srv2.log():
            assert time.monotonic() < deadline, srv2.log()
            time.sleep(0.2)
        xb.start()
        wait_running(xb)
        console = finish_x(xb, xa.console, run, image)
        y.release("done", BOOT)
        assert y.wait_result(60).status == 0
    print(f"saved state: {state.stat().st_size} bytes")
    check(run, console, srv1.log() + srv2.log())
