#!/usr/bin/env python3
"""Device-side split-ring throughput: Cython vs the pure-Python reference, one run.

For 1-descriptor and 4-descriptor chains on a queue of 256 with
VIRTIO_F_EVENT_IDX, the device pops batches of 32 chains, pushes them to the
used ring and asks whether to notify; the driver side re-publishes the same
chains by advancing avail idx (its slots never change, so the driver costs one
16-bit store per batch).  Prints chains/s per implementation and the ratio;
the ceiling is the same pop, push and notify decision in plain C on the same
layout (``ring_ceiling.c``, compiled here with ``gcc -O2``).  The Cython queue
runs twice: called from Python once per batch (what a device in Python pays),
and through its C interface from a C loop (``ring_loop.pyx``, compiled here):
``ratio_cython_vs_c`` (issue 15: ≥ 0.7) is the latter's share of the ceiling,
``ratio_cython_from_python_vs_c`` the former's.  The last line is a JSON
object of the figures.

    python benchmarks/ring.py [--seconds S]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import tempfile
import time
from pathlib import Path

from iovirt.memory import BumpAllocator, GuestMemory
from iovirt.virtio.driver import DriverQueue
from iovirt.virtio.queue import implementations

QUEUE_SIZE = 256
BATCH = 32


def posted_ring(queue_cls, descs_per_chain: int):
    """A device queue of ``queue_cls`` over a ring whose every chain is posted; ``(queue, avail idx view, chains)``."""
    memory = GuestMemory.from_ranges([(0, 1 << 22)])
    alloc = BumpAllocator(0x1000, (1 << 22) - 0x1000)
    drv = DriverQueue(memory, alloc, QUEUE_SIZE, event_idx=True)
    nchains = QUEUE_SIZE // descs_per_chain
    buf = alloc.alloc(2048 * nchains)
    heads = [
        drv.add_chain([(buf + 2048 * c + 64 * k, 64) for k in range(descs_per_chain)]) for c in range(nchains)
    ]
    # Fill every avail slot with the chain it will always hold when chains are
    # re-posted in FIFO order, so re-posting is only an avail idx bump.
    for slot in range(nchains, QUEUE_SIZE):
        drv.post_head(heads[slot % nchains])
    drv.set_avail_idx(nchains)
    dev = queue_cls.from_state(memory, drv.state())
    return dev, memory.view(drv.avail_addr + 2, 2).cast("H"), nchains


def measure(queue_cls, descs_per_chain: int, seconds: float) -> float:
    """Chains per second popped and pushed by ``queue_cls``."""
    dev, avail_idx, idx = posted_ring(queue_cls, descs_per_chain)
    batch = dev.pop_batch(0)
    done = 0
    rounds = 64
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(rounds):
            batch = dev.pop_batch(BATCH, batch)
            dev.push_batch(batch)
            dev.need_notify()
            done += len(batch)
            idx = (idx + len(batch)) & 0xFFFF
            avail_idx[0] = idx
        now = time.perf_counter()
        if now >= deadline:
            break
    elapsed = now - start
    avail_idx.release()
    return done / elapsed


def build_loop(directory: Path):
    """``ring_loop.pyx`` compiled against the installed package's ``_queue_c.pxd``; the module."""
    import importlib.util
    import sys

    import iovirt

    source = Path(__file__).with_name("ring_loop.pyx")
    package_root = str(Path(iovirt.__file__).resolve().parent.parent)
    subprocess.run([sys.executable, "-m", "cython", "-3", "-I", package_root, "-o", str(directory / "ring_loop.c"),
                    str(source)], check=True)
    include = subprocess.run([sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['include'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    suffix = subprocess.run([sys.executable, "-c", "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))"],
                            check=True, capture_output=True, text=True).stdout.strip()
    lib = directory / f"ring_loop{suffix}"
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", f"-I{include}", "-o", str(lib), str(directory / "ring_loop.c")],
                   check=True)
    spec = importlib.util.spec_from_file_location("ring_loop", lib)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure_c_interface(loop, queue_cls, descs_per_chain: int, seconds: float) -> float:
    """Chains per second of the Cython queue driven through its C interface (``ring_loop.pyx``)."""
    from iovirt.virtio.queue import ChainBatch

    dev, avail_idx, _ = posted_ring(queue_cls, descs_per_chain)
    batch = ChainBatch()
    done = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        done += loop.run(dev, batch, avail_idx, BATCH, 4096)
        now = time.perf_counter()
        if now >= deadline:
            break
    avail_idx.release()
    return done / (now - start)


def c_ceiling(descs_per_chain: int, seconds: float) -> float:
    """Chains per second of ``ring_ceiling.c`` (compiled into a temporary directory)."""
    source = Path(__file__).with_name("ring_ceiling.c")
    with tempfile.TemporaryDirectory(prefix="iovirt-ring-") as tmp:
        binary = Path(tmp) / "ring_ceiling"
        subprocess.run(["gcc", "-O2", "-o", str(binary), str(source)], check=True)
        out = subprocess.run([str(binary), str(descs_per_chain), str(seconds)], check=True,
                             capture_output=True, text=True).stdout
    return float(out.split()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="time per Cython measurement (default 2)")
    args = parser.parse_args()
    impls = implementations()
    if "cython" not in impls:
        raise SystemExit("the Cython queue extension is not built: pip install -e .")
    print(f"machine: {platform.machine()}, {platform.python_implementation()} {platform.python_version()}")
    print(f"queue size {QUEUE_SIZE}, batches of {BATCH}, EVENT_IDX on; pop + push used + need_notify")
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="iovirt-ring-loop-") as tmp:
        loop = build_loop(Path(tmp))
        for n in (1, 4):
            cy = measure(impls["cython"], n, args.seconds)
            py = measure(impls["python"], n, max(args.seconds / 4, 0.5))
            cc = measure_c_interface(loop, impls["cython"], n, args.seconds)
            c = c_ceiling(n, args.seconds)
            print(f"{n}-descriptor chains: cython from Python {cy:,.0f} chains/s   reference {py:,.0f} chains/s   "
                  f"ratio {cy / py:.1f}x   cython through its C interface {cc:,.0f} chains/s   plain C {c:,.0f} "
                  f"chains/s   cython/C {cc / c:.2f} (from Python: {cy / c:.2f})")
            suffix = "" if n == 1 else f"_{n}desc"
            figures[f"cython_chains_per_s{suffix}"] = round(cy)
            figures[f"reference_chains_per_s{suffix}"] = round(py)
            figures[f"ratio{suffix}"] = round(cy / py, 1)
            figures[f"cython_c_interface_chains_per_s{suffix}"] = round(cc)
            figures[f"c_chains_per_s{suffix}"] = round(c)
            figures[f"ratio_cython_vs_c{suffix}"] = round(cc / c, 3)
            figures[f"ratio_cython_from_python_vs_c{suffix}"] = round(cy / c, 3)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
