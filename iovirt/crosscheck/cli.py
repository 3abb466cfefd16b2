"""``iovirt crosscheck``: compare iovirt's hardware models with QEMU's through qtest."""

from __future__ import annotations

import argparse
import logging

from iovirt.crosscheck.area import AreaResult, compare, show_observation
from iovirt.crosscheck.areas import AREAS
from iovirt.crosscheck.ops import parse_ops
from iovirt.crosscheck.report import run_areas, summary, write_json

DEFAULT_OPS = 10_000


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``crosscheck`` subcommand."""
    p = sub.add_parser("crosscheck", help="compare iovirt's PCI models with QEMU's own through qtest")
    p.add_argument("--area", choices=sorted(AREAS), action="append", help="area to run (repeatable; default all)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--ops", type=int, default=DEFAULT_OPS, help=f"operations per area (default {DEFAULT_OPS})")
    p.add_argument("--json", metavar="FILE", help="write the per-area counts as JSON")
    p.add_argument("--replay", metavar="FILE", help="run a printed sequence on both sides (needs one --area)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    names = args.area or sorted(AREAS)
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
    print(summary(results))
    if args.json:
        write_json(args.json, results, args.seed)
    return 1 if any(r.mismatches for r in results) else 0


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
