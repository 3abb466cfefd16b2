"""A learning L2 switch joining every net port of one iovirt process.

It behaves like an IEEE 802.1D transparent bridge: it learns which port each
source MAC sits behind, forwards a frame to the port its destination MAC was
learned on, floods broadcast, multicast and unknown-destination frames to
every other port, drops frames whose destination sits behind the port they
came in on, and forgets entries not refreshed within the ageing time.

The MAC table is bounded, as in Linux's bridge (``max_fdb_entries``) and Open
vSwitch (``other_config:mac-table-size``): one guest sending frames from fresh
source MACs must not grow the process without bound (issue 12, failure 10).
A global cap and a per-port cap stop learning, not forwarding: a frame whose
source cannot be learned is still switched, and replies to it are flooded as
unknown unicast.  The table is ordered by last-seen time, so a periodic sweep
drops aged entries from its front in O(expired), and a full table is swept
before a learning is refused.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from iovirt.virtio.net.defs import ETH_HLEN

log = logging.getLogger("iovirt.switch")

DEFAULT_AGEING_S = 300.0  # 802.1D default ageing time
DEFAULT_MAX_ENTRIES = 4096  # the global cap on learned MACs (Linux bridge: unlimited; OVS: 2048)
DEFAULT_MAX_PER_PORT = 1024  # the cap on MACs learned on one port
SWEEP_INTERVAL_S = 1.0  # how often aged entries are dropped without waiting for a lookup


class SwitchPort(Protocol):
    """Something the switch can deliver frames to."""

    @property
    def name(self) -> str:
        """The port's name, for the log."""
        ...

    def deliver(self, frame: bytes, csum: tuple[int, int] | None) -> bool:
        """Take one Ethernet frame; ``csum`` is a pending (csum_start, csum_offset). False if dropped."""
        ...


def port_name(port: SwitchPort) -> str:
    """The port's name in the log: a device's ``label`` (``net0``) when it has one, else its ``name``.

    A virtio-net port's ``name`` is its device type, the same for every
    port; a MAC move between two of them must say which two.
    """
    label = getattr(port, "label", None)
    return label if isinstance(label, str) and label else port.name


@dataclass(slots=True)
class _Entry:
    port: SwitchPort
    seen: float


class LearningSwitch:
    """MAC learning, flooding and ageing over attached :class:`SwitchPort` objects.

    ``max_entries`` caps the MAC table, ``max_per_port`` the MACs learned on
    one port; ``learn_refused`` counts the source MACs not learned because a
    cap was reached, ``aged_out`` the entries dropped by ageing.
    """

    def __init__(
        self,
        ageing_s: float = DEFAULT_AGEING_S,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_per_port: int = DEFAULT_MAX_PER_PORT,
    ) -> None:
        if max_entries < 1 or max_per_port < 1:
            raise ValueError(f"MAC table caps must be positive, got {max_entries} and {max_per_port} per port")
        self.ageing_s = ageing_s
        self.clock = clock
        self.max_entries = max_entries
        self.max_per_port = max_per_port
        self.ports: list[SwitchPort] = []
        # MAC as a 48-bit integer -> entry, least recently seen first.
        self.table: OrderedDict[int, _Entry] = OrderedDict()
        self._per_port: dict[int, int] = {}  # id(port) -> MACs learned on it
        self._refusing: set[int] = set()  # id(port) of ports whose refusals were logged
        self._next_sweep = clock() + SWEEP_INTERVAL_S
        self._lock = threading.Lock()
        self.flooded = 0
        self.forwarded = 0
        self.filtered = 0
        self.learn_refused = 0
        self.aged_out = 0
        # id(port) -> its impairments (iovirt/virtio/net/impair.py): they see what the port sends before the
        # switch does, and what the switch delivers to the port before the port does.
        self.impairments: dict[int, Any] = {}

    def attach(self, port: SwitchPort) -> None:
        """Add a port."""
        with self._lock:
            self.ports.append(port)

    def detach(self, port: SwitchPort) -> None:
        """Remove a port and forget every MAC learned on it."""
        with self._lock:
            if port in self.ports:
                self.ports.remove(port)
            self._forget(port)
            self.impairments.pop(id(port), None)

    def forget(self, port: SwitchPort) -> None:
        """Forget the MACs learned on ``port`` (its link went down or its driver reset)."""
        with self._lock:
            self._forget(port)

    def _forget(self, port: SwitchPort) -> None:
        if not self._per_port.get(id(port)):
            return
        for mac in [m for m, e in self.table.items() if e.port is port]:
            self._remove(mac)
        self._refusing.discard(id(port))

    def learned_on(self, port: SwitchPort) -> int:
        """How many MACs are learned on ``port``."""
        return self._per_port.get(id(port), 0)

    def lookup(self, mac: bytes) -> SwitchPort | None:
        """The port ``mac`` was learned on, if the entry has not aged out."""
        entry = self.table.get(int.from_bytes(mac, "big"))
        if entry is None or self.clock() - entry.seen > self.ageing_s:
            return None
        return entry.port

    def _remove(self, mac: int) -> None:
        entry = self.table.pop(mac)
        key = id(entry.port)
        left = self._per_port[key] - 1
        if left:
            self._per_port[key] = left
        else:
            del self._per_port[key]

    def _sweep(self, now: float) -> None:
        """Drop aged entries: they sit at the front of the table, so this costs O(expired)."""
        self._next_sweep = now + SWEEP_INTERVAL_S
        table = self.table
        while table:
            mac, entry = next(iter(table.items()))
            if now - entry.seen <= self.ageing_s:
                break
            self._remove(mac)
            self.aged_out += 1

    def _learn(self, ingress: SwitchPort, src: int, now: float) -> None:
        if src >> 40 & 1:  # never learn a group address as a source
            return
        entry = self.table.get(src)
        if entry is not None and entry.port is ingress:
            entry.seen = now
            self.table.move_to_end(src)
            return
        if entry is not None:
            log.info("MAC %012x moved from %s to %s", src, port_name(entry.port), port_name(ingress))
            self._remove(src)
        key = id(ingress)
        if len(self.table) >= self.max_entries:
            self._sweep(now)
        if len(self.table) >= self.max_entries or self._per_port.get(key, 0) >= self.max_per_port:
            self._refuse(ingress, src)
            return
        self.table[src] = _Entry(ingress, now)
        self._per_port[key] = self._per_port.get(key, 0) + 1

    def _refuse(self, ingress: SwitchPort, src: int) -> None:
        self.learn_refused += 1
        if id(ingress) not in self._refusing:
            self._refusing.add(id(ingress))
            log.warning(
                "MAC table full (%d entries, %d on %s; caps %d and %d per port): MAC %012x and further new "
                "MACs from %s are not learned (their frames are still switched; refusals counted)",
                len(self.table), self.learned_on(ingress), port_name(ingress), self.max_entries, self.max_per_port,
                src, port_name(ingress),
            )

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
                self._remove(dst)
                self.aged_out += 1
        self.flooded += 1
        return [port for port in self.ports if port is not ingress]

    def forward_batch(self, ingress: SwitchPort, frames) -> int:
        """Switch a batch of frames (a ``datapath.Frames``) from ``ingress``.

        Frames are grouped by destination, so the table is consulted once per
        destination and each egress port takes its frames in one call.
        """
        if not len(frames):
            return 0
        impaired = self.impairments.get(id(ingress))
        if impaired is not None and impaired.intercepts_ingress:
            return int(impaired.ingress_batch(frames))
        dsts, srcs = frames.macs()
        now = self.clock()
        if now >= self._next_sweep:
            self._sweep(now)
        for src in set(srcs):
            self._learn(ingress, src, now)
        groups: dict[int, list[int]] = {}
        for i, dst in enumerate(dsts):
            groups.setdefault(dst, []).append(i)
        return sum(
            self._deliver(port, frames, indexes)
            for dst, indexes in groups.items()
            for port in self._egress(ingress, dst, now)
        )

    def _deliver(self, port: SwitchPort, frames: Any, indexes: list[int]) -> int:
        """Frames ``indexes`` of a batch to ``port``: in one call where the port takes batches."""
        impaired = self.impairments.get(id(port))
        if impaired is not None and impaired.intercepts_egress:
            return int(impaired.egress_batch(frames, indexes))
        deliver_batch = getattr(port, "deliver_batch", None)
        if deliver_batch is not None:
            return int(deliver_batch(frames, indexes))
        return sum(int(port.deliver(frames.frame(i), frames.csum(i))) for i in indexes)

    def forward(self, ingress: SwitchPort, frame: bytes, csum: tuple[int, int] | None = None) -> int:
        """Switch one frame that arrived on ``ingress``; returns how many ports took it."""
        if len(frame) < ETH_HLEN:
            return 0
        impaired = self.impairments.get(id(ingress))
        if impaired is not None and impaired.intercepts_ingress:
            return int(impaired.ingress_frame(frame, csum))
        now = self.clock()
        if now >= self._next_sweep:
            self._sweep(now)
        self._learn(ingress, int.from_bytes(frame[6:12], "big"), now)
        egress = self._egress(ingress, int.from_bytes(frame[0:6], "big"), now)
        return sum(self._deliver_frame(port, frame, csum) for port in egress)

    def _deliver_frame(self, port: SwitchPort, frame: bytes, csum: tuple[int, int] | None) -> int:
        """One frame to ``port`` (through its impairments, if it has any)."""
        impaired = self.impairments.get(id(port))
        if impaired is not None and impaired.intercepts_egress:
            return int(impaired.egress_frame(frame, csum))
        return int(port.deliver(frame, csum))
