"""An entropy device (virtio 1.2 section 5.4) served over vhost-user: the example of docs/devices.md.

Run it, then point a front-end at the socket (QEMU: ``-chardev socket,id=r,path=SOCKET
-device vhost-user-rng-pci,chardev=r,vectors=0``)::

    python examples/entropy_device.py /tmp/rng.sock
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Callable

from iovirt.vhost_user import devices
from iovirt.vhost_user.device import COMMON_PROTOCOL_FEATURES, VhostUserDevice
from iovirt.vhost_user.messages import ProtocolFeature
from iovirt.vhost_user.server import VhostUserServer
from iovirt.virtio.chain import write_chain
from iovirt.virtio.device import COMMON_FEATURES, VirtioDevice
from iovirt.virtio.queue import SplitQueue

VIRTIO_ID_ENTROPY = 4  # virtio 1.2 section 5: device ID of an entropy source
REQUESTQ = 0  # 5.4.2: the one virtqueue


class EntropyDevice(VirtioDevice):
    """Fills every buffer the driver posts with bytes from ``source`` (5.4.6)."""

    device_id = VIRTIO_ID_ENTROPY
    name = "virtio-rng"

    def __init__(self, source: Callable[[int], bytes] = os.urandom, label: str = "rng0") -> None:
        super().__init__(num_queues=1, label=label)
        self.source = source

    def device_features(self) -> int:
        """5.4.3: no device-specific feature bits."""
        return COMMON_FEATURES

    def config_space(self) -> bytes:
        """5.4.4: no configuration space."""
        return b""

    def process_queue(self, index: int, queue: SplitQueue) -> None:
        """Answer every request with as many random bytes as its buffers hold."""
        if not self.enabled[index]:
            return  # vhost-user "Ring states": a disabled ring has no side effects
        served = 0
        while (chain := queue.pop()) is not None:
            # 5.4.6.2: the device writes random bytes into the device-writable buffers.
            written = write_chain(queue.memory, chain, self.source(chain.writable_len))
            queue.push(chain.head, written)
            served += 1
        if served:
            self.signal(index)  # the used-buffer notification, if the driver wants one


class EntropyAdapter(VhostUserDevice):
    """No config space, so no VHOST_USER_PROTOCOL_F_CONFIG; everything else is the default."""

    protocol_features = COMMON_PROTOCOL_FEATURES & ~(1 << ProtocolFeature.VHOST_USER_PROTOCOL_F_CONFIG)


devices.register(VIRTIO_ID_ENTROPY, EntropyAdapter)


def main(argv: list[str]) -> int:
    """Serve one entropy device on the socket path ``argv[1]`` until SIGTERM or SIGINT."""
    if len(argv) != 2:
        print(f"usage: {argv[0]} SOCKET", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO)
    server = VhostUserServer()
    server.add_socket(argv[1], EntropyDevice())
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: server.stop())
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
