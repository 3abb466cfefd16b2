"""``iovirt crosscheck``: compare iovirt's hardware models with QEMU's through qtest."""

from __future__ import annotations

import argparse
import logging
import tempfile

from iovirt.crosscheck.area import AreaResult, compare, show_observation
from iovirt.crosscheck.areas import AREAS
from iovirt.crosscheck.linux_tables import AREA as LINUX_AREA
from iovirt.crosscheck.linux_tables import LinuxTablesResult, compare_core
from iovirt.crosscheck.ops import parse_ops
from iovirt.crosscheck.report import run_areas, summary, write_json

DEFAULT_OPS = 10_000


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``crosscheck`` subcommand."""
    p = sub.add_parser("crosscheck", help="compare iovirt's PCI, MSI-X, SR-IOV and VT-d models with QEMU's own through qtest")
    p.add_argument("--area", choices=sorted(AREAS), action="append", help="area to run (repeatable; default all)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--ops", type=int, default=DEFAULT_OPS, help=f"operations per area (default {DEFAULT_OPS})")
    p.add_argument("--json", metavar="FILE", help="write the per-area counts as JSON")
    p.add_argument("--replay", metavar="FILE", help="run a printed sequence on both sides (needs one --area)")
    p.add_argument("--linux-tables", action="store_true",
                   help=f"area {LINUX_AREA}: boot Linux under QEMU's intel-iommu, dump it, walk its tables with "
                        "iovirt (runs alone unless --area is given too)")
    p.add_argument("--workdir", help="where --linux-tables keeps QEMU's trace, the core and the logs "
                                     "(default: a temporary directory, removed)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    names = args.area or ([] if args.linux_tables else sorted(AREAS))
    # iovirt's models log each odd access a random sequence makes (an unset
    # pci_cfg window, a write to the PBA, a register invalidation with QI on);
    # the comparison reports what matters.
    quiet = [logging.getLogger(name) for name in ("iovirt.pci", "iovirt.sriov", "iovirt.virtio", "iovirt.vtd")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    try:
        return _dispatch(args, names)
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)


def _dispatch(args: argparse.Namespace, names: list[str]) -> int:
    if args.replay:
        if len(names) != 1:
            print("--replay needs exactly one --area")
            return 2
        return _replay(names[0], args.replay)
    results = run_areas(names, args.seed, args.ops)
    if results:
        print(summary(results))
    linux = _linux_tables(args.workdir) if args.linux_tables else None
    if linux is not None:
        print(linux.summary())
    if args.json:
        write_json(args.json, results, args.seed, {LINUX_AREA: linux.as_json()} if linux else None)
    return 1 if any(r.mismatches for r in results) or (linux and linux.mismatches) else 0


def _linux_tables(workdir: str | None) -> LinuxTablesResult:
    # Imported here: the guest kit is only needed (and its QEMU only looked for) by this area.
    from iovirt.crosscheck.linux_guest import run_linux_guest

    if workdir is not None:
        run = run_linux_guest(workdir)
        return compare_core(run.trace, run.core)
    with tempfile.TemporaryDirectory(prefix="iovirt-vtd-linux-") as tmp:
        run = run_linux_guest(tmp)
        return compare_core(run.trace, run.core)


def _replay(name: str, path: str) -> int:
    with open(path) as f:
        ops = parse_ops(f.read())
    with AREAS[name]() as area:
        qemu = area.run_qemu(ops)
        iovirt = area.run_iovirt(ops)
        result = AreaResult(name)
        compare(area, ops, result)
    for op, a, b in zip(ops, qemu, iovirt):
        mark = "" if a == b else "   <-- differs"
        print(f"{op}    # qemu={show_observation(a)} iovirt={show_observation(b)}{mark}")
    return 1 if result.mismatches else 0
