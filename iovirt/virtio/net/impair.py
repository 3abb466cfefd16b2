"""Network impairments, netem-style: drop, duplicate, corrupt, reorder, delay with jitter, rate; seeded.

An :class:`Impairment` says what to do to the frames of one direction of one
port; an :class:`Impairer` does it, one frame at a time, in the order of
Linux's ``sch_netem.c`` (``netem_enqueue``):

1. duplicate with probability ``dup``, then drop with probability ``drop``
   (a duplicated frame that is dropped loses one of its two copies);
2. corrupt with probability ``corrupt``: one random bit past the Ethernet
   header is flipped (the frame still reaches its port, as if its FCS had
   not caught the error).  A pending checksum (NEEDS_CSUM) is completed
   first, so the damage is there to be detected; ``corrupt_fix`` recomputes
   the IPv4 header and the TCP, UDP and ICMP checksums afterwards, so it is
   not (the corruption reaches the application);
3. hold the frame for ``delay_ms`` plus a jitter of ``jitter_ms`` drawn from
   a ``uniform`` (delay ± jitter) or ``normal`` (standard deviation jitter)
   distribution, never below 0; with ``rate`` (frames/s) frames leave at
   most that often, each after the one before it (netem's ``rate``: a
   shaper, frames wait; the QoS limit ``pps`` of ``docs/qos.md`` polices:
   frames beyond it are dropped);
4. reorder (netem's ``reorder P gap G``, which needs a delay): after
   ``gap - 1`` frames held in turn, a frame skips the delay with
   probability ``reorder`` and overtakes the frames held, and the count
   starts again.

At most ``limit`` frames are held (netem's ``limit``, default 1000): beyond
it a frame is dropped and counted.  Held frames leave in the order of their
time to send (netem's tfifo), so a jitter larger than the gap between two
frames reorders them, as netem does.

Every random draw comes from one ``random.Random`` per direction seeded from
``seed``: the same seed, configuration and frames give the same decisions.

:class:`PortImpairment` binds the two directions of one switch port to a
:class:`~iovirt.virtio.net.switch.LearningSwitch`: ingress is what the port
sends into the switch, egress what the switch delivers to it.  Held frames
are let go by timers on the data-plane thread
(:meth:`~iovirt.vhost_user.dataplane.DataPlane.call_later`); nothing sleeps.
"""

from __future__ import annotations

import collections
import functools
import heapq
import itertools
import math
import random
import struct
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Generic, Iterable, Mapping, TypeVar

from iovirt.errors import IovirtError
from iovirt.virtio.net import datapath
from iovirt.virtio.net.csum import ChecksumOffsetError, complete_checksum, internet_checksum, l3_start, pseudo_header
from iovirt.virtio.net.defs import ETH_HLEN, ETH_P_IP, ETH_P_IPV6, IPPROTO_TCP, IPPROTO_UDP

Csum = tuple[int, int] | None
Clock = Callable[[], float]
CallLater = Callable[[float, Callable[[], None]], None]
Tag = TypeVar("Tag")

DIRECTIONS = ("ingress", "egress")
"""ingress: from the port (the guest) into the switch; egress: from the switch to the port."""
DISTRIBUTIONS = ("uniform", "normal")
DEFAULT_LIMIT = 1000  # netem's default limit (packets held)
MAX_LIMIT = 1 << 20
IPPROTO_ICMP, IPPROTO_ICMPV6 = 1, 58

class ImpairmentError(IovirtError, ValueError):
    """An impairment that cannot be applied (a probability above 1, a negative delay, an unknown key...)."""


@dataclass(frozen=True)
class Impairment:
    """What to do to the frames of one direction (see the module docstring); the defaults do nothing.

    Probabilities are fractions 0..1; times are milliseconds; ``rate`` is
    frames per second (0: none); ``seed`` ``None`` draws a fresh seed.
    """

    drop: float = 0.0
    dup: float = 0.0
    corrupt: float = 0.0
    corrupt_fix: bool = False
    reorder: float = 0.0
    gap: int = 1
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    dist: str = "uniform"
    rate: float = 0.0
    limit: int = DEFAULT_LIMIT
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("drop", "dup", "corrupt", "reorder"):
            _check_number(name, getattr(self, name), 0.0, 1.0, "a probability 0..1 (1 is 100 %)")
        _check_number("delay", self.delay_ms, 0.0, math.inf, "milliseconds >= 0")
        _check_number("jitter", self.jitter_ms, 0.0, math.inf, "milliseconds >= 0")
        _check_number("rate", self.rate, 0.0, math.inf, "frames per second >= 0 (0: no rate)")
        if type(self.corrupt_fix) is not bool:
            raise ImpairmentError(f"corrupt_fix: want true or false, got {self.corrupt_fix!r}")
        _check_int("gap", self.gap, 1, 1 << 31)
        _check_int("limit", self.limit, 1, MAX_LIMIT)
        if self.seed is not None:
            _check_int("seed", self.seed, 0, (1 << 64) - 1)
        if self.dist not in DISTRIBUTIONS:
            raise ImpairmentError(f"dist: want one of {', '.join(DISTRIBUTIONS)}, got {self.dist!r}")
        if self.jitter_ms and not self.delay_ms:
            raise ImpairmentError("jitter needs a delay (netem: delay TIME JITTER); give delay too")
        if self.reorder and not self.delay_ms:
            raise ImpairmentError("reorder needs a delay (netem: frames overtake the ones delayed); give delay too")

    @property
    def holds(self) -> bool:
        """Whether frames are held (a delay or a rate), so timers are needed."""
        return bool(self.delay_ms or self.rate)

    @property
    def active(self) -> bool:
        """Whether it does anything at all."""
        return bool(self.drop or self.dup or self.corrupt or self.holds)

    def settings(self) -> dict[str, Any]:
        """The non-default fields, as plain data (for replies and logs)."""
        default = Impairment()
        return {k: v for k, v in asdict(self).items() if v != getattr(default, k)}


def _check_number(name: str, value: Any, low: float, high: float, want: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) \
            or not low <= value <= high or math.isinf(value):
        raise ImpairmentError(f"{name}: want {want}, got {value!r}")


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if type(value) is not int or not low <= value <= high:
        raise ImpairmentError(f"{name}: want a whole number {low}..{high}, got {value!r}")


# -- key=value form (--net, the TOML file, iovirt ctl impair) -----------------------------------
def _fraction(value: Any) -> float:
    """``0.1`` or ``10%``."""
    if isinstance(value, str) and value.strip().endswith("%"):
        return _number(value.strip()[:-1]) / 100
    return _number(value)


def _number(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"want a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"want a number, got {value!r}") from None
    if math.isnan(number) or math.isinf(number):
        raise ValueError(f"want a finite number, got {value!r}")
    return number


def _whole(value: Any) -> int:
    if isinstance(value, (bool, float)):
        raise ValueError(f"want a whole number, got {value!r}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"want a whole number, got {value!r}") from None


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "on", "yes", "true", ""):
        return True
    if text in ("0", "off", "no", "false"):
        return False
    raise ValueError(f"want on or off (1 or 0), got {value!r}")


def _choice(*allowed: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in allowed:
            raise ValueError(f"want one of {', '.join(allowed)}, got {value!r}")
        return str(value)
    return parse


KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "drop": ("drop", _fraction),
    "dup": ("dup", _fraction),
    "corrupt": ("corrupt", _fraction),
    "corrupt_fix": ("corrupt_fix", _flag),
    "reorder": ("reorder", _fraction),
    "gap": ("gap", _whole),
    "delay": ("delay_ms", _number),
    "jitter": ("jitter_ms", _number),
    "dist": ("dist", _choice(*DISTRIBUTIONS)),
    "rate": ("rate", _number),
    "limit": ("limit", _whole),
    "seed": ("seed", _whole),
}
"""The ``key=value`` spelling of an :class:`Impairment`: key → (field, value parser).  ``dir`` is apart."""

DIR_KEY = "dir"
DIR_CHOICES = {"ingress": ("ingress",), "egress": ("egress",), "both": DIRECTIONS}
DEFAULT_DIR = "egress"
"""Without ``dir=``, what the switch delivers to the port is impaired, as netem impairs what leaves an interface."""


def parse_value(key: str, value: Any) -> Any:
    """One ``key=value`` checked on its own (``ValueError`` naming the problem; ranges are checked later)."""
    if key == DIR_KEY:
        return _choice(*DIR_CHOICES)(value)
    if key not in KEYS:
        raise ValueError(f"unknown impairment {key!r} (known: {', '.join([*KEYS, DIR_KEY])})")
    return KEYS[key][1](value)


def from_options(options: Mapping[str, Any]) -> tuple[tuple[str, ...], Impairment]:
    """The directions and the :class:`Impairment` of ``key=value`` options (keys of :data:`KEYS` and ``dir``).

    Values may be strings (``"10%"``, ``"5"``) or numbers.  Raises
    :class:`ImpairmentError` naming the key.
    """
    values: dict[str, Any] = {}
    direction = DEFAULT_DIR
    for key, value in options.items():
        try:
            parsed = parse_value(key, value)
        except ValueError as exc:
            raise ImpairmentError(f"{key}: {exc}" if key in KEYS or key == DIR_KEY else str(exc)) from None
        if key == DIR_KEY:
            direction = parsed
        else:
            values[KEYS[key][0]] = parsed
    return DIR_CHOICES[direction], Impairment(**values)


def to_options(impairment: Impairment) -> dict[str, Any]:
    """The ``key=value`` options (without ``dir``) that give ``impairment`` back: its non-default fields."""
    keys = {field: key for key, (field, _) in KEYS.items()}
    return {keys[k]: v for k, v in impairment.settings().items()}


# -- the engine -----------------------------------------------------------------------------------
class Impairer(Generic[Tag]):
    """One direction's impairments applied to frames: :meth:`admit` them, :meth:`release` the held ones when due.

    ``tag`` is carried along with each frame untouched (the bench keeps a
    frame's ``virtio_net_hdr`` there).  ``stats`` counts the frames
    ``dropped`` (by ``drop``), ``duplicated``, ``corrupted``, ``reordered``
    (sent ahead of the held ones), ``delayed`` (held) and ``dropped_limit``
    (``limit`` frames were already held);
    ``count``, if given, is told of each count too (``count(name, n)``);
    ``retag``, if given, makes the tag of a frame it corrupts.
    """

    def __init__(self, impairment: Impairment, direction: str = "egress", clock: Clock = time.monotonic,
                 count: Callable[[str, int], None] | None = None,
                 retag: Callable[[Tag | None], Tag | None] | None = None) -> None:
        self.impairment = impairment
        seed = impairment.seed if impairment.seed is not None else random.SystemRandom().getrandbits(64)
        # One stream per direction, so setting the other direction does not change this one's decisions.
        self.rng = random.Random(f"{seed}/{direction}")
        self.clock = clock
        self.stats: collections.Counter[str] = collections.Counter()
        self._on_count = count
        self._retag = retag
        self._held: list[tuple[float, int, bytes, Csum, Tag | None]] = []
        self._seq = itertools.count()
        self._gap_count = 0  # netem's q->counter: frames held since the last reordered one
        self._last_send = -math.inf  # the time to send of the frame queued last (for the rate)

    def __len__(self) -> int:
        return len(self._held)

    def _count(self, name: str, n: int = 1) -> None:
        self.stats[name] += n
        if self._on_count is not None:
            self._on_count(name, n)

    def admit(self, frame: bytes, csum: Csum = None, tag: Tag | None = None,
              out: list[tuple[bytes, Csum, Tag | None]] | None = None) -> list[tuple[bytes, Csum, Tag | None]]:
        """Impair one frame: appends to ``out`` (returned) what leaves now; the rest is dropped or held."""
        out = [] if out is None else out
        imp, rng = self.impairment, self.rng
        copies = 1
        if imp.dup and rng.random() < imp.dup:
            copies += 1
        if imp.drop and rng.random() < imp.drop:
            copies -= 1
        if not copies:
            self._count("dropped")
            return out
        if copies > 1:
            self._count("duplicated")
            self._enqueue(frame, csum, tag, out)  # the copy goes first, as netem enqueues its clone first
        self._enqueue(frame, csum, tag, out)
        return out

    def _enqueue(self, frame: bytes, csum: Csum, tag: Tag | None, out: list) -> None:
        imp, rng = self.impairment, self.rng
        if imp.corrupt and rng.random() < imp.corrupt:
            frame, csum = corrupt(frame, csum, rng, imp.corrupt_fix)
            if self._retag is not None:
                tag = self._retag(tag)
            self._count("corrupted")
        if not imp.holds:
            out.append((frame, csum, tag))
            return
        if len(self._held) >= imp.limit:
            self._count("dropped_limit")
            return
        now = self.clock()
        if imp.reorder and self._gap_count >= imp.gap - 1 and rng.random() < imp.reorder:
            # netem: the frame is queued at the head, ahead of every frame delayed.
            self._gap_count = 0
            self._count("reordered")
            out.append((frame, csum, tag))
            return
        self._gap_count += 1
        send = now + self._delay()
        if imp.rate:
            # netem's rate: a frame leaves one frame time after the one before it, or after its delay.
            send = max(send, self._last_send) + 1.0 / imp.rate
        self._last_send = max(self._last_send, send)
        heapq.heappush(self._held, (send, next(self._seq), frame, csum, tag))
        self._count("delayed")

    def _delay(self) -> float:
        imp = self.impairment
        delay = imp.delay_ms
        if imp.jitter_ms:
            if imp.dist == "normal":
                delay = self.rng.gauss(imp.delay_ms, imp.jitter_ms)
            else:
                delay = self.rng.uniform(imp.delay_ms - imp.jitter_ms, imp.delay_ms + imp.jitter_ms)
        return max(0.0, delay) / 1000.0

    def next_due(self) -> float | None:
        """When the first held frame is due (the clock's time), or ``None`` if none is held."""
        return self._held[0][0] if self._held else None

    def release(self, now: float | None = None) -> list[tuple[bytes, Csum, Tag | None]]:
        """The held frames due by ``now`` (default: the clock), in the order they are due."""
        now = self.clock() if now is None else now
        held, due = self._held, []
        while held and held[0][0] <= now:
            _, _, frame, csum, tag = heapq.heappop(held)
            due.append((frame, csum, tag))
        return due


# -- corruption --------------------------------------------------------------------------------
def corrupt(frame: bytes, csum: Csum, rng: random.Random, fix: bool) -> tuple[bytes, Csum]:
    """``frame`` with one random bit flipped past the Ethernet header; checksums recomputed if ``fix``.

    A pending checksum is completed first (the frame leaves complete).
    """
    buf = bytearray(frame)
    if csum is not None:
        try:
            complete_checksum(buf, *csum)
        except ChecksumOffsetError:
            pass  # the receiving port reports the bad offsets; the flip below still happens
        csum = None
    start = ETH_HLEN if len(buf) > ETH_HLEN else 0
    pos = rng.randrange(start, len(buf))
    buf[pos] ^= 1 << rng.randrange(8)
    if fix:
        fix_checksums(buf)
    return bytes(buf), csum


def fix_checksums(frame: bytearray) -> None:
    """Recompute the IPv4 header checksum and the TCP, UDP, ICMP or ICMPv6 checksum of ``frame``, in place.

    Whatever cannot be parsed (a flipped length, a fragment, an IPv6
    extension header) is left as it is.
    """
    start = l3_start(frame)
    if start is None:
        return
    etype, off = start
    n = len(frame)
    if etype == ETH_P_IP:
        if n < off + 20 or frame[off] >> 4 != 4:
            return
        ihl = (frame[off] & 0xF) * 4
        if ihl < 20 or off + ihl > n:
            return
        frame[off + 10 : off + 12] = b"\0\0"
        frame[off + 10 : off + 12] = ((~internet_checksum(frame[off : off + ihl])) & 0xFFFF).to_bytes(2, "big")
        total, frag = struct.unpack_from("!H2xH", frame, off + 2)
        if total < ihl or off + total > n or frag & 0x3FFF:
            return
        proto, l4, l4len = frame[off + 9], off + ihl, total - ihl
        addrs = bytes(frame[off + 12 : off + 20])
    elif etype == ETH_P_IPV6:
        if n < off + 40 or frame[off] >> 4 != 6:
            return
        (l4len,) = struct.unpack_from("!H", frame, off + 4)
        proto, l4 = frame[off + 6], off + 40
        if l4 + l4len > n:
            return
        addrs = bytes(frame[off + 8 : off + 40])
    else:
        return
    field = {IPPROTO_TCP: 16, IPPROTO_UDP: 6, IPPROTO_ICMP: 2, IPPROTO_ICMPV6: 2}.get(proto)
    if field is None or l4len < field + 2:
        return
    if proto == IPPROTO_UDP and etype == ETH_P_IP and frame[l4 + 6 : l4 + 8] == b"\0\0":
        return  # RFC 768: no checksum over IPv4 stays none
    frame[l4 + field : l4 + field + 2] = b"\0\0"
    pseudo = b"" if proto == IPPROTO_ICMP else pseudo_header(addrs, proto, l4len)
    value = (~internet_checksum(pseudo + bytes(frame[l4 : l4 + l4len]))) & 0xFFFF
    if proto == IPPROTO_UDP and not value:
        value = 0xFFFF  # RFC 768: a computed 0 is sent as all ones
    frame[l4 + field : l4 + field + 2] = value.to_bytes(2, "big")


def counting(stats: collections.Counter[str], direction: str) -> Callable[[str, int], None]:
    """An :class:`Impairer` ``count`` that counts into a port's ``stats``, as ``<dir>_impair_<name>``.

    ``<dir>`` is ``tx`` for ingress (the guest transmitted) and ``rx`` for
    egress.  Drops also count as a device counts its other drops:
    ``<dir>_dropped`` and ``<dir>_dropped_impair`` / ``<dir>_dropped_impair_limit``.
    """
    prefix = "tx" if direction == "ingress" else "rx"

    def count(name: str, n: int) -> None:
        stats[f"{prefix}_impair_{name}"] += n
        if name.startswith("dropped"):
            stats[f"{prefix}_dropped"] += n
            stats[f"{prefix}_dropped_impair{name[len('dropped'):]}"] += n
    return count


# -- a switch port's impairments -----------------------------------------------------------------
class PortImpairment:
    """The impairments of one port of ``switch``: ingress (port → switch) and egress (switch → port).

    :func:`impair_port` makes one and registers it in ``switch.impairments``;
    the switch then hands this object what the port sends
    (:meth:`ingress_batch`, :meth:`ingress_frame`) and what it would deliver to
    the port (:meth:`egress_batch`, :meth:`egress_frame`).  What passes goes on
    at once; held frames go on from ``call_later`` timers, under the lock the
    data plane holds around them.  Counters go to ``stats`` (:func:`counting`).
    """

    def __init__(self, switch: Any, port: Any, call_later: CallLater, stats: collections.Counter[str],
                 clock: Clock = time.monotonic) -> None:
        self.switch = switch
        self.port = port
        self.call_later = call_later
        self.stats = stats
        self.clock = clock
        self.impairers: dict[str, Impairer[None] | None] = dict.fromkeys(DIRECTIONS)
        self._passing = False  # True while handing ingress frames on: the switch must not impair them again
        self._armed = math.inf  # the earliest timer asked for and not yet run

    # -- configuration ----------------------------------------------------------------
    def set(self, direction: str, impairment: Impairment | None) -> None:
        """Impair ``direction`` as ``impairment`` says (``None`` or an inactive one: not at all).

        Frames held under the previous setting go on at once.
        """
        old = self.impairers[direction]
        count = counting(self.stats, direction)
        self.impairers[direction] = Impairer(impairment, direction, self.clock, count) \
            if impairment is not None and impairment.active else None
        if old is not None and len(old):
            self._hand_on(direction, [(f, c) for f, c, _ in old.release(math.inf)])

    def settings(self) -> dict[str, dict[str, Any]]:
        """Each direction's impairment as ``key=value`` options (empty: none)."""
        return {d: (to_options(i.impairment) if i is not None else {}) for d, i in self.impairers.items()}

    @property
    def idle(self) -> bool:
        """Neither direction is impaired."""
        return self.impairers["ingress"] is None and self.impairers["egress"] is None

    @property
    def intercepts_ingress(self) -> bool:
        """Whether the switch must hand this object what the port sends."""
        return not self._passing and self.impairers["ingress"] is not None

    @property
    def intercepts_egress(self) -> bool:
        """Whether the switch must hand this object what it delivers to the port."""
        return self.impairers["egress"] is not None

    # -- from the switch --------------------------------------------------------------
    def ingress_batch(self, frames: Any) -> int:
        """What the port sent (a ``datapath.Frames``); returns how many frames went on into the switch now."""
        return self._admit("ingress", ((frames.frame(i), frames.csum(i)) for i in range(len(frames))))

    def ingress_frame(self, frame: bytes, csum: Csum) -> int:
        """One frame the port sent."""
        return self._admit("ingress", [(frame, csum)])

    def egress_batch(self, frames: Any, indexes: list[int]) -> int:
        """Frames ``indexes`` of a batch the switch delivers to the port; returns how many it took now."""
        return self._admit("egress", ((frames.frame(i), frames.csum(i)) for i in indexes))

    def egress_frame(self, frame: bytes, csum: Csum) -> int:
        """One frame the switch delivers to the port."""
        return self._admit("egress", [(frame, csum)])

    def _admit(self, direction: str, frames: Iterable[tuple[bytes, Csum]]) -> int:
        impairer = self.impairers[direction]
        if impairer is None:
            return self._hand_on(direction, list(frames))
        out: list[tuple[bytes, Csum, None]] = []
        for frame, csum in frames:
            impairer.admit(bytes(frame), csum, None, out)
        self._arm(impairer)
        return self._hand_on(direction, [(f, c) for f, c, _ in out])

    # -- held frames ----------------------------------------------------------------
    def _arm(self, impairer: Impairer[None]) -> None:
        due = impairer.next_due()
        if due is not None and due < self._armed:
            self._armed = due
            self.call_later(max(0.0, due - self.clock()), functools.partial(self._on_timer, due))

    def _on_timer(self, deadline: float) -> None:
        if deadline <= self._armed:
            self._armed = math.inf
        if self.switch.impairments.get(id(self.port)) is not self:
            return  # the port left the switch, or was given another impairment: its held frames go nowhere
        now = self.clock()
        for direction, impairer in self.impairers.items():
            if impairer is not None:
                due = impairer.release(now)
                if due:
                    self._hand_on(direction, [(f, c) for f, c, _ in due])
                self._arm(impairer)

    def _hand_on(self, direction: str, frames: list[tuple[bytes, Csum]]) -> int:
        """Frames that passed: into the switch (ingress) or to the port (egress), not impaired again."""
        if not frames:
            return 0
        batch = datapath.Frames()
        for frame, csum in frames:
            batch.append(frame, csum)
        if direction == "egress":  # straight to the port, as the switch delivers (switch.py)
            deliver_batch = getattr(self.port, "deliver_batch", None)
            if deliver_batch is not None:
                return int(deliver_batch(batch, list(range(len(batch)))))
            return sum(int(self.port.deliver(batch.frame(i), batch.csum(i))) for i in range(len(batch)))
        self._passing = True
        try:
            return int(self.switch.forward_batch(self.port, batch))
        finally:
            self._passing = False


def impair_port(switch: Any, port: Any, directions: Iterable[str], impairment: Impairment | None,
                call_later: CallLater, stats: collections.Counter[str],
                clock: Clock = time.monotonic) -> PortImpairment | None:
    """Impair ``port`` of ``switch`` in ``directions`` (``None``: stop impairing them); returns its impairments.

    Call it where the data plane cannot run meanwhile (holding its lock).
    ``stats`` is the port's counters (a device's ``stats``).
    """
    current: PortImpairment | None = switch.impairments.get(id(port))
    if current is None:
        if impairment is None or not impairment.active:
            return None
        current = PortImpairment(switch, port, call_later, stats, clock)
        switch.impairments[id(port)] = current
    for direction in directions:
        if direction not in DIRECTIONS:
            raise ImpairmentError(f"direction: want one of {', '.join(DIRECTIONS)}, got {direction!r}")
        current.set(direction, impairment)
    if current.idle:
        del switch.impairments[id(port)]
        return None
    return current


__all__ = [
    "DIRECTIONS", "DISTRIBUTIONS", "Impairer", "Impairment", "ImpairmentError", "KEYS",
    "PortImpairment", "corrupt", "counting", "fix_checksums", "from_options", "impair_port", "parse_value", "to_options",
]
