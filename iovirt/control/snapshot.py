"""Devices and their counters read as plain data, for the control commands and the metrics.

Device names: every device has its label (``net0``, ``blk1``: by kind and
order of creation, never reused in a process) and its socket path; both
name it (:func:`find`).

Counters are copied per device (a ``dict`` of a ``Counter`` is one C call
under the GIL, so a copy is consistent even while the data plane counts).
Ring state is read under the data-path lock, so a ring is never seen
half-started or half-stopped.
"""

from __future__ import annotations

from typing import Any

from iovirt.control.protocol import DEVICE_NOT_FOUND, ControlError
from iovirt.vhost_user.peers import peer_credentials
from iovirt.vhost_user.server import Endpoint, VhostUserServer
from iovirt.virtio.errors import VirtqueueError
from iovirt.virtio.net.switch import LearningSwitch
from iovirt.virtio.queue import ring_of


def device_name(endpoint: Endpoint) -> str:
    """The device's stable name: its label (``net0``, ``blk0``, ...)."""
    return endpoint.device.device.label


def find(server: VhostUserServer, name: str) -> Endpoint:
    """The endpoint named ``name`` (a label, a socket path or the endpoint's name); DeviceNotFound else."""
    for endpoint in server.endpoints:
        if name in (device_name(endpoint), endpoint.path, endpoint.name):
            return endpoint
    known = ", ".join(device_name(e) for e in server.endpoints) or "none"
    raise ControlError(DEVICE_NOT_FOUND, f"no device {name!r} (devices: {known})")


def kind(endpoint: Endpoint) -> str:
    """``net``, ``blk``, ...: the virtio device's name without its ``virtio-`` prefix."""
    return endpoint.device.device.name.removeprefix("virtio-")


def describe(endpoint: Endpoint) -> dict[str, Any]:
    """One device's state: socket, type, front-end, negotiated features, and each queue (call under the data-path lock)."""
    device = endpoint.device.device
    conn = endpoint.connection
    info: dict[str, Any] = {
        "name": device_name(endpoint),
        "socket": endpoint.path,
        "type": kind(endpoint),
        "connected": conn is not None,
        "connections_served": endpoint.connections_served,
        "needs_reset": device.needs_reset,
        "worker": endpoint.worker.name if endpoint.worker is not None else None,
    }
    if conn is None:
        return info
    peer = peer_credentials(conn.sock)
    session = conn.session
    info["frontend"] = None if peer is None else {"pid": peer.pid, "uid": peer.uid, "gid": peer.gid}
    info["features"] = f"{session.features:#x}"
    info["protocol_features"] = f"{session.protocol_features:#x}"
    info["status"] = session.status
    info["queues"] = [_queue(vring, device.queues[vring.index]) for vring in session.vrings.rings]
    return info


def _queue(vring: Any, queue: Any) -> dict[str, Any]:
    if vring.started and vring.awaiting_translation:
        state = "awaiting-translation"
    elif vring.started and vring.awaiting_log:
        state = "awaiting-log"
    else:
        state = "started" if vring.started else "stopped"
    entry: dict[str, Any] = {"index": vring.index, "state": state, "enabled": vring.enabled, "num": vring.num,
                             "packed": vring.packed}
    if vring.addr is not None:
        entry["addr"] = {"desc": f"{vring.addr.desc:#x}", "avail": f"{vring.addr.avail:#x}",
                         "used": f"{vring.addr.used:#x}"}
    if queue is not None:
        ring: Any = ring_of(queue)
        try:
            saved = ring.state()
            entry["last_avail_idx"], entry["used_idx"] = saved.last_avail_idx, saved.used_idx
            if not vring.packed:  # a packed ring has no avail index (2.8): its positions carry wrap counters
                entry["avail_idx"] = ring.avail_idx()
        except VirtqueueError:  # released between the check and the read: report what is known
            pass
    elif vring.packed:
        # vhost-user.rst "Vring descriptor indices for packed virtqueues": both positions in the base.
        entry["last_avail_idx"], entry["used_idx"] = vring.base & 0xFFFF, vring.base >> 16
    else:
        entry["last_avail_idx"] = vring.base
    return entry


def counters(endpoint: Endpoint) -> dict[str, Any]:
    """One device's counters: device totals (drops by reason among them), each queue's, the IOTLB's."""
    device = endpoint.device.device
    stats: dict[str, Any] = {
        "name": device_name(endpoint),
        "type": kind(endpoint),
        "counters": dict(getattr(device, "stats", {})),  # device types without device-level counters have none
        "queues": [{"index": i, **dict(q)} for i, q in enumerate(device.queue_stats)],
    }
    conn = endpoint.connection
    iotlb = conn.session.vrings.iotlb if conn is not None else None
    stats["iotlb"] = dict(iotlb.stats) if iotlb is not None else {}
    stats["iotlb_misses"] = stats["iotlb"].get("misses_sent", 0)
    return stats


def switch_counters(switch: LearningSwitch) -> dict[str, int]:
    """The learning switch's own counters, and its table's size."""
    return {
        "forwarded": switch.forwarded,
        "flooded": switch.flooded,
        "filtered": switch.filtered,
        "learn_refused": switch.learn_refused,
        "aged_out": switch.aged_out,
        "vlan_dropped": switch.vlan_dropped,
        "malformed": switch.malformed,
        "handed_off": switch.handed_off,
        "handoff_dropped": switch.handoff_dropped,
        "entries": len(switch.table),
    }
