"""Real Linux guests on packed virtqueues (virtio 1.2 section 2.8) served by ``iovirt serve`` (issue 15).

QEMU 7.2's ``packed=on`` on ``virtio-net-pci`` (vhost-user netdev) and
``vhost-user-blk-pci``: QEMU silently masks VIRTIO_F_RING_PACKED (bit 34)
unless the back-end offers it, so each guest prints its virtio devices'
negotiated features (``/sys/bus/virtio/devices/*/features``, one character
per bit) and the test checks bit 34 there, and that iovirt started its rings
packed.

* Two guests ping each other through iovirt's switch (distinct MACs), one of
  them also writing and read-verifying 4 KiB blocks with O_DIRECT on a
  vhost-user-blk disk, whose image then holds what the guest wrote.
* Device types beyond net and blk on packed rings: a guest reads its hwrng
  from ``vhost-user-rng-pci,packed=on``, another reads and writes a disk
  behind ``vhost-user-scsi-pci,packed=on`` (control, event and request queues),
  a third sends a 1 MiB AF_VSOCK stream to the host through
  ``vhost-user-vsock-pci,packed=on``.
* A packed blk guest's write-verify loop survives iovirt's SIGKILL: QEMU
  (``reconnect=1``) hands the inflight region back to the restarted
  back-end, which takes the packed ring's positions from it (QEMU could not
  ask the dead back-end, and restores stale ones) and resubmits what was in
  flight (vhost-user.rst "Inflight I/O tracking", packed layout).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import signal
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from iovirt.guest import Guest, VhostUserBlk, VhostUserNet
from iovirt.guest.hostprog import program_files
from iovirt.guest.modules import VIRTIO_MODULES, VSOCK_MODULES
from iovirt.serve_process import ServeProcess
from iovirt.virtio.blk.defs import VIRTIO_ID_BLOCK
from iovirt.virtio.defs import VIRTIO_F_RING_PACKED
from iovirt.virtio.net.defs import VIRTIO_ID_NET
from iovirt.virtio.rng.defs import VIRTIO_ID_ENTROPY
from iovirt.virtio.scsi.defs import VIRTIO_ID_SCSI
from iovirt.virtio.vsock.defs import VIRTIO_ID_VSOCK

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86 is not installed"),
]

BOOT = 180.0  # the machine is shared: generous
BLOCK = 4096
BLOCKS = 64

# Every virtio device of the guest: "virtio DEVICE-ID FEATURE-BITS" (bit i is character i).
FEATURES = 'for d in /sys/bus/virtio/devices/*; do echo "virtio $(cat $d/device) $(cat $d/features)"; done'

# Write BLOCKS blocks of random data with O_DIRECT, read each back with O_DIRECT and compare;
# leave the last block's digest for the host.
BLK_VERIFY = f"""
i=0
while [ $i -lt {BLOCKS} ]; do
    dd if=/dev/urandom of=/tmp/p bs={BLOCK} count=1 2>/dev/null
    dd if=/tmp/p of=/dev/vda bs={BLOCK} seek=$i count=1 oflag=direct conv=notrunc,fsync 2>/tmp/err \\
        || {{ echo "write $i failed: $(cat /tmp/err)"; exit 3; }}
    want=$(md5sum < /tmp/p)
    got=$(dd if=/dev/vda bs={BLOCK} skip=$i count=1 iflag=direct 2>/tmp/err | md5sum)
    [ "$want" = "$got" ] || {{ echo "verify $i failed"; exit 4; }}
    i=$((i + 1))
done
echo "blk verified {BLOCKS} blocks, last $(md5sum < /tmp/p)"
"""


def packed_devices(output: str) -> dict[int, bool]:
    """Device ID -> whether VIRTIO_F_RING_PACKED is negotiated, from the :data:`FEATURES` lines."""
    found = {}
    for device, bits in re.findall(r"^virtio (0x[0-9a-f]+) ([01]+)$", output, re.M):
        found[int(device, 16)] = len(bits) > VIRTIO_F_RING_PACKED and bits[VIRTIO_F_RING_PACKED] == "1"
    return found


@pytest.fixture
def serve(tmp_path):
    procs = []

    def start(*args, sockets):
        proc = ServeProcess(args, tmp_path / f"serve{len(procs)}.log", sockets).start()
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        code = proc.stop()
        assert code in (0, -signal.SIGKILL), proc.log()


def test_packed_guests_ping_each_other_and_verify_a_disk(tmp_path, serve):
    socks = [tmp_path / "n0.sock", tmp_path / "n1.sock"]
    image, bsock = tmp_path / "disk.img", tmp_path / "b.sock"
    srv = serve("--net", str(socks[0]), "--net", str(socks[1]), "--blk", f"{bsock},{image},size=8M",
                sockets=[*socks, bsock])
    script_a = f"""set -e
{FEATURES}
{BLK_VERIFY}
iovirt_wait_ping 10.79.0.2 120
ping -c 5 -W 10 10.79.0.2
"""
    script_b = f"""{FEATURES}
iovirt_wait_host done
"""
    a = Guest(tmp_path, [VhostUserNet(socks[0], ip="10.79.0.1/24", mac="52:54:00:79:00:01", packed=True),
                         VhostUserBlk(bsock, packed=True)], name="a", script=script_a)
    b = Guest(tmp_path, [VhostUserNet(socks[1], ip="10.79.0.2/24", mac="52:54:00:79:00:02", packed=True)],
              name="b", script=script_b)
    with a, b:
        b.start()
        a.start()
        result = a.wait_result(timeout=BOOT)
        b.release("done", timeout=BOOT)
        other = b.wait_result(timeout=60)
    log = srv.log()
    detail = f"--- a ---\n{result.console}\n--- b ---\n{other.console}\n--- iovirt ---\n{log}"
    assert result.status == 0, detail
    assert other.status == 0, detail
    # The guests' drivers negotiated bit 34 on every device: net and blk in a, net in b.
    assert packed_devices(result.output) == {VIRTIO_ID_NET: True, VIRTIO_ID_BLOCK: True}, result.output
    assert packed_devices(other.output) == {VIRTIO_ID_NET: True}, other.output
    assert "5 packets transmitted, 5 packets received" in result.output, detail
    # iovirt served the rings packed: every net ring and the blk ring.
    assert log.count("started packed") >= 5, log
    assert "not below the ring size" not in log and "needs reset" not in log, log
    # The last block the guest wrote is in the image.
    last = re.search(rf"blk verified {BLOCKS} blocks, last ([0-9a-f]{{32}})", result.output)
    assert last, detail
    data = image.read_bytes()
    assert hashlib.md5(data[(BLOCKS - 1) * BLOCK : BLOCKS * BLOCK]).hexdigest() == last.group(1)


RESTART_LOOP = 200

# Write block i with O_DIRECT and a FLUSH, read it back past the page cache, compare;
# the host kills and restarts iovirt in the middle of the loop.
RESTART_SCRIPT = rf"""
{FEATURES}
dmesg -c > /dev/null
fail=0
i=0
while [ $i -lt {RESTART_LOOP} ]; do
    yes "iovirt-packed-$i" | head -c {BLOCK} > /tmp/p
    dd if=/tmp/p of=/dev/vda bs={BLOCK} seek=$i count=1 oflag=direct conv=notrunc,fsync 2>/tmp/err \
        || {{ echo "write $i failed: $(cat /tmp/err)"; fail=$((fail + 1)); }}
    want=$(md5sum < /tmp/p)
    got=$(dd if=/dev/vda bs={BLOCK} skip=$i count=1 iflag=direct 2>/tmp/err | md5sum)
    [ "$want" = "$got" ] || {{ echo "verify $i failed: $(cat /tmp/err)"; fail=$((fail + 1)); }}
    echo "blk-written $i"
    i=$((i + 1))
done
echo "blk-failures $fail"
dmesg | grep -i "error\|I/O" && fail=$((fail + 1))
[ $fail -eq 0 ]
"""


def test_packed_blk_guest_survives_a_backend_sigkill(tmp_path, serve):
    image, sock = tmp_path / "disk.img", tmp_path / "b.sock"
    image.write_bytes(bytes(4 << 20))
    args = ("--blk", f"{sock},{image}")
    first = serve(*args, sockets=[sock])
    with Guest(tmp_path, [VhostUserBlk(sock, reconnect=1, packed=True)], script=RESTART_SCRIPT, name="pk") as g:
        g.start()
        g.wait_for(r"^blk-written 50\n", timeout=BOOT)
        first.kill()  # a crash, as QEMU sees it
        second = serve(*args, sockets=[sock])
        result = g.wait_result(timeout=BOOT)
        stderr = g.stderr_path.read_text()
    log = second.log()
    detail = f"{result.console}\n--- QEMU stderr ---\n{stderr}\n--- iovirt after the kill ---\n{log}"
    assert result.status == 0, detail
    assert packed_devices(result.output) == {VIRTIO_ID_BLOCK: True}, detail
    assert "blk-failures 0" in result.output, detail
    written = [int(n) for n in re.findall(r"^blk-written (\d+)$", result.console, re.M)]
    assert written == list(range(RESTART_LOOP)), detail
    # The restarted back-end served the rest of the loop on the packed ring, where the inflight
    # region (not QEMU, which could not ask the dead back-end) said it stood.
    assert "vring 0 started packed" in log, detail
    assert "the inflight region places the ring at" in log, detail
    data = image.read_bytes()
    for i in (0, 50, RESTART_LOOP - 1):
        assert data[i * BLOCK : (i + 1) * BLOCK] == (f"iovirt-packed-{i}\n" * BLOCK).encode()[:BLOCK], i


@dataclass
class PackedVhostUserDevice:
    """A QEMU vhost-user front-end device (``vhost-user-rng-pci``...) on ``socket``, with ``packed=on``."""

    model: str
    socket: str | Path

    def qemu_args(self, index: int, iommu: bool) -> list[str]:
        """The ``-chardev``/``-device`` arguments for device number ``index``."""
        return ["-chardev", f"socket,id=cv{index},path={self.socket}",
                "-device", f"{self.model},chardev=cv{index},vectors=0,packed=on"]


def test_packed_guest_reads_hwrng(tmp_path, serve):
    sock = tmp_path / "rng.sock"
    srv = serve("--rng", str(sock), sockets=[sock])
    script = f"""{FEATURES}
echo "hwrng-bytes: $(head -c 65536 /dev/hwrng | wc -c)"
"""
    with Guest(tmp_path, [PackedVhostUserDevice("vhost-user-rng-pci", sock)], script=script, name="rng",
               modules=(*VIRTIO_MODULES, "virtio-rng")) as g:
        result = g.start().wait_result(timeout=BOOT)
    assert result.status == 0, result.console
    assert packed_devices(result.output) == {VIRTIO_ID_ENTROPY: True}, result.output
    assert "hwrng-bytes: 65536" in result.output, result.output
    assert "vring 0 started packed" in srv.log(), srv.log()


def test_packed_guest_reads_and_writes_a_scsi_disk(tmp_path, serve):
    lun = tmp_path / "lun0.img"
    content = bytes(range(256)) * (4 << 12)  # 4 MiB
    lun.write_bytes(content)
    sock = tmp_path / "scsi.sock"
    srv = serve("--scsi", f"{sock},{lun}", sockets=[sock])
    offset, pattern = 1 << 20, "iovirt-packed-scsi-34"
    script = f"""set -e
{FEATURES}
i=0
while [ ! -b /dev/sda ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
md5sum /dev/sda
printf '%s' '{pattern}' | dd of=/dev/sda bs=512 seek={offset // 512} conv=notrunc 2>/dev/null
sync
"""
    with Guest(tmp_path, [PackedVhostUserDevice("vhost-user-scsi-pci", sock)], script=script, name="scsi",
               modules=(*VIRTIO_MODULES, "virtio_scsi", "sd_mod")) as g:
        result = g.start().wait_result(timeout=BOOT)
    log = srv.log()
    assert result.status == 0, f"{result.console}\n{log}"
    assert packed_devices(result.output) == {VIRTIO_ID_SCSI: True}, result.output
    assert re.search(rf"^{hashlib.md5(content).hexdigest()}  /dev/sda$", result.output, re.M), result.output
    assert lun.read_bytes()[offset : offset + len(pattern)] == pattern.encode()
    assert log.count("started packed") >= 3, log  # control, event and one request queue


@pytest.mark.skipif(shutil.which("socat") is None, reason="socat is not installed (make deps)")
def test_packed_guest_streams_to_the_host_over_vsock(tmp_path, serve):
    vhost, uds, port = tmp_path / "vsock.sock", str(tmp_path / "vm.vsock"), 5000
    srv = serve("--vsock", f"{vhost},cid=7,uds={uds}", sockets=[vhost])
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f"{uds}_{port}")
    listener.listen(1)
    got: list[bytes] = []

    def receive() -> None:
        conn, _ = listener.accept()
        data = bytearray()
        while chunk := conn.recv(1 << 16):
            data += chunk
        conn.close()
        got.append(bytes(data))

    thread = threading.Thread(target=receive, daemon=True)
    thread.start()
    script = f"""set -e
{FEATURES}
head -c {1 << 20} /dev/urandom > /tmp/s
socat -t 120 - VSOCK-CONNECT:2:{port} < /tmp/s
echo "sent $(md5sum < /tmp/s | cut -d' ' -f1)"
"""
    extra = ("-chardev", f"socket,id=vs0,path={vhost}",
             "-device", "vhost-user-vsock-pci,chardev=vs0,vectors=0,packed=on")
    with Guest(tmp_path, script=script, name="vsock", files=program_files("socat", "socat"),
               modules=VIRTIO_MODULES + VSOCK_MODULES, extra_args=extra) as g:
        result = g.start().wait_result(timeout=BOOT)
    thread.join(timeout=30)
    listener.close()
    assert result.status == 0, f"{result.console}\n{srv.log()}"
    assert packed_devices(result.output) == {VIRTIO_ID_VSOCK: True}, result.output
    sent = re.search(r"^sent ([0-9a-f]{32})$", result.output, re.M)
    assert sent and got and hashlib.md5(got[0]).hexdigest() == sent.group(1), result.output
    assert "started packed" in srv.log(), srv.log()
