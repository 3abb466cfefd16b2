"""``iovirt lspci``: print the default platform's functions like lspci does.

``iovirt lspci -xxxx | lspci -vvv -F /dev/stdin`` decodes them with pciutils.
``--sriov-vfs N`` lists a virtio-net SR-IOV PF with N VFs enabled instead
(:mod:`iovirt.sriov.lspci`).
"""

from __future__ import annotations

import argparse
import os
import tempfile

from iovirt.pci.lspci import format_host


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add the ``lspci`` subcommand; it sets ``func`` to a callable ``(args) -> int``."""
    parser = subparsers.add_parser(
        "lspci",
        help="list the in-process PCI functions, lspci style",
        description=(
            "List the default in-process platform's PCI functions. -x dumps 64 bytes of "
            "config space, -xxx 256 bytes, -xxxx 4096 bytes (PCI Express functions); the "
            "output is what 'lspci -F' reads."
        ),
    )
    parser.add_argument(
        "-x", dest="hex", action="count", default=0,
        help="hex dump of config space; repeat as -xxx or -xxxx for more",
    )
    parser.add_argument(
        "--sriov-vfs", dest="sriov_vfs", type=int, default=None, metavar="N",
        help="instead: a virtio-net SR-IOV PF at 00:03.0 with N VFs enabled the way Linux does",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build the default platform (virtio-blk on a scratch image) and print its functions."""
    # Imported here: the PCI layer does not depend on the platform built on top of it.
    from iovirt.platform.machine import Platform

    if args.sriov_vfs is not None:
        from iovirt.sriov.lspci import run_sriov_vfs

        return run_sriov_vfs(args.sriov_vfs, args.hex)

    with tempfile.TemporaryDirectory(prefix="iovirt-lspci-") as scratch:
        with Platform.default(os.path.join(scratch, "disk.img")) as platform:
            print(format_host(platform.host, args.hex), end="")
    return 0
