"""Offload and header checks of a virtio-net device, against references computed with scapy.

Each check drives a :class:`~iovirt.bench.pair.NetPair` (port ``a``
transmits, port ``b`` receives) and returns a :class:`CheckResult`: ``pass``,
``fail`` with what was wrong and what the spec wants, or ``n/a`` when the
features the check needs were not offered or not negotiated.  They work
against any target, iovirt's devices or an external vhost-user back-end.

Clauses are those of virtio 1.2 section 5.1.6 ("Device Operation"):
5.1.6.2 (packet transmission: NEEDS_CSUM, GSO), 5.1.6.3 (setting up receive
buffers), 5.1.6.4 (processing of incoming packets: num_buffers, flags,
DATA_VALID).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw

from iovirt.bench.errors import BenchError
from iovirt.bench.pair import NetPair
from iovirt.bench.reference import completed, l4_checksum_ok, partial_checksum, tso_segments, ufo_fragments
from iovirt.virtio.net.defs import (
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_HOST_UFO,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_GSO_UDP,
)

PASS, FAIL, NA = "pass", "fail", "n/a"

SRC_MAC = "02:00:00:00:00:0a"
DST_MAC = "02:00:00:00:00:0b"


@dataclass(frozen=True)
class CheckResult:
    """The verdict of one check: ``pass``, ``fail`` or ``n/a``, with the reason."""

    check: str
    clause: str
    verdict: str
    reason: str = ""


class _Failed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _check(name: str, clause: str) -> Callable:
    """Wrap a check body: ``_Failed`` and bench errors become a ``fail`` verdict with their reason."""

    def wrap(body: Callable[..., str | CheckResult]) -> Callable[..., CheckResult]:
        def run(pair: NetPair, *args, **kwargs) -> CheckResult:
            try:
                pair.b.recv()  # leftovers of earlier traffic are not this check's
                outcome = body(pair, *args, **kwargs)
            except _Failed as exc:
                return CheckResult(name, clause, FAIL, exc.reason)
            except BenchError as exc:
                return CheckResult(name, clause, FAIL, f"{type(exc).__name__}: {exc}")
            if isinstance(outcome, CheckResult):
                return outcome
            return CheckResult(name, clause, PASS, outcome)

        run.__name__ = body.__name__
        run.__doc__ = body.__doc__
        return run

    return wrap


def _na(name: str, clause: str, reason: str) -> CheckResult:
    return CheckResult(name, clause, NA, reason)


def l4_frames(payload: int = 200) -> dict[str, Packet]:
    """One UDP and one TCP frame over IPv4 and IPv6, addressed from port a to port b."""
    data = Raw(bytes(range(256)) * (payload // 256) + bytes(range(payload % 256)))
    eth = Ether(src=SRC_MAC, dst=DST_MAC)
    v4 = IP(src="192.0.2.1", dst="192.0.2.2")
    v6 = IPv6(src="2001:db8::1", dst="2001:db8::2")
    return {
        "udp4": eth / v4 / UDP(sport=4000, dport=5000) / data,
        "tcp4": eth / v4 / TCP(sport=4000, dport=5000, flags="PA", seq=1000) / data,
        "udp6": eth / v6 / UDP(sport=4000, dport=5000) / data,
        "tcp6": eth / v6 / TCP(sport=4000, dport=5000, flags="PA", seq=1000) / data,
    }


def udp_zero_checksum_frames() -> dict[str, Packet]:
    """UDP frames whose checksum computes to 0: RFC 768 sends it as 0xFFFF (0 means "no checksum")."""
    frames: dict[str, Packet] = {}
    for name, ip in (("udp4-zero", IP(src="192.0.2.1", dst="192.0.2.2")), ("udp6-zero", IPv6(src="2001:db8::1", dst="2001:db8::2"))):
        base = Ether(src=SRC_MAC, dst=DST_MAC) / ip / UDP(sport=4000, dport=5000)
        tail = b"zero-sum" * 4
        # With a first payload word of 0 the complement is c; making that word c
        # brings the one's-complement sum to 0xFFFF, i.e. a computed checksum of 0.
        c = Ether(completed(base / Raw(b"\0\0" + tail)))[UDP].chksum
        frames[name] = base / Raw(c.to_bytes(2, "big") + tail)
    return frames


def _send_partial(pair: NetPair, frames: dict[str, Packet]) -> dict[str, tuple[bytes, int, int]]:
    partial = {name: partial_checksum(pkt) for name, pkt in frames.items()}
    hdr = pair.a.hdr_cls
    pair.send([hdr(flags="NEEDS_CSUM", csum_start=s, csum_offset=o) / Ether(f) for f, s, o in partial.values()])
    return partial


def _tx_checksum(pair: NetPair, frames: dict[str, Packet], name: str, clause: str) -> CheckResult | str:
    if not pair.a.has_feature(VIRTIO_NET_F_CSUM):
        return _na(name, clause, "the sending driver did not negotiate VIRTIO_NET_F_CSUM (bit 0)")
    partial = _send_partial(pair, frames)
    got = pair.recv(len(frames))
    guest_csum = pair.b.has_feature(VIRTIO_NET_F_GUEST_CSUM)
    faults = []
    for (label, pkt), (frame, start, offset), rx in zip(frames.items(), partial.values(), got):
        flags = int(rx.flags)
        if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
            if not guest_csum:
                faults.append(f"{label}: NEEDS_CSUM set for a driver without GUEST_CSUM (5.1.6.4.1: flags MUST be 0)")
            elif (rx.csum_start, rx.csum_offset) != (start, offset) or bytes(rx[Ether]) != frame:
                faults.append(
                    f"{label}: partial checksum passed on as csum_start {rx.csum_start}/offset {rx.csum_offset}, "
                    f"expected {start}/{offset} and the frame as sent"
                )
            continue
        if not guest_csum and flags:
            faults.append(f"{label}: flags {flags:#x} without GUEST_CSUM (5.1.6.4.1: flags MUST be 0)")
        expected = completed(pkt)
        if bytes(rx[Ether]) != expected:
            l4 = rx[UDP] if UDP in rx else rx[TCP]
            ref = Ether(expected)[type(l4)]
            faults.append(
                f"{label}: checksum {l4.chksum:#06x} left the device, scapy's reference is {ref.chksum:#06x} "
                f"(csum_start {start}, csum_offset {offset})"
            )
    if faults:
        raise _Failed("; ".join(faults))
    mode = "passed on as NEEDS_CSUM or completed" if guest_csum else "completed"
    return f"{len(frames)} NEEDS_CSUM frames ({', '.join(frames)}) {mode} as scapy computes them"


@_check("tx-needs-csum", "5.1.6.2, 5.1.6.4.1")
def check_tx_checksum(pair: NetPair) -> CheckResult | str:
    """Frames sent with NEEDS_CSUM and a partial checksum arrive with scapy's checksum.

    A receiving driver without GUEST_CSUM must get the completed checksum
    and ``flags`` 0; one with GUEST_CSUM may instead get the frame as sent
    with NEEDS_CSUM and the same ``csum_start``/``csum_offset``.
    """
    return _tx_checksum(pair, l4_frames(), "tx-needs-csum", "5.1.6.2, 5.1.6.4.1")


@_check("tx-needs-csum-udp-zero", "5.1.6.2; RFC 768")
def check_tx_checksum_udp_zero(pair: NetPair) -> CheckResult | str:
    """A completed UDP checksum that computes to 0 is sent as 0xFFFF (RFC 768; 0 is "none", invalid over IPv6)."""
    return _tx_checksum(pair, udp_zero_checksum_frames(), "tx-needs-csum-udp-zero", "5.1.6.2; RFC 768")


@_check("rx-header", "5.1.6.4.1")
def check_rx_header(pair: NetPair) -> str:
    """Received headers: no GSO, ``flags`` 0 without GUEST_CSUM, ``num_buffers`` 1 without MRG_RXBUF."""
    frames = l4_frames(64)
    pair.send(list(frames.values()))
    got = pair.recv(len(frames))
    guest_csum = pair.b.has_feature(VIRTIO_NET_F_GUEST_CSUM)
    mergeable = pair.b.has_feature(VIRTIO_NET_F_MRG_RXBUF)
    for (label, pkt), rx in zip(frames.items(), got):
        if rx.gso_type != VIRTIO_NET_HDR_GSO_NONE or rx.gso_ecn:
            raise _Failed(f"{label}: gso_type {rx.gso_type} without any GUEST_TSO/UFO feature (must be NONE)")
        if not guest_csum and int(rx.flags):
            raise _Failed(f"{label}: flags {int(rx.flags):#x} without GUEST_CSUM (must be 0)")
        if hasattr(rx, "num_buffers") and not mergeable and rx.num_buffers != 1:
            raise _Failed(f"{label}: num_buffers {rx.num_buffers} without MRG_RXBUF (must be 1)")
        if bytes(rx[Ether]) != bytes(pkt):
            raise _Failed(f"{label}: the frame changed on its way: {rx[Ether].summary()}")
    return f"{len(frames)} frames with well-formed headers ({pair.b.hdr_size} bytes)"


@_check("rx-data-valid", "5.1.6.4.1")
def check_rx_data_valid(pair: NetPair, required: bool = False) -> CheckResult | str:
    """With GUEST_CSUM, DATA_VALID only on frames whose checksum is right.

    DATA_VALID is optional (the device MAY set it); ``required`` makes a
    device that never sets it fail instead of being not applicable.
    """
    name, clause = "rx-data-valid", "5.1.6.4.1"
    if not pair.b.has_feature(VIRTIO_NET_F_GUEST_CSUM):
        return _na(name, clause, "the receiving driver did not negotiate VIRTIO_NET_F_GUEST_CSUM (bit 1)")
    good = l4_frames()
    bad = {}
    for label, pkt in good.items():
        broken = Ether(completed(pkt))
        l4 = broken[UDP] if UDP in broken else broken[TCP]
        l4.chksum ^= 0x5A5A
        bad[label + "-bad"] = broken
    frames = {label: Ether(completed(pkt)) for label, pkt in good.items()} | bad
    pair.send(list(frames.values()))
    got = pair.recv(len(frames))
    valid_marked = 0
    for (label, pkt), rx in zip(frames.items(), got):
        if int(rx.flags) & VIRTIO_NET_HDR_F_DATA_VALID:
            if not l4_checksum_ok(rx[Ether]):
                raise _Failed(f"{label}: DATA_VALID on a frame with a wrong checksum (the device MUST validate it)")
            valid_marked += 1
    if valid_marked == 0:
        reason = "the device set DATA_VALID on none of the frames with a right checksum (optional: it MAY)"
        return CheckResult(name, clause, FAIL if required else NA, reason)
    return f"DATA_VALID on {valid_marked} of {len(good)} frames with right checksums, none on the {len(bad)} wrong ones"


@_check("mrg-rxbuf", "5.1.6.3, 5.1.6.4")
def check_mrg_rxbuf(pair: NetPair) -> CheckResult | str:
    """With MRG_RXBUF, ``num_buffers`` counts the buffers each frame took, frames rejoin intact.

    Frames are sized around the receive buffer size so that some fit one
    buffer exactly and others need one more.
    """
    name, clause = "mrg-rxbuf", "5.1.6.3, 5.1.6.4"
    b = pair.b
    if not b.has_feature(VIRTIO_NET_F_MRG_RXBUF):
        return _na(name, clause, "the receiving driver did not negotiate VIRTIO_NET_F_MRG_RXBUF (bit 15)")
    room = b.rx_buffer_size
    # Standard Ethernet sizes only (1514 at most): a back-end may drop longer frames.
    sizes = sorted(n for n in {60, room - b.hdr_size, room - b.hdr_size + 1, 2 * room - b.hdr_size, 1514} if 60 <= n <= 1514)
    eth = Ether(src=SRC_MAC, dst=DST_MAC, type=0x88B5)  # IEEE local experimental ethertype
    frames = [eth / Raw(bytes([n & 0xFF]) * (n - 14)) for n in sizes]
    pair.send(frames)
    got = pair.recv(len(frames))
    lens_all = b.rx_buffer_lens[-len(frames) :]
    spans_seen = []
    for pkt, rx, lens in zip(frames, got, lens_all):
        size = len(pkt)
        least = -(-(size + b.hdr_size) // room)
        if rx.num_buffers != len(lens):
            raise _Failed(f"{size}-byte frame: num_buffers {rx.num_buffers}, but it took {len(lens)} buffers")
        if sum(lens) != size + b.hdr_size:
            raise _Failed(f"{size}-byte frame: used lens {lens} add up to {sum(lens)}, not header + frame")
        if rx.num_buffers < least:
            raise _Failed(f"{size}-byte frame: num_buffers {rx.num_buffers} < {least} buffers of {room} bytes")
        if bytes(rx[Ether]) != bytes(pkt):
            raise _Failed(f"{size}-byte frame came back changed after joining {len(lens)} buffers")
        spans_seen.append(rx.num_buffers)
    if max(spans_seen) < 2:
        return _na(name, clause, f"every frame fit one {room}-byte buffer: use smaller receive buffers")
    return f"frames of {sizes} bytes took {spans_seen} buffers of {room} bytes, num_buffers right, rejoined intact"


def _gso(pair: NetPair, name: str, feature: int, gso_type: int, pkt: Packet, gso_size: int, reference: list[Packet]) -> CheckResult | str:
    clause = "5.1.6.2"
    offered = pair.a.target.offered
    if not offered >> feature & 1:
        return _na(name, clause, f"the device does not offer feature bit {feature}, so it takes no GSO frames (5.1.6.2)")
    if not pair.a.has_feature(feature) or not pair.a.has_feature(VIRTIO_NET_F_CSUM):
        return _na(name, clause, f"the sending driver did not negotiate feature bit {feature} with CSUM")
    frame, start, offset = partial_checksum(pkt)
    l4_hdr = 8 if gso_type == VIRTIO_NET_HDR_GSO_UDP else len(Ether(frame)[TCP]) - len(Ether(frame)[TCP].payload)
    hdr = pair.a.hdr_cls(
        flags="NEEDS_CSUM", gso_type=gso_type, hdr_len=start + l4_hdr, gso_size=gso_size,
        csum_start=start, csum_offset=offset,
    )
    pair.send(hdr / Ether(frame))
    got = pair.recv(len(reference))
    for k, (rx, ref) in enumerate(zip(got, reference)):
        seg = Ether(bytes(rx[Ether]))
        if IP in seg and IP in ref:
            ref = Ether(bytes(ref))
            ref[IP].id = seg[IP].id  # ids are the device's choice; everything else is fixed
            del ref[IP].chksum
            ref = Ether(bytes(ref))
        if bytes(seg) != bytes(ref):
            raise _Failed(f"segment {k}: {seg.summary()} ({len(seg)} bytes) differs from scapy's {ref.summary()} ({len(ref)} bytes)")
    return f"one {len(pkt)}-byte GSO frame became the {len(reference)} segments scapy computes"


@_check("host-tso4", "5.1.6.2")
def check_host_tso4(pair: NetPair, mss: int = 1000) -> CheckResult | str:
    """A TCPv4 GSO frame is cut into ``mss``-sized segments as :func:`tso_segments` computes."""
    pkt = l4_frames(3 * mss + 123)["tcp4"]
    return _gso(pair, "host-tso4", VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_HDR_GSO_TCPV4, pkt, mss, tso_segments(pkt, mss))


@_check("host-tso6", "5.1.6.2")
def check_host_tso6(pair: NetPair, mss: int = 1000) -> CheckResult | str:
    """A TCPv6 GSO frame is cut into ``mss``-sized segments as :func:`tso_segments` computes."""
    pkt = l4_frames(3 * mss + 123)["tcp6"]
    return _gso(pair, "host-tso6", VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_HDR_GSO_TCPV6, pkt, mss, tso_segments(pkt, mss))


@_check("host-ufo", "5.1.6.2")
def check_host_ufo(pair: NetPair, gso_size: int = 1480) -> CheckResult | str:
    """A UDPv4 GSO (UFO) frame is cut into the IPv4 fragments :func:`ufo_fragments` computes."""
    pkt = l4_frames(3 * gso_size)["udp4"]
    return _gso(pair, "host-ufo", VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_HDR_GSO_UDP, pkt, gso_size, ufo_fragments(pkt, gso_size))
