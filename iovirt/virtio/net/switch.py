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

    @property
    def name(self) -> str:
        """The port's name, for the log."""
        ...

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
        self.table: dict[int, _Entry] = {}  # MAC as a 48-bit integer -> entry
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
        entry = self.table.get(int.from_bytes(mac, "big"))
        if entry is None or self.clock() - entry.seen > self.ageing_s:
            return None
        return entry.port

    def _learn(self, ingress: SwitchPort, src: int, now: float) -> None:
        if src >> 40 & 1:  # never learn a group address as a source
            return
        entry = self.table.get(src)
        if entry is None or entry.port is not ingress:
            if entry is not None:
                log.info("MAC %012x moved from %s to %s", src, entry.port.name, ingress.name)
            self.table[src] = _Entry(ingress, now)
        else:
            entry.seen = now

    def _egress(self, ingress: SwitchPort, dst: int, now: float) -> list[SwitchPort]:
        """The ports a frame to ``dst`` goes to: the learned one, or every other (flood)."""
        if not dst >> 40 & 1:
            entry = self.table.get(dst)
            if entry is not None and now - entry.seen <= self.ageing_s:
                if entry.port is ingress:
                    self.filtered += 1
                    return []
                self.forwarded += 1
                return [entry.port]
            if entry is not None:
                del self.table[dst]
        self.flooded += 1
        return [port for port in self.ports if port is not ingress]

    def forward_batch(self, ingress: SwitchPort, frames) -> int:
        """Switch a batch of frames (a ``datapath.Frames``) from ``ingress``.

        Frames are grouped by destination, so the table is consulted once per
        destination and each egress port takes its frames in one call.
        """
        if not len(frames):
            return 0
        dsts, srcs = frames.macs()
        now = self.clock()
        for src in set(srcs):
            self._learn(ingress, src, now)
        groups: dict[int, list[int]] = {}
        for i, dst in enumerate(dsts):
            groups.setdefault(dst, []).append(i)
        taken = 0
        for dst, indexes in groups.items():
            for port in self._egress(ingress, dst, now):
                deliver_batch = getattr(port, "deliver_batch", None)
                if deliver_batch is not None:
                    taken += deliver_batch(frames, indexes)
                else:
                    taken += sum(int(port.deliver(frames.frame(i), frames.csum(i))) for i in indexes)
        return taken

    def forward(self, ingress: SwitchPort, frame: bytes, csum: tuple[int, int] | None = None) -> int:
        """Switch one frame that arrived on ``ingress``; returns how many ports took it."""
        if len(frame) < ETH_HLEN:
            return 0
        now = self.clock()
        self._learn(ingress, int.from_bytes(frame[6:12], "big"), now)
        egress = self._egress(ingress, int.from_bytes(frame[0:6], "big"), now)
        return sum(int(port.deliver(frame, csum)) for port in egress)
