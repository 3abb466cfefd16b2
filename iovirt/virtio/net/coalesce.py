"""virtio-net notification coalescing parameters (virtio 1.4 5.1.9.5.10).

``VIRTIO_NET_CTRL_NOTF_COAL_TX_SET`` / ``_RX_SET`` (VIRTIO_NET_F_NOTF_COAL) set ``max_packets`` and
``max_usecs`` of every transmit / receive queue; ``_VQ_SET`` / ``_VQ_GET`` (VIRTIO_NET_F_VQ_NOTF_COAL)
set and read one enabled data queue's.  The last set wins per queue.  A queue disabled and enabled
again takes the parameters of the last TX_SET / RX_SET of its direction, 0 if there was none, and a
device reset puts every parameter to 0 (5.1.9.5.10.6).

How the device holds notifications back with them is in ``device.py`` (``VirtioNet.signal``).
"""

from __future__ import annotations

Params = tuple[int, int]
"""``(max_packets, max_usecs)``."""

NO_COALESCING: Params = (0, 0)


class Coalescing:
    """The coalescing parameters of the data queues of a device with ``queue_pairs`` pairs."""

    def __init__(self, queue_pairs: int) -> None:
        self.queue_pairs = queue_pairs
        self.tx_set: Params = NO_COALESCING  # the last TX_SET / RX_SET: what a re-enabled queue takes
        self.rx_set: Params = NO_COALESCING
        self.params: list[Params] = [NO_COALESCING] * (2 * queue_pairs)
        self.notified_frames = [0] * (2 * queue_pairs)
        """Per queue, the frame count of its last used buffer notification (``max_packets`` counts from there)."""
        self.armed: set[int] = set()
        """Queues whose ``max_usecs`` timer is running."""

    def reset(self) -> None:
        """Every parameter 0 (5.1.9.5.10.6)."""
        self.tx_set = self.rx_set = NO_COALESCING
        self.params = [NO_COALESCING] * (2 * self.queue_pairs)
        self.notified_frames = [0] * (2 * self.queue_pairs)
        self.armed.clear()

    def set_direction(self, transmit: bool, params: Params) -> None:
        """TX_SET (``transmit``) or RX_SET: every queue of that direction (odd / even indexes, 5.1.2)."""
        if transmit:
            self.tx_set = params
        else:
            self.rx_set = params
        for index in range(int(transmit), 2 * self.queue_pairs, 2):
            self.params[index] = params

    def queue_disabled(self, index: int) -> None:
        """Data queue ``index`` stopped: when enabled again it has its direction's TX_SET / RX_SET parameters."""
        self.params[index] = self.tx_set if index % 2 else self.rx_set
        self.armed.discard(index)
