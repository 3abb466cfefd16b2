"""iovirt's own vhost-user back-end in a thread (net: two switch ports; blk rw and ro), for the suite to check."""

from __future__ import annotations

import pytest

from conformance_backend import IovirtBackend


@pytest.fixture
def iovirt_backend(tmp_path):
    b = IovirtBackend(tmp_path)
    yield b
    b.stop()


@pytest.fixture
def make_backend(tmp_path):
    """Makes iovirt back-ends (``IovirtBackend`` keyword arguments) in ``tmp_path``; stops them all at teardown."""
    made = []

    def make(**kwargs):
        made.append(IovirtBackend(tmp_path, **kwargs))
        return made[-1]

    yield make
    for b in made:
        b.stop()
