"""Counters in the Prometheus text exposition format, version 0.0.4.

Each metric family gets one ``# HELP`` and one ``# TYPE`` line, then one
sample per label set (``device=``, ``queue=``, ``reason=``), as the format
asks (prometheus.io "Exposition formats": families are not split, label
values escape backslash, double quote and newline).  Device counters named
``<dir>_dropped_<reason>`` become ``iovirt_<dir>_dropped_by_reason_total``
with a ``reason`` label; every other counter ``iovirt_<name>_total``.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4"
"""What an HTTP exporter would send the text as."""

_DROP_REASON = re.compile(r"^(rx|tx)_dropped_(\w+)$")
_NOT_NAME = re.compile(r"[^a-zA-Z0-9_]")

Sample = tuple[dict[str, str], int | float]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _name(text: str) -> str:
    return _NOT_NAME.sub("_", text)


def render(devices: list[dict[str, Any]], switch: dict[str, int] | None = None) -> str:
    """The exposition text for the counters of :func:`iovirt.control.snapshot.counters` (and the switch's)."""
    families: dict[tuple[str, str, str], list[Sample]] = defaultdict(list)
    for dev in devices:
        device = {"device": dev["name"], "type": dev["type"]}
        for name, value in sorted(dev["counters"].items()):
            match = _DROP_REASON.match(name)
            if match:
                key = (f"iovirt_{match.group(1)}_dropped_by_reason_total", "counter",
                       f"{match.group(1).upper()} frames dropped, by reason")
                families[key].append(({**device, "reason": match.group(2)}, value))
            else:
                families[(f"iovirt_{_name(name)}_total", "counter", f"device counter {name}")].append((device, value))
        for queue in dev["queues"]:
            labels = {**device, "queue": str(queue["index"])}
            for name, value in sorted(queue.items()):
                if name != "index":
                    families[(f"iovirt_queue_{_name(name)}_total", "counter", f"per-queue counter {name}")].append(
                        (labels, value))
        for name, value in sorted(dev["iotlb"].items()):
            families[(f"iovirt_iotlb_{_name(name)}_total", "counter", f"device IOTLB {name}")].append((device, value))
    if switch is not None:
        for name, value in switch.items():
            if name == "entries":
                families[("iovirt_switch_fdb_entries", "gauge", "MACs in the switch's forwarding table")].append(({}, value))
            else:
                families[(f"iovirt_switch_{_name(name)}_total", "counter", f"switch {name}")].append(({}, value))
    lines: list[str] = []
    for (name, kind, help_text), samples in families.items():
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{name}{_labels(labels)} {value}" for labels, value in samples)
    return "\n".join(lines) + "\n"
