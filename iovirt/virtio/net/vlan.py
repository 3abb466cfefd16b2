"""IEEE 802.1Q VLANs at the switch's edge: port configurations, tags read, inserted and removed.

A port of the :class:`~iovirt.virtio.net.switch.LearningSwitch` is one of

- **VLAN-unaware** (no configuration, the default): a trunk of every VLAN
  whose untagged frames belong to VLAN 0, the "no VLAN" domain (Open
  vSwitch's model of a port without ``tag=`` or ``trunks=``).  Its tagged
  frames reach the ports of their VLAN; frames of other VLANs reach it tagged.
- an **access** port of VLAN N (``--net SOCKET,vlan=N``): its guest sends and
  receives untagged frames, which are in VLAN N inside the switch.  A frame it
  sends tagged (other than a priority tag, VID 0) is dropped and counted.
- a **trunk** port of VLANs N, M, ... (``--net SOCKET,trunk=N:M``): frames
  cross it tagged; a frame of another VLAN, or untagged, is dropped and counted.

The tag (802.1Q 9.6, 9.3) is the TPID 0x8100 and a 16-bit TCI: PCP (3 bits),
DEI (1 bit), VID (12 bits).  VIDs 0 (priority tag: the frame belongs to the
port's VLAN) and 4095 (reserved) never name a VLAN, so a configuration takes
1..4094.  Tags are added and removed here, at the edge; inside the switch a
frame is its untagged form plus its VID.
"""

from __future__ import annotations

from dataclasses import dataclass

from iovirt.virtio.net.defs import ETH_HLEN, ETH_P_8021Q, VLAN_HLEN

VID_MIN, VID_MAX = 1, 4094  # 802.1Q 9.6: VID 0 is a priority tag, 4095 is reserved
VID_MASK = 0x0FFF
TAGGED_HLEN = ETH_HLEN + VLAN_HLEN  # a VLAN_HLEN tag is TPID + TCI
UNTAGGED = 0  # the VID of the "no VLAN" domain inside the switch (frames of VLAN-unaware ports)
TPID = ETH_P_8021Q.to_bytes(2, "big")


class VlanConfigError(ValueError):
    """A VLAN id outside 1..4094, or a trunk list that names none or repeats one."""


def parse_vid(value: str | int) -> int:
    """A VLAN id 1..4094 (``ValueError`` otherwise: 0 and 4095 are reserved, 802.1Q 9.6)."""
    if isinstance(value, bool) or isinstance(value, float):
        raise VlanConfigError(f"want a VLAN id {VID_MIN}..{VID_MAX}, got {value!r}")
    try:
        vid = int(value)
    except (TypeError, ValueError):
        raise VlanConfigError(f"want a VLAN id {VID_MIN}..{VID_MAX}, got {value!r}") from None
    if not VID_MIN <= vid <= VID_MAX:
        raise VlanConfigError(
            f"VLAN id {vid} out of range: want {VID_MIN}..{VID_MAX} (0 and 4095 are reserved, IEEE 802.1Q 9.6)"
        )
    return vid


def parse_trunk(value: str | list[int]) -> frozenset[int]:
    """``N:M:...`` (or a TOML list): the VLANs a trunk port carries."""
    items = value if isinstance(value, list) else str(value).split(":")
    vids = [parse_vid(item) for item in items if item != ""]
    if not vids:
        raise VlanConfigError(f"want VLAN ids N:M:..., got {value!r}")
    if len(set(vids)) != len(vids):
        raise VlanConfigError(f"a VLAN is named twice in {value!r}")
    return frozenset(vids)


@dataclass(frozen=True, slots=True)
class PortVlan:
    """A port's VLAN configuration: ``access`` (one VID, untagged at the port) or ``trunk`` (VIDs, tagged)."""

    access: int | None = None
    trunk: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if (self.access is None) == (not self.trunk):
            raise VlanConfigError("a port is an access port of one VLAN or a trunk of some, not both or neither")
        for vid in (self.access,) if self.access is not None else tuple(self.trunk):
            parse_vid(vid)

    def carries(self, vid: int) -> bool:
        """Whether frames of VLAN ``vid`` cross this port."""
        return vid == self.access or vid in self.trunk

    def describe(self) -> str:
        """``access 10`` or ``trunk 10:20``, for the log and the control socket."""
        if self.access is not None:
            return f"access {self.access}"
        return "trunk " + ":".join(str(v) for v in sorted(self.trunk))


def tag_of(frame: bytes) -> int | None:
    """The TCI of an 802.1Q-tagged frame, ``None`` for an untagged one.

    ``ValueError`` for a frame whose EtherType says tagged but that is too
    short to hold the tag and the inner EtherType.
    """
    if frame[12:14] != TPID:
        return None
    if len(frame) < TAGGED_HLEN:
        raise ValueError(f"{len(frame)}-byte 802.1Q frame is shorter than a tagged header ({TAGGED_HLEN})")
    return int.from_bytes(frame[14:16], "big")


def untag(frame: bytes) -> bytes:
    """The frame without its (outermost) 802.1Q tag."""
    return frame[:12] + frame[16:]


def tagged(frame: bytes, vid: int, pcp: int = 0) -> bytes:
    """The untagged ``frame`` with a tag for ``vid`` (and priority ``pcp``) inserted after the MACs."""
    return frame[:12] + TPID + ((pcp << 13) | vid).to_bytes(2, "big") + frame[12:]


def shift_csum(csum: tuple[int, int] | None, by: int) -> tuple[int, int] | None:
    """A pending checksum's ``(csum_start, csum_offset)`` once the L3 header moved by ``by`` bytes."""
    return None if csum is None else (csum[0] + by, csum[1])
