"""``iovirt bench``: throughput and latency runs, pcap replay and capture through virtio-net devices.

* ``iovirt bench run`` - frames/s from one port to another, then the
  latency histogram (p50, p99, p999).
* ``iovirt bench replay FILE`` - a pcap or pcapng file into a device, what
  comes out recorded.
* ``iovirt bench capture`` - record what arrives on ports, with the port
  and direction of each frame (pcapng).

Each drives the devices as their guest driver (:class:`~iovirt.bench.port.BenchPort`):
over vhost-user with ``--socket`` (any virtio-net back-end, e.g. ``iovirt
serve --net S``), or, without, two in-process devices on one switch.  Bad
input (a malformed capture file, an unreadable one, an impossible rate,
conflicting timing options) is a usage error: a message and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import ExitStack
from typing import Any, Callable

from typing import TYPE_CHECKING

from iovirt.bench.errors import BenchError
from iovirt.bench.pcapio import PcapError, read_frames
from iovirt.bench.target import DEFAULT_TIMEOUT
from iovirt.virtio.net.defs import ETH_HLEN

if TYPE_CHECKING:
    from iovirt.bench.port import BenchPort
    from iovirt.bench.traffic import Recorder

# The parser is built for every ``iovirt`` command: what needs scapy (ports,
# pairs, traffic) is imported by the subcommand that runs.

EXIT_USAGE = 2
EXIT_FAILED = 1


def _positive(kind: Callable[[str], Any], what: str) -> Callable[[str], Any]:
    """An argparse ``type=`` that takes only values above zero (a usage error otherwise, exit 2)."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a number, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{what} must be greater than 0, got {text}")
        return value
    return parse


def register(sub: Any) -> None:
    """Add ``bench`` and its subcommands to the top-level parser's subparsers."""
    bench = sub.add_parser(
        "bench",
        help="packet bench: throughput and latency, pcap replay and capture through virtio-net devices",
        description="Drive virtio-net devices as their guest driver: over vhost-user (--socket, e.g. the sockets "
                    "of 'iovirt serve --net S') or, without --socket, two in-process devices on one switch. "
                    "Frames move as bytes (no scapy per frame) over the bench's raw data path, Cython unless "
                    "IOVIRT_NO_EXTENSIONS is set ('iovirt info' shows which runs).",
    )
    bench.set_defaults(func=lambda args: (bench.print_help(), 0)[1])
    cmds = bench.add_subparsers(dest="bench_command", metavar="SUBCOMMAND")

    run = cmds.add_parser(
        "run", help="frames/s from one port to another, then the latency histogram (p50, p99, p999)",
        description="Send batches of frames on the first port and take them on the second: first as fast as "
                    "possible (frames/s), then again with each frame's ingress-to-egress latency recorded "
                    "(a histogram with p50, p99 and p999). Ingress is when a frame's batch was made available "
                    "to the device, egress when the receiving port took it from its used ring.",
    )
    _sockets(run, "two sockets: the sending port's and the receiving port's (default: two in-process devices)")
    run.add_argument("--size", type=_positive(int, "--size"), default=64, help="frame size in bytes, no FCS (default 64)")
    run.add_argument("--seconds", type=_positive(float, "--seconds"), default=2.0, help="time per phase (default 2)")
    run.add_argument("--batch", type=_positive(int, "--batch"), default=64, help="frames per round (default 64)")
    run.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    run.set_defaults(func=_run)

    rep = cmds.add_parser(
        "replay", help="play a pcap/pcapng file into a device and record what comes out",
        description="Play the frames of FILE (pcap or pcapng, Ethernet) into the first port's device and take "
                    "what every port receives. Pacing: as fast as possible (default), --rate PPS, --speedup X "
                    "(the file's gaps divided by X) or --timing (the file's own gaps); these exclude each other.",
    )
    rep.add_argument("file", metavar="FILE", help="the capture to replay")
    _sockets(rep, "the port to play into, then ports to record (default: two in-process devices on one switch)")
    pace = rep.add_mutually_exclusive_group()
    pace.add_argument("--rate", type=_positive(float, "--rate"), metavar="PPS", help="frames per second")
    pace.add_argument("--speedup", type=_positive(float, "--speedup"), metavar="X", help="the file's timing, X times faster")
    pace.add_argument("--timing", action="store_true", help="the file's own timing")
    rep.add_argument("-w", "--write", metavar="OUT",
                     help="record every port's frames: OUT.pcapng with port and direction, or OUT.pcap with what came out")
    rep.add_argument("--wait", type=_positive(float, "--wait"), default=0.5,
                     help="after the last frame, stop once nothing arrived for this many seconds (default 0.5)")
    rep.set_defaults(func=_replay)

    cap = cmds.add_parser(
        "capture", help="record what arrives on ports into pcapng, with the port and direction of each frame",
        description="Connect to each --socket as its device's guest driver and write every frame the device "
                    "delivers into OUT (pcapng: one interface per port, each frame marked inbound in its "
                    "epb_flags) until --seconds pass or --count frames arrived.",
    )
    _sockets(cap, "the ports to record (one or more)", required=True)
    cap.add_argument("-w", "--write", metavar="OUT", required=True, help="the pcapng file to write")
    cap.add_argument("--seconds", type=_positive(float, "--seconds"), help="stop after this long")
    cap.add_argument("--count", type=_positive(int, "--count"), help="stop after this many frames")
    cap.set_defaults(func=_capture)


def _sockets(parser: argparse.ArgumentParser, what: str, required: bool = False) -> None:
    parser.add_argument("--socket", action="append", metavar="PATH", required=required, help=f"vhost-user socket; {what}")
    parser.add_argument("--timeout", type=_positive(float, "--timeout"), default=DEFAULT_TIMEOUT,
                        help=f"bound on every wait on a device, in seconds (default {DEFAULT_TIMEOUT:g})")


def _open_ports(stack: ExitStack, sockets: list[str] | None, timeout: float) -> list[BenchPort]:
    """Bench ports on ``sockets`` (closed by ``stack``), or the two of an in-process pair."""
    from iovirt.bench.pair import DEFAULT_FEATURES, NetPair
    from iovirt.bench.port import BenchPort
    from iovirt.bench.target import VhostUserTarget

    if not sockets:
        pair = stack.enter_context(NetPair.in_process(a={"timeout": timeout}, b={"timeout": timeout}))
        return [pair.a, pair.b]
    ports = []
    for path in sockets:
        target = VhostUserTarget(path, DEFAULT_FEATURES, timeout)
        try:
            port = BenchPort(target, timeout=timeout, name=path)
        except BaseException:
            target.close()
            raise
        stack.callback(port.close)
        ports.append(port)
    return ports


class _OutputError(Exception):
    """The output file cannot be written."""


def _recorder(stack: ExitStack, path: str, ports: list[BenchPort]) -> Recorder:
    from iovirt.bench.traffic import Recorder

    try:
        recorder = Recorder(path, [port.name for port in ports])
    except OSError as exc:
        raise _OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    stack.callback(recorder.close)
    return recorder


def _fail(command: str, message: str, status: int) -> int:
    print(f"iovirt bench {command}: {message}", file=sys.stderr)
    return status


def _run(args: argparse.Namespace) -> int:
    from iovirt.bench.rawpath import IMPLEMENTATION
    from iovirt.bench.traffic import measure

    if args.socket is not None and len(args.socket) != 2:
        return _fail("run", f"--socket must be given twice (sender, receiver), got {len(args.socket)}", EXIT_USAGE)
    try:
        with ExitStack() as stack:
            tx, rx = _open_ports(stack, args.socket, args.timeout)
            where = "in-process" if not args.socket else f"{args.socket[0]} -> {args.socket[1]}"
            print(f"{where}: {args.size}-byte frames, batches of {args.batch}, raw path {IMPLEMENTATION}")
            plain = measure(tx, rx, args.size, args.seconds, args.batch)
            print(f"throughput: {plain.frames_per_s:,.0f} frames/s ({plain.frames} frames in {plain.seconds:.2f} s)")
            timed = measure(tx, rx, args.size, args.seconds, args.batch, latency=True)
            assert timed.latency is not None
            print(f"with latency recording: {timed.frames_per_s:,.0f} frames/s")
            print(timed.latency.format())
    except BenchError as exc:
        return _fail("run", str(exc), EXIT_FAILED)
    if args.json:
        summary = timed.latency.summary_us()
        print(json.dumps({
            "frames_per_s": round(plain.frames_per_s),
            **{f"latency_{key}_us": round(summary[key], 2) for key in ("p50", "p99", "p999")},
        }))
    return 0


def _replay(args: argparse.Namespace) -> int:
    from iovirt.bench.traffic import replay

    try:
        records = read_frames(args.file)
    except PcapError as exc:
        return _fail("replay", str(exc), EXIT_USAGE)
    except OSError as exc:
        return _fail("replay", f"cannot read {args.file}: {exc.strerror or exc}", EXIT_USAGE)
    if not records:
        return _fail("replay", f"{args.file}: no frames to replay", EXIT_USAGE)
    short = next((i for i, rec in enumerate(records) if len(rec.data) < ETH_HLEN), None)
    if short is not None:
        return _fail("replay", f"{args.file}: frame {short + 1} has {len(records[short].data)} bytes, "
                               f"less than an Ethernet header ({ETH_HLEN})", EXIT_USAGE)
    speedup = 1.0 if args.timing else args.speedup
    try:
        with ExitStack() as stack:
            ports = _open_ports(stack, args.socket, args.timeout)
            room = ports[0].tx_buffer_size - ports[0].hdr_size
            long = next((i for i, rec in enumerate(records) if len(rec.data) > room), None)
            if long is not None:
                return _fail("replay", f"{args.file}: frame {long + 1} has {len(records[long].data)} bytes, "
                                       f"more than a transmit buffer takes ({room})", EXIT_USAGE)
            recorder = _recorder(stack, args.write, ports) if args.write else None
            result = replay(records, ports, rate=args.rate, speedup=speedup, recorder=recorder, wait=args.wait)
    except _OutputError as exc:
        return _fail("replay", str(exc), EXIT_USAGE)
    except BenchError as exc:
        return _fail("replay", str(exc), EXIT_FAILED)
    print(f"sent {result.sent} frames into {ports[0].name} in {result.seconds:.3f} s ({result.frames_per_s:,.0f} frames/s)")
    for port, count in zip(ports, result.received):
        print(f"received {count} frames on {port.name}")
    if len(result.latency):
        print(result.latency.format())
    print(f"unmatched {result.unmatched}, not received {result.outstanding}")
    if recorder is not None:
        print(f"wrote {recorder.count} frames to {args.write}")
    return 0


def _capture(args: argparse.Namespace) -> int:
    from iovirt.bench.traffic import capture

    if args.seconds is None and args.count is None:
        return _fail("capture", "give --seconds or --count (or both): when to stop", EXIT_USAGE)
    try:
        with ExitStack() as stack:
            ports = _open_ports(stack, args.socket, args.timeout)
            recorder = _recorder(stack, args.write, ports)
            counts = capture(ports, recorder, args.seconds, args.count)
    except _OutputError as exc:
        return _fail("capture", str(exc), EXIT_USAGE)
    except BenchError as exc:
        return _fail("capture", str(exc), EXIT_FAILED)
    for port, count in zip(ports, counts):
        print(f"received {count} frames on {port.name}")
    print(f"wrote {recorder.count} frames to {args.write}")
    return 0
