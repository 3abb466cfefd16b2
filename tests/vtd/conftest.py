"""Shared fixtures for the VT-d tests: real mmap'd guest memory, a unit, a driver."""

from __future__ import annotations

import pytest

from iovirt.memory import BumpAllocator, GuestMemory
from iovirt.vtd import VtdDriver, VtdUnit
from vtd_memory import MEM_SIZE, TABLES_BASE, TABLES_SIZE, RecordingSink


@pytest.fixture
def mem():
    memory = GuestMemory.from_ranges([(0, MEM_SIZE)])
    yield memory
    memory.close()


@pytest.fixture
def sink():
    return RecordingSink()


@pytest.fixture
def unit(mem, sink):
    return VtdUnit(mem, sink, source_id=0x0010)


@pytest.fixture
def alloc():
    return BumpAllocator(TABLES_BASE, TABLES_SIZE)


@pytest.fixture
def drv(unit, mem, alloc):
    """A driver that has run init() with queued invalidation (translation still off)."""
    driver = VtdDriver(unit, mem, alloc)
    driver.init()
    return driver


@pytest.fixture
def reg_drv(unit, mem, alloc):
    """A driver that has run init() with register-based invalidation."""
    driver = VtdDriver(unit, mem, alloc, queued_invalidation=False)
    driver.init()
    return driver
