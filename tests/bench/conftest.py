"""Bench fixtures: the plugin's own (imported, as a project without the entry point would) and a pair factory."""

from __future__ import annotations

import pytest

from iovirt.bench.pair import NetPair, ServedNet
from iovirt.bench.pytest_plugin import iovirt_net, iovirt_vhost_net  # noqa: F401 - fixtures

TARGETS = ["in-process", "vhost-user"]


@pytest.fixture(params=TARGETS)
def make_pair(request, tmp_path):
    """``make_pair(**NetPair options)`` against an in-process device or ``iovirt serve`` in a thread."""
    made: list[NetPair] = []
    served = ServedNet(tmp_path) if request.param == "vhost-user" else None

    def make(**options) -> NetPair:
        pair = served.pair(**options) if served is not None else NetPair.in_process(**options)
        made.append(pair)
        return pair

    make.target = request.param
    yield make
    for pair in made:
        pair.close()
    if served is not None:
        served.stop()
