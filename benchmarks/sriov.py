"""SR-IOV: enabling and enumerating VFs, and frames between two VFs through the switch.

- ``init_ms``: Linux's ``sriov_init`` on the PF (System Page Size, VF BAR
  sizing, the NumVFs walk from TotalVFs down to 1 re-reading Offset/Stride);
- ``enable_enumerate_ms``: ``sriov_enable`` of TotalVFs VFs (NumVFs, VF
  Enable|MSE, every VF put on the bus and read back at its routing ID)
  followed by ``sriov_disable`` (every VF taken off and reset);
- ``vf_bring_up_ms``: one VF's virtio-pci bring-up (probe, features,
  MSI-X, two queues, DRIVER_OK) through its VF BARs, mean over 14 VFs;
- ``vf_to_vf_frames_per_s``: 64-byte frames from VF 0's transmitq to VF 1's
  receiveq through the learning switch, with the MSI-X interrupts serviced,
  on the whole in-process platform (config and MMIO through the host); at
  most 6000 frames per run (the platform's driver never frees DMA buffers).

Prints one line per figure and, last, one JSON object of all figures.

    python benchmarks/sriov.py [--total-vfs 64] [--seconds 1.0]
"""

from __future__ import annotations

import argparse
import json
import time

from iovirt.platform import Platform, VirtioNetDriver
from iovirt.sriov.machine import PF_MAC, SriovNetMachine
from iovirt.sriov.virtio_net import vf_mac
from iovirt.timer.testing import fake_multiplexer

BATCH = 32
BRING_UP_VFS = 14  # distinct VFs brought up for vf_bring_up_ms
# The platform's driver takes a fresh DMA buffer for every frame and reposted
# receive buffer and never frees one, so a run is capped to fit its memory.
MAX_FRAMES = 6000


def _mean_ms(op, seconds: float) -> float:
    runs = 0
    start = time.perf_counter()
    while True:
        op()
        runs += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return 1000 * elapsed / runs


def bench(total_vfs: int, seconds: float) -> dict[str, float]:
    mux, _clock = fake_multiplexer()
    with SriovNetMachine(total_vfs, platform=Platform((), mux=mux)) as machine:
        iov = machine.iov
        figures = {"total_vfs": float(total_vfs), "init_ms": _mean_ms(iov.init, seconds)}
        iov.init()
        machine.bring_up_pf()

        def cycle() -> None:
            vfs = machine.sriov_configure(total_vfs)
            assert len(vfs) == total_vfs
            machine.sriov_configure(0)

        figures["enable_enumerate_ms"] = _mean_ms(cycle, seconds)
        vfs = machine.sriov_configure(total_vfs)

        # Each VF once: vectors and ring memory are never given back by the platform.
        targets = vfs[2 : 2 + BRING_UP_VFS]
        start = time.perf_counter()
        for vf in targets:
            machine.vf_driver(vf).bring_up(queue_size=64)
        figures["vf_bring_up_ms"] = 1000 * (time.perf_counter() - start) / len(targets)
        figures["vf_to_vf_frames_per_s"] = _frames_per_s(machine, vfs, seconds)
    return {k: round(v, 3) for k, v in figures.items()}


def _frames_per_s(machine: SriovNetMachine, vfs, seconds: float) -> float:
    drivers = [machine.vf_driver(vf) for vf in vfs[:2]]
    for driver in drivers:
        driver.bring_up(queue_size=256)
    a, b = (VirtioNetDriver(d) for d in drivers)
    b.post_rx(4 * BATCH)
    src, dst = vf_mac(PF_MAC, 0), vf_mac(PF_MAC, 1)
    b.send(b"\xff" * 6 + dst + b"\x88\xb5" + bytes(46))  # the switch learns VF 1
    a.post_rx(BATCH)
    a.receive()
    frame = dst + src + b"\x88\xb5" + bytes(50)
    received = 0
    start = time.perf_counter()
    while True:
        for _ in range(BATCH):
            a.send(frame)
        a.tx_completed()
        received += len(b.receive())
        machine.platform.service_interrupts()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds or received >= MAX_FRAMES:
            break
    assert received, "no frame crossed the switch"
    return received / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--total-vfs", type=int, default=64, help="TotalVFs of the PF (16-224)")
    parser.add_argument("--seconds", type=float, default=1.0, help="time per figure")
    args = parser.parse_args()
    figures = bench(args.total_vfs, args.seconds)
    for name, value in figures.items():
        print(f"{name:>24}: {value:>14,.3f}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
