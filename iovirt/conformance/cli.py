"""``iovirt conform``: check a vhost-user back-end against the specs and report per clause."""

from __future__ import annotations

import argparse
import sys

from iovirt.conformance import coverage, matrix
from iovirt.conformance.platform_target import (
    CTRL_QUEUE_PAIRS,
    IN_PROCESS_DEVICES,
    PlatformTarget,
    iovirt_ctrl_net,
    iovirt_device,
)
from iovirt.conformance.registry import Verdict
from iovirt.conformance.report import ProgressLine, table, to_json, to_junit
from iovirt.conformance.runner import Runner
from iovirt.conformance.target import DEVICES, Target


def _timeout(text: str) -> float:
    value = float(text)
    if not 0 < value <= 120:
        raise argparse.ArgumentTypeError(f"--timeout must be in (0, 120] seconds, got {text}")
    return value


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add the ``conform`` subcommand."""
    p = subparsers.add_parser(
        "conform",
        help="check a vhost-user back-end (or iovirt's virtio-pci transport) against the virtio and vhost-user specs",
        description=(
            "Act as the VMM and guest driver of a vhost-user back-end and check it clause by clause; "
            "or, with --in-process, check iovirt's own device behind the in-process virtio-pci transport. "
            "Exit status: 0 no failures, 1 failures, 2 usage error."
        ),
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--socket", metavar="PATH", help="the back-end's listening UNIX socket (needs --device)")
    what.add_argument(
        "--in-process",
        choices=IN_PROCESS_DEVICES,
        metavar="net|blk",
        help="iovirt's device of this type behind the in-process virtio-pci platform (virtio 1.2 2.x and 4.1 checks)",
    )
    what.add_argument(
        "--coverage",
        action="store_true",
        help="run nothing: print per spec section how many device statements are checked, not observable, not yet",
    )
    p.add_argument("--device", choices=DEVICES, metavar="|".join(DEVICES), help="the device type behind the socket")
    p.add_argument("--json", metavar="FILE", help="write the JSON report (with --coverage: the coverage counts) here")
    p.add_argument("--junit", metavar="FILE", help="write a JUnit XML report here")
    p.add_argument(
        "--html",
        metavar="FILE",
        help="with --coverage: write the coverage matrix here as HTML (one row per statement, one column per --run)",
    )
    p.add_argument(
        "--run",
        metavar="NAME=FILE",
        action="append",
        default=[],
        help="with --html: a column NAME from the JSON report FILE of an earlier run (repeatable)",
    )
    p.add_argument(
        "--sriov-owner",
        action="store_true",
        help="with --in-process net: iovirt's SR-IOV owner, a virtio-net PF with VFs and an administration virtqueue "
        "(adds the virtio 1.4 group administration checks)",
    )
    p.add_argument(
        "--ctrl-queue",
        action="store_true",
        help=f"with --in-process net: a net device with a control virtqueue and {CTRL_QUEUE_PAIRS} queue pairs "
        "(adds the virtio 1.4 5.1.9.5 control queue checks: receive modes, MAC table, coalescing, statistics, RSS)",
    )
    p.add_argument("--timeout", type=_timeout, default=5.0, metavar="S", help="bound on every wait (default 5 s)")
    p.add_argument(
        "--peer-socket",
        metavar="PATH",
        help="net: another port of the same network, to send frames to the device and receive what it sends",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the suite; print the table; write the reports asked for."""
    target: Target | PlatformTarget
    if args.coverage:
        return _coverage(args)
    if (args.sriov_owner or args.ctrl_queue) and not args.in_process:
        print("iovirt conform: --sriov-owner and --ctrl-queue go with --in-process net", file=sys.stderr)
        return 2
    if args.html or args.run:
        print("iovirt conform: --html and --run go with --coverage", file=sys.stderr)
        return 2
    if args.in_process:
        if args.device or args.peer_socket:
            print("iovirt conform: --in-process takes neither --device nor --peer-socket", file=sys.stderr)
            return 2
        if (args.sriov_owner or args.ctrl_queue) and args.in_process != "net":
            print("iovirt conform: --sriov-owner and --ctrl-queue go with --in-process net", file=sys.stderr)
            return 2
        if args.sriov_owner and args.ctrl_queue:
            print("iovirt conform: the SR-IOV owner has no control queue: --sriov-owner or --ctrl-queue", file=sys.stderr)
            return 2
        factory = iovirt_ctrl_net if args.ctrl_queue else iovirt_device
        target = PlatformTarget(args.in_process, args.timeout, make_device=factory, owner=args.sriov_owner)
    elif args.device is None:
        print(f"iovirt conform: --socket needs --device {'|'.join(DEVICES)}", file=sys.stderr)
        return 2
    else:
        target = Target(args.socket, args.device, args.timeout, args.peer_socket)
    runner = Runner(target)
    results = runner.run(ProgressLine(sys.stderr))
    print(table(results))
    for path, text in ((args.json, to_json), (args.junit, to_junit)):
        if path:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text(results))
    return 1 if any(r.verdict is Verdict.FAIL for r in results) else 0


def _coverage(args: argparse.Namespace) -> int:
    if args.device or args.peer_socket or args.junit:
        print("iovirt conform: --coverage takes only --json, --html and --run", file=sys.stderr)
        return 2
    if args.run and not args.html:
        print("iovirt conform: --run needs --html", file=sys.stderr)
        return 2
    try:
        runs = [matrix.Run.load(*_named(text)) for text in args.run]
        rows = coverage.statements()
    except (ValueError, matrix.MatrixError, coverage.CoverageMapError) as exc:
        print(f"iovirt conform: {exc}", file=sys.stderr)
        return 2 if not isinstance(exc, coverage.CoverageMapError) else 1
    print(coverage.table(rows))
    for path, text in ((args.json, lambda: coverage.to_json(rows)), (args.html, lambda: matrix.to_html(rows, runs))):
        if path:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text())
    return 0


def _named(text: str) -> tuple[str, str]:
    """``NAME=FILE`` of ``--run``."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--run {text!r}: want NAME=FILE")
    return name, path
