"""The kit's vhost-user device command lines against real C backends.

qemu-storage-daemon serves vhost-user-blk and DPDK's vhost PMD serves
vhost-user-net, so ``VhostUserBlk``/``VhostUserNet`` (``vectors=0``,
``queues``/``mq``, ``num-queues``) are proven before iovirt's own backend
exists. Multiqueue needs ``smp=2``: Linux's virtio-blk and virtio-net use
at most one queue (pair) per guest CPU.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess

import pytest

from iovirt.guest import Guest, VhostUserBlk, VhostUserNet, wait_unix_listen

pytestmark = pytest.mark.slow


def _run(argv, log):
    # stdin stays an open pipe: testpmd without -i exits when stdin reaches EOF.
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT)


def _stop(proc):
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _need(tool):
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} not installed")


def test_vhost_user_blk_two_queues_against_qemu_storage_daemon(tmp_path):
    _need("qemu-storage-daemon")
    image, sock = tmp_path / "disk.img", tmp_path / "blk.sock"
    content = os.urandom(2 << 20)
    image.write_bytes(content)
    offset, pattern = 512 * 1000, "vhost-user-blk-pattern"
    with open(tmp_path / "qsd.log", "wb") as log:
        qsd = _run(["qemu-storage-daemon",
                    "--blockdev", f"driver=file,node-name=file0,filename={image}",
                    "--blockdev", "driver=raw,node-name=disk0,file=file0",
                    "--export", f"type=vhost-user-blk,id=exp0,addr.type=unix,addr.path={sock},"
                                "node-name=disk0,writable=on,num-queues=2"], log)
    try:
        wait_unix_listen(sock, timeout=20)
        script = f"""
            set -e
            ls /sys/block/vda/mq
            md5sum /dev/vda
            printf '%s' '{pattern}' | dd of=/dev/vda bs=512 seek={offset // 512} conv=notrunc 2>/dev/null
            sync
        """
        with Guest(tmp_path, [VhostUserBlk(sock, num_queues=2)], smp=2, script=script) as g:
            result = g.start().wait_result(timeout=90)
    finally:
        _stop(qsd)
    assert result.status == 0, result.output
    assert re.search(r"^0\s+1$", result.output, re.M), "expected two request queues"
    assert f"{hashlib.md5(content).hexdigest()}  /dev/vda" in result.output
    assert image.read_bytes()[offset:offset + len(pattern)] == pattern.encode()


def test_vhost_user_net_two_queue_pairs_against_dpdk_vhost_pmd(tmp_path):
    _need("dpdk-testpmd")
    sock = tmp_path / "net.sock"
    # icmpecho answers ARP and ICMP echo on its port, so one guest suffices.
    with open(tmp_path / "testpmd.log", "wb") as log:
        testpmd = _run(["dpdk-testpmd", "--no-huge", "-m", "256", "--no-pci", "-l", "0,1",
                        "--file-prefix", f"iovirt-guest-{os.getpid()}",
                        "--vdev", f"net_vhost0,iface={sock},queues=2", "--",
                        "--forward-mode=icmpecho", "--rxq=2", "--txq=2", "--total-num-mbufs=4096"], log)
    try:
        wait_unix_listen(sock, timeout=20)
        script = """
            set -e
            ls /sys/class/net/eth0/queues
            iovirt_wait_ping 10.77.0.99 30
            ping -c 3 -W 2 10.77.0.99
        """
        with Guest(tmp_path, [VhostUserNet(sock, queues=2, ip="10.77.0.1/24")], smp=2, script=script) as g:
            result = g.start().wait_result(timeout=90)
    finally:
        _stop(testpmd)
    assert result.status == 0, result.output
    assert re.search(r"^rx-0\s+rx-1\s+tx-0\s+tx-1$", result.output, re.M)
    assert "3 packets transmitted, 3 packets received" in result.output
