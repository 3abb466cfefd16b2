"""Two bench ports joined by a switch, in-process or over vhost-user sockets.

:class:`NetPair` is what the pytest fixtures hand out: ``send`` (``send_raw``)
transmits on port ``a``, ``recv`` (``recv_raw``) returns what the device of
port ``b`` received, and an
optional :class:`~iovirt.bench.capture.CapturePort` on the same switch sees
what crossed it.  :class:`ServedNet` runs iovirt's vhost-user server (what
``iovirt serve --net S1 --net S2`` runs) in a thread of this process.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, ContextManager, Iterable, Sequence

from scapy.packet import Packet

from iovirt.bench.capture import CapturePort
from iovirt.bench.latency import LatencyMeter
from iovirt.bench.port import SUPPORTED_FEATURES, BenchPort
from iovirt.bench.target import DEFAULT_TIMEOUT, InProcessTarget, VhostUserTarget
from iovirt.vhost_user.server import VhostUserServer
from iovirt.virtio.net.device import VirtioNet
from iovirt.virtio.net.switch import LearningSwitch

DEFAULT_FEATURES = SUPPORTED_FEATURES


def port_mac(index: int) -> bytes:
    """The MAC of the ``index``-th device the bench creates (locally administered)."""
    return bytes([0x52, 0x54, 0x00, 0xBE, 0x00, index & 0xFF])


class NetPair:
    """Ports ``a`` and ``b`` on one switch (plus an optional capture port)."""

    def __init__(self, a: BenchPort, b: BenchPort, switch: LearningSwitch | None = None, capture: CapturePort | None = None) -> None:
        self.a = a
        self.b = b
        self.switch = switch
        self.capture = capture

    def send(self, pkts: Packet | bytes | Iterable[Packet | bytes]) -> int:
        """Transmit on port ``a`` (see :meth:`BenchPort.send`)."""
        return self.a.send(pkts)

    def recv(self, count: int | None = None, timeout: float | None = None) -> list[Packet]:
        """What port ``b`` received (see :meth:`BenchPort.recv`)."""
        return self.b.recv(count, timeout)

    def send_raw(self, frames: Sequence[bytes], hdr: bytes | None = None, *, latency: LatencyMeter | None = None) -> int:
        """Transmit bytes on port ``a`` (see :meth:`BenchPort.send_raw`)."""
        return self.a.send_raw(frames, hdr, latency=latency)

    def recv_raw(self, count: int | None = None, timeout: float | None = None, *, latency: LatencyMeter | None = None) -> list[Any]:
        """What port ``b`` received, as bytes (see :meth:`BenchPort.recv_raw`)."""
        return self.b.recv_raw(count, timeout, latency=latency)

    @property
    def emitted(self) -> list[Packet]:
        """Every frame a device wrote to a bench port, plus what the capture port saw, in time order."""
        pkts = self.a.received + self.b.received + (self.capture.packets if self.capture else [])
        return sorted(pkts, key=lambda p: p.time)

    def close(self) -> None:
        """Release both ports and detach the capture port."""
        if self.capture is not None:
            self.capture.detach()
        self.a.close()
        self.b.close()

    def __enter__(self) -> "NetPair":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    def in_process(
        cls,
        features: int = DEFAULT_FEATURES,
        b_features: int | None = None,
        *,
        capture: bool = False,
        a: dict[str, Any] | None = None,
        b: dict[str, Any] | None = None,
        mtu: int = 1500,
    ) -> "NetPair":
        """Two in-process :class:`VirtioNet` devices on a new switch.

        ``features``/``b_features`` are the bits each driver wants (masked
        to what the bench supports); ``a``/``b`` are :class:`BenchPort`
        options per port.
        """
        switch = LearningSwitch()
        ports = []
        for i, (wanted, options) in enumerate(((features, a), (features if b_features is None else b_features, b))):
            device = VirtioNet(port_mac(i), switch, mtu=mtu, label=f"bench{'ab'[i]}")
            target = InProcessTarget(device, wanted & SUPPORTED_FEATURES)
            ports.append(BenchPort(target, name=f"port {'ab'[i]}", **(options or {})))
        tap = CapturePort(switch) if capture else None
        return cls(ports[0], ports[1], switch, tap)

    @classmethod
    def vhost_user(
        cls,
        path_a: str,
        path_b: str,
        features: int = DEFAULT_FEATURES,
        b_features: int | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        switch: LearningSwitch | None = None,
        lock: ContextManager | None = None,
        capture: bool = False,
        a: dict[str, Any] | None = None,
        b: dict[str, Any] | None = None,
    ) -> "NetPair":
        """Ports on two sockets of one vhost-user back-end whose devices share a switch.

        ``switch`` and ``lock`` (the server's data-plane lock) are needed
        only for a capture port, which needs the back-end in this process.
        """
        targets: list[VhostUserTarget] = []
        try:
            ports = []
            for i, (path, wanted, options) in enumerate(
                ((path_a, features, a), (path_b, features if b_features is None else b_features, b))
            ):
                targets.append(VhostUserTarget(path, wanted & SUPPORTED_FEATURES, timeout))
                options = {"timeout": timeout, **(options or {})}
                ports.append(BenchPort(targets[-1], name=f"port {'ab'[i]} ({path})", **options))
        except BaseException:
            for target in targets:
                target.close()
            raise
        tap = CapturePort(switch, lock=lock) if capture and switch is not None else None
        return cls(ports[0], ports[1], switch, tap)


class ServedNet:
    """iovirt's vhost-user server in a thread: ``ports`` virtio-net devices on one switch.

    With ``workers`` > 1 the ports are served by that many data-plane
    threads, round robin, as ``iovirt serve --workers`` does.
    """

    def __init__(
        self, directory: str | Path, ports: int = 2, queue_pairs: int = 1, mtu: int = 1500, workers: int = 1
    ) -> None:
        self.switch = LearningSwitch()
        self.server = VhostUserServer(workers=workers)
        self.devices: list[VirtioNet] = []
        self.paths: list[str] = []
        for i in range(ports):
            device = VirtioNet(port_mac(0x10 + i), self.switch, queue_pairs=queue_pairs, mtu=mtu, label=f"net{i}")
            path = str(Path(directory) / f"net{i}.sock")
            endpoint = self.server.add_socket(path, device, name=f"net{i} ({path})")
            if workers > 1 and endpoint.worker is not None:
                self.switch.set_owner(device, endpoint.worker, self.server.dataplane.home)
            self.devices.append(device)
            self.paths.append(path)
        self.thread = threading.Thread(target=self.server.serve_forever, name="iovirt-serve", daemon=True)
        self.thread.start()

    @property
    def lock(self) -> ContextManager:
        """The data-plane lock: hold it to touch the switch from another thread."""
        return self.server.dataplane.lock

    def pair(self, features: int = DEFAULT_FEATURES, b_features: int | None = None, **options: Any) -> NetPair:
        """A :class:`NetPair` on the first two sockets (capture ports use this server's switch and lock)."""
        return NetPair.vhost_user(
            self.paths[0], self.paths[1], features, b_features, switch=self.switch, lock=self.lock, **options
        )

    def stop(self) -> None:
        """Stop the server and wait for its thread."""
        self.server.stop()
        self.thread.join(timeout=10)

    def __enter__(self) -> "ServedNet":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
