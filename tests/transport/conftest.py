"""Fixtures for the virtio-pci transport tests: the transport alone on a PCI host, MSIs recorded."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from iovirt.memory import GuestMemory
from iovirt.pci.host import PciHost
from iovirt.pci.testing import RecordingMsiSink
from iovirt.pci.topology import build_default_host
from iovirt.virtio import device as device_mod
from iovirt.virtio.blk.device import VirtioBlk
from iovirt.virtio.net.device import VirtioNet
from iovirt.virtio.transport import VirtioPciFunction
from iovirt.virtio.transport.pci import VIRTIO_BAR

MAC = bytes.fromhex("525400000001")
MEM_SIZE = 0x400000


@dataclass
class Rig:
    """A host with virtio-net at 00:03.0 and virtio-blk at 00:04.0, BARs assigned, MSIs recorded."""

    host: PciHost
    memory: GuestMemory
    sink: RecordingMsiSink
    net: VirtioPciFunction
    blk: VirtioPciFunction

    def bar(self, fn: VirtioPciFunction, index: int = VIRTIO_BAR) -> int:
        bar = fn.bars[index]
        assert bar is not None
        return bar.address

    def common(self, fn: VirtioPciFunction) -> int:
        return self.bar(fn)


@pytest.fixture
def ring_impl(queue_cls, monkeypatch):
    """Devices started through the transport use ``queue_cls`` (python or cython)."""
    monkeypatch.setattr(device_mod, "SplitQueue", queue_cls)
    return queue_cls


@pytest.fixture
def rig(tmp_path):
    memory = GuestMemory.from_ranges([(0, MEM_SIZE)])
    blk_dev = VirtioBlk(str(tmp_path / "disk.img"), size=1 << 20)
    net = VirtioPciFunction(VirtioNet(MAC), memory)
    blk = VirtioPciFunction(blk_dev, memory)
    sink = RecordingMsiSink()

    def add(bus):
        bus.add_function(net, 3)
        bus.add_function(blk, 4)

    host = build_default_host(msi_sink=sink, add_devices=add)
    yield Rig(host, memory, sink, net, blk)
    net.reset()
    blk.reset()
    blk_dev.close()
    memory.close()
