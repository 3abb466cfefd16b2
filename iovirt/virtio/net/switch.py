"""A learning L2 switch joining every net port of one iovirt process.

It behaves like an IEEE 802.1D transparent bridge: it learns which port each
source MAC sits behind, forwards a frame to the port its destination MAC was
learned on, floods broadcast, multicast and unknown-destination frames to
every other port, drops frames whose destination sits behind the port they
came in on, and forgets entries not refreshed within the ageing time.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol

from iovirt.virtio.net.defs import ETH_HLEN

log = logging.getLogger("iovirt.switch")

DEFAULT_AGEING_S = 300.0  # 802.1D default ageing time


class SwitchPort(Protocol):
    """Something the switch can deliver frames to."""

    name: str

    def deliver(self, frame: bytes, csum: tuple[int, int] | None) -> bool:
        """Take one Ethernet frame; ``csum`` is a pending (csum_start, csum_offset). False if dropped."""
        ...


@dataclass
class _Entry:
    port: SwitchPort
    seen: float


class LearningSwitch:
    """MAC learning, flooding and ageing over attached :class:`SwitchPort` objects."""

    def __init__(self, ageing_s: float = DEFAULT_AGEING_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.ageing_s = ageing_s
        self.clock = clock
        self.ports: list[SwitchPort] = []
        self.table: dict[bytes, _Entry] = {}
        self._lock = threading.Lock()
        self.flooded = 0
        self.forwarded = 0
        self.filtered = 0

    def attach(self, port: SwitchPort) -> None:
        """Add a port."""
        with self._lock:
            self.ports.append(port)

    def detach(self, port: SwitchPort) -> None:
        """Remove a port and forget every MAC learned on it."""
        with self._lock:
            if port in self.ports:
                self.ports.remove(port)
            for mac in [m for m, e in self.table.items() if e.port is port]:
                del self.table[mac]

    def forget(self, port: SwitchPort) -> None:
        """Forget the MACs learned on ``port`` (its link went down or its driver reset)."""
        with self._lock:
            for mac in [m for m, e in self.table.items() if e.port is port]:
                del self.table[mac]

    def lookup(self, mac: bytes) -> SwitchPort | None:
        """The port ``mac`` was learned on, if the entry has not aged out."""
        entry = self.table.get(mac)
        if entry is None or self.clock() - entry.seen > self.ageing_s:
            return None
        return entry.port

    def forward(self, ingress: SwitchPort, frame: bytes, csum: tuple[int, int] | None = None) -> int:
        """Switch one frame that arrived on ``ingress``; returns how many ports took it."""
        if len(frame) < ETH_HLEN:
            return 0
        dst, src = frame[0:6], frame[6:12]
        now = self.clock()
        if not src[0] & 1:  # never learn a group address as a source
            entry = self.table.get(src)
            if entry is None or entry.port is not ingress:
                if entry is not None:
                    log.info("MAC %s moved from %s to %s", src.hex(":"), entry.port.name, ingress.name)
                self.table[src] = _Entry(ingress, now)
            else:
                entry.seen = now
        if not dst[0] & 1:
            entry = self.table.get(dst)
            if entry is not None and now - entry.seen <= self.ageing_s:
                if entry.port is ingress:
                    self.filtered += 1
                    return 0
                self.forwarded += 1
                return int(entry.port.deliver(frame, csum))
            if entry is not None:
                del self.table[dst]
        self.flooded += 1
        return sum(int(port.deliver(frame, csum)) for port in list(self.ports) if port is not ingress)
