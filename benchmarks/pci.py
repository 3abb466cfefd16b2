"""PCI model throughput: config-space dword reads/writes and MSI-X deliveries.

Config accesses go through the host's ECAM window (decode, bus routing,
function, config space), like a guest's; MSI-X deliveries go from
``PciFunction.raise_interrupt`` through the capability and table to a
counting :class:`~iovirt.pci.msi.MsiSink`.  The platform figures send a
virtio-net queue's used-buffer interrupt through the whole in-process
platform: virtio-pci transport, MSI-X table, InterruptRouter (and with
``_remapped``, the VT-d interrupt remapper's IRTE lookup) into a vLAPIC's
IRR.  Prints one line per figure and, last, one JSON object of all figures.

    python benchmarks/pci.py [--seconds 1.0]
"""

from __future__ import annotations

import argparse
import json
import time

from iovirt.pci.host import PciHost
from iovirt.pci.topology import build_default_host
from iovirt.platform import Platform
from iovirt.virtio.net.device import VirtioNet


class CountingSink:
    """An MsiSink that only counts."""

    def __init__(self) -> None:
        self.count = 0

    def deliver_msi(self, source_id: int, address: int, data: int) -> None:
        self.count += 1


def _rate(op, seconds: float, batch: int = 2000) -> float:
    done = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(batch):
            op()
        done += batch
        now = time.perf_counter()
        if now >= deadline:
            return done / (now - start)


def bench(seconds: float) -> dict[str, float]:
    sink = CountingSink()
    host: PciHost = build_default_host(msi_sink=sink)
    fn = host.root_bus.function(2, 0)
    assert fn is not None and fn.msix is not None
    vendor = 2 << 15  # 00:02.0, offset 0
    interrupt_line = vendor | 0x3C
    figures = {
        "cfg_read_per_s": _rate(lambda: host.ecam_read(vendor, 4), seconds),
        "cfg_write_per_s": _rate(lambda: host.ecam_write(interrupt_line, 4, 0x0000010B), seconds),
    }
    # Program vector 0 through BAR0 MMIO, enable MSI-X.
    table = fn.bars[0]
    assert table is not None
    host.mmio_write(table.address, 8, 0xFEE0_0000)
    host.mmio_write(table.address + 8, 4, 0x41)
    host.mmio_write(table.address + 12, 4, 0)
    fn.config_write(fn.msix.offset + 2, 2, 0x8000)
    figures["msix_per_s"] = _rate(lambda: fn.raise_interrupt(0), seconds)
    assert sink.count > 0
    figures["mmio_read_per_s"] = _rate(lambda: host.mmio_read(table.address + 8, 4), seconds)
    figures["platform_msix_per_s"] = _platform_msix_rate(seconds, remapped=False)
    figures["platform_msix_remapped_per_s"] = _platform_msix_rate(seconds, remapped=True)
    return {k: round(v) for k, v in figures.items()}


def _platform_msix_rate(seconds: float, remapped: bool) -> float:
    """Used-buffer interrupts of a brought-up virtio-net's RX queue into a vLAPIC per second."""
    with Platform([VirtioNet(bytes.fromhex("525400000001"))], iommu=remapped) as platform:
        if remapped:
            platform.enable_iommu()
        function = platform.functions[0]
        platform.driver(function).bring_up(queue_size=64)
        before = platform.router.delivered
        rate = _rate(lambda: function.queue_interrupt(0), seconds)
        assert platform.router.delivered > before and platform.router.blocked == 0
        return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="time per figure")
    args = parser.parse_args()
    figures = bench(args.seconds)
    for name, value in figures.items():
        print(f"{name:>28}: {value:>12,}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
