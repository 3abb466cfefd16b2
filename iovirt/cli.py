"""The ``iovirt`` command line: parses arguments and hands off to the layers."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Sequence


from iovirt import __version__, _accel, service
from iovirt.bench import cli as bench_cli
from iovirt.conformance import cli as conformance_cli
from iovirt.crosscheck import cli as crosscheck_cli
from iovirt.control import cli as control_cli
from iovirt.inspect import cli as inspect_cli
from iovirt.pci import cli as pci_cli
from iovirt.vhost_user import cli as vhost_user_cli

EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE
"""The exit status when the reader of the output went away: a shell's status for a process killed by SIGPIPE."""


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="iovirt",
        description=(
            "iovirt: I/O-virtualization device models. A vhost-user back-end serving virtio-net "
            "(with a built-in learning switch), virtio-blk, virtio-scsi, virtio-vsock, virtio-rng and "
            "virtio-input to VMMs; a conformance suite for any vhost-user back-end; models of PCI, "
            "MSI-X, SR-IOV and VT-d checked against QEMU's; virtio rings with a Cython hot path."
        ),
    )
    parser.add_argument("--version", action="version", version=f"iovirt {__version__}")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"], help="log verbosity (default info)"
    )
    parser.set_defaults(log_format="text")  # the serving commands take --log-format
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    vhost_user_cli.register(sub)
    control_cli.register(sub)
    pci_cli.register(sub)
    conformance_cli.register(sub)
    inspect_cli.register(sub)
    crosscheck_cli.register(sub)
    bench_cli.register(sub)
    info = sub.add_parser("info", help="show which implementation of each accelerated part runs, and why")
    info.set_defaults(func=_info)
    descriptors = sub.add_parser(
        "descriptors",
        help="write vhost-user back-end descriptors (QEMU docs/interop/vhost-user.json) for libvirt",
        description="Write one JSON descriptor per iovirt back-end (net, block, rng, input, vsock, scsi) into DIR, e.g. "
                    "/usr/share/qemu/vhost-user or /etc/qemu/vhost-user, where libvirt looks for them, and the "
                    "small executables they name (iovirt-vhost-user-net, iovirt-vhost-user-blk, ...).",
    )
    descriptors.add_argument("dir", metavar="DIR", help="where the descriptors go")
    descriptors.add_argument("--binary-dir", metavar="BINDIR",
                             help="where the executables go (default: DIR); descriptors name them by absolute path")
    descriptors.set_defaults(func=_descriptors)
    return parser


def _descriptors(args: argparse.Namespace) -> int:
    """``iovirt descriptors DIR``."""
    try:
        written = service.write_descriptors(args.dir, args.binary_dir)
    except OSError as exc:
        print(f"iovirt descriptors: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


BLK_ENGINE_ROW = "blk I/O engine"
"""The row of ``iovirt info`` after the parts: io_uring or threads, and why."""


def _info(args: argparse.Namespace) -> int:
    """Print one row per accelerated part (:data:`iovirt._accel.PARTS`): what runs and why; then the blk I/O engine."""
    from iovirt.virtio.blk import datapath

    rows = [("part", "runs", "extension", "why")]
    rows += [(part.name, choice.implementation, part.module, choice.reason) for part, choice in _accel.report()]
    engine, why = datapath.engine_report()
    rows.append((BLK_ENGINE_ROW, engine, "iovirt.virtio.blk.aio", why))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    print(f"iovirt {__version__}")
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``iovirt`` console script and ``python -m iovirt``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 0
    service.configure_logging(args.log_level, args.log_format)
    try:
        status = args.func(args)
        sys.stdout.flush()  # here, where a reader gone away is caught, not at interpreter exit
        return status
    except BrokenPipeError:
        # The reader of our output went away (``iovirt ctl PATH devices | head``): not an error of ours.
        # Point stdout at /dev/null so the interpreter's final flush cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
