"""Real Linux guests behind QEMU's emulated VT-d, whose virtio-net data path is ``iovirt serve``.

Issue 6's "behind a real guest" part: with ``-device intel-iommu,intremap=off,device-iotlb=on``,
``iommu_platform=on,ats=on,disable-legacy=on`` on the device and ``intel_iommu=on`` (the
default translated mode, no ``iommu=pt``), every ring and buffer address iovirt sees is an
IOVA.  QEMU answers iovirt's IOTLB misses (sent on the back-end channel) with
VHOST_USER_IOTLB_MSG updates and forwards the guest's invalidations.  Two such guests
ping each other from the first packet on.

The guests run the kernel's defaults: translated, lazy invalidation (a flush
queue ending in whole device-TLB flushes, which QEMU forwards as an INVALIDATE
of size 0 - "everything from iova on").
"""

from __future__ import annotations

import shutil
import signal

import pytest

from iovirt.guest import Guest, VhostUserNet
from iovirt.serve_process import ServeProcess

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86 is not installed"),
]

BOOT = 120.0


def test_two_viommu_guests_ping_from_the_first_packet(tmp_path):
    socks = [tmp_path / "n0.sock", tmp_path / "n1.sock"]
    with ServeProcess(["--net", str(socks[0]), "--net", str(socks[1])], tmp_path / "serve.log", socks) as srv:
        a = Guest(tmp_path, [VhostUserNet(socks[0], ip="10.78.0.1/24")], name="a", viommu=True,
                  script="ping -c 3 -W 10 10.78.0.2")
        b = Guest(tmp_path, [VhostUserNet(socks[1], ip="10.78.0.2/24")], name="b", viommu=True,
                  script="iovirt_wait_host done")
        with a, b:
            b.start()
            a.start()
            result = a.wait_result(timeout=BOOT)
            b.release("done", timeout=BOOT)
            assert b.wait_result(timeout=30).status == 0
        log = srv.log()
        code = srv.stop()
    assert code in (0, -signal.SIGKILL), log
    assert result.status == 0, result.console + log
    # No warm-up: the very first echo request is answered.
    assert "3 packets transmitted, 3 packets received" in result.output, result.output + log
    # Both ports ran with IOVAs: ACCESS_PLATFORM (bit 33) negotiated, the rings waited for misses.
    negotiated = [int(line.rsplit(" ", 1)[1], 16) for line in log.splitlines() if "negotiated features" in line]
    assert len(negotiated) >= 2 and all(f >> 33 & 1 for f in negotiated), log
    assert "waits for IOTLB entries" in log
    assert "needs reset" not in log, log
