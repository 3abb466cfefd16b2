"""The suite against real peers: qemu-storage-daemon (vhost-user-blk) and DPDK's vhost PMD (net).

OVS-DPDK and virtiofsd run through tools/conform_peers.py (docs/conformance/README.md)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from iovirt.conformance.registry import Verdict
from iovirt.conformance.runner import Runner
from iovirt.conformance.target import Target

pytestmark = pytest.mark.slow

# Deviations of QSD 7.2 explained in docs/conformance/README.md.
QSD_FAILURES = {
    "vhost-user:GET_VRING_BASE#drain",
    "vhost-user:Ring states#disabled",
    "vhost-user:SET_VRING_ENABLE#both",
    "vhost-user:SET_VRING_CALL#nofd",
    "vhost-user:SET_CONFIG",
    "virtio-1.2:5.2.6#get-id",
    "virtio-1.2:2.7.5.3.2#limits",
}
# Deviations of DPDK 22.11's vhost library explained in docs/conformance/README.md.
DPDK_FAILURES = {
    "vhost-user:Ring states#disabled-net-tx",
    "vhost-user:Multiple queue support#data-path",
    "virtio-1.2:5.1.3.1",
    "virtio-1.2:5.1.6.4.1#num_buffers",
    "virtio-1.2:2.7.5.3.2#limits",
    "virtio-1.2:5.1.6.2#tunnel",
}


def _conform_peers():
    """tools/conform_peers.py, which starts each peer the way its published report was made."""
    path = Path(__file__).resolve().parents[2] / "tools" / "conform_peers.py"
    spec = importlib.util.spec_from_file_location("conform_peers", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _wait_socket(path, proc, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, "peer exited before listening"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


@pytest.mark.skipif(shutil.which("qemu-storage-daemon") is None, reason="qemu-storage-daemon not installed")
def test_qemu_storage_daemon(tmp_path):
    image, sock = tmp_path / "disk.img", str(tmp_path / "qsd.sock")
    image.write_bytes(bytes(16 << 20))
    # Writes throttled (conform_peers.QSD_WRITE_BPS): libvhost-user answers GET_VRING_BASE without waiting for
    # the requests in flight, and only slow writes make that show in every run, not in some.
    proc = subprocess.Popen(_conform_peers().qsd_args(image, Path(sock)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        _wait_socket(sock, proc)
        started = time.monotonic()
        results = Runner(Target(sock, "blk", 3.0)).run()
        assert time.monotonic() - started < 60
    finally:
        proc.terminate()
        proc.wait(10)
    failed = {r.clause for r in results if r.verdict is Verdict.FAIL}
    assert failed == QSD_FAILURES, {r.clause: r.reason for r in results if r.verdict is Verdict.FAIL}


@pytest.mark.skipif(shutil.which("dpdk-testpmd") is None, reason="dpdk-testpmd not installed")
def test_dpdk_vhost_pmd(tmp_path):
    sock = str(tmp_path / "vhost.sock")
    proc = subprocess.Popen(
        ["dpdk-testpmd", "--no-huge", "-m", "256", "-l", "0-1", "--no-pci", "--file-prefix", f"iovirt{tmp_path.name}",
         "--vdev", f"net_vhost0,iface={sock},client=0,queues=2", "--", "--rxq=2", "--txq=2", "--forward-mode=io", "--auto-start",
         "--total-num-mbufs=2048"],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        _wait_socket(sock, proc, 30)
        started = time.monotonic()
        results = {r.clause: r for r in Runner(Target(sock, "net", 2.0)).run()}
        assert time.monotonic() - started < 90
    finally:
        proc.terminate()
        proc.wait(10)
    failed = {clause for clause, r in results.items() if r.verdict is Verdict.FAIL}
    assert failed == DPDK_FAILURES, {c: r.reason for c, r in results.items() if r.verdict is Verdict.FAIL}
    # testpmd's io forwarding sends port 0's frames back to it: the RX checks run, not n/a.
    assert results["virtio-1.2:5.1.6.4.1#mrg_rxbuf"].verdict is Verdict.PASS
