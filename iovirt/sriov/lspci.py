"""``iovirt lspci --sriov-vfs N``: the platform with a virtio-net PF and N VFs, lspci style.

The machine is brought up the way a Linux guest does it (PF bound to
virtio-pci, ``echo N > sriov_numvfs``), then every function is dumped in
``lspci -x`` format: the PF, whose SR-IOV capability ``lspci -vvv -F``
decodes, and every VF at its routing ID.  Title lines show the IDs Linux
shows (PF vendor, VF Device ID); a VF's dumped Vendor/Device bytes read
0xFFFF, as its config space does.
"""

from __future__ import annotations

import sys

from iovirt.pci.lspci import format_host
from iovirt.sriov.errors import SriovLayoutError
from iovirt.sriov.machine import MAX_TOTAL_VFS, SriovNetMachine

DEFAULT_TOTAL_VFS = 16


def sriov_dump(num_vfs: int, level: int = 4) -> str:
    """Every function of a platform with ``num_vfs`` VFs enabled; TotalVFs is max(16, ``num_vfs``).

    Raises :class:`~iovirt.sriov.errors.SriovLayoutError` when ``num_vfs``
    is not in 0..224 (what fits on bus 0 behind the PF at 00:03.0).
    """
    if not 0 <= num_vfs <= MAX_TOTAL_VFS:
        raise SriovLayoutError(f"{num_vfs} VFs requested; expected 0-{MAX_TOTAL_VFS} behind a PF at 00:03.0")
    with SriovNetMachine(max(DEFAULT_TOTAL_VFS, num_vfs)) as machine:
        machine.bring_up_pf()
        machine.sriov_configure(num_vfs)
        return format_host(machine.platform.host, level)


def run_sriov_vfs(num_vfs: int, level: int) -> int:
    """The ``--sriov-vfs`` option of ``iovirt lspci``: print the dump; 2 on a bad count."""
    try:
        text = sriov_dump(num_vfs, level)
    except SriovLayoutError as exc:
        print(f"iovirt lspci: {exc}", file=sys.stderr)
        return 2
    print(text, end="")
    return 0
