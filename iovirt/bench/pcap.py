"""pcap output of what devices emitted (scapy's ``PcapWriter``, link type Ethernet).

The virtio-net header is not part of the frame on a wire: it is stripped, so
Wireshark and tshark read the file as plain Ethernet (``DLT_EN10MB``).
"""

from __future__ import annotations

from os import PathLike
from typing import Iterable

from scapy.data import DLT_EN10MB
from scapy.layers.l2 import Ether
from scapy.packet import Packet
from scapy.utils import PcapWriter


def write_pcap(path: str | PathLike, packets: Iterable[Packet]) -> int:
    """Write the Ethernet frames of ``packets`` (their arrival times kept) to ``path``; returns the count."""
    count = 0
    with PcapWriter(str(path), linktype=DLT_EN10MB, sync=True) as writer:
        for pkt in packets:
            frame = Ether(bytes(pkt[Ether]))
            frame.time = pkt.time
            writer.write(frame)
            count += 1
    return count
