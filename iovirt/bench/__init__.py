"""The packet-level test bench: play the guest driver of a virtio-net device, with bytes or scapy packets.

* :mod:`~iovirt.bench.layers` - ``VirtioNetHdr`` scapy layers (10-, 12- and 20-byte forms).
* :mod:`~iovirt.bench.target` - the device behind a port: in-process, or any vhost-user back-end.
* :mod:`~iovirt.bench.port` - :class:`BenchPort`: ``send`` frames, ``recv`` what the device wrote;
  ``send_raw`` / ``recv_raw`` the same with bytes, over :mod:`~iovirt.bench.rawpath` (Cython twin).
* :mod:`~iovirt.bench.latency` - ingress-to-egress latency: :class:`LatencyMeter`, :class:`LatencyHistogram`.
* :mod:`~iovirt.bench.traffic` - throughput and latency runs, pcap replay, capture (``iovirt bench``).
* :mod:`~iovirt.bench.pcapio` - pcap/pcapng reading, pcapng writing with port and direction.
* :mod:`~iovirt.bench.capture` - :class:`CapturePort`: a switch port that records and injects.
* :mod:`~iovirt.bench.pair` - :class:`NetPair` (two ports on one switch), :class:`ServedNet`.
* :mod:`~iovirt.bench.reference` / :mod:`~iovirt.bench.checks` - scapy references and offload checks.
* :mod:`~iovirt.bench.pcap` - pcap output; :mod:`~iovirt.bench.pytest_plugin` - pytest fixtures.

The names below load their module on first use (PEP 562), so that importing
a light part (``iovirt bench``'s parser, :mod:`~iovirt.bench.rawpath`) does
not import scapy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "BenchError": "errors", "BenchTimeout": "errors", "TargetError": "errors", "UsedRingError": "errors",
    "CapturePort": "capture",
    "VirtioNetHdr": "layers", "VirtioNetHdrHashReport": "layers", "VirtioNetHdrLegacy": "layers", "hdr_class": "layers",
    "NetPair": "pair", "ServedNet": "pair",
    "write_pcap": "pcap",
    "BenchPort": "port",
    "InProcessTarget": "target", "VhostUserTarget": "target",
    "LatencyHistogram": "latency", "LatencyMeter": "latency",
    "RawFrame": "rawpath",
    "PcapError": "pcapio", "PcapNgWriter": "pcapio", "read_frames": "pcapio",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from iovirt.bench.capture import CapturePort
    from iovirt.bench.errors import BenchError, BenchTimeout, TargetError, UsedRingError
    from iovirt.bench.latency import LatencyHistogram, LatencyMeter
    from iovirt.bench.layers import VirtioNetHdr, VirtioNetHdrHashReport, VirtioNetHdrLegacy, hdr_class
    from iovirt.bench.pair import NetPair, ServedNet
    from iovirt.bench.pcap import write_pcap
    from iovirt.bench.pcapio import PcapError, PcapNgWriter, read_frames
    from iovirt.bench.port import BenchPort
    from iovirt.bench.rawpath import RawFrame
    from iovirt.bench.target import InProcessTarget, VhostUserTarget


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'iovirt.bench' has no attribute {name!r}")
    return getattr(importlib.import_module(f"iovirt.bench.{module}"), name)
