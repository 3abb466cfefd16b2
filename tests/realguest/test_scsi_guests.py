"""A real Linux guest on ``iovirt serve --scsi``: QEMU 7.2's vhost-user-scsi-pci, Linux's virtio_scsi and sd.

Linux's sd driver is the oracle (issue 16): the guest sees LUN 0 with
the image's size and the same bytes (md5), writes a pattern the host finds in
the image, shows the vendor, model and revision iovirt's INQUIRY reports and
the queue limits its Block Limits VPD page sets, and finds the second LUN.
Each disk is found by its SCSI address (H:C:T:L), not by its ``sdX`` name:
Linux's asynchronous scan may probe LUN 1 first and call it ``sda``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest

from iovirt.guest import Guest
from iovirt.guest.modules import VIRTIO_MODULES
from iovirt.serve_process import ServeProcess
from iovirt.virtio.scsi.target import MAX_UNMAP_BLOCKS, OPTIMAL_TRANSFER_BLOCKS, PRODUCT, REVISION, VENDOR

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86 is not installed"),
]

BOOT = 180.0
SCSI_MODULES = (*VIRTIO_MODULES, "virtio_scsi", "sd_mod")  # resolve() adds scsi_mod, scsi_common, t10-pi, crc*


@dataclass
class VhostUserScsi:
    """QEMU's vhost-user-scsi-pci served by a back-end listening on ``socket``."""

    socket: str | Path
    num_queues: int = 1

    def qemu_args(self, index: int, iommu: bool) -> list[str]:
        """The ``-chardev``/``-device`` arguments for device number ``index``."""
        return ["-chardev", f"socket,id=cs{index},path={self.socket}",
                "-device", f"vhost-user-scsi-pci,chardev=cs{index},num_queues={self.num_queues},vectors=0"]


def test_guest_sees_two_luns_reads_writes_and_limits(tmp_path):
    lun0, lun1 = tmp_path / "lun0.img", tmp_path / "lun1.img"
    content = os.urandom(8 << 20)
    lun0.write_bytes(content)
    with open(lun1, "wb") as f:
        f.truncate(2 << 20)
    sock = tmp_path / "scsi.sock"
    serve = ServeProcess(("--scsi", f"{sock},{lun0},{lun1}"), tmp_path / "serve.log", [sock], ()).start()
    offset, pattern = 3 << 20, "iovirt-scsi-pattern-16"
    script = f"""set -e
i=0
# Both LUNs' block devices, found by SCSI address: the sdX order is the probe order, which varies.
while ! ls /sys/bus/scsi/devices/*:0:0:1/block/ >/dev/null 2>&1 && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
d0=$(ls /sys/bus/scsi/devices/*:0:0:0/block/)
d1=$(ls /sys/bus/scsi/devices/*:0:0:1/block/)
echo "size=$(cat /sys/block/$d0/size)"
echo "size1=$(cat /sys/block/$d1/size) $(ls /sys/block/$d1/device/scsi_disk)"
md5sum /dev/$d0 | cut -d' ' -f1
echo "vendor=[$(cat /sys/block/$d0/device/vendor)]"
echo "model=[$(cat /sys/block/$d0/device/model)]"
echo "rev=[$(cat /sys/block/$d0/device/rev)]"
echo "max_sectors_kb=$(cat /sys/block/$d0/queue/max_sectors_kb)"
echo "discard_max_bytes=$(cat /sys/block/$d0/queue/discard_max_bytes)"
printf '%s' '{pattern}' | dd of=/dev/$d0 bs=512 seek={offset // 512} conv=notrunc 2>/dev/null
sync
"""
    try:
        with Guest(tmp_path, [VhostUserScsi(sock)], script=script, name="scsi", modules=SCSI_MODULES) as g:
            result = g.start().wait_result(timeout=BOOT)
        stderr = g.stderr_path.read_text()  # QEMU has exited: all of it
    finally:
        code = serve.stop()
    assert code in (0, -signal.SIGKILL), serve.log()
    assert result.status == 0, result.console
    out = result.output.replace("\r", "")
    lines = set(out.splitlines())
    assert f"size={len(content) // 512}" in lines
    assert re.search(r"^size1=4096 \d+:0:0:1$", out, re.M), out
    assert hashlib.md5(content).hexdigest() in lines, out
    assert f"vendor=[{VENDOR.ljust(8)}]" in out and f"model=[{PRODUCT.ljust(16)}]" in out, out
    assert f"rev=[{REVISION}]" in out, out
    assert f"max_sectors_kb={OPTIMAL_TRANSFER_BLOCKS * 512 // 1024}" in lines, out
    assert f"discard_max_bytes={MAX_UNMAP_BLOCKS * 512}" in lines, out
    assert lun0.read_bytes()[offset : offset + len(pattern)] == pattern.encode()
    assert "Traceback" not in serve.log()
    # No warning on a correct setup: iovirt offers QEMU's vhost-user-scsi nothing it does not use.
    assert "VHOST_USER_PROTOCOL_F_CONFIG" not in stderr, stderr
