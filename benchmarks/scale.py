#!/usr/bin/env python3
"""The cost of scale: one ``iovirt serve`` with 1, 4, 16 and 64 net ports and as many blk devices.

For each count N, one ``iovirt serve`` (core 0) serves N ``--net`` ports and
N read-only ``--blk`` devices on one image in /dev/shm, and:

* **memory**: its resident set (VmRSS) once listening, and again once a
  front-end process (iovirt's vhost-user driver, one connection per device,
  every queue started) has connected all 2N devices: the difference over 2N
  is the memory per connected device;
* **idle CPU**: its user + system CPU time over a few seconds with every
  device connected and no traffic, in per cent of one core and per device
  (idle devices should cost about 0: nothing polls);
* **net aggregate**: DPDK's virtio-user (``dpdk-testpmd`` txonly, one vdev per
  port, one forwarding core) transmits 64-byte frames into all N ports at
  once, each port to its own MAC (dropped by the switch where it came in: no
  flooding); the figure is the sum of the ports' transmit rates;
* **blk with N connected**: 4 KiB random reads at QD32 on the first blk
  device (iovirt's driver, ``vhost_common.blk_run``) while the other devices
  stay connected; the peer figure is the same run at N = 1, so the ratio
  says what connected neighbours cost.

The last line is one JSON object: ``{"1": {...}, "4": {...}, ...}``.

    python benchmarks/scale.py [--counts 1,4,16,64] [--seconds S]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from vhost_common import NO_EVENT_IDX, blk_run, numbered_image, serve_iovirt, stop_process, wait_socket

TESTPMD = "dpdk-testpmd"
IMAGE_SIZE = 16 << 20


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` in KiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    return int(match.group(1)) if match else 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` (every thread), from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _connect_all(socks: list[str], ready, stop) -> None:
    """Connect to every socket and start its queues; hold the connections until ``stop``."""
    os.sched_setaffinity(0, {1})
    from iovirt.vhost_user.driver import VhostUserDriver

    drivers = []
    try:
        for sock in socks:
            drv = VhostUserDriver(sock, features=NO_EVENT_IDX, memory_size=4 << 20)
            drivers.append(drv)
            queues = [0, 1] if "net" in os.path.basename(sock) else [0]
            for q in drv.start_queues(queues, size=64).values():
                q.set_interrupts(False)
        ready.set()
        stop.wait()
    finally:
        for drv in drivers:
            drv.close()


MAX_PORTS_PER_TESTPMD = 32  # Debian's DPDK is built with RTE_MAX_ETHPORTS 32


def testpmd_multi_tx(socks: list[Path], seconds: float, log: Path) -> float:
    """DPDK virtio-user txonly into every socket at once; the median of the summed per-second Tx-pps.

    Each port sends to its own MAC (the vdev's ``mac=``), which the switch
    learns on that port from the first frame: every later frame is dropped
    there (its destination sits behind the port it came in on), so the
    figure is each port's transmit path, with no flooding into the others
    (what one port costs the rest).  Up to 32 ports per ``dpdk-testpmd``
    process; more take several processes at once.
    """
    procs, logs = [], []
    for start in range(0, len(socks), MAX_PORTS_PER_TESTPMD):
        group = socks[start:start + MAX_PORTS_PER_TESTPMD]
        vdevs, peers = [], []
        for i, sock in enumerate(group):
            mac = f"02:00:00:00:{(start + i) >> 8:02x}:{(start + i) & 0xFF:02x}"
            vdevs += ["--vdev", f"net_virtio_user{i},path={sock},queues=1,mac={mac}"]
            peers.append(f"--eth-peer={i},{mac}")
        part = log.with_suffix(f".{start}.log")
        args = [TESTPMD, "-l", "0,1", "--main-lcore", "0", "--no-pci", "--no-huge", "-m", "1024",
                f"--file-prefix=ivt-scale-{os.getpid()}-{start}", *vdevs, "--", "--forward-mode=txonly",
                "--txpkts=64", "--auto-start", "--stats-period=1", "--nb-cores=1", "--txd=64", "--rxd=64",
                f"--total-num-mbufs={max(8192, 256 * len(group))}", *peers]
        procs.append(subprocess.Popen(args, stdout=open(part, "wb"), stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL))
        logs.append((part, len(group)))
    time.sleep(seconds + 3)
    for proc in procs:
        stop_process(proc)
    total = 0.0
    for part, n in logs:
        # testpmd prints one block per port each period: sum each period's n rates.
        rates = [int(x) for x in re.findall(r"Tx-pps:\s+(\d+)", part.read_text(errors="replace"))]
        periods = [sum(rates[i:i + n]) for i in range(0, len(rates) - n + 1, n)]
        periods = periods[2:] or periods  # skip start-up seconds
        if not periods:
            raise RuntimeError(f"testpmd printed no rates; see {part}")
        total += sorted(periods)[len(periods) // 2]
    return total


def one_count(tmp: Path, image: Path, n: int, seconds: float) -> dict[str, float]:
    """The figures for N net ports and N blk devices."""
    net = [tmp / f"net{i}.sock" for i in range(n)]
    blk = [tmp / f"blk{i}.sock" for i in range(n)]
    args: list[str] = []
    for sock in net:
        args += ["--net", str(sock)]
    for sock in blk:
        args += ["--blk", f"{sock},{image},ro"]
    serve = serve_iovirt(args, tmp / f"serve-{n}.log")
    figures: dict[str, float] = {}
    try:
        for sock in net + blk:
            wait_socket(sock, serve, timeout=60)
        time.sleep(1)
        rss_listening = rss_kib(serve.pid)
        ctx = mp.get_context("spawn")
        ready, stop = ctx.Event(), ctx.Event()
        holder = ctx.Process(target=_connect_all, args=([str(s) for s in blk[1:] + net], ready, stop))
        holder.start()
        if not ready.wait(120):
            raise RuntimeError("the front-ends did not connect within 120 s")
        time.sleep(1)
        rss_connected = rss_kib(serve.pid)
        cpu0, t0 = cpu_seconds(serve.pid), time.monotonic()
        time.sleep(seconds)
        idle_cpu = (cpu_seconds(serve.pid) - cpu0) / (time.monotonic() - t0)
        connected = 2 * n - 1
        figures["rss_listening_mib"] = round(rss_listening / 1024, 1)
        figures["rss_connected_mib"] = round(rss_connected / 1024, 1)
        figures["kib_per_connected_device"] = round((rss_connected - rss_listening) / connected, 1)
        figures["idle_cpu_percent"] = round(100 * idle_cpu, 2)
        figures["idle_cpu_percent_per_device"] = round(100 * idle_cpu / connected, 4)
        figures["blk_4k_randread_iops_first_device"] = round(blk_run(blk[0], IMAGE_SIZE // 512, seconds))
        stop.set()
        holder.join(30)
        # The holder has let go of the net ports: testpmd drives them all.
        time.sleep(1)
        figures["net_64B_aggregate_frames_per_s"] = testpmd_multi_tx(net, seconds, tmp / f"testpmd-{n}.log")
    finally:
        stop_process(serve, signal.SIGTERM)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="1,4,16,64", help="device counts to measure (default 1,4,16,64)")
    parser.add_argument("--seconds", type=float, default=4.0, help="measuring time per figure (default 4)")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    results: dict[str, dict[str, float]] = {}
    keep = os.environ.get("IOVIRT_SCALE_KEEP")
    with tempfile.TemporaryDirectory(prefix="iovirt-scale-") as tmp, numbered_image(IMAGE_SIZE) as image:
        tmp = keep or tmp
        for n in counts:
            work = Path(tmp) / str(n)
            work.mkdir()
            f = one_count(work, image, n, args.seconds)
            results[str(n)] = f
            print(f"N={n:3d} net + {n:3d} blk: RSS {f['rss_listening_mib']} MiB listening, "
                  f"{f['rss_connected_mib']} MiB connected ({f['kib_per_connected_device']} KiB per device); "
                  f"idle CPU {f['idle_cpu_percent']} % of a core; "
                  f"net 64 B aggregate {f['net_64B_aggregate_frames_per_s']:,.0f} frames/s; "
                  f"blk 4 KiB QD32 on one device {f['blk_4k_randread_iops_first_device']:,} IOPS")
    base = results.get(str(counts[0]))
    if base:
        for n, f in results.items():
            f["ratio_blk_vs_first_count"] = round(f["blk_4k_randread_iops_first_device"]
                                                  / base["blk_4k_randread_iops_first_device"], 3)
            f["ratio_net_vs_first_count"] = round(f["net_64B_aggregate_frames_per_s"]
                                                  / base["net_64B_aggregate_frames_per_s"], 3)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
