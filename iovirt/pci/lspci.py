"""Dumps of config space in ``lspci -x``/``-xxx``/``-xxxx`` text format.

The format is pciutils' ``show_hex_dump``: a title line ``BB:DD.F <class>:
<vendor> <device> (rev RR)``, then one line per 16 bytes, ``OFF:`` followed by
`` xx`` per byte, and a blank line after each device.  ``lspci -F FILE``
reads exactly this back (pciutils ``lib/dump.c``), which is how the tests
check what iovirt's config space says with an independent decoder.

Levels mirror lspci's ``-x`` count: 1-2 dump 64 bytes, 3 dumps 256, 4 dumps
4096 for a PCI Express (4 KiB) function and 256 otherwise; 0 prints titles
only.  Bytes are read through the function's config accesses, so hooked
registers show what a driver would read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from iovirt.pci.names import class_description, device_description

if TYPE_CHECKING:
    from iovirt.pci.function import PciFunction
    from iovirt.pci.host import PciHost


def bdf(function: PciFunction) -> str:
    """``BB:DD.F`` of a function."""
    rid = function.requester_id
    return f"{rid >> 8:02x}:{(rid >> 3) & 0x1F:02x}.{rid & 7:x}"


def title(function: PciFunction) -> str:
    """The title line lspci prints for a function."""
    line = (
        f"{bdf(function)} {class_description(function.class_code)}: "
        f"{device_description(function.vendor_id, function.device_id)}"
    )
    if function.revision:
        line += f" (rev {function.revision:02x})"
    return line


def dump_length(function: PciFunction, level: int) -> int:
    """How many bytes ``lspci`` with ``level`` ``-x`` flags dumps for ``function``."""
    if level <= 0:
        return 0
    if level <= 2:
        return 64
    if level == 3:
        return 256
    return function.config.size


def format_function(function: PciFunction, level: int = 4) -> str:
    """One function as ``lspci`` with ``level`` ``-x`` flags prints it."""
    lines = [title(function)]
    length = dump_length(function, level)
    for row in range(0, length, 16):
        raw = b"".join(
            function.config_read(row + i, 4).to_bytes(4, "little") for i in range(0, 16, 4)
        )
        lines.append(f"{row:02x}:" + "".join(f" {b:02x}" for b in raw))
    text = "\n".join(lines) + "\n"
    return text + "\n" if length else text


def sorted_functions(host: PciHost) -> list[PciFunction]:
    """Every function reachable from the host, in bus/device/function order like lspci."""
    return sorted(host.root_bus.walk(), key=lambda f: f.requester_id)


def format_host(host: PciHost, level: int = 4) -> str:
    """Every function of the host's hierarchy, as ``lspci -x…`` prints them."""
    return "".join(format_function(f, level) for f in sorted_functions(host))
