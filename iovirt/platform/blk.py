"""Block requests to a virtio-blk device through its driver (virtio 1.2 5.2.6).

A request is a chain: the 16-byte header (``type``, ``reserved``,
``sector``) and any data to write device-readable, then any buffer to read
into and the status byte device-writable.  The in-process transport serves a
request while the notify write runs, so each call here completes it.
"""

from __future__ import annotations

from iovirt.platform.errors import VirtioDriverError
from iovirt.platform.virtio_driver import VirtioPciDriver
from iovirt.virtio.blk.defs import REQ_HDR, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT

REQUEST_QUEUE = 0
PAGE_SIZE = 4096


class VirtioBlkDriver:
    """Read, write and flush sectors of a brought-up virtio-blk device."""

    def __init__(self, driver: VirtioPciDriver, index: int = REQUEST_QUEUE) -> None:
        self.driver = driver
        self.index = index
        self.queue = driver.queues[index]

    def request(self, rtype: int, sector: int, out: bytes = b"", in_size: int = 0) -> tuple[int, bytes]:
        """Submit one request and wait for it; returns ``(status, data read)``."""
        memory, alloc = self.queue.memory, self.queue.alloc
        hdr = alloc.alloc(REQ_HDR.size)
        memory.write(hdr, REQ_HDR.pack(rtype, 0, sector))
        readable = [(hdr, REQ_HDR.size)]
        writable = []
        if out:
            # Data buffers are whole pages, as a block layer's are (and an IOMMU maps them page by page).
            readable.append((alloc.alloc(len(out), PAGE_SIZE), len(out)))
            memory.write(readable[-1][0], out)
        if in_size:
            writable.append((alloc.alloc(in_size, PAGE_SIZE), in_size))
        writable.append((alloc.alloc(1), 1))
        head = self.queue.add_chain(readable, writable)
        self.driver.kick(self.index)
        for used in self.queue.get_used():
            if used.head == head:
                # The status byte is the last byte the device wrote.
                return used.data[-1], used.data[:-1]
        raise VirtioDriverError("blk request", f"request {head} was not completed", self.driver.status)

    def write(self, sector: int, data: bytes) -> int:
        """VIRTIO_BLK_T_OUT; returns the status."""
        return self.request(VIRTIO_BLK_T_OUT, sector, out=data)[0]

    def read(self, sector: int, length: int) -> tuple[int, bytes]:
        """VIRTIO_BLK_T_IN of ``length`` bytes; returns ``(status, data)``."""
        return self.request(VIRTIO_BLK_T_IN, sector, in_size=length)

    def flush(self) -> int:
        """VIRTIO_BLK_T_FLUSH; returns the status."""
        return self.request(VIRTIO_BLK_T_FLUSH, 0)[0]
