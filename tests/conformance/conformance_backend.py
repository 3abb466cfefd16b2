"""iovirt's own vhost-user back-end in a thread, for the conformance tests (pytest puts this folder on sys.path)."""

from __future__ import annotations

import threading
from pathlib import Path

from iovirt.vhost_user.devices.net import NetConfigAdapter
from iovirt.vhost_user.server import VhostUserServer
from iovirt.virtio.blk.device import VirtioBlk
from iovirt.virtio.net.device import VirtioNet
from iovirt.virtio.net.switch import LearningSwitch


IMAGE_SIZE = 1 << 20


class IovirtBackend:
    """A server with net0/net1 (two queue pairs each) on one switch, a writable blk, a read-only blk, and a
    writable blk that offers VIRTIO_F_ACCESS_PLATFORM (``iommu_blk_path``)."""

    def __init__(self, tmp: Path, blk_class: type[VirtioBlk] = VirtioBlk, net_class: type[VirtioNet] = VirtioNet) -> None:
        self.server = VhostUserServer()
        switch = LearningSwitch()
        self.net_paths = [str(tmp / f"net{i}.sock") for i in range(2)]
        for i, path in enumerate(self.net_paths):
            # config=on: the suite's net config-space checks read it with GET_CONFIG.
            self.server.add_socket(path, net_class(bytes([0x52, 0x54, 0, 0, 0, i]), switch, queue_pairs=2, label=f"net{i}"),
                                   adapter=NetConfigAdapter)
        self.blks = [
            blk_class(str(tmp / "rw.img"), size=IMAGE_SIZE, label="blk-rw"),
            blk_class(str(tmp / "ro.img"), size=IMAGE_SIZE, read_only=True, label="blk-ro"),
            blk_class(str(tmp / "iommu.img"), size=IMAGE_SIZE, label="blk-iommu"),
        ]
        self.blk_path = str(tmp / "blk.sock")
        self.blk_ro_path = str(tmp / "blk-ro.sock")
        self.server.add_socket(self.blk_path, self.blks[0])
        self.server.add_socket(self.blk_ro_path, self.blks[1])
        self.iommu_blk_path = str(tmp / "blk-iommu.sock")
        self.server.add_socket(self.iommu_blk_path, self.blks[2], iommu=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(timeout=10)
        for blk in self.blks:
            blk.close()
