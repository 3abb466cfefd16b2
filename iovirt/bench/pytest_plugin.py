"""pytest fixtures of the packet bench, for any project (entry point group ``pytest11``).

``iovirt_net``
    A :class:`~iovirt.bench.pair.NetPair` of two in-process virtio-net
    devices on one switch, with a capture port: ``iovirt_net.send(frames)``
    transmits on port ``a``, ``iovirt_net.recv(n)`` returns what port ``b``
    received.
``iovirt_vhost_net``
    The same over vhost-user: iovirt's server runs in a thread and the
    bench drives two of its sockets.  With ``--iovirt-bench-sockets A,B``
    it drives those sockets of an external back-end instead (no capture port).

Both take ``NetPair`` options through indirect parametrisation, e.g.
``@pytest.mark.parametrize("iovirt_net", [{"b": {"rx_buffer_size": 256}}], indirect=True)``.
With ``--iovirt-bench-pcap DIR`` every frame the devices emitted during a test
is written to ``DIR/<test name>.pcap``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

import pytest

from iovirt.bench.pair import NetPair, ServedNet
from iovirt.bench.pcap import write_pcap


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("iovirt-bench", "iovirt packet bench")
    group.addoption(
        "--iovirt-bench-sockets", metavar="A,B", default=None,
        help="iovirt_vhost_net drives these two vhost-user net sockets of an external back-end",
    )
    group.addoption("--iovirt-bench-pcap", metavar="DIR", default=None, help="write each test's frames to DIR/<test>.pcap")


def _options(request: pytest.FixtureRequest) -> dict[str, Any]:
    return dict(getattr(request, "param", None) or {})


def _finish(request: pytest.FixtureRequest, pair: NetPair) -> None:
    directory = request.config.getoption("--iovirt-bench-pcap", None)
    try:
        if directory:
            Path(directory).mkdir(parents=True, exist_ok=True)
            name = re.sub(r"[^\w.-]+", "_", request.node.name)
            write_pcap(Path(directory) / f"{name}.pcap", pair.emitted)
    finally:
        pair.close()


@pytest.fixture
def iovirt_net(request: pytest.FixtureRequest) -> Iterator[NetPair]:
    """Two in-process virtio-net bench ports on one switch, plus a capture port."""
    options = {"capture": True, **_options(request)}
    pair = NetPair.in_process(**options)
    yield pair
    _finish(request, pair)


@pytest.fixture
def iovirt_vhost_net(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NetPair]:
    """Two bench ports over vhost-user: iovirt's server in a thread, or ``--iovirt-bench-sockets``."""
    options = _options(request)
    sockets = request.config.getoption("--iovirt-bench-sockets", None)
    if sockets:
        path_a, _, path_b = sockets.partition(",")
        options.pop("capture", None)
        pair = NetPair.vhost_user(path_a, path_b, **options)
        yield pair
        _finish(request, pair)
        return
    with ServedNet(tmp_path) as served:
        pair = served.pair(**{"capture": True, **options})
        yield pair
        _finish(request, pair)
