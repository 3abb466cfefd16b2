"""What is tested: the back-end's socket and device type, what it offers, and the per-check context."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

from iovirt.conformance.devices import NetPort, marker_frame, new_tag
from iovirt.conformance.link import Link
from iovirt.conformance.registry import NotApplicable
from iovirt.vhost_user.errors import BackendClosedError
from iovirt.vhost_user.messages import VHOST_USER_F_PROTOCOL_FEATURES, ProtocolFeature as PF

DEVICES = ("net", "blk", "rng", "input", "vsock", "scsi", "fs")
# net: mac..mtu (5.1.4); blk: capacity..num_queues (5.2.4); rng: none (5.4.4); input: virtio_input_config (5.8.4);
# vsock: guest_cid (5.10.4); scsi: the whole struct virtio_scsi_config (5.6.4); fs: tag[36] and
# num_request_queues (5.11.4)
CONFIG_PROBE_SIZE = {"net": 12, "blk": 36, "rng": 0, "input": 136, "vsock": 8, "scsi": 36, "fs": 40}
PEER_SETTLE_S = 0.25
"""How long a switch is given to start forwarding to a newly connected peer port.  Open vSwitch 3.1 maps a
vhost port's transmit queue about 50 ms after the ring is enabled (its vring_state_changed callback, then a
reconfiguration) and drops what it forwards there before; a frame the network loses is no fault of the device."""
RECONNECT_S = 1.0
"""How long to retry connecting: a back-end may still be tearing down the previous check's connection, or (one
process per connection, as virtiofsd) be restarting; a socket still gone after this fails the check."""


@dataclass(frozen=True)
class Target:
    """A back-end to check: its socket, its device type, and (net) an optional peer socket.

    ``peer_socket`` is another port of the same network (e.g. a second port
    of iovirt's switch): frames sent there arrive at the device under test
    and vice versa.  Without it, net RX checks need a back-end that loops
    frames back (DPDK testpmd forwarding a single port to itself).
    """

    socket: str
    device: str
    timeout: float = 5.0
    peer_socket: str | None = None
    transport: ClassVar[str] = "vhost-user"

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")

    def probe(self) -> "Capabilities":
        """What the back-end offers (see :func:`probe`)."""
        return probe(self)

    def context(self, caps: "Capabilities") -> "Context":
        """A fresh context for one check."""
        return Context(self, caps)


@dataclass
class Capabilities:
    """What the back-end offers, found once before the checks run."""

    device: str
    features: int = 0
    protocol_features: int = 0
    config: bytes | None = None
    queue_num: int | None = None
    frame_path: str | None = None
    """net: ``"loopback"`` (what the device transmits comes back to it), ``"peer"``, or ``None``."""

    def has(self, bit: int) -> bool:
        """Whether the back-end offers feature ``bit``."""
        return bool(self.features >> bit & 1)

    def has_protocol(self, feature: PF) -> bool:
        """Whether the back-end offers protocol feature ``feature``."""
        return bool(self.protocol_features >> feature & 1)


def needs_feature(bit: int, name: str):
    """An ``applies`` predicate: the back-end must offer feature ``bit``."""
    return lambda caps: None if caps.has(bit) else f"{name} not offered"


def needs_protocol(feature: PF):
    """An ``applies`` predicate: the back-end must offer protocol feature ``feature``."""

    def applies(caps: Capabilities) -> str | None:
        if not caps.has(VHOST_USER_F_PROTOCOL_FEATURES):
            return "VHOST_USER_F_PROTOCOL_FEATURES not offered"
        return None if caps.has_protocol(feature) else f"{feature.name} not offered"

    return applies


def needs_frame_path(caps: Capabilities) -> str | None:
    """An ``applies`` predicate for net checks that need frames to reach the device."""
    if caps.frame_path is None:
        return "no frame source: the back-end does not loop frames back and no peer socket was given"
    return None


class Context:
    """What one check works with: the target, the capabilities, and the links it opens.

    The runner closes every link when the check ends, so a check never
    cleans up after itself.
    """

    def __init__(self, target: Target, caps: Capabilities) -> None:
        self.target = target
        self.caps = caps
        self.timeout = target.timeout
        self.quiet = min(0.3, target.timeout)
        """How long to watch for something that must not happen."""
        self._links: list[Link] = []
        self.opened = False
        """Whether a link was opened (the back-end negotiated at least once)."""

    def open(self, *, peer: bool = False, **options) -> Link:
        """A new link to the back-end (or to the peer socket), negotiated and with memory shared."""
        path = self.target.peer_socket if peer else self.target.socket
        assert path is not None
        deadline = time.monotonic() + RECONNECT_S
        while True:
            try:
                link = Link(path, self.timeout, **options)
                break
            except (BackendClosedError, ConnectionResetError, BrokenPipeError, ConnectionRefusedError, FileNotFoundError):
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.02)
        self._links.append(link)
        self.opened = True
        return link

    def close_link(self, link: Link) -> None:
        """Close one link before the check ends (to reconnect, say)."""
        self._links.remove(link)
        link.close()

    def close(self) -> None:
        """Close every link this check opened."""
        for link in self._links:
            link.close()
        self._links.clear()

    # -- net -----------------------------------------------------------------------------
    def net_port(self, link: Link, *, enable_rx: bool = True, enable_tx: bool = True, rx_buffers: int = 16) -> NetPort:
        """Start receiveq1 and transmitq1 of a net link and post receive buffers."""
        return NetPort(link, enable_rx=enable_rx, enable_tx=enable_tx, rx_buffers=rx_buffers)

    def net_ends(self, dut: NetPort) -> tuple[NetPort, NetPort]:
        """(injector, sink): sending on the injector reaches ``dut``; what ``dut`` sends reaches the sink."""
        if self.caps.frame_path is None:
            raise NotApplicable(needs_frame_path(self.caps) or "")
        if self.caps.frame_path == "loopback":
            return dut, dut
        peer = self.net_port(self.open(peer=True))
        time.sleep(PEER_SETTLE_S)
        return peer, peer


def probe(target: Target) -> Capabilities:
    """Ask the back-end what it offers (features, protocol features, config, queues, frame path)."""
    caps = Capabilities(target.device)
    ctx = Context(target, caps)
    try:
        link = ctx.open()
        neg = link.negotiated
        caps.features = neg.offered
        caps.protocol_features = neg.protocol_features
        fe = link.frontend
        if caps.has_protocol(PF.VHOST_USER_PROTOCOL_F_CONFIG) and CONFIG_PROBE_SIZE[target.device]:
            try:
                caps.config = fe.get_config(0, CONFIG_PROBE_SIZE[target.device])
            except Exception:  # reported by the config checks, not here
                caps.config = None
        if caps.has_protocol(PF.VHOST_USER_PROTOCOL_F_MQ):
            caps.queue_num = fe.get_queue_num()
        if target.device == "net":
            caps.frame_path = _find_frame_path(ctx, link, target)
    finally:
        ctx.close()
    return caps


def _find_frame_path(ctx: Context, link: Link, target: Target) -> str | None:
    if target.peer_socket is not None:
        return "peer"
    port = ctx.net_port(link)
    tag = new_tag()
    port.send([marker_frame(tag)])
    got = port.receive(tag, min(1.5, target.timeout))
    return "loopback" if got is not None else None
