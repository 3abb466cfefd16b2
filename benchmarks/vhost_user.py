#!/usr/bin/env python3
"""vhost-user back-end throughput: iovirt against DPDK's vhost PMD and qemu-storage-daemon.

Net: DPDK's virtio-user (``dpdk-testpmd --vdev net_virtio_user0``, a C
front-end with no VM, in txonly mode) pushes 64-byte and 1500-byte frames
into a back-end; the figure is the front-end's transmit rate (a virtio-user
TX completes only when the back-end has consumed the chain).  Back-ends:
``iovirt serve`` with the frames going into its switch (no other port knows
the destination: the sink case), and DPDK's vhost PMD in rxonly mode,
alternately twice (best of each; ``SINK_ROUNDS``).
Then port to port: frames to a MAC learned on iovirt's second port, whose
receive ring a light front-end process keeps refilled; iovirt's own receive
counter gives its rate.  The peer is Open vSwitch with DPDK (a netdev bridge,
two ``dpdkvhostuser`` ports, the NORMAL action, its PMD on core 0; see
``ovs_peer.py``) driven the same way; ``ratio_p2p_64B_vs_ovs`` compares what
the receiving front-end saw from each (best 1 s window).
The 64-byte sink and port-to-port runs are repeated under ``iovirt serve
--isolate`` (each port a worker process, the switch in the supervisor): the
cost of process isolation, in the same run.

Busy polling: the same 64-byte sink against ``iovirt serve --poll-us 1000``
(the data plane keeps polling a ring for 1 ms after its last work, with
the front-end's kicks suppressed, as DPDK's PMD polls its ring), against
``iovirt serve`` without it and against DPDK's vhost PMD, alternately
twice (best of each): ``ratio_net_64B_vs_dpdk_poll``.  (``--only poll``.)

Packed against split: the same 64-byte sink, with the front-end asking for
packed rings (``packed_vq=1``) and then not, alternately three times against
one ``iovirt serve`` (best of each); ``ratio_packed_vs_split_64B`` is packed /
split.  (``--only packed`` runs this alone.)

Blk: 4 KiB random reads at queue depth 32 against a raw image in /dev/shm
from a front-end process (iovirt's Python driver, each request re-posted as
soon as it completes), against ``iovirt serve`` and ``qemu-storage-daemon``,
alternately twice (best of each).
Then the same on a regular file (the same image copied out of /dev/shm, to
``$TMPDIR`` or /var/tmp) with the page cache bypassed on both sides: iovirt
opens it ``O_DIRECT`` (its default where the file system allows it; the
front-end's 4 KiB buffers are aligned), ``qemu-storage-daemon`` gets
``cache.direct=on`` (its default ``aio=threads``): ``ratio_blk_odirect_vs_qsd``.

Dirty logging (migration): the 64-byte sink (an iovirt front-end process
transmitting into the switch) and the blk 4 KiB reads, each with
``VHOST_F_LOG_ALL`` off and then on (QEMU's order: SET_LOG_BASE,
SET_FEATURES, SET_VRING_ADDR with VHOST_VRING_F_LOG) against the same
``iovirt serve``, alternately three times (best of each: the machine is
shared); the figures are the on/off time ratios ``logging_slowdown_net_64B``
and ``logging_slowdown_blk_4k``.

Counters: the same 64-byte sink with the port's counters off and then on
(``iovirt ctl PATH counting net0 off|on``), alternately three times against
one ``iovirt serve --control``; ``counters_cost_net_64B`` is the on/off time
ratio (off rate / on rate).

Cores (2): back-ends on core 0, front-ends' pollers on core 1.  The last
output line is one JSON object of the figures.

    python benchmarks/vhost_user.py [--seconds S]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import ovs_peer
from vhost_common import NO_EVENT_IDX, blk_run, numbered_image, serve_iovirt, stop_process, wait_socket

TESTPMD = "dpdk-testpmd"
QSD = "qemu-storage-daemon"



def testpmd_tx(sock: Path, frame_size: int, seconds: float, log: Path, dst_mac: str | None = None,
               packed: bool = False) -> float:
    """Run virtio-user txonly against ``sock``; return the median transmit packets/s.

    ``packed``: the front-end asks for packed rings (``packed_vq=1``, VIRTIO_F_RING_PACKED, virtio 1.2 §2.8).
    """
    vdev = f"net_virtio_user0,path={sock},queues=1" + (",packed_vq=1" if packed else "")
    args = [
        TESTPMD, "-l", "0,1", "--main-lcore", "0", "--no-pci", "--no-huge", "-m", "256",
        f"--file-prefix=ivt-fe-{os.getpid()}", "--vdev", vdev,
        "--", "--forward-mode=txonly", f"--txpkts={frame_size}", "--auto-start", "--stats-period=1",
        "--nb-cores=1", "--total-num-mbufs=4096", "--txd=256", "--rxd=256",
    ]
    if dst_mac:
        args.append(f"--eth-peer=0,{dst_mac}")
    proc = subprocess.Popen(args, stdout=open(log, "wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    time.sleep(seconds + 3)
    stop_process(proc)
    rates = [int(x) for x in re.findall(r"Tx-pps:\s+(\d+)", log.read_text(errors="replace"))]
    rates = rates[2:] or rates  # skip start-up seconds
    if not rates:
        raise RuntimeError(f"testpmd printed no rates; see {log}")
    return float(sorted(rates)[len(rates) // 2])


def dpdk_vhost_backend(sock: Path, log: Path) -> subprocess.Popen:
    """DPDK's vhost PMD (a C back-end) in rxonly mode, forwarding on core 0."""
    proc = subprocess.Popen(
        [
            TESTPMD, "-l", "0,1", "--main-lcore", "1", "--no-pci", "--no-huge", "-m", "512",
            f"--file-prefix=ivt-be-{os.getpid()}", "--vdev", f"net_vhost0,iface={sock},queues=1",
            # --stats-period keeps testpmd running without waiting for Enter on stdin.
            "--", "--forward-mode=rxonly", "--auto-start", "--stats-period=1", "--nb-cores=1",
            "--total-num-mbufs=8192",
        ],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    wait_socket(sock, proc)
    return proc


# -- the light receive front-end for iovirt's second port ---------------------------


def _rx_sink(sock: str, mac: bytes, ready, stop, out=None) -> None:
    os.sched_setaffinity(0, {1})
    from iovirt.vhost_user.driver import VhostUserDriver

    with VhostUserDriver(sock, features=NO_EVENT_IDX) as drv:  # no EVENT_IDX: never wait on calls
        rx, tx = drv.start_queues([0, 1], size=256).values()
        for _ in range(256):
            rx.add_data([], [2048])
        rx.set_interrupts(False)
        drv.kick(0)
        # Announce our MAC so the switch learns it on this port.
        frame = b"\xff" * 6 + mac + b"\x08\x06" + bytes(46)
        tx.add_data([bytes(12) + frame])
        drv.kick(1)
        ready.set()
        used_idx_view = drv.memory.view(rx.used_addr + 2, 2).cast("H")
        avail_idx_view = drv.memory.view(rx.avail_addr + 2, 2).cast("H")
        seen = 0
        received = window_start = 0
        window_t = time.monotonic()
        best = 0.0
        while not stop.is_set():
            used = used_idx_view[0]
            n = (used - seen) & 0xFFFF
            if n:
                # Chains come back in order and go out again in order: the
                # avail slots keep their heads, so re-posting is an idx bump.
                seen = used
                avail_idx_view[0] = (avail_idx_view[0] + n) & 0xFFFF
                drv.frontend.kick(0)
                if out is not None:  # the receive rate seen by the front-end, best 1 s window
                    received += n
                    now = time.monotonic()
                    if now - window_t >= 1.0:
                        best = max(best, (received - window_start) / (now - window_t))
                        window_start, window_t = received, now
            else:
                time.sleep(0)
        used_idx_view.release()
        avail_idx_view.release()
    if out is not None:
        out.put(best)


def p2p_run(s0: Path, s1: Path, seconds: float, log: Path) -> float:
    """64 B frames from DPDK's virtio-user on ``s0`` to a MAC learned on ``s1``; the receiver's best 1 s rate."""
    ctx = mp.get_context("spawn")
    ready, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
    mac = bytes.fromhex("525400aabbcc")
    sink = ctx.Process(target=_rx_sink, args=(str(s1), mac, ready, stop, out))
    sink.start()
    ready.wait(20)
    try:
        testpmd_tx(s0, 64, seconds, log, dst_mac=mac.hex(":"))
    finally:
        stop.set()
        try:
            seen = out.get(timeout=30)
        except queue.Empty:
            seen = 0.0
        sink.join(10)
    return float(seen)


SINK_ROUNDS = 2
"""The sink and blk runs alternate iovirt and its peer this many times; the best of each counts.  One run
each could land in a slow moment of this shared machine: the same iovirt measured 8.1 and 14.4 M
frames/s within one run (benchmarks/RESULTS.md, ninth session)."""


def _alternately(ours: Callable[[int], float], theirs: Callable[[int], float]) -> tuple[list[float], list[float]]:
    """``ours(run)`` then ``theirs(run)``, ``SINK_ROUNDS`` times: each one's figures in the order measured."""
    our_runs: list[float] = []
    their_runs: list[float] = []
    for run in range(SINK_ROUNDS):
        our_runs.append(ours(run))
        their_runs.append(theirs(run))
    return our_runs, their_runs


def _runs(rates: list[float]) -> str:
    """The runs' figures, in the order measured, for the printed line."""
    return "/".join(f"{rate:,.0f}" for rate in rates)


def net_figures(tmp: Path, seconds: float) -> dict[str, float]:
    figures: dict[str, float] = {}
    for size in (64, 1500):

        def iovirt_sink(run: int) -> float:
            sock = tmp / f"iovirt-net-{size}-{run}.sock"
            backend = serve_iovirt(["--net", str(sock)], tmp / f"iovirt-net-{size}.log")
            wait_socket(sock, backend)
            try:
                return testpmd_tx(sock, size, seconds, tmp / f"fe-iovirt-{size}.log")
            finally:
                stop_process(backend, signal.SIGTERM)

        def dpdk_sink(run: int) -> float:
            sock = tmp / f"dpdk-net-{size}-{run}.sock"
            peer = dpdk_vhost_backend(sock, tmp / f"dpdk-vhost-{size}.log")
            try:
                return testpmd_tx(sock, size, seconds, tmp / f"fe-dpdk-{size}.log")
            finally:
                stop_process(peer)

        ours, theirs = _alternately(iovirt_sink, dpdk_sink)
        iovirt_rate, peer_rate = max(ours), max(theirs)
        print(f"net {size:4d} B frames, sink: iovirt {iovirt_rate:,.0f} frames/s   "
              f"DPDK vhost PMD {peer_rate:,.0f} frames/s   ratio {iovirt_rate / peer_rate:.2f}  "
              f"(best of runs: iovirt {_runs(ours)}, DPDK {_runs(theirs)})")
        figures[f"net_{size}B_frames_per_s"] = iovirt_rate
        figures[f"dpdk_vhost_{size}B_frames_per_s"] = peer_rate
        figures[f"ratio_net_{size}B_vs_dpdk"] = round(iovirt_rate / peer_rate, 3)
    # Port to port through the switch, then through Open vSwitch with DPDK.
    p2p, p2p_seen = p2p_backend_run(tmp, seconds, 1, "0")
    figures["net_port_to_port_64B_frames_per_s"] = p2p
    reason = ovs_peer.available()
    if reason:
        print(f"net   64 B frames, port 0 -> switch -> port 1: iovirt {p2p:,.0f} frames/s (no OVS peer: {reason})")
    else:
        with ovs_peer.ovs_bridge(tmp / "ovs") as (o0, o1):
            ovs_seen = p2p_run(o0, o1, seconds, tmp / "fe-ovs-p2p.log")
        # The ratio compares what the receiving front-end saw from each (best 1 s window).
        print(f"net   64 B frames, port 0 -> switch -> port 1: iovirt {p2p:,.0f} frames/s by its counter, "
              f"{p2p_seen:,.0f} at the receiver   OVS-DPDK {ovs_seen:,.0f} at the receiver   "
              f"ratio {p2p_seen / ovs_seen if ovs_seen else float('nan'):.2f}")
        figures["net_port_to_port_64B_received_per_s"] = p2p_seen
        figures["ovs_port_to_port_64B_received_per_s"] = ovs_seen
        if ovs_seen:
            figures["ratio_p2p_64B_vs_ovs"] = round(p2p_seen / ovs_seen, 3)
    figures.update(isolated_figures(tmp, seconds, figures))
    return figures


def p2p_backend_run(tmp: Path, seconds: float, workers: int, cpus: str) -> tuple[float, float]:
    """Port to port with the two ports on ``workers`` workers, the back-end on ``cpus``.

    Returns the back-end's receive counter's best 1 s and the receiving front-end's.
    """
    s0, s1 = tmp / f"w{workers}-p0.sock", tmp / f"w{workers}-p1.sock"
    log = tmp / f"iovirt-p2p-w{workers}.log"
    backend = subprocess.Popen(
        ["taskset", "-c", cpus, sys.executable, "-c", P2P_BACKEND, str(s0), str(s1), str(seconds + 8), str(workers)],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT,
    )
    wait_socket(s1, backend)
    try:
        seen = p2p_run(s0, s1, seconds, tmp / f"fe-p2p-w{workers}.log")
    finally:
        backend.wait(30)
    match = re.search(r"rx_per_s=([\d.]+)", log.read_text())
    return (float(match.group(1)) if match else 0.0), seen


def workers_figures(tmp: Path, seconds: float) -> dict[str, float]:
    """Port to port 64 B with both ports on one worker and on two (the frames cross), alternately twice; best of each.

    Both back-ends run on core 0 (the front-ends take core 1): on these 2-core machines the figure is what
    crossing between two workers (``iovirt/virtio/net/crossing.py``) costs, not what a second core would add.
    """
    best = {1: 0.0, 2: 0.0}
    for _ in range(2):
        for workers in (1, 2):
            best[workers] = max(best[workers], p2p_backend_run(tmp, seconds, workers, "0")[0])
    ratio = best[2] / best[1] if best[1] else float("nan")
    print(f"net   64 B port -> switch -> port, both ports on one worker: {best[1]:,.0f} frames/s; "
          f"on two workers (crossing), same core: {best[2]:,.0f} frames/s   ratio {ratio:.2f}")
    return {"net_port_to_port_64B_frames_per_s_1_worker": best[1],
            "net_port_to_port_64B_frames_per_s_2_workers": best[2],
            "ratio_p2p_2_workers_vs_1": round(ratio, 3)}


def packed_figures(tmp: Path, seconds: float) -> dict[str, float]:
    """The 64-byte sink with split and then packed rings, alternately three times against one ``iovirt serve``.

    Best of each (the machine is shared); ``ratio_packed_vs_split_64B`` is packed / split.  The
    front-end's log is checked for the ring layout it negotiated, so a silent fall-back to split
    rings cannot pass for a packed figure.
    """
    sock = tmp / "iovirt-packed.sock"
    backend = serve_iovirt(["--net", str(sock)], tmp / "iovirt-packed.log", log_level="info")  # says each layout
    wait_socket(sock, backend)
    rates: dict[bool, list[float]] = {False: [], True: []}
    try:
        for _ in range(3):
            for packed in (False, True):
                log = tmp / f"fe-{'packed' if packed else 'split'}.log"
                rates[packed].append(testpmd_tx(sock, 64, seconds, log, packed=packed))
    finally:
        stop_process(backend, signal.SIGTERM)
    started = re.findall(r"vring 1 started( packed)?:", (tmp / "iovirt-packed.log").read_text(errors="replace"))
    if [bool(p) for p in started] != [False, True] * 3:
        raise RuntimeError(f"the transmit ring's layout did not alternate split, packed: {started}; "
                           f"see {tmp / 'iovirt-packed.log'}")
    split, packed = max(rates[False]), max(rates[True])
    print(f"net   64 B frames, sink: split rings {split:,.0f} frames/s   packed rings {packed:,.0f} frames/s   "
          f"ratio {packed / split:.2f}  (runs: split {rates[False]}, packed {rates[True]})")
    return {"net_64B_split_frames_per_s": split, "net_64B_packed_frames_per_s": packed,
            "ratio_packed_vs_split_64B": round(packed / split, 3)}


POLL_US = 1000
"""``iovirt serve --poll-us`` for the busy-poll figures: a ring is polled for 1 ms after its last work."""


def poll_figures(tmp: Path, seconds: float) -> dict[str, float]:
    """The 64-byte sink with ``iovirt serve --poll-us POLL_US``, without it, and DPDK's vhost PMD, alternately twice.

    DPDK's PMD busy-polls its ring on its core; with ``--poll-us`` iovirt's data plane does the same
    while traffic flows (the front-end sees notifications suppressed and stops kicking).  Best of
    each; ``ratio_net_64B_vs_dpdk_poll`` is the polled figure against the PMD's from the same run.
    """
    best = {"poll": 0.0, "kicks": 0.0, "dpdk": 0.0}
    for round_ in range(2):
        for kind in best:
            sock = tmp / f"poll-{kind}-{round_}.sock"
            if kind == "dpdk":
                backend = dpdk_vhost_backend(sock, tmp / f"dpdk-vhost-poll-{round_}.log")
            else:
                extra = ["--poll-us", str(POLL_US)] if kind == "poll" else []
                backend = serve_iovirt(["--net", str(sock), *extra], tmp / f"iovirt-{kind}-{round_}.log")
                wait_socket(sock, backend)
            try:
                rate = testpmd_tx(sock, 64, seconds, tmp / f"fe-{kind}-{round_}.log")
            finally:
                stop_process(backend, signal.SIGTERM if kind != "dpdk" else signal.SIGINT)
            best[kind] = max(best[kind], rate)
    print(f"net   64 B frames, sink: iovirt --poll-us {POLL_US} {best['poll']:,.0f} frames/s   "
          f"iovirt (kicks) {best['kicks']:,.0f} frames/s   DPDK vhost PMD {best['dpdk']:,.0f} frames/s   "
          f"ratios {best['poll'] / best['dpdk']:.2f} polled, {best['kicks'] / best['dpdk']:.2f} with kicks")
    return {"net_64B_frames_per_s_poll": best["poll"], "net_64B_frames_per_s_kicks": best["kicks"],
            "dpdk_vhost_64B_frames_per_s_poll_run": best["dpdk"],
            "ratio_net_64B_vs_dpdk_poll": round(best["poll"] / best["dpdk"], 3),
            "ratio_net_64B_vs_dpdk_kicks_poll_run": round(best["kicks"] / best["dpdk"], 3)}


def _link_drops(log: Path) -> tuple[int, int]:
    """(sent, dropped) over the isolated net workers' links to the switch, from their exit lines."""
    found = re.findall(r"link to the switch: (\d+) frames sent, (\d+) dropped", log.read_text(errors="replace"))
    return sum(int(a) for a, _ in found), sum(int(b) for _, b in found)


def isolated_figures(tmp: Path, seconds: float, in_process: dict[str, float]) -> dict[str, float]:
    """The 64 B sink and port-to-port figures again under ``iovirt serve --isolate``.

    Each port is then a worker process and the switch lives in the
    supervisor: a frame crosses a SOCK_SEQPACKET link (worker to switch) in
    the sink case, and two (worker to switch to worker) port to port.  Same
    cores as the in-process runs (everything of iovirt on core 0).  The sink
    figure counts the frames the worker consumed; the line also gives how
    many of them its link dropped because the switch process fell behind.
    Port to port counts what the receiving front-end got.
    """
    def serve(args: list[str], log: Path) -> subprocess.Popen:
        return subprocess.Popen(
            ["taskset", "-c", "0", sys.executable, "-m", "iovirt", "--log-level", "info", "serve", "--isolate", *args],
            stdout=open(log, "wb"), stderr=subprocess.STDOUT,
        )

    figures: dict[str, float] = {}
    sock, log = tmp / "iovirt-isolated-64.sock", tmp / "iovirt-isolated-64.log"
    backend = serve(["--net", str(sock)], log)
    wait_socket(sock, backend)
    try:
        sink = testpmd_tx(sock, 64, seconds, tmp / "fe-isolated-64.log")
    finally:
        stop_process(backend, signal.SIGTERM)
    sent, dropped = _link_drops(log)
    ref = in_process["net_64B_frames_per_s"]
    print(f"net   64 B frames, sink, --isolate: iovirt {sink:,.0f} frames/s ({sink / ref:.2f}x in-process); "
          f"the link to the switch dropped {dropped:,} of {sent + dropped:,}")
    figures["net_64B_frames_per_s_isolated"] = sink
    s0, s1 = tmp / "iso-p0.sock", tmp / "iso-p1.sock"
    log = tmp / "iovirt-isolated-p2p.log"
    backend = serve(["--net", str(s0), "--net", str(s1)], log)
    wait_socket(s0, backend)
    wait_socket(s1, backend)
    ctx = mp.get_context("spawn")
    ready, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
    mac = bytes.fromhex("525400aabbcc")
    rx = ctx.Process(target=_rx_sink, args=(str(s1), mac, ready, stop, out))
    rx.start()
    ready.wait(20)
    try:
        testpmd_tx(s0, 64, seconds, tmp / "fe-isolated-p2p.log", dst_mac=mac.hex(":"))
    finally:
        stop.set()
        p2p = out.get(timeout=30)
        rx.join(10)
        stop_process(backend, signal.SIGTERM)
    ref = in_process["net_port_to_port_64B_frames_per_s"]
    ratio = f"{p2p / ref:.2f}x" if ref else "n/a"
    print(f"net   64 B frames, port 0 -> switch -> port 1, --isolate: iovirt {p2p:,.0f} frames/s ({ratio} in-process)")
    figures["net_port_to_port_64B_frames_per_s_isolated"] = p2p
    return figures


# Runs in its own process on core 0: two net ports, prints port 1's receive rate.
P2P_BACKEND = """
import sys, threading, time
from iovirt.vhost_user.server import VhostUserServer
from iovirt.virtio.net.device import VirtioNet
from iovirt.virtio.net.switch import LearningSwitch
s0, s1, run = sys.argv[1], sys.argv[2], float(sys.argv[3])
workers = int(sys.argv[4]) if len(sys.argv) > 4 else 1
sw = LearningSwitch(); srv = VhostUserServer(workers=workers)
ports = [VirtioNet(bytes([0x52, 0x54, 0, 0, 0, i]), sw, label=f"p{i}") for i in range(2)]
for sock, port in zip((s0, s1), ports):
    endpoint = srv.add_socket(sock, port)
    if workers > 1:  # as iovirt serve --workers does: each port on its own worker
        sw.set_owner(port, endpoint.worker, srv.dataplane.home)
threading.Thread(target=srv.serve_forever, daemon=True).start()
best = 0.0
end = time.monotonic() + run
def received():
    with srv.dataplane.lock:  # what the workers' kick jobs moved is counted in first
        return ports[1].stats["rx_packets"]
last = received(); t = time.monotonic()
while time.monotonic() < end:
    time.sleep(1)
    now, cur = time.monotonic(), received()
    best = max(best, (cur - last) / (now - t)); last, t = cur, now
print(f"rx_per_s={best:.0f} stats={dict(ports[1].stats)}", flush=True)
srv.stop()
"""


# -- blk -------------------------------------------------------------------------------------


def blk_figures(tmp: Path, seconds: float) -> dict[str, float]:
    from iovirt.virtio.blk.defs import SECTOR_SIZE

    size = 256 << 20
    with numbered_image(size) as image:
        sectors = size // SECTOR_SIZE
        our_runs, their_runs = _alternately(
            lambda run: _iovirt_reads(tmp / f"iovirt-blk-{run}.sock", image, sectors, seconds, tmp / "iovirt-blk.log"),
            lambda run: _qsd_reads(tmp / f"qsd-blk-{run}.sock", image, False, sectors, seconds, tmp / "qsd.log"),
        )
        ours, theirs = max(our_runs), max(their_runs)
        print(f"blk 4 KiB random read, QD32, /dev/shm: iovirt {ours:,.0f} IOPS   "
              f"qemu-storage-daemon {theirs:,.0f} IOPS   ratio {ours / theirs:.2f}  "
              f"(best of runs: iovirt {_runs(our_runs)}, qemu-storage-daemon {_runs(their_runs)})")
        figures = {"blk_4k_randread_iops": ours, "qsd_4k_randread_iops": theirs,
                   "ratio_blk_vs_qsd": round(ours / theirs, 3)}
        with tempfile.TemporaryDirectory(prefix="iovirt-bench-", dir=os.environ.get("TMPDIR", "/var/tmp")) as disk:
            regular = Path(disk) / "bench.img"
            shutil.copyfile(image, regular)
            figures.update(_blk_odirect_figures(tmp, regular, size // SECTOR_SIZE, seconds))
    return figures


def _iovirt_reads(sock: Path, image: Path, sectors: int, seconds: float, log: Path) -> float:
    """IOPS of the 4 KiB random-read front-end against ``iovirt serve --blk`` on ``image``."""
    backend = serve_iovirt(["--blk", f"{sock},{image}"], log)
    wait_socket(sock, backend)
    try:
        return blk_run(sock, sectors, seconds)
    finally:
        stop_process(backend, signal.SIGTERM)


def _qsd_reads(sock: Path, image: Path, direct: bool, sectors: int, seconds: float, log: Path) -> float:
    """The same against ``qemu-storage-daemon`` exporting ``image`` (``cache.direct`` as ``direct`` says)."""
    peer = subprocess.Popen(
        ["taskset", "-c", "0", QSD, "--blockdev",
         f"driver=file,node-name=f,filename={image},cache.direct={'on' if direct else 'off'}",
         "--export", f"type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={sock},writable=on"],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT,
    )
    wait_socket(sock, peer)
    try:
        return blk_run(sock, sectors, seconds)
    finally:
        stop_process(peer, signal.SIGTERM)


def _blk_odirect_figures(tmp: Path, image: Path, sectors: int, seconds: float) -> dict[str, float]:
    """4 KiB random reads, QD32, on a regular file with the page cache bypassed (O_DIRECT both sides)."""
    # iovirt opens an image O_DIRECT wherever its file system allows it: make sure this one does.
    os.close(os.open(image, os.O_RDONLY | os.O_DIRECT))
    ours = _iovirt_reads(tmp / "iovirt-blk-direct.sock", image, sectors, seconds, tmp / "iovirt-blk-direct.log")
    theirs = _qsd_reads(tmp / "qsd-blk-direct.sock", image, True, sectors, seconds, tmp / "qsd-direct.log")
    print(f"blk 4 KiB random read, QD32, regular file, O_DIRECT: iovirt {ours:,.0f} IOPS   "
          f"qemu-storage-daemon (cache.direct=on) {theirs:,.0f} IOPS   ratio {ours / theirs:.2f}")
    return {"blk_4k_randread_iops_odirect": ours, "qsd_4k_randread_iops_odirect": theirs,
            "ratio_blk_odirect_vs_qsd": round(ours / theirs, 3)}


# -- dirty logging ------------------------------------------------------------------------


def _net_tx_frontend(sock: str, seconds: float, out, log: bool) -> None:
    """Transmit 64-byte frames to an unknown MAC (the switch sinks them) as fast as the back-end takes them."""
    os.sched_setaffinity(0, {1})
    from iovirt.vhost_user.driver import VhostUserDriver

    with VhostUserDriver(sock, features=NO_EVENT_IDX) as drv:  # no EVENT_IDX
        rx, tx = drv.start_queues([0, 1], size=256).values()
        frame = bytes.fromhex("020000dead01") + bytes.fromhex("020000beef01") + b"\x88\xb5" + bytes(50)
        for _ in range(256):
            tx.add_data([bytes(12) + frame])
        tx.set_interrupts(False)
        dirty_log = drv.start_logging() if log else None
        drv.kick(1)
        used_idx_view = drv.memory.view(tx.used_addr + 2, 2).cast("H")
        avail_idx_view = drv.memory.view(tx.avail_addr + 2, 2).cast("H")
        seen = used_idx_view[0]
        sent = 0
        start = time.monotonic()
        end = start + seconds
        while time.monotonic() < end:
            used = used_idx_view[0]
            n = (used - seen) & 0xFFFF
            if n:
                # In-order completion: the avail slots keep their heads, re-posting is an idx bump.
                seen = used
                avail_idx_view[0] = (avail_idx_view[0] + n) & 0xFFFF
                drv.frontend.kick(1)
                sent += n
        elapsed = time.monotonic() - start
        used_idx_view.release()
        avail_idx_view.release()
        tx._inflight.clear()
        if dirty_log is not None and not any(dirty_log):
            raise RuntimeError("LOG_ALL on, but nothing was logged")
    out.put(sent / elapsed)


ROUNDS = 3  # off/on runs alternate; the best of each counts


def logging_figures(tmp: Path, seconds: float) -> dict[str, float]:
    """The 64 B sink and blk 4 KiB reads with LOG_ALL off and on, against one back-end each."""
    from iovirt.virtio.blk.defs import SECTOR_SIZE

    figures: dict[str, float] = {}
    sock = tmp / "iovirt-log-net.sock"
    backend = serve_iovirt(["--net", str(sock)], tmp / "iovirt-log-net.log")
    wait_socket(sock, backend)
    ctx = mp.get_context("spawn")
    try:
        rates = [0.0, 0.0]
        for _ in range(ROUNDS):
            for log in (False, True):
                out = ctx.Queue()
                proc = ctx.Process(target=_net_tx_frontend, args=(str(sock), seconds, out, log))
                proc.start()
                rates[log] = max(rates[log], out.get(timeout=seconds + 60))
                proc.join(10)
    finally:
        stop_process(backend, signal.SIGTERM)
    figures["net_64B_frames_per_s_log_off"], figures["net_64B_frames_per_s_log_on"] = rates
    figures["logging_slowdown_net_64B"] = round(rates[0] / rates[1], 3)
    size = 64 << 20
    with numbered_image(size) as image:
        sock = tmp / "iovirt-log-blk.sock"
        backend = serve_iovirt(["--blk", f"{sock},{image}"], tmp / "iovirt-log-blk.log")
        wait_socket(sock, backend)
        try:
            iops = [0.0, 0.0]
            for _ in range(ROUNDS):
                for log in (False, True):
                    iops[log] = max(iops[log], blk_run(sock, size // SECTOR_SIZE, seconds, log))
        finally:
            stop_process(backend, signal.SIGTERM)
    figures["blk_4k_iops_log_off"], figures["blk_4k_iops_log_on"] = iops
    figures["logging_slowdown_blk_4k"] = round(iops[0] / iops[1], 3)
    print(f"dirty logging (LOG_ALL on/off time ratio): net 64 B sink {rates[0]:,.0f} -> {rates[1]:,.0f} frames/s "
          f"({figures['logging_slowdown_net_64B']:.2f}x); blk 4 KiB reads {iops[0]:,.0f} -> {iops[1]:,.0f} IOPS "
          f"({figures['logging_slowdown_blk_4k']:.2f}x)")
    return figures


def counters_figures(tmp: Path, seconds: float) -> dict[str, float]:
    """The 64 B sink with the port's counters off and on (``iovirt ctl counting``), against one back-end."""
    from iovirt.control.cli import request

    sock, control = tmp / "iovirt-counters.sock", tmp / "iovirt-counters.ctl"
    backend = serve_iovirt(["--net", str(sock), "--control", str(control)], tmp / "iovirt-counters.log")
    wait_socket(sock, backend)
    wait_socket(control, backend)
    ctx = mp.get_context("spawn")
    rates = [0.0, 0.0]  # off, on
    try:
        for _ in range(ROUNDS):
            for counting in (False, True):
                request(str(control), "counting", {"device": "net0", "enabled": counting})
                out = ctx.Queue()
                proc = ctx.Process(target=_net_tx_frontend, args=(str(sock), seconds, out, False))
                proc.start()
                rates[counting] = max(rates[counting], out.get(timeout=seconds + 60))
                proc.join(10)
    finally:
        stop_process(backend, signal.SIGTERM)
    cost = rates[0] / rates[1]
    print(f"counters (off/on time ratio): net 64 B sink {rates[0]:,.0f} -> {rates[1]:,.0f} frames/s ({cost:.3f}x)")
    return {"net_64B_frames_per_s_counters_off": rates[0], "net_64B_frames_per_s_counters_on": rates[1],
            "counters_cost_net_64B": round(cost, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measuring time per figure (default 5)")
    parser.add_argument("--only", choices=["net", "poll", "workers", "packed", "blk", "logging", "counters"],
                        help="run only the net, poll (the 64 B sink with --poll-us), workers (port to port on one "
                             "worker and on two), packed-versus-split, blk, logging or counters figures")
    args = parser.parse_args()
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="iovirt-bench-") as tmp:
        if args.only in (None, "net"):
            figures.update(net_figures(Path(tmp), args.seconds))
        if args.only in (None, "poll"):
            figures.update(poll_figures(Path(tmp), args.seconds))
        if args.only in (None, "workers"):
            figures.update(workers_figures(Path(tmp), args.seconds))
        if args.only in (None, "packed"):
            figures.update(packed_figures(Path(tmp), args.seconds))
        if args.only in (None, "blk"):
            figures.update(blk_figures(Path(tmp), args.seconds))
        if args.only in (None, "logging"):
            figures.update(logging_figures(Path(tmp), args.seconds))
        if args.only in (None, "counters"):
            figures.update(counters_figures(Path(tmp), args.seconds))
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}))


if __name__ == "__main__":
    main()
