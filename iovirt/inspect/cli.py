"""``iovirt inspect CORE`` and ``iovirt dump PID``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from iovirt.inspect.dump import DumpError, request_dump
from iovirt.inspect.elfcore import CoreFileError, read_core
from iovirt.inspect.rings import RingReport, decode_ring

EXIT_BAD_INPUT = 2


def _ring_spec(text: str) -> tuple[int, int, int, int]:
    parts = text.split(",")
    try:
        if len(parts) != 4:
            raise ValueError("four fields")
        size, desc, avail, used = (int(p, 0) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ring wants SIZE,DESC,AVAIL,USED (numbers, 0x for hex), got {text!r}")
    return size, desc, avail, used


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``inspect`` and ``dump``."""
    inspect = sub.add_parser(
        "inspect",
        help="decode the virtqueues in a guest-memory core (QEMU dump-guest-memory or iovirt dump)",
        description=(
            "Read an ELF core of guest memory and decode its split virtqueues: descriptor table, avail and "
            "used indices, in-flight chains, event-idx values, with warnings about inconsistent state "
            "(an avail index that jumps, a used id out of range, a descriptor loop). A core written by "
            "'iovirt dump' names its rings in its IOVIRT note; for QEMU's dump-guest-memory (paging=false) "
            "give each ring's guest-physical addresses with --ring. A file that is not an ELF core of "
            f"guest memory exits with status {EXIT_BAD_INPUT}."
        ),
    )
    inspect.add_argument("core", metavar="CORE", help="the ELF core file")
    inspect.add_argument(
        "--ring", metavar="SIZE,DESC,AVAIL,USED", type=_ring_spec, action="append", default=[],
        help="a split ring of SIZE entries at these guest-physical addresses (repeatable)",
    )
    inspect.add_argument("--json", action="store_true", help="print the decoded state as JSON")
    inspect.set_defaults(func=run_inspect)

    dump = sub.add_parser(
        "dump",
        help="ask a running back-end to write an ELF core of each device's guest memory",
        description=(
            "Send SIGUSR2 to the iovirt back-end PID, which must run 'iovirt serve --dump-dir DIR' "
            "(checked on its command line first: the signal would end a process that does not expect it). "
            "Every connected device writes DIR/<device>-<time>.core: an ELF64 core with a PT_LOAD per "
            "guest memory region (p_paddr = guest-physical address) and a PT_NOTE named IOVIRT whose JSON "
            "describes its rings (device, queue index, size, desc/avail/used addresses, last_avail_idx, "
            "used_idx). Then it writes DIR/iovirt-PID-<time>.json listing the cores; this command waits for "
            "that index and prints the cores' paths. Read them with 'iovirt inspect CORE'. The rings are "
            "snapshotted under the data-path lock; the other devices are served meanwhile."
        ),
    )
    dump.add_argument("pid", metavar="PID", type=int, help="the back-end process")
    dump.add_argument("--dir", metavar="DIR", help="where the back-end writes (default: its --dump-dir)")
    dump.add_argument("--timeout", metavar="S", type=float, default=10.0, help="how long to wait (default 10)")
    dump.set_defaults(func=run_dump)


def run_dump(args: argparse.Namespace) -> int:
    """``iovirt dump``."""
    try:
        index = request_dump(args.pid, args.dir, args.timeout)
    except (DumpError, OSError) as exc:
        print(f"iovirt dump: {exc}", file=sys.stderr)
        return 1
    for path in index.get("cores", []):
        print(path)
    for error in index.get("errors", []):
        print(f"iovirt dump: {error}", file=sys.stderr)
    if not index.get("cores") and not index.get("errors"):
        print("iovirt dump: no device had a front-end connected", file=sys.stderr)
    return 1 if index.get("errors") else 0


def run_inspect(args: argparse.Namespace) -> int:
    """``iovirt inspect``."""
    try:
        core = read_core(args.core)
    except CoreFileError as exc:
        print(f"iovirt inspect: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        reports = [_from_note(core.memory, ring) for ring in (core.iovirt_note or {}).get("rings", [])]
        reports += [decode_ring(core.memory, *ring, index=i) for i, ring in enumerate(args.ring)]
        regions = [{"gpa": r.gpa, "size": r.size} for r in core.memory.regions]
        if args.json:
            print(json.dumps({"core": args.core, "regions": regions,
                              "rings": [r.to_dict() for r in reports]}, indent=1))
        else:
            _print_text(args.core, regions, reports)
    except CoreFileError as exc:
        print(f"iovirt inspect: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        core.memory.close()
    return 0


def _from_note(memory: Any, ring: Any) -> RingReport:
    """Decode a ring the IOVIRT note describes (untrusted JSON: checked field by field)."""
    if not isinstance(ring, dict):
        raise CoreFileError("IOVIRT note", f"a ring entry is not an object: {ring!r}")
    ints = {}
    for key in ("queue", "size", "desc", "avail", "used", "last_avail_idx"):
        value = ring.get(key)
        if not isinstance(value, int) or value < 0:
            if key in ("desc", "avail", "used") and "error" in ring:
                report = RingReport(int(ring.get("queue", 0)), 0, 0, 0, 0, str(ring.get("device", "")))
                report.error = str(ring["error"])
                report.warnings.append(f"the back-end could not place this ring: {ring['error']}")
                return report
            raise CoreFileError("IOVIRT note", f"ring field {key!r} is {value!r}, not a non-negative integer")
        ints[key] = value
    return decode_ring(memory, ints["size"], ints["desc"], ints["avail"], ints["used"], index=ints["queue"],
                       device=str(ring.get("device", "")), last_avail_idx=ints["last_avail_idx"])


def _print_text(path: str, regions: list[dict[str, int]], reports: list[RingReport]) -> None:
    print(f"{path}: {len(regions)} guest memory region(s)")
    for region in regions:
        print(f"  [{region['gpa']:#x}, +{region['size']:#x})")
    if not reports:
        print("no rings: give --ring SIZE,DESC,AVAIL,USED (an iovirt dump core names its rings)")
    for r in reports:
        name = f"{r.device} queue {r.index}" if r.device else f"ring {r.index}"
        print(f"{name}: size {r.size}, desc {r.desc_addr:#x} avail {r.avail_addr:#x} used {r.used_addr:#x}")
        if r.error is None:
            device = "" if r.last_avail_idx is None else f", device last_avail_idx {r.last_avail_idx}"
            print(f"  avail: flags {r.avail_flags:#x} idx {r.avail_idx} used_event {r.used_event}")
            print(f"  used:  flags {r.used_flags:#x} idx {r.used_idx} avail_event {r.avail_event}{device}")
            print(f"  in flight: {len(r.in_flight)}")
            for chain in r.in_flight:
                state = {None: "", True: " popped", False: " waiting"}[chain.popped]
                bufs = " ".join(f"[{a:#x},+{n:#x}{',w' if w else ''}]" for a, n, w in chain.buffers)
                print(f"    avail[{chain.avail_index}] head {chain.head}{state}: {chain.error or bufs}")
        for warning in r.warnings:
            print(f"  WARNING: {warning}")
