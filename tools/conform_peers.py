#!/usr/bin/env python3
"""Run ``iovirt conform`` against every vhost-user back-end on this machine; write the peer reports and the matrix.

Back-ends (each from Debian's packages, started here in a temporary directory):

* ``iovirt-pci-net``, ``iovirt-pci-blk`` and ``iovirt-sriov-owner``: iovirt's own devices behind its in-process
  virtio-pci transport (``iovirt conform --in-process``): a net device with a control virtqueue
  (``--ctrl-queue``), a blk device, and the SR-IOV owner with its administration virtqueue (``--sriov-owner``);
  the transport, control-queue and group administration checks run only here;

* ``iovirt-net`` and ``iovirt-blk``: ``iovirt serve`` (two net ports: the second is the suite's peer port);
* ``qemu-storage-daemon-blk``: a vhost-user-blk export of a 16 MiB raw image, writes throttled to 1 MiB/s;
* ``dpdk-vhost-net``: ``dpdk-testpmd``'s vhost PMD, io forwarding (frames the device sends come back);
* ``ovs-dpdk-net``: Open vSwitch with DPDK, a netdev bridge with two ``dpdkvhostuser`` ports
  (benchmarks/ovs_peer.py; needs ``openvswitch-switch-dpdk`` and hugepages, which it reserves).
* ``virtiofsd-fs``: QEMU's virtiofsd (vhost-user-fs), checked on the message-level vhost-user rules only
  (``--device fs``).  A virtiofsd process serves one front-end connection and exits when it closes; as a VMM
  starts one per VM, this script starts a new one on the same socket each time the last one exits (each
  process's output goes to ``virtiofsd.log`` in the temporary directory, numbered by process).

For each: ``docs/conformance/NAME.json`` (the JSON report) and ``NAME.txt`` (the table), then
``docs/conformance/matrix.html`` (``iovirt conform --coverage --html``), one column per back-end.
A peer that is not installed is skipped with a line saying so; one that crashes or hangs is
reported against the checks it broke by the suite itself (every wait is bounded).

    python3 tools/conform_peers.py [--out docs/conformance] [--only NAME ...] [--timeout 3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import ovs_peer  # noqa: E402  (benchmarks/ovs_peer.py: the OVS-DPDK bridge)

Peer = Callable[[Path], "contextlib.AbstractContextManager[tuple[str | None, list[str]]]"]
"""Starts a back-end in a directory; yields the device type (``None`` in-process) and the ``iovirt conform``
target arguments."""


def _wait_socket(path: Path, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"the back-end exited ({proc.returncode}) before it listened on {path}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing listened on {path} within {timeout:g} s")
        time.sleep(0.05)


@contextlib.contextmanager
def _process(args: list[str], log: Path, sock: Path) -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen(args, stdout=open(log, "wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        _wait_socket(sock, proc)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def iovirt_net(tmp: Path) -> Iterator[tuple[str, list[str]]]:
    a, b = tmp / "net0.sock", tmp / "net1.sock"
    with _process([sys.executable, "-m", "iovirt", "serve", "--net", str(a), "--net", str(b)], tmp / "iovirt.log", b):
        yield "net", ["--socket", str(a), "--peer-socket", str(b)]


@contextlib.contextmanager
def iovirt_blk(tmp: Path) -> Iterator[tuple[str, list[str]]]:
    sock = tmp / "blk.sock"
    with _process([sys.executable, "-m", "iovirt", "serve", "--blk", f"{sock},{tmp / 'disk.img'},size=16M"],
                  tmp / "iovirt.log", sock):
        yield "blk", ["--socket", str(sock)]


QSD_WRITE_BPS = 1 << 20
"""Writes through QSD are throttled to 1 MiB/s: the GET_VRING_BASE#drain check's 1 MiB of writes then takes about a
second, so requests are in flight when it stops the ring, in every run (unthrottled, they finish first in most)."""


def qsd_args(image: Path, sock: Path) -> list[str]:
    """qemu-storage-daemon exporting ``image`` as vhost-user-blk on ``sock``, writes throttled to QSD_WRITE_BPS."""
    return ["qemu-storage-daemon", "--object", f"throttle-group,id=tg,x-bps-write={QSD_WRITE_BPS}",
            "--blockdev", f"driver=file,node-name=f,filename={image}",
            "--blockdev", "driver=throttle,node-name=t,file=f,throttle-group=tg",
            "--export", f"type=vhost-user-blk,id=e,node-name=t,addr.type=unix,addr.path={sock},writable=on"]


@contextlib.contextmanager
def qsd_blk(tmp: Path) -> Iterator[tuple[str, list[str]]]:
    image, sock = tmp / "disk.img", tmp / "qsd.sock"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    with _process(qsd_args(image, sock), tmp / "qsd.log", sock):
        yield "blk", ["--socket", str(sock)]


@contextlib.contextmanager
def dpdk_net(tmp: Path) -> Iterator[tuple[str, list[str]]]:
    sock = tmp / "dpdk.sock"
    args = ["dpdk-testpmd", "--no-huge", "-m", "256", "-l", "0-1", "--no-pci", f"--file-prefix=ivt-conf-{os.getpid()}",
            "--vdev", f"net_vhost0,iface={sock},client=0,queues=2", "--", "--rxq=2", "--txq=2",
            "--forward-mode=io", "--auto-start", "--total-num-mbufs=2048", "--stats-period=1"]
    with _process(args, tmp / "testpmd.log", sock):
        yield "net", ["--socket", str(sock)]


@contextlib.contextmanager
def ovs_net(tmp: Path) -> Iterator[tuple[str, list[str]]]:
    with ovs_peer.ovs_bridge(tmp / "ovs") as (a, b):
        yield "net", ["--socket", str(a), "--peer-socket", str(b)]


VIRTIOFSD = "/usr/lib/qemu/virtiofsd"


@contextlib.contextmanager
def virtiofsd_fs(tmp: Path) -> Iterator[tuple[str, list[str]]]:
    source, sock, log = tmp / "shared", tmp / "virtiofsd.sock", tmp / "virtiofsd.log"
    source.mkdir()
    # sandbox=chroot: the default (namespaces) needs privileges a container may lack; cache=none: no host page cache.
    args = [VIRTIOFSD, f"--socket-path={sock}", "-o", f"source={source}", "-o", "sandbox=chroot", "-o", "cache=none"]
    stop = threading.Event()
    procs: list[subprocess.Popen] = []

    def supervise() -> None:
        with open(log, "ab") as out:
            while not stop.is_set():
                out.write(f"--- virtiofsd process {len(procs) + 1}\n".encode())
                out.flush()
                proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
                procs.append(proc)
                while proc.poll() is None and not stop.is_set():
                    time.sleep(0.01)

    thread = threading.Thread(target=supervise, daemon=True)
    thread.start()
    try:
        while not procs:
            time.sleep(0.01)
        _wait_socket(sock, procs[0])
        yield "fs", ["--socket", str(sock)]
    finally:
        stop.set()
        thread.join(5)
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(10)
        print(f"virtiofsd-fs: {len(procs)} virtiofsd processes served the run")


def in_process(*args: str) -> Peer:
    """iovirt's own device behind the in-process virtio-pci transport (``iovirt conform --in-process ...``)."""

    @contextlib.contextmanager
    def start(tmp: Path) -> Iterator[tuple[str | None, list[str]]]:
        yield None, ["--in-process", *args]

    return start


PEERS: dict[str, tuple[Peer, str]] = {
    "iovirt-pci-net": (in_process("net", "--ctrl-queue"), sys.executable),
    "iovirt-pci-blk": (in_process("blk"), sys.executable),
    "iovirt-sriov-owner": (in_process("net", "--sriov-owner"), sys.executable),
    "iovirt-net": (iovirt_net, sys.executable),
    "iovirt-blk": (iovirt_blk, sys.executable),
    "qemu-storage-daemon-blk": (qsd_blk, "qemu-storage-daemon"),
    "dpdk-vhost-net": (dpdk_net, "dpdk-testpmd"),
    "ovs-dpdk-net": (ovs_net, str(ovs_peer.VSWITCHD)),
    "virtiofsd-fs": (virtiofsd_fs, VIRTIOFSD),
}
"""Name -> (how to start it, the program it needs)."""


def run_peer(name: str, out: Path, timeout: float) -> bool:
    """Run the suite against one back-end; True when its reports were written."""
    start, program = PEERS[name]
    if shutil.which(program) is None and not Path(program).exists():
        print(f"{name}: skipped, {program} is not installed")
        return False
    with tempfile.TemporaryDirectory(prefix=f"iovirt-conform-{name}-") as tmp:
        with start(Path(tmp)) as (device, socket_args):
            device_args = ["--device", device] if device else []
            cmd = [sys.executable, "-m", "iovirt", "conform", *device_args, "--timeout", str(timeout),
                   *socket_args, "--json", str(out / f"{name}.json")]
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    (out / f"{name}.txt").write_text(result.stdout)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr.strip()[-300:]
    print(f"{name}: {summary}")
    return result.returncode in (0, 1)  # 1: the back-end failed checks, which is a report too


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "conformance", help="where the reports go")
    parser.add_argument("--only", nargs="+", choices=sorted(PEERS), help="these back-ends only")
    parser.add_argument("--timeout", type=float, default=3.0, help="the suite's bound on every wait (default 3 s)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.only or PEERS:
        run_peer(name, args.out, args.timeout)
    runs = [f"{name}={args.out / f'{name}.json'}" for name in PEERS if (args.out / f"{name}.json").exists()]
    cmd = [sys.executable, "-m", "iovirt", "conform", "--coverage", "--html", str(args.out / "matrix.html")]
    for run in runs:
        cmd += ["--run", run]
    return subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode


if __name__ == "__main__":
    sys.exit(main())
