#!/usr/bin/env python3
"""DMA translation through the VT-d model, batched through the accelerated ring: hits, misses, slowdown.

The ring benchmark's loop (``benchmarks/ring.py``: 1-descriptor chains, a
queue of 256 with VIRTIO_F_EVENT_IDX, the device pops batches of 32, pushes
them to the used ring and asks whether to notify) run three ways, in one run:

- untranslated: the device sees guest-physical memory (the baseline);
- IOMMU on, IOTLB warm: every buffer is translated by a hit in the device's
  C-level IOTLB (``hit_per_s``);
- IOMMU on, IOTLB invalidated before every batch (a domain-selective
  invalidation through the invalidation queue, as Linux's intel-iommu sends
  it): every buffer lies on its own 4 KiB page, so every buffer is a miss
  that walks the 4-level second-level table (``miss_per_s``), served by the
  device translator's miss handler (C, ``iovirt.vtd._dma_c``, when built).
  Only the ring work is timed, not the invalidations (their cost is printed
  apart).

One translation per chain: the ring parts are translated once, at setup.
``ring_slowdown`` is untranslated chains/s over warm translated chains/s.
The last line is a JSON object of the figures.

    python benchmarks/vtd.py [--seconds S]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

from iovirt.memory import BumpAllocator, GuestMemory
from iovirt.virtio.driver import DriverQueue
from iovirt.virtio.queue import implementations
from iovirt.vtd import DmaTranslator, VtdDriver, VtdUnit
from iovirt.vtd.tables import AW_48, PTE_R, PTE_W

QUEUE_SIZE = 256
BATCH = 32
SID = 0x0008  # 00:01.0
MEM_SIZE = 1 << 24
RING_AREA = (0x10_0000, 0x10_0000)  # identity-mapped (IOVA == GPA): rings, as dma_alloc_coherent gives
BUF_GPA = 0x40_0000
BUF_IOVA = 0x7F_0000_0000  # high in the 48-bit space: the walk reads all four levels
TABLES = (0x80_0000, 0x80_0000)


class Bench:
    """One guest memory, one VT-d unit and driver, one ring whose chains each use their own page."""

    def __init__(self, translated: bool) -> None:
        self.memory = GuestMemory.from_ranges([(0, MEM_SIZE)])
        self.unit = VtdUnit(self.memory)
        self.vtd = VtdDriver(self.unit, self.memory, BumpAllocator(*TABLES))
        self.vtd.init()
        self.domain = self.vtd.create_domain(1, AW_48)
        self.vtd.attach(SID, self.domain)
        self.vtd.map(self.domain, RING_AREA[0], RING_AREA[0], RING_AREA[1], PTE_R | PTE_W)
        self.vtd.map(self.domain, BUF_IOVA, BUF_GPA, QUEUE_SIZE * 0x1000, PTE_R | PTE_W)
        base = BUF_IOVA if translated else BUF_GPA
        if translated:
            self.vtd.enable_translation()
        self.driver = DriverQueue(self.memory, BumpAllocator(*RING_AREA), QUEUE_SIZE, event_idx=True)
        heads = [self.driver.add_chain([(base + 0x1000 * c, 64)]) for c in range(QUEUE_SIZE)]
        self.driver.set_avail_idx(len(heads))
        self.avail_idx = len(heads)
        self.translator = self.unit.dma_translator(SID)
        dev_memory = self.memory.with_translator(self.translator) if translated else self.memory
        self.device = implementations()["cython"].from_state(dev_memory, self.driver.state())

    def run(self, seconds: float, invalidate: bool) -> tuple[float, float]:
        """(chains/s of ring work, seconds spent invalidating per batch)."""
        device = self.device
        avail_idx = self.memory.view(self.driver.avail_addr + 2, 2).cast("H")
        idx = self.avail_idx
        batch = device.pop_batch(0)
        done = 0
        ring_time = flush_time = 0.0
        flushes = 0
        clock = time.perf_counter
        deadline = clock() + seconds
        while clock() < deadline:
            if invalidate:
                t0 = clock()
                self.vtd.flush_iotlb_domain(self.domain)
                flushes += 1
                t1 = clock()
                flush_time += t1 - t0
                batch = device.pop_batch(BATCH, batch)
                device.push_batch(batch)
                device.need_notify()
                ring_time += clock() - t1
                n = len(batch)
            else:
                t0 = clock()
                n = 0
                for _ in range(64):
                    batch = device.pop_batch(BATCH, batch)
                    device.push_batch(batch)
                    device.need_notify()
                    n += len(batch)
                    idx = (idx + len(batch)) & 0xFFFF
                    avail_idx[0] = idx
                ring_time += clock() - t0
                done += n
                continue
            done += n
            idx = (idx + n) & 0xFFFF
            avail_idx[0] = idx
        avail_idx.release()
        self.avail_idx = idx
        return done / ring_time, (flush_time / flushes if flushes else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measurement (default 2)")
    args = parser.parse_args()
    if "cython" not in implementations():
        raise SystemExit("the Cython queue extension is not built: pip install -e .")
    print(f"machine: {platform.machine()}, {platform.python_implementation()} {platform.python_version()}")
    print(f"queue size {QUEUE_SIZE}, batches of {BATCH}, 1-descriptor chains (one 4 KiB page each), EVENT_IDX on")
    base = DmaTranslator.__mro__[1]
    print(f"IOTLB-miss handler: {base.__module__}.{base.__name__}")

    plain = Bench(translated=False).run(args.seconds, invalidate=False)[0]
    print(f"untranslated ring:          {plain:>12,.0f} chains/s (baseline)")

    warm = Bench(translated=True)
    hits_before = warm.translator.cache.hits
    hit = warm.run(args.seconds, invalidate=False)[0]
    assert warm.translator.cache.hits > hits_before, "the ring did not translate through the C IOTLB"
    print(f"IOMMU on, IOTLB hits:       {hit:>12,.0f} translations/s (= chains/s)")

    cold = Bench(translated=True)
    walks_before = cold.translator.cache.misses
    miss, flush = cold.run(args.seconds, invalidate=True)
    assert cold.translator.cache.misses > walks_before, "no miss was taken"
    print(f"IOMMU on, IOTLB misses:     {miss:>12,.0f} translations/s (4-level walk each; "
          f"plus {flush * 1e6:,.1f} us per queued domain invalidation, not counted)")

    slowdown = plain / hit
    print(f"ring slowdown with translation (hits): {slowdown:.2f}x")
    print(json.dumps({
        "hit_per_s": round(hit),
        "miss_per_s": round(miss),
        "ring_slowdown": round(slowdown, 2),
        "untranslated_chains_per_s": round(plain),
        "invalidation_us": round(flush * 1e6, 1),
    }))


if __name__ == "__main__":
    main()
