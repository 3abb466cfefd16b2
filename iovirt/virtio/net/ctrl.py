"""virtio-net's control virtqueue where iovirt serves it: the in-process transport (virtio 1.4 5.1.9.5).

Under vhost-user the front-end (QEMU, DPDK virtio-user) serves the control
queue itself and never passes its commands on, so only a device made with
``VirtioNet(..., ctrl_vq=True)`` and driven in-process
(:mod:`iovirt.platform`) has one, and only such a device offers the feature
bits of the commands below.  It is the last queue, after the receive and
transmit pairs (5.1.2).

A command is ``struct virtio_net_ctrl``: ``u8 class``, ``u8 command`` and
the command's data in device-readable buffers, then ``u8 ack`` in a
device-writable one (``VIRTIO_NET_OK`` or ``VIRTIO_NET_ERR``) and, for the
commands that answer something, the ``command-specific-result`` after it
(cut to the writable space the driver gave).  Served:

- ``VIRTIO_NET_CTRL_RX`` (5.1.9.5.1, VIRTIO_NET_F_CTRL_RX and _CTRL_RX_EXTRA)
  and ``VIRTIO_NET_CTRL_MAC`` ``_TABLE_SET`` (5.1.9.5.2, VIRTIO_NET_F_CTRL_RX)
  / ``_ADDR_SET`` (VIRTIO_NET_F_CTRL_MAC_ADDR): receive modes and the MAC
  filtering table (``rx_filter.py``), honoured on receive.
- ``VIRTIO_NET_CTRL_VLAN`` (5.1.9.5.3) ``_ADD`` / ``_DEL`` with a le16 VLAN
  id: the device's VLAN filter table.  While ``VIRTIO_NET_F_CTRL_VLAN`` is
  negotiated the table starts empty and a received frame tagged with a VID
  not in it is dropped (as QEMU's virtio-net does); untagged frames always
  pass.
- ``VIRTIO_NET_CTRL_ANNOUNCE_ACK`` (5.1.9.5.4, VIRTIO_NET_F_GUEST_ANNOUNCE):
  clears VIRTIO_NET_S_ANNOUNCE before the buffer is used.
- ``VIRTIO_NET_CTRL_MQ`` ``_VQ_PAIRS_SET`` (5.1.9.5.6): within
  1..max_virtqueue_pairs, the pairs receive steering spreads flows over
  (receiveq1 alone after a reset); ``_RSS_CONFIG`` (5.1.9.5.7,
  VIRTIO_NET_F_RSS): receive-side scaling from then on (``rss.py``).
- ``VIRTIO_NET_CTRL_HASH_TUNNEL_SET`` (5.1.9.4.4, VIRTIO_NET_F_HASH_TUNNEL):
  the encapsulation types RSS hashes on the inner header (``rss.py``).
- ``VIRTIO_NET_CTRL_NOTF_COAL`` (5.1.9.5.10, VIRTIO_NET_F_NOTF_COAL and
  _VQ_NOTF_COAL): the coalescing parameters (``coalesce.py``).
- ``VIRTIO_NET_CTRL_STATS`` (5.1.9.5.11, VIRTIO_NET_F_DEVICE_STATS):
  ``ctrl_stats.py``.

Anything else, a command whose feature was not negotiated, or one of the
wrong size or with a value out of range, is answered ``VIRTIO_NET_ERR`` and
logged once, naming the problem.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from iovirt.virtio.chain import read_chain, write_chain
from iovirt.virtio.net import ctrl_stats, vlan
from iovirt.virtio.net.coalesce import Coalescing
from iovirt.virtio.net.defs import (
    ETH_ALEN,
    VIRTIO_NET_CTRL_ANNOUNCE,
    VIRTIO_NET_CTRL_ANNOUNCE_ACK,
    VIRTIO_NET_CTRL_COAL,
    VIRTIO_NET_CTRL_COAL_VQ,
    VIRTIO_NET_CTRL_HASH_TUNNEL,
    VIRTIO_NET_CTRL_HASH_TUNNEL_SET,
    VIRTIO_NET_CTRL_MAC,
    VIRTIO_NET_CTRL_MAC_ADDR_SET,
    VIRTIO_NET_CTRL_MAC_TABLE_SET,
    VIRTIO_NET_CTRL_MQ,
    VIRTIO_NET_CTRL_MQ_RSS_CONFIG,
    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
    VIRTIO_NET_CTRL_NOTF_COAL,
    VIRTIO_NET_CTRL_NOTF_COAL_RX_SET,
    VIRTIO_NET_CTRL_NOTF_COAL_TX_SET,
    VIRTIO_NET_CTRL_NOTF_COAL_VQ_GET,
    VIRTIO_NET_CTRL_NOTF_COAL_VQ_SET,
    VIRTIO_NET_CTRL_RX,
    VIRTIO_NET_CTRL_RX_ALLMULTI,
    VIRTIO_NET_CTRL_RX_PROMISC,
    VIRTIO_NET_CTRL_STATS,
    VIRTIO_NET_CTRL_STATS_GET,
    VIRTIO_NET_CTRL_STATS_QUERY,
    VIRTIO_NET_CTRL_VLAN,
    VIRTIO_NET_CTRL_VLAN_ADD,
    VIRTIO_NET_CTRL_VLAN_DEL,
    VIRTIO_NET_ERR,
    VIRTIO_NET_F_CTRL_MAC_ADDR,
    VIRTIO_NET_F_CTRL_RX,
    VIRTIO_NET_F_CTRL_RX_EXTRA,
    VIRTIO_NET_F_DEVICE_STATS,
    VIRTIO_NET_F_GUEST_ANNOUNCE,
    VIRTIO_NET_F_HASH_TUNNEL,
    VIRTIO_NET_F_NOTF_COAL,
    VIRTIO_NET_F_RSS,
    VIRTIO_NET_F_VQ_NOTF_COAL,
    VIRTIO_NET_OK,
)
from iovirt.virtio.net.rss import SUPPORTED_TUNNEL_TYPES, RssConfig, RssConfigError
from iovirt.virtio.net.rx_filter import RX_MODES, MacTableError, RxFilter, parse_mac_table
from iovirt.virtio.queue import SplitQueue

if TYPE_CHECKING:
    from iovirt.virtio.net.device import VirtioNet

__all__ = ["NetCtrl", "VIRTIO_NET_CTRL_VLAN", "VIRTIO_NET_ERR", "VIRTIO_NET_OK"]

MAX_COMMAND = 1024  # the longest command read: two full MAC tables (2 * (4 + 64 * 6) bytes) and the header fit
VLAN_IDS = 4096  # 5.1.9.5.3: the table covers every 12-bit VLAN id

_LE16 = struct.Struct("<H")


class CommandError(ValueError):
    """A control command the device answers VIRTIO_NET_ERR; the text says what was wrong."""


class NetCtrl:
    """The control queue of one :class:`~iovirt.virtio.net.device.VirtioNet` and the state its commands set."""

    def __init__(self, device: "VirtioNet") -> None:
        self.device = device
        self.vlans: set[int] = set()
        self.rx_filter = RxFilter()
        self.coalescing = Coalescing(device.queue_pairs)
        self.commands = 0  # 5.1.9.5.11: command_num and ok_num of the control queue's statistics
        self.ok = 0
        self.virtqueue_pairs = 1
        """The pairs receive steering uses: 1 after a reset, then what VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET says."""
        self.rss: RssConfig | None = None
        """The last VIRTIO_NET_CTRL_MQ_RSS_CONFIG: RSS steers received frames from then on (5.1.9.5.7.3)."""
        self.tunnel_types = 0
        """enabled_tunnel_types: 0 (no inner header hash) after a reset (5.1.9.4.4.4)."""

    def reset(self) -> None:
        """A device reset empties the tables and puts the modes and parameters back."""
        self.vlans.clear()
        self.rx_filter.reset()
        self.coalescing.reset()
        self.commands = self.ok = 0
        self.virtqueue_pairs = 1
        self.rss = None
        self.tunnel_types = 0

    def allows(self, frame: bytes) -> bool:
        """Whether the VLAN filter lets ``frame`` through (untagged, or tagged with a VID in the table)."""
        if frame[12:14] != vlan.TPID or len(frame) < vlan.TAGGED_HLEN:
            return True
        return int.from_bytes(frame[14:16], "big") & vlan.VID_MASK in self.vlans

    def process(self, index: int, queue: SplitQueue) -> None:
        """Serve every available command and signal the driver once."""
        served = 0
        while (chain := queue.pop()) is not None:
            self.commands += 1
            ack, result = VIRTIO_NET_ERR, b""
            if chain.writable_len >= 1 and 2 <= chain.readable_len <= MAX_COMMAND:
                data = read_chain(queue.memory, chain, MAX_COMMAND)
                try:
                    result = self._command(data[0], data[1], data[2:])
                    ack = VIRTIO_NET_OK
                    self.ok += 1
                except CommandError as exc:
                    self.device.log.warning("%s: control command class %d command %d refused: %s; answered "
                                            "VIRTIO_NET_ERR", self.device.label, data[0], data[1], exc)
            else:
                self.device.log.warning("%s: malformed control command (%d bytes in, %d out); answered ERR",
                                        self.device.label, chain.readable_len, chain.writable_len)
            written = write_chain(queue.memory, chain, bytes([ack]) + result) if chain.writable_len else 0
            queue.push(chain.head, written)
            served += 1
        if served:
            self.device.signal(index)

    def _need(self, bit: int, name: str) -> None:
        if not self.device.has_feature(bit):
            raise CommandError(f"{name} was not negotiated")

    def _command(self, cls: int, command: int, payload: bytes) -> bytes:
        """Carry out one command; returns its command-specific-result, raises :class:`CommandError`."""
        if cls == VIRTIO_NET_CTRL_RX and command in RX_MODES:
            return self._rx_mode(command, payload)
        if cls == VIRTIO_NET_CTRL_MAC and command in (VIRTIO_NET_CTRL_MAC_TABLE_SET, VIRTIO_NET_CTRL_MAC_ADDR_SET):
            return self._mac(command, payload)
        if cls == VIRTIO_NET_CTRL_VLAN and command in (VIRTIO_NET_CTRL_VLAN_ADD, VIRTIO_NET_CTRL_VLAN_DEL):
            vid = self._le16(payload, "a VLAN id")
            if vid >= VLAN_IDS:
                raise CommandError(f"VLAN id {vid} beyond {VLAN_IDS - 1}")
            if command == VIRTIO_NET_CTRL_VLAN_ADD:
                self.vlans.add(vid)
            else:
                self.vlans.discard(vid)
            return b""
        if cls == VIRTIO_NET_CTRL_ANNOUNCE and command == VIRTIO_NET_CTRL_ANNOUNCE_ACK:
            self._need(VIRTIO_NET_F_GUEST_ANNOUNCE, "VIRTIO_NET_F_GUEST_ANNOUNCE")
            # 5.1.9.5.4.2: VIRTIO_NET_S_ANNOUNCE is clear before the buffer is used (it is used after this returns).
            self.device.announce_pending = False
            return b""
        if cls == VIRTIO_NET_CTRL_MQ and command == VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET:
            pairs = self._le16(payload, "virtqueue_pairs")
            if not 1 <= pairs <= self.device.queue_pairs:
                raise CommandError(f"{pairs} queue pairs asked for, the device has 1..{self.device.queue_pairs}")
            # 5.1.9.5.6.2: in force before the buffer is used.
            self.virtqueue_pairs = pairs
            return b""
        if cls == VIRTIO_NET_CTRL_MQ and command == VIRTIO_NET_CTRL_MQ_RSS_CONFIG:
            self._need(VIRTIO_NET_F_RSS, "VIRTIO_NET_F_RSS")
            try:
                self.rss = RssConfig.parse(payload, self.device.queue_pairs)
            except RssConfigError as exc:
                raise CommandError(f"virtio_net_rss_config: {exc}") from None
            return b""
        if cls == VIRTIO_NET_CTRL_HASH_TUNNEL and command == VIRTIO_NET_CTRL_HASH_TUNNEL_SET:
            self._need(VIRTIO_NET_F_HASH_TUNNEL, "VIRTIO_NET_F_HASH_TUNNEL")
            if len(payload) != 4:
                raise CommandError(f"{len(payload)} bytes of virtnet_hash_tunnel, expected 4")
            types = int.from_bytes(payload, "little")
            if types & ~SUPPORTED_TUNNEL_TYPES:  # 5.1.9.4.4.4
                raise CommandError(f"enabled_tunnel_types {types:#x} beyond the supported {SUPPORTED_TUNNEL_TYPES:#x}")
            self.tunnel_types = types
            return b""
        if cls == VIRTIO_NET_CTRL_NOTF_COAL:
            return self._coalescing(command, payload)
        if cls == VIRTIO_NET_CTRL_STATS and command in (VIRTIO_NET_CTRL_STATS_QUERY, VIRTIO_NET_CTRL_STATS_GET):
            self._need(VIRTIO_NET_F_DEVICE_STATS, "VIRTIO_NET_F_DEVICE_STATS")
            if command == VIRTIO_NET_CTRL_STATS_QUERY:
                if payload:
                    raise CommandError(f"VIRTIO_NET_CTRL_STATS_QUERY takes no data, got {len(payload)} bytes")
                return ctrl_stats.capabilities()
            try:
                entries = ctrl_stats.parse_request(self.device, payload)
            except ctrl_stats.StatsRequestError as exc:
                raise CommandError(str(exc)) from None
            return ctrl_stats.reply(self.device, entries, self.commands, self.ok + 1)  # ok_num counts this one
        raise CommandError("unknown class or command")

    @staticmethod
    def _le16(payload: bytes, what: str) -> int:
        if len(payload) != _LE16.size:
            raise CommandError(f"{len(payload)} bytes of data, expected {what} (le16)")
        value: int = _LE16.unpack(payload)[0]
        return value

    def _rx_mode(self, command: int, payload: bytes) -> bytes:
        if command in (VIRTIO_NET_CTRL_RX_PROMISC, VIRTIO_NET_CTRL_RX_ALLMULTI):
            self._need(VIRTIO_NET_F_CTRL_RX, "VIRTIO_NET_F_CTRL_RX")
        else:
            self._need(VIRTIO_NET_F_CTRL_RX_EXTRA, "VIRTIO_NET_F_CTRL_RX_EXTRA")
        if len(payload) != 1 or payload[0] > 1:
            raise CommandError(f"receive mode data {payload.hex() or 'missing'}, expected one byte 0 or 1")
        self.rx_filter.set_mode(command, bool(payload[0]))
        return b""

    def _mac(self, command: int, payload: bytes) -> bytes:
        if command == VIRTIO_NET_CTRL_MAC_TABLE_SET:
            self._need(VIRTIO_NET_F_CTRL_RX, "VIRTIO_NET_F_CTRL_RX")
            try:
                unicast, multicast = parse_mac_table(payload)
            except MacTableError as exc:
                raise CommandError(f"MAC table: {exc}") from None
            # 5.1.9.5.2.1: the table is in place before the command is used.
            self.rx_filter.set_table(unicast, multicast)
            return b""
        self._need(VIRTIO_NET_F_CTRL_MAC_ADDR, "VIRTIO_NET_F_CTRL_MAC_ADDR")
        if len(payload) != ETH_ALEN:
            raise CommandError(f"{len(payload)} bytes of MAC address, expected {ETH_ALEN}")
        if payload[0] & 1:
            raise CommandError(f"MAC address {payload.hex(':')} is a multicast address")
        # 5.1.9.5.2.1: mac in config space changes before the command is used.
        self.device.mac = bytes(payload)
        return b""

    def _coalescing(self, command: int, payload: bytes) -> bytes:
        coal, device = self.coalescing, self.device
        if command in (VIRTIO_NET_CTRL_NOTF_COAL_TX_SET, VIRTIO_NET_CTRL_NOTF_COAL_RX_SET):
            self._need(VIRTIO_NET_F_NOTF_COAL, "VIRTIO_NET_F_NOTF_COAL")
            if len(payload) != VIRTIO_NET_CTRL_COAL.size:
                raise CommandError(f"{len(payload)} bytes of virtio_net_ctrl_coal, expected {VIRTIO_NET_CTRL_COAL.size}")
            max_packets, max_usecs = VIRTIO_NET_CTRL_COAL.unpack(payload)
            coal.set_direction(command == VIRTIO_NET_CTRL_NOTF_COAL_TX_SET, (max_packets, max_usecs))
            device.coalescing_changed()
            return b""
        if command not in (VIRTIO_NET_CTRL_NOTF_COAL_VQ_SET, VIRTIO_NET_CTRL_NOTF_COAL_VQ_GET):
            raise CommandError("unknown notifications coalescing command")
        self._need(VIRTIO_NET_F_VQ_NOTF_COAL, "VIRTIO_NET_F_VQ_NOTF_COAL")
        size = VIRTIO_NET_CTRL_COAL_VQ.size if command == VIRTIO_NET_CTRL_NOTF_COAL_VQ_SET else 4
        if len(payload) != size:
            raise CommandError(f"{len(payload)} bytes of virtio_net_ctrl_coal_vq, expected {size}")
        vq_index = _LE16.unpack_from(payload)[0]  # then reserved: ignored (5.1.9.5.10.6)
        # 5.1.9.5.10.6: only an enabled transmit or receive queue.
        if vq_index >= 2 * device.queue_pairs or device.queues[vq_index] is None or not device.enabled[vq_index]:
            raise CommandError(f"vq_index {vq_index} is not an enabled transmit or receive queue")
        if command == VIRTIO_NET_CTRL_NOTF_COAL_VQ_GET:
            return VIRTIO_NET_CTRL_COAL.pack(*coal.params[vq_index])
        _, _, max_packets, max_usecs = VIRTIO_NET_CTRL_COAL_VQ.unpack(payload)
        coal.params[vq_index] = (max_packets, max_usecs)
        device.coalescing_changed()
        return b""
