"""A switch port that records what reaches it and injects frames: the bench's wire tap.

:class:`CapturePort` implements :class:`~iovirt.virtio.net.switch.SwitchPort`,
so it attaches to the :class:`~iovirt.virtio.net.switch.LearningSwitch` of an
in-process pair or of ``iovirt serve`` running in this process.  A frame that
left a device with a pending checksum (``VIRTIO_NET_HDR_F_NEEDS_CSUM``) is
recorded as it crossed the switch, with its ``(csum_start, csum_offset)``.
"""

from __future__ import annotations

import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import ContextManager

from scapy.layers.l2 import Ether
from scapy.packet import Packet

from iovirt.bench.errors import BenchTimeout
from iovirt.virtio.net.switch import LearningSwitch


@dataclass(frozen=True)
class Captured:
    """One frame delivered to the capture port."""

    packet: Packet
    csum: tuple[int, int] | None
    """The pending (csum_start, csum_offset), or ``None`` for a complete frame."""


class CapturePort:
    """Records every frame the switch delivers to it; injects frames into the switch.

    ``lock`` is held while injecting: pass the data-plane lock of a server
    whose devices share the switch (``VhostUserServer.dataplane.lock``).
    """

    def __init__(self, switch: LearningSwitch, name: str = "capture", lock: ContextManager | None = None) -> None:
        self.name = name
        self.switch = switch
        self.lock = lock if lock is not None else nullcontext()
        self.captured: list[Captured] = []
        self._cond = threading.Condition()
        switch.attach(self)

    def deliver(self, frame: bytes, csum: tuple[int, int] | None) -> bool:
        """SwitchPort: record the frame."""
        pkt = Ether(frame)
        pkt.time = time.time()
        with self._cond:
            self.captured.append(Captured(pkt, csum))
            self._cond.notify_all()
        return True

    @property
    def packets(self) -> list[Packet]:
        """The captured frames, in arrival order."""
        with self._cond:
            return [c.packet for c in self.captured]

    def wait(self, count: int, timeout: float) -> list[Captured]:
        """Wait (at most ``timeout`` s) until ``count`` frames were captured; returns them all."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.captured) >= count, timeout):
                raise BenchTimeout("frames captured", self.name, count, len(self.captured), timeout, [c.packet for c in self.captured])
            return list(self.captured)

    def inject(self, pkt: Packet | bytes, csum: tuple[int, int] | None = None) -> int:
        """Send a frame into the switch as if it came from this port; returns how many ports took it."""
        with self.lock:
            return self.switch.forward(self, bytes(pkt), csum)

    def clear(self) -> None:
        """Forget what was captured."""
        with self._cond:
            self.captured.clear()

    def detach(self) -> None:
        """Leave the switch."""
        self.switch.detach(self)
