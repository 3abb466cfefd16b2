"""The packet-level test bench: play the guest driver of a virtio-net device with scapy packets.

* :mod:`~iovirt.bench.layers` - ``VirtioNetHdr`` scapy layers (10-, 12- and 20-byte forms).
* :mod:`~iovirt.bench.target` - the device behind a port: in-process, or any vhost-user back-end.
* :mod:`~iovirt.bench.port` - :class:`BenchPort`: ``send`` frames, ``recv`` what the device wrote.
* :mod:`~iovirt.bench.capture` - :class:`CapturePort`: a switch port that records and injects.
* :mod:`~iovirt.bench.pair` - :class:`NetPair` (two ports on one switch), :class:`ServedNet`.
* :mod:`~iovirt.bench.reference` / :mod:`~iovirt.bench.checks` - scapy references and offload checks.
* :mod:`~iovirt.bench.pcap` - pcap output; :mod:`~iovirt.bench.pytest_plugin` - pytest fixtures.
"""

from iovirt.bench.capture import CapturePort
from iovirt.bench.errors import BenchError, BenchTimeout, TargetError, UsedRingError
from iovirt.bench.layers import VirtioNetHdr, VirtioNetHdrHashReport, VirtioNetHdrLegacy, hdr_class
from iovirt.bench.pair import NetPair, ServedNet
from iovirt.bench.pcap import write_pcap
from iovirt.bench.port import BenchPort
from iovirt.bench.target import InProcessTarget, VhostUserTarget

__all__ = [
    "BenchError", "BenchPort", "BenchTimeout", "CapturePort", "InProcessTarget", "NetPair", "ServedNet",
    "TargetError", "UsedRingError", "VhostUserTarget", "VirtioNetHdr", "VirtioNetHdrHashReport",
    "VirtioNetHdrLegacy", "hdr_class", "write_pcap",
]
