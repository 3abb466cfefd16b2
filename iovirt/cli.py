"""The ``iovirt`` command line: parses arguments and hands off to the layers."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from iovirt import __version__
from iovirt.virtio import queue


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="iovirt",
        description=(
            "iovirt: I/O-virtualization device models. virtio rings with a Cython hot path, "
            "guest memory, and (as they land) a vhost-user backend, PCI/SR-IOV/VT-d models "
            "and LAPIC timers."
        ),
    )
    parser.add_argument("--version", action="version", version=f"iovirt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help="show which ring implementation runs and why")
    info.set_defaults(func=_info)
    return parser


def _info(args: argparse.Namespace) -> int:
    impls = sorted(queue.implementations())
    print(f"iovirt {__version__}")
    print(f"split virtqueue: {queue.IMPLEMENTATION} (available: {', '.join(impls)})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``iovirt`` console script and ``python -m iovirt``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
