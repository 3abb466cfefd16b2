"""A live virtqueue behind the IOMMU: the device pops and reads buffers through an IOVA view;
the driver remaps a buffer page while traffic flows; the old mapping is served until invalidated."""

from __future__ import annotations

import pytest

from iovirt.errors import IovirtError
from iovirt.memory import BumpAllocator
from iovirt.virtio.chain import read_chain
from iovirt.virtio.driver import DriverQueue
from iovirt.vtd import VtdDriver
from iovirt.vtd import regs as R
from iovirt.vtd.faults import FR_READ
from iovirt.vtd.tables import PTE_R, PTE_W

SID = 0x0008  # 00:01.0
RINGS = (0x10_0000, 0x10_0000)  # identity-mapped ring area (IOVA == GPA)
BUF_IOVA = 0x4000_0000
P1, P2 = 0x30_0000, 0x30_1000


@pytest.mark.parametrize("flush", ["queued", "registers"])
def test_buffer_remap_is_stale_until_invalidated(queue_cls, unit, mem, alloc, flush):
    drv = VtdDriver(unit, mem, alloc, queued_invalidation=flush == "queued")
    drv.init()
    dom = drv.create_domain(1)
    drv.attach(SID, dom)
    drv.map(dom, RINGS[0], RINGS[0], RINGS[1], PTE_R | PTE_W)
    drv.map(dom, BUF_IOVA, P1, 0x1000, PTE_R)
    drv.enable_translation()

    guest = DriverQueue(mem, BumpAllocator(*RINGS), 16)
    dev_mem = mem.with_translator(unit.dma_translator(SID))
    device = queue_cls.from_state(dev_mem, guest.state())

    def send() -> bytes:
        guest.add_chain(readable=[(BUF_IOVA, 8)])
        guest.publish()
        chain = device.pop()
        data = read_chain(dev_mem, chain)
        device.push(chain.head, 0)
        assert guest.get_used()[0].head == chain.head
        return data

    mem.write(P1, b"first..!")
    assert send() == b"first..!"
    # The guest moves the buffer page and rewrites both pages, but does not flush yet.
    drv.map(dom, BUF_IOVA, P2, 0x1000, PTE_R)
    mem.write(P1, b"stale..!")
    mem.write(P2, b"second.!")
    for _ in range(3):  # traffic keeps flowing through the cached translation
        assert send() == b"stale..!"
    drv.flush_iotlb(dom, BUF_IOVA, 0x1000)
    assert send() == b"second.!"
    # Unmapped and flushed: the device's access fails (the ring code checks buffers
    # at pop time) and the IOMMU records a read fault for the device.
    drv.unmap(dom, BUF_IOVA, 0x1000)
    guest.add_chain(readable=[(BUF_IOVA, 8)])
    guest.publish()
    with pytest.raises(IovirtError):
        read_chain(dev_mem, device.pop())
    hi = unit.mmio_read(R.FRCD + 8, 8)
    assert (hi >> 32) & 0xFF == FR_READ and hi & 0xFFFF == SID
    assert unit.mmio_read(R.FRCD, 8) == BUF_IOVA
