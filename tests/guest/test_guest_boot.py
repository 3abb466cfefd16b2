"""Real guests under QEMU (TCG) with QEMU's own devices: the kit boots, runs, reports."""

from __future__ import annotations

import hashlib
import os
import re

import pytest

from iovirt.guest import Guest, GuestFailed, GuestTimeout, SocketNet, VirtioBlk, find_kernel
from iovirt.guest import free_tcp_port, wait_tcp_listen

pytestmark = pytest.mark.slow

BOOT_TIMEOUT = 90.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; only its parent's wait() is missing.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_boot_reports_kernel_and_status_and_waits_for_host(tmp_path):
    script = "uname -r\niovirt_wait_host go-on\necho after-release\nexit 3\n"
    with Guest(tmp_path, script=script) as g:
        g.start()
        g.release("go-on", timeout=BOOT_TIMEOUT)
        result = g.wait_result(timeout=30)
    print(f"boot to script: {result.boot_seconds:.2f} s, whole run: {result.seconds:.2f} s")
    assert result.status == 3
    assert find_kernel().version in result.output.splitlines()
    assert "after-release" in result.output
    assert g.returncode == 0  # poweroff -f: QEMU exits cleanly
    assert (tmp_path / "guest-console.log").read_text() == result.console


def test_virtio_blk_behind_viommu_read_md5_and_write_pattern(tmp_path):
    # One boot covers both the disk round trip and the vIOMMU command line
    # (booting costs ~5 s of a shared 2-core machine); the plain, IOMMU-less
    # path is covered by the ping test and by test_guest_vhost_user_peers.py.
    image = tmp_path / "disk.img"
    content = os.urandom(4 << 20)
    image.write_bytes(content)
    offset, pattern = 1 << 20, "iovirt-pattern-0123456789"
    script = f"""
        set -e
        ls /sys/class/iommu
        readlink /sys/bus/pci/devices/*/virtio*/../iommu_group >/dev/null && echo has-group
        # Bit 33 is VIRTIO_F_ACCESS_PLATFORM (virtio 1.2, 6 Reserved Feature Bits).
        echo access_platform=$(cut -c34 /sys/bus/virtio/devices/virtio0/features)
        md5sum /dev/vda
        cat /sys/block/vda/size
        printf '%s' '{pattern}' | dd of=/dev/vda bs=512 seek={offset // 512} conv=notrunc 2>/dev/null
        sync
    """
    with Guest(tmp_path, [VirtioBlk(image)], script=script, viommu=True) as g:
        result = g.start().wait_result(timeout=BOOT_TIMEOUT)
    assert result.status == 0, result.output
    assert re.search(r"^dmar0$", result.output, re.M)
    assert "has-group" in result.output
    assert "access_platform=1" in result.output
    assert re.search(rf"^{hashlib.md5(content).hexdigest()}  /dev/vda$", result.output, re.M)
    assert re.search(rf"^{len(content) // 512}$", result.output, re.M)
    assert image.read_bytes()[offset:offset + len(pattern)] == pattern.encode()


def test_two_guests_ping_over_socket_netdev(tmp_path):
    port = free_tcp_port()
    script = """
        set -e
        ls /sys/class/net/eth0/queues
        iovirt_wait_ping {peer} 60
        ping -c 3 -W 2 {peer}
        # operstate turns "up" asynchronously (linkwatch), so it is read after traffic.
        cat /sys/class/net/eth0/operstate
        # Stay up until the peer has finished pinging us too.
        iovirt_wait_host done
    """
    a = Guest(tmp_path, [SocketNet(listen=("127.0.0.1", port), ip="10.77.0.1/24")], name="a",
              script=script.format(peer="10.77.0.2"))
    b = Guest(tmp_path, [SocketNet(connect=("127.0.0.1", port), ip="10.77.0.2/24")], name="b",
              script=script.format(peer="10.77.0.1"))
    with a, b:
        a.start()
        wait_tcp_listen(port)  # b's QEMU exits at once if nobody listens yet
        b.start()
        for g in (a, b):
            g.wait_for(r"^IOVIRT-WAIT done\n", BOOT_TIMEOUT)
        for g in (a, b):
            g.release("done")
        results = [a.wait_result(BOOT_TIMEOUT), b.wait_result(BOOT_TIMEOUT)]
    for r in results:
        assert r.status == 0, r.output
        assert re.search(r"^up$", r.output, re.M)
        assert re.search(r"^rx-0\s+tx-0$", r.output, re.M)
        assert "3 packets transmitted, 3 packets received" in r.output


def test_init_failure_is_reported(tmp_path):
    # No NIC at all, so eth3 cannot be configured: /init must say so and power off.
    with Guest(tmp_path, script="true", append=("iovirt.ip3=10.77.0.9/24",)) as g:
        with pytest.raises(GuestFailed, match=r"/init failed: no interface eth3") as info:
            g.start().wait_result(timeout=BOOT_TIMEOUT)
    assert "IOVIRT-INIT-FAILED" in info.value.tail


def test_timeout_names_marker_and_leaves_no_qemu(tmp_path):
    g = Guest(tmp_path, script="true")
    with pytest.raises(GuestTimeout, match="within 0.5 s") as info:
        with g:
            g.start().wait_for("never-printed", timeout=0.5)
    assert info.value.returncode is None  # QEMU was still running when the wait gave up
    assert not _alive(g.pid)
