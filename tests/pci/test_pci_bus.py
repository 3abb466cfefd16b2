"""Buses, bridges, ECAM and 0xCF8/0xCFC, absent functions, reset, firmware enumeration."""

from __future__ import annotations

import logging

import pytest

from iovirt.pci import Bar, PciBridge, PciConfigAccessError, PciFunction, PciHost, PciTopologyError
from iovirt.pci.firmware import assign_resources
from iovirt.pci.topology import build_default_host


def ecam(bus: int, dev: int, fn: int, reg: int = 0) -> int:
    return bus << 20 | dev << 15 | fn << 12 | reg


def cf8(bus: int, dev: int, fn: int, reg: int = 0) -> int:
    return 0x8000_0000 | bus << 16 | dev << 11 | fn << 8 | reg


def endpoint(device_id: int = 0x0005, pcie: bool = False) -> PciFunction:
    return PciFunction(0x1B36, device_id, 0x00FF00, pcie=pcie)


def test_absent_functions_read_all_ones() -> None:
    host = PciHost()
    host.root_bus.add_function(endpoint(), 2)
    assert host.ecam_read(ecam(0, 2, 0), 4) == 0x0005_1B36
    assert host.ecam_read(ecam(0, 3, 0), 4) == 0xFFFFFFFF
    assert host.ecam_read(ecam(0, 2, 1), 2) == 0xFFFF
    assert host.ecam_read(ecam(7, 0, 0), 1) == 0xFF
    assert host.config_read(0, 9, 0, 0, 4) == 0xFFFFFFFF
    host.ecam_write(ecam(0, 3, 0, 4), 2, 0xFFFF)  # dropped silently


def test_ecam_extended_space_of_conventional_function_reads_all_ones() -> None:
    host = PciHost()
    host.root_bus.add_function(endpoint(), 1)
    host.root_bus.add_function(endpoint(pcie=True), 2)
    assert host.ecam_read(ecam(0, 1, 0, 0x100), 4) == 0xFFFFFFFF
    assert host.ecam_read(ecam(0, 2, 0, 0x100), 4) == 0


def test_unaligned_guest_access_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    host = PciHost()
    host.root_bus.add_function(endpoint(), 1)
    with caplog.at_level(logging.WARNING):
        assert host.ecam_read(ecam(0, 1, 0, 0x3), 2) == 0xFFFF
        host.ecam_write(ecam(0, 1, 0, 0x5), 4, 0)
    assert "not naturally aligned" in caplog.text
    with pytest.raises(PciConfigAccessError):
        host.config_read(0, 1, 0, 0x3, 2)


def test_cf8_cfc_including_byte_and_word_accesses() -> None:
    host = PciHost()
    fn = endpoint()
    host.root_bus.add_function(fn, 4, 0)
    host.io_write(0xCF8, 4, cf8(0, 4, 0, 0x00))
    assert host.io_read(0xCF8, 4) == cf8(0, 4, 0)
    assert host.io_read(0xCFC, 4) == 0x0005_1B36
    assert host.io_read(0xCFE, 2) == 0x0005
    assert host.io_read(0xCFD, 1) == 0x1B
    host.io_write(0xCF8, 4, cf8(0, 4, 0, 0x0C))
    host.io_write(0xCFD, 1, 0x40)  # latency timer through CFD
    host.io_write(0xCFC, 1, 0x10)
    assert fn.config_read(0x0C, 2) == 0x4010
    host.io_write(0xCF8, 4, cf8(0, 4, 0, 0x3C) | 0x3)  # reserved low bits ignored
    assert host.io_read(0xCF8, 4) == cf8(0, 4, 0, 0x3C)
    host.io_write(0xCF8, 4, cf8(0, 4, 0) & ~0x8000_0000)  # enable clear
    assert host.io_read(0xCFC, 4) == 0xFFFFFFFF
    host.io_write(0xCF8, 4, cf8(0, 5, 0))
    assert host.io_read(0xCFC, 4) == 0xFFFFFFFF


def test_multifunction_bit() -> None:
    host = PciHost()
    f0, f3 = endpoint(), endpoint(0x0006)
    host.root_bus.add_function(f0, 2, 0)
    assert host.ecam_read(ecam(0, 2, 0, 0x0E), 1) == 0x00
    host.root_bus.add_function(f3, 2, 3)
    assert host.ecam_read(ecam(0, 2, 0, 0x0E), 1) == 0x80
    assert host.ecam_read(ecam(0, 2, 3, 0x0E), 1) == 0x80
    assert host.ecam_read(ecam(0, 2, 3, 0x00), 4) == 0x0006_1B36
    f0.reset()
    assert host.ecam_read(ecam(0, 2, 0, 0x0E), 1) == 0x80
    with pytest.raises(PciTopologyError):
        host.root_bus.add_function(endpoint(), 2, 3)
    with pytest.raises(PciTopologyError):
        host.root_bus.add_function(endpoint(), 32)
    with pytest.raises(PciTopologyError):
        host.root_bus.add_function(f0, 4)


def test_bridge_header_and_routing() -> None:
    host = PciHost()
    bridge = PciBridge(0x1B36, 0x0001)
    host.root_bus.add_function(bridge, 1)
    inner = PciBridge(0x1B36, 0x0001)
    bridge.secondary_bus.add_function(inner, 0)
    leaf = endpoint()
    inner.secondary_bus.add_function(leaf, 5, 0)
    assert host.ecam_read(ecam(0, 1, 0, 0x0E), 1) == 0x01
    # Unnumbered bridges forward nothing.
    assert host.ecam_read(ecam(1, 0, 0), 4) == 0xFFFFFFFF
    host.ecam_write(ecam(0, 1, 0, 0x18), 4, 0x00_05_01_00)  # primary 0, secondary 1, subordinate 5
    assert host.ecam_read(ecam(1, 0, 0), 4) == 0x0001_1B36
    host.ecam_write(ecam(1, 0, 0, 0x18), 4, 0x00_03_02_01)
    assert host.ecam_read(ecam(2, 5, 0), 4) == 0x0005_1B36
    assert leaf.requester_id == 0x0228
    assert host.ecam_read(ecam(6, 5, 0), 4) == 0xFFFFFFFF  # beyond subordinate
    # Renumbering moves the bus.
    host.ecam_write(ecam(1, 0, 0, 0x19), 1, 3)
    assert host.ecam_read(ecam(3, 5, 0), 4) == 0x0005_1B36
    assert host.ecam_read(ecam(2, 5, 0), 4) == 0xFFFFFFFF


def test_bridge_register_masks() -> None:
    bridge = PciBridge(0x1B36, 0x0001)
    bridge.config_write(0x1C, 2, 0xFFFF)
    assert bridge.config_read(0x1C, 2) == 0xF0F0
    bridge.config_write(0x20, 4, 0xFFFFFFFF)
    assert bridge.config_read(0x20, 4) == 0xFFF0FFF0
    bridge.config_write(0x24, 4, 0xFFFFFFFF)
    assert bridge.config_read(0x24, 4) == 0xFFF1FFF1  # 64-bit prefetchable type bits
    bridge.config_write(0x3E, 2, 0xFFFF)
    assert bridge.config_read(0x3E, 2) == 0x007F
    bridge.config.set(0x1E, 2, 0xF900)
    bridge.config_write(0x1C, 4, 0x8000_0000)  # W1C Detected Parity Error in Secondary Status
    assert bridge.config_read(0x1E, 2) == 0x7900


def test_secondary_bus_reset_and_host_reset() -> None:
    host = PciHost()
    bridge = PciBridge(0x1B36, 0x0001)
    host.root_bus.add_function(bridge, 1)
    leaf = endpoint()
    leaf.add_bar(0, Bar(0x1000))
    bridge.secondary_bus.add_function(leaf, 0)
    leaf.config_write(0x10, 4, 0xE000_0000)
    leaf.config_write(0x04, 2, 0x2)
    bridge.config_write(0x3E, 2, 0x0040)
    assert leaf.config_read(0x10, 4) == 0 and leaf.config_read(0x04, 2) == 0
    assert bridge.config_read(0x3E, 2) == 0x0040  # the bridge itself is not reset
    leaf.config_write(0x04, 2, 0x2)
    host.io_write(0xCF8, 4, 0x8000_0000)
    host.reset()
    assert bridge.config_read(0x3E, 2) == 0 and leaf.config_read(0x04, 2) == 0
    assert host.io_read(0xCF8, 4) == 0


def test_default_topology_enumerates_through_config_accesses() -> None:
    host = build_default_host(assign=False)
    found = assign_resources(host)
    assert found == [(0, 0, 0), (0, 1, 0), (1, 0, 0), (0, 2, 0), (0, 2, 1)]
    for function in host.root_bus.walk():
        for bar in function.iter_bars():
            assert bar.address % bar.size == 0
            assert bar.address != 0
    # Every function's vendor ID is reachable through the legacy mechanism too.
    for bus, dev, fn in found:
        host.io_write(0xCF8, 4, cf8(bus, dev, fn))
        assert host.io_read(0xCFC, 2) == 0x1B36


def test_remove_function_frees_the_slot_and_updates_multifunction():
    from iovirt.pci.bus import PciBus
    from iovirt.pci.errors import PciTopologyError
    from iovirt.pci.function import PciFunction

    bus = PciBus(0)
    f0 = bus.add_function(PciFunction(0x1234, 0x1, 0x020000), 3, 0)
    f1 = bus.add_function(PciFunction(0x1234, 0x2, 0x020000), 3, 1)
    assert f0.config_read(0x0E, 1) & 0x80
    bus.remove_function(f1)
    assert bus.function(3, 1) is None and f1.bus is None
    assert not f0.config_read(0x0E, 1) & 0x80
    with pytest.raises(PciTopologyError):
        bus.remove_function(f1)
    bus.add_function(f1, 3, 1)  # the slot and the function can be used again
