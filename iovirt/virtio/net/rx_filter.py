"""virtio-net receive filtering set through the control queue (virtio 1.4 5.1.9.5.1 and 5.1.9.5.2).

With VIRTIO_NET_F_CTRL_RX the driver sets the receive modes (``VIRTIO_NET_CTRL_RX_PROMISC``,
``_ALLMULTI``; with VIRTIO_NET_F_CTRL_RX_EXTRA also ``_ALLUNI``, ``_NOMULTI``, ``_NOUNI``, ``_NOBCAST``)
and the MAC filtering table (``VIRTIO_NET_CTRL_MAC_TABLE_SET``: a unicast and a multicast table).  A
received frame passes (the order decides which mode wins, 5.1.9.5.1.1):

1. promiscuous mode on: every frame, whatever the other modes;
2. broadcast: unless broadcast receive is suppressed (NOMULTI does not apply to it, ALLMULTI does
   not bring it back);
3. multicast: never while multicast receive is suppressed (even with ALLMULTI), else with ALLMULTI or
   when the address is in the multicast table;
4. unicast: never while unicast receive is suppressed (even with ALLUNI), else with ALLUNI, or when it
   is the device's ``mac`` or in the unicast table (5.1.9.5.2.1).

After a reset the tables are empty (5.1.9.5.2.1) and promiscuous mode is on, as in QEMU's virtio-net:
a driver that never sets a mode keeps receiving what it did without VIRTIO_NET_F_CTRL_RX.  A table
given more than :data:`MAC_TABLE_ENTRIES` addresses turns into "accept every address of that kind"
(the spec's footnote allows falling back to allmulti or promiscuous mode).
"""

from __future__ import annotations

import struct

from iovirt.virtio.net.defs import (
    ETH_ALEN,
    VIRTIO_NET_CTRL_RX_ALLMULTI,
    VIRTIO_NET_CTRL_RX_ALLUNI,
    VIRTIO_NET_CTRL_RX_NOBCAST,
    VIRTIO_NET_CTRL_RX_NOMULTI,
    VIRTIO_NET_CTRL_RX_NOUNI,
    VIRTIO_NET_CTRL_RX_PROMISC,
)

MAC_TABLE_ENTRIES = 64  # addresses kept per table (QEMU's MAC_TABLE_ENTRIES); more: accept all of that kind
BROADCAST = b"\xff" * ETH_ALEN
RX_MODES = {
    VIRTIO_NET_CTRL_RX_PROMISC: "promisc",
    VIRTIO_NET_CTRL_RX_ALLMULTI: "allmulti",
    VIRTIO_NET_CTRL_RX_ALLUNI: "alluni",
    VIRTIO_NET_CTRL_RX_NOMULTI: "nomulti",
    VIRTIO_NET_CTRL_RX_NOUNI: "nouni",
    VIRTIO_NET_CTRL_RX_NOBCAST: "nobcast",
}
"""Each VIRTIO_NET_CTRL_RX command and the mode it turns on (1) or off (0)."""

_LE32 = struct.Struct("<I")


class MacTableError(ValueError):
    """A VIRTIO_NET_CTRL_MAC_TABLE_SET payload that is not two well-formed tables."""


def parse_mac_table(payload: bytes) -> tuple[list[bytes], list[bytes]]:
    """The unicast and multicast tables of a VIRTIO_NET_CTRL_MAC_TABLE_SET payload (two ``virtio_net_ctrl_mac``).

    Raises :class:`MacTableError` when the sizes do not add up.
    """
    tables: list[list[bytes]] = []
    pos = 0
    for kind in ("unicast", "multicast"):
        if len(payload) < pos + _LE32.size:
            raise MacTableError(f"the {kind} table has no entries count ({len(payload)} bytes)")
        (entries,) = _LE32.unpack_from(payload, pos)
        pos += _LE32.size
        end = pos + entries * ETH_ALEN
        if end > len(payload):
            raise MacTableError(f"the {kind} table claims {entries} entries, {len(payload) - pos} bytes follow")
        tables.append([payload[i : i + ETH_ALEN] for i in range(pos, end, ETH_ALEN)])
        pos = end
    if pos != len(payload):
        raise MacTableError(f"{len(payload) - pos} bytes after the two tables")
    return tables[0], tables[1]


class RxFilter:
    """The receive modes and the MAC filtering table of one device."""

    def __init__(self) -> None:
        self.modes: dict[str, bool] = {}
        self.unicast: set[bytes] = set()
        self.multicast: set[bytes] = set()
        self.all_unicast_table = False  # the last table set overflowed MAC_TABLE_ENTRIES
        self.all_multicast_table = False
        self.reset()

    def reset(self) -> None:
        """The state after a device reset: empty tables (5.1.9.5.2.1), promiscuous (as QEMU)."""
        self.modes = {name: False for name in RX_MODES.values()}
        self.modes["promisc"] = True
        self.set_table([], [])

    def set_mode(self, command: int, on: bool) -> None:
        """A VIRTIO_NET_CTRL_RX command (a key of :data:`RX_MODES`)."""
        self.modes[RX_MODES[command]] = on

    def set_table(self, unicast: list[bytes], multicast: list[bytes]) -> None:
        """Replace the MAC filtering table (VIRTIO_NET_CTRL_MAC_TABLE_SET)."""
        self.all_unicast_table = len(unicast) > MAC_TABLE_ENTRIES
        self.all_multicast_table = len(multicast) > MAC_TABLE_ENTRIES
        self.unicast = set() if self.all_unicast_table else set(unicast)
        self.multicast = set() if self.all_multicast_table else set(multicast)

    def allows(self, frame: bytes | memoryview, mac: bytes) -> bool:
        """Whether a frame the network brings passes, ``mac`` being the device's address."""
        modes = self.modes
        if modes["promisc"]:
            return True
        dest = bytes(frame[:ETH_ALEN])
        if dest == BROADCAST:
            return not modes["nobcast"]
        if dest[0] & 1:  # the group bit: multicast
            if modes["nomulti"]:
                return False
            return modes["allmulti"] or self.all_multicast_table or dest in self.multicast
        if modes["nouni"]:
            return False
        return modes["alluni"] or self.all_unicast_table or dest == mac or dest in self.unicast
