"""A Linux guest translating through QEMU's intel-iommu, traced, paused mid-traffic and dumped.

The devices behind the IOMMU are QEMU's own, so that no iovirt code touches the DMA
being checked: a virtio-blk disk (read and written in a loop), a virtio-net NIC on
QEMU's user network (pinging its gateway) and idle virtio-blk disks.  Linux gives each
device a DMA domain of its own, so the idle disks' rings, mapped at probe, are never
covered by the busy devices' invalidations: their fills stay comparable whenever the
guest is paused.  Linux runs ``intel_iommu=on`` in strict
mode (``iommu.strict=1``): each unmap is invalidated page by page at once, so the pages
still mapped -- the virtqueue rings, the posted receive buffers, the requests in flight --
are never covered by a whole-domain flush and their fills stay comparable
(:mod:`~iovirt.crosscheck.vtd_trace`).  The result is QEMU's trace and an ELF core of the
paused guest (QMP ``stop``, ``dump-guest-memory`` with paging off).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from iovirt.crosscheck.vtd_trace import TRACE_EVENTS
from iovirt.guest import Guest, VirtioBlk
from iovirt.guest.qemu import IOMMU_DEVICE_PROPS, Device

DISK_BYTES = 4 << 20
IDLE_DISKS = 8
#: QEMU's user network: the guest's address and the gateway that answers pings.
GUEST_IP, GATEWAY_IP = "10.0.2.15/24", "10.0.2.2"

#: Disk reads (page cache dropped each round) and writes, and pings, until the host pauses the guest.
TRAFFIC_SCRIPT = f"""
ip link set eth0 up && ip addr add {GUEST_IP} dev eth0 || exit 1
ping -q -i 0.05 {GATEWAY_IP} > /dev/null &
while :; do
    dd if=/dev/vda of=/dev/null bs=64k 2>/dev/null
    dd if=/dev/zero of=/dev/vda bs=64k count=8 seek=16 conv=fsync 2>/dev/null
    echo 3 > /proc/sys/vm/drop_caches
done &
sleep 2
iovirt_wait_host done
"""


@dataclass(frozen=True)
class LinuxRun:
    """The files one run left: QEMU's trace and the guest's ELF core."""

    trace: Path
    core: Path


def user_net_args(index: int = 0) -> list[str]:
    """QEMU's virtio-net on the user network, behind the IOMMU (not one of the guest kit's devices)."""
    return ["-netdev", f"user,id=u{index}",
            "-device", f"virtio-net-pci,netdev=u{index},romfile=,{IOMMU_DEVICE_PROPS}"]


def trace_args(trace: Path) -> list[str]:
    """``-trace`` for every event the comparison reads, written to ``trace`` (QEMU's log back-end)."""
    args = [arg for event in TRACE_EVENTS for arg in ("-trace", event)]
    return [*args, "-D", str(trace)]


def run_linux_guest(workdir: str | Path, boot_timeout: float = 150.0, traffic_seconds: float = 2.0) -> LinuxRun:
    """Boot the guest, let the traffic run ``traffic_seconds``, pause it, dump it; return the files."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    disk = workdir / "vtd-linux-disk.img"
    disk.write_bytes(bytes(range(256)) * (DISK_BYTES // 256))
    run = LinuxRun(workdir / "vtd-linux-trace.log", workdir / "vtd-linux.core")
    for stale in (run.trace, run.core):
        stale.unlink(missing_ok=True)
    idle = [workdir / f"vtd-linux-idle{n}.img" for n in range(IDLE_DISKS)]
    for image in idle:
        image.write_bytes(bytes(1 << 20))
    devices: list[Device] = [VirtioBlk(disk), *(VirtioBlk(image, readonly=True) for image in idle)]
    guest = Guest(workdir, devices, name="vtd-linux", viommu=True, qmp=True,
                  append=("iommu.strict=1",), extra_args=(*trace_args(run.trace), *user_net_args()),
                  script=TRAFFIC_SCRIPT)
    with guest:
        guest.start()
        guest.wait_for("IOVIRT-WAIT done\n", timeout=boot_timeout)
        time.sleep(traffic_seconds)
        qmp = guest.qmp()
        qmp.execute("stop")
        qmp.execute("dump-guest-memory", paging=False, protocol=f"file:{run.core}", timeout=120)
    return run
