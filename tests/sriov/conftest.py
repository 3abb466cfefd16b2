"""Fixtures for the SR-IOV tests: a host with the generic PF of :mod:`iovirt.sriov.testing`."""

from __future__ import annotations

from typing import Callable

import pytest

from iovirt.memory import BumpAllocator
from iovirt.pci import PciFunction, PciHost
from iovirt.pci.testing import RecordingMsiSink
from iovirt.sriov import SriovCapability, attach_pf, default_routing
from iovirt.sriov.testing import build_generic_vf, make_generic_pf

PF_SLOT = 3


@pytest.fixture
def sink() -> RecordingMsiSink:
    return RecordingMsiSink()


@pytest.fixture
def host(sink: RecordingMsiSink) -> PciHost:
    return PciHost(msi_sink=sink)


@pytest.fixture
def pf_factory(host: PciHost) -> Callable[..., tuple[PciFunction, SriovCapability]]:
    """``pf_factory(total_vfs=16, routing=…, slot=3)`` -> (pf, cap) attached to the host's root bus."""

    def factory(total_vfs: int = 16, routing=default_routing, slot: int = PF_SLOT, make_vf=build_generic_vf):
        pf = make_generic_pf(total_vfs, routing, make_vf)
        attach_pf(host.root_bus, pf, slot)
        cap = pf.extended_capabilities[0]
        assert isinstance(cap, SriovCapability)
        return pf, cap

    return factory


@pytest.fixture
def allocator() -> BumpAllocator:
    return BumpAllocator(0xE000_0000, 1 << 26)
