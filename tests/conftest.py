"""Shared fixtures: every ring test runs against both queue implementations."""

from __future__ import annotations

import os

import pytest

from iovirt import _accel
from iovirt.virtio import queue as queue_mod

IMPLS = queue_mod.implementations()


def pytest_report_header(config):
    return (
        f"iovirt queue implementations: {sorted(IMPLS)}; default: {queue_mod.IMPLEMENTATION}; "
        f"IOVIRT_NO_EXTENSIONS={os.environ.get('IOVIRT_NO_EXTENSIONS', '')!r}"
    )


@pytest.fixture(params=["python", "cython"])
def queue_cls(request):
    """A ``SplitQueue`` class; the cython parameter fails if the extension did not load."""
    name = request.param
    if name == "cython" and "cython" not in IMPLS:
        if _accel.NO_EXTENSIONS:
            pytest.skip("IOVIRT_NO_EXTENSIONS set: pure Python run")
        pytest.fail("the Cython queue extension did not load (build it: pip install -e .)")
    return IMPLS[name]
