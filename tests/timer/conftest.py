"""Shared fixtures for the timer/APIC tests: a VM of vLAPICs on a fake clock."""

from __future__ import annotations

import pytest

from fake_vm import FakeVm, make_vm


@pytest.fixture
def vm() -> FakeVm:
    return make_vm()
