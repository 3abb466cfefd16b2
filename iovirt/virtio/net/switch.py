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

VLANs (IEEE 802.1Q, :mod:`iovirt.virtio.net.vlan`): a port may be an access
or trunk port (:meth:`LearningSwitch.set_vlan`).  The table is keyed by
(VLAN, MAC), learning is per VLAN and a frame floods only to the ports of its
VLAN.  While no port has a VLAN configuration the switch is VLAN-transparent
and every frame takes the batch path below (VLAN 0, the key is the MAC); once
one has, frames are classified one by one in Python (:meth:`_vlan_egress`:
tags are read, removed and inserted per frame and per egress port) and each
egress port then takes its frames of the batch in one call.

Ports on several threads (``iovirt serve --workers N``): a port may have an
owner (:meth:`LearningSwitch.set_owner`), the data-plane worker whose thread
serves it.  Any worker may switch a frame; the table is consulted under the
switch's lock, held only for that, and a batch for a port owned by another
thread crosses to it: from the sending port's own worker, through the port's
:class:`~iovirt.virtio.net.crossing.Crossing` from that worker (a lock-free
channel that both workers may serve in C); from any other thread, or without
the C twin, as a copy posted to the owner (``owner.post``, a lock-free
hand-off ring).  Either way the owner delivers it on its own thread.  A port
with no owner of its own (a TAP uplink, the router) belongs to
:attr:`LearningSwitch.home`.  A switch without owners (one thread) delivers
in the caller, as before.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from iovirt.virtio.net import datapath, vlan
from iovirt.virtio.net.crossing import Crossing
from iovirt.virtio.net.defs import ETH_HLEN, VLAN_HLEN
from iovirt.virtio.net.vlan import UNTAGGED, PortVlan

log = logging.getLogger("iovirt.switch")

DEFAULT_AGEING_S = 300.0  # 802.1D default ageing time
DEFAULT_MAX_ENTRIES = 4096  # the global cap on learned MACs (Linux bridge: unlimited; OVS: 2048)
DEFAULT_MAX_PER_PORT = 1024  # the cap on MACs learned on one port
SWEEP_INTERVAL_S = 1.0  # how often aged entries are dropped without waiting for a lookup
MAC_BITS = 48
MAC_MASK = (1 << MAC_BITS) - 1
Csum = tuple[int, int] | None


def fdb_key(vid: int, mac: int) -> int:
    """The table key of ``mac`` (a 48-bit integer) in VLAN ``vid``: one integer, VLAN 0's keys are the MACs."""
    return vid << MAC_BITS | mac


class SwitchPort(Protocol):
    """Something the switch can deliver frames to."""

    @property
    def name(self) -> str:
        """The port's name, for the log."""
        ...

    def deliver(self, frame: bytes, csum: tuple[int, int] | None) -> bool:
        """Take one Ethernet frame; ``csum`` is a pending (csum_start, csum_offset). False if dropped."""
        ...


class PortOwner(Protocol):
    """The thread serving a port: a data-plane worker (:class:`~iovirt.vhost_user.dataplane.DataPlane`)."""

    def is_current(self) -> bool:
        """Whether the caller runs on this owner's thread."""

    def post(self, handler: Callable[..., object], *args: Any) -> bool:
        """Run ``handler(*args)`` on this owner's thread soon; False: no room, nothing will run."""

    def watch(self, fd: int, handler: Callable[[], None], queue: object, job_of: Callable[[], Any] | None) -> None:
        """Serve eventfd ``fd`` on this owner's thread (a crossing's bell: ``iovirt/virtio/net/crossing.py``)."""

    def remove(self, fd: int) -> None:
        """Stop serving ``fd``."""


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
    cap was reached, ``aged_out`` the entries dropped by ageing; with VLAN
    ports, ``vlan_dropped`` the frames of a VLAN their ingress port does not
    carry and ``malformed`` the 802.1Q frames that could not be read.
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
        # fdb_key(VLAN, MAC) -> entry, least recently seen first.
        self.table: OrderedDict[int, _Entry] = OrderedDict()
        self._vlans: dict[int, PortVlan] = {}  # id(port) -> its VLAN configuration; none: VLAN-unaware
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
        # id(port) -> the thread serving it; ports not in it belong to home (only while some port has an owner).
        self._owners: dict[int, PortOwner] = {}
        self.home: PortOwner | None = None
        # (id(sending worker), id(port)) -> the crossing from the ports of that worker to that port
        self._crossings: dict[tuple[int, int], Crossing] = {}
        self.handed_off = 0  # batches (or frames) posted to another thread's port
        self.handoff_dropped = 0  # frames dropped because that thread's hand-off ring was full
        self.vlan_dropped = 0  # frames of a VLAN their ingress port does not carry (or untagged on a trunk)
        self.malformed = 0  # 802.1Q frames too short for their tag, or tagged with the reserved VID 4095

    def set_vlan(self, port: SwitchPort, config: PortVlan | None) -> None:
        """Make ``port`` an access or trunk port (``None``: VLAN-unaware again); forgets its MACs."""
        with self._lock:
            self._forget(port)
            if config is None:
                self._vlans.pop(id(port), None)
            else:
                self._vlans[id(port)] = config
        log.info("%s: %s", port_name(port), "VLAN-unaware" if config is None else config.describe())

    def set_owner(self, port: SwitchPort, owner: PortOwner, home: PortOwner) -> None:
        """Serve ``port`` on ``owner``'s thread; ports without an owner of their own go to ``home``'s."""
        with self._lock:
            self._owners[id(port)] = owner
            self.home = home

    def vlan_of(self, port: SwitchPort) -> PortVlan | None:
        """``port``'s VLAN configuration, ``None`` for a VLAN-unaware port."""
        return self._vlans.get(id(port))

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
            self._vlans.pop(id(port), None)
            self._owners.pop(id(port), None)
            # (The caller holds every worker's lock: no job runs that rings these bells.)
            for key in [k for k in self._crossings if k[1] == id(port)]:
                self._crossings.pop(key).close()

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

    def lookup(self, mac: bytes, vid: int = UNTAGGED) -> SwitchPort | None:
        """The port ``mac`` was learned on in VLAN ``vid``, if the entry has not aged out."""
        entry = self.table.get(fdb_key(vid, int.from_bytes(mac, "big")))
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
            log.info("MAC %012x%s moved from %s to %s", src & MAC_MASK, _in_vlan(src),
                     port_name(entry.port), port_name(ingress))
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
                "MAC table full (%d entries, %d on %s; caps %d and %d per port): MAC %012x%s and further new "
                "MACs from %s are not learned (their frames are still switched; refusals counted)",
                len(self.table), self.learned_on(ingress), port_name(ingress), self.max_entries, self.max_per_port,
                src & MAC_MASK, _in_vlan(src), port_name(ingress),
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
        if self._vlans:
            return self._forward_vlan_batch(ingress, frames)
        srcs = frames.sources()
        groups = frames.groups()
        with self._lock:  # the table only: delivery runs without it
            now = self.clock()
            if now >= self._next_sweep:
                self._sweep(now)
            for src in srcs:
                self._learn(ingress, src, now)
            plan = [(port, indexes) for dst, indexes in groups for port in self._egress(ingress, dst, now)]
        if not plan:  # dropped, or flooded to no other port: per batch, so no generator for nothing
            return 0
        return sum(self._deliver(port, frames, indexes, ingress) for port, indexes in plan)

    def shortcut(self, ingress: SwitchPort, src: int, dst: int, across: bool = False) -> SwitchPort | Crossing | None:
        """The port frames from ``src`` to ``dst`` (48-bit MACs) arriving on ``ingress`` go to, if that is all there is.

        For a transmit loop that writes such frames straight into that port
        (``datapath.forward``) instead of handing each batch here: the
        answer holds while the table does, and the caller asks again on each
        kick.  That is so while no port has a VLAN configuration, neither
        port is impaired, ``dst`` is a unicast MAC learned (not aged) on
        another port served by the caller's thread, and ``src`` is learned on
        ``ingress``: learning it again is refreshing its entry, done here.
        Otherwise None, and each batch goes through :meth:`forward_batch`.
        With ``across``, a port another worker serves gives its
        :class:`Crossing` from the caller's worker (``ingress``'s), where
        there is one (``datapath.send_job`` publishes into it).
        """
        impairments = self.impairments
        if self._vlans or dst >> 40 & 1 or id(ingress) in impairments:
            return None
        with self._lock:
            now = self.clock()
            if now >= self._next_sweep:
                self._sweep(now)
            source, target = self.table.get(src), self.table.get(dst)
            if source is None or source.port is not ingress or target is None or target.port is ingress \
                    or now - target.seen > self.ageing_s:
                return None
            port = target.port
            if id(port) in impairments:
                return None
            owner = self._elsewhere(port) if self._owners else None
            crossing = None
            if owner is not None:
                crossing = self._crossing(ingress, port, owner) if across else None
                if crossing is None:
                    return None
            source.seen = now
            self.table.move_to_end(src)
        return port if crossing is None else crossing

    def took_shortcut(self, batches: int) -> None:
        """Count ``batches`` batches that went where :meth:`shortcut` said (as forwarded, one per batch)."""
        with self._lock:
            self.forwarded += batches

    def crossed(self, batches: int) -> None:
        """Count ``batches`` batches a sending kick job published into a :class:`Crossing` (forwarded, handed off)."""
        with self._lock:
            self.forwarded += batches
            self.handed_off += batches

    def _crossing(self, ingress: SwitchPort, port: SwitchPort, owner: PortOwner) -> Crossing | None:
        """The crossing to ``port`` (served by ``owner``) from ``ingress``'s worker, made if need be; None if none.

        Only from ``ingress``'s own worker (the channel has one producer),
        and with the C twin (the channel is C).  So only that worker makes
        the crossings keyed by it, and no lock is needed to make one; they
        go when their port is detached.
        """
        sender = self._owners.get(id(ingress), self.home)
        if sender is None or sender is owner or datapath.accel is None or not sender.is_current():
            return None
        key = (id(sender), id(port))
        crossing = self._crossings.get(key)
        if crossing is None:
            impairments = self.impairments
            crossing = Crossing(port, self._deliver, lambda: id(port) not in impairments, sender, owner)
            self._crossings[key] = crossing
            crossing.open()
        return crossing

    def _elsewhere(self, port: SwitchPort) -> PortOwner | None:
        """``port``'s owner if that is another thread (then the frames are posted to it), else None."""
        owner = self._owners.get(id(port), self.home)
        return None if owner is None or owner.is_current() else owner

    def _post(self, owner: PortOwner, handler: Callable[..., object], *args: Any, frames: int) -> int:
        return self._handed_off(owner.post(handler, *args), frames)

    def _handed_off(self, taken: bool, frames: int) -> int:
        """Count a batch of ``frames`` handed to another thread's port: taken, or dropped (its ring was full)."""
        if taken:
            self.handed_off += 1
            return frames
        self.handoff_dropped += frames  # the owner's ring is full: dropped, as a congested switch drops
        return 0

    def _deliver(self, port: SwitchPort, frames: Any, indexes: list[int], ingress: SwitchPort | None = None) -> int:
        """Frames ``indexes`` of a batch from ``ingress`` to ``port``: in one call where the port takes batches."""
        if self._owners:
            owner = self._elsewhere(port)
            crossing = None if owner is None or ingress is None else self._crossing(ingress, port, owner)
            if crossing is not None:  # a copy into the channel: the sender's buffer is refilled by its next batch
                return self._handed_off(crossing.push(frames, indexes), len(indexes))
            if owner is not None:  # a copy: the sender's buffer is refilled by its next batch
                copy = frames.subset(indexes)
                return self._post(owner, self._deliver, port, copy, list(range(len(copy))), frames=len(copy))
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
        if self._vlans:
            return self._forward_vlan(ingress, frame, csum)
        with self._lock:
            now = self.clock()
            if now >= self._next_sweep:
                self._sweep(now)
            self._learn(ingress, int.from_bytes(frame[6:12], "big"), now)
            egress = self._egress(ingress, int.from_bytes(frame[0:6], "big"), now)
        return sum(self._deliver_frame(port, frame, csum) for port in egress)

    def _deliver_frame(self, port: SwitchPort, frame: bytes, csum: tuple[int, int] | None) -> int:
        """One frame to ``port`` (through its impairments, if it has any)."""
        if self._owners:
            owner = self._elsewhere(port)
            if owner is not None:
                return self._post(owner, self._deliver_frame, port, bytes(frame), csum, frames=1)
        impaired = self.impairments.get(id(port))
        if impaired is not None and impaired.intercepts_egress:
            return int(impaired.egress_frame(frame, csum))
        return int(port.deliver(frame, csum))

    # -- VLANs (802.1Q): one frame at a time ------------------------------------------------
    def _classify(self, ingress: SwitchPort, frame: bytes, csum: Csum) -> tuple[int, int, bytes, Csum] | None:
        """``(VID, PCP, untagged frame, its pending checksum)`` of a frame from ``ingress``; None: dropped."""
        try:
            tci = vlan.tag_of(frame)
        except ValueError:
            self.malformed += 1
            return None
        if tci is None:
            vid, pcp = UNTAGGED, 0
        else:
            vid, pcp = tci & vlan.VID_MASK, tci >> 13
            if vid == vlan.VID_MASK:  # 802.1Q 9.6: 4095 is reserved, never on the wire
                self.malformed += 1
                return None
            frame, csum = vlan.untag(frame), vlan.shift_csum(csum, -VLAN_HLEN)
            if len(frame) < ETH_HLEN or (csum is not None and csum[0] < ETH_HLEN):  # the checksum began in the tag
                self.malformed += 1
                return None
        config = self._vlans.get(id(ingress))
        if config is None:
            return vid, pcp, frame, csum
        if config.access is not None:
            if vid != UNTAGGED:  # an access port takes untagged (or priority-tagged) frames only
                self.vlan_dropped += 1
                return None
            return config.access, pcp, frame, csum
        if vid not in config.trunk:  # untagged, or a VLAN this trunk does not carry
            self.vlan_dropped += 1
            return None
        return vid, pcp, frame, csum

    def _carries(self, port: SwitchPort, vid: int) -> bool:
        config = self._vlans.get(id(port))
        return config is None or config.carries(vid)

    def _vlan_egress(self, ingress: SwitchPort, frame: bytes, csum: Csum) -> list[tuple[SwitchPort, bytes, Csum]]:
        """Learn from one frame and say what each port of its VLAN gets: ``(port, frame as it leaves, csum)``."""
        if len(frame) < ETH_HLEN:
            return []
        classified = self._classify(ingress, frame, csum)
        if classified is None:
            return []
        vid, pcp, frame, csum = classified
        with self._lock:
            now = self.clock()
            if now >= self._next_sweep:
                self._sweep(now)
            self._learn(ingress, fdb_key(vid, int.from_bytes(frame[6:12], "big")), now)
            egress = self._egress(ingress, fdb_key(vid, int.from_bytes(frame[0:6], "big")), now)
        out: list[tuple[SwitchPort, bytes, Csum]] = []
        tagged: tuple[bytes, Csum] | None = None
        for port in egress:
            if not self._carries(port, vid):
                continue
            config = self._vlans.get(id(port))
            if vid == UNTAGGED or (config is not None and config.access is not None):
                out.append((port, frame, csum))
                continue
            if tagged is None:  # built once, for every trunk and VLAN-unaware port
                tagged = vlan.tagged(frame, vid, pcp), vlan.shift_csum(csum, VLAN_HLEN)
            out.append((port, *tagged))
        return out

    def _forward_vlan(self, ingress: SwitchPort, frame: bytes, csum: Csum) -> int:
        """Switch one frame when some port has a VLAN configuration: learn and flood within its VLAN."""
        egress = self._vlan_egress(ingress, frame, csum)
        return sum(self._deliver_frame(port, out, out_csum) for port, out, out_csum in egress)

    def _forward_vlan_batch(self, ingress: SwitchPort, frames: Any) -> int:
        """A batch, frame by frame through :meth:`_vlan_egress`; each egress port then takes its frames in one call."""
        batches: dict[int, tuple[SwitchPort, Any]] = {}
        for i in range(len(frames)):
            for port, out, out_csum in self._vlan_egress(ingress, frames.frame(i), frames.csum(i)):
                batch = batches.get(id(port))
                if batch is None:
                    batch = batches[id(port)] = (port, datapath.Frames())
                batch[1].append(out, out_csum)
        return sum(self._deliver(port, batch, list(range(len(batch)))) for port, batch in batches.values())


def _in_vlan(key: int) -> str:
    """`` in VLAN N`` for a table key of VLAN N, nothing for VLAN 0 (the log line of a VLAN-unaware switch)."""
    vid = key >> MAC_BITS
    return f" in VLAN {vid}" if vid else ""
