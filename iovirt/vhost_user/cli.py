"""Command-line front of the vhost-user back-end: ``serve`` and the ``vhost-user-*`` programs.

``serve`` runs any number of devices in one process, every net port joined by
one learning switch.  ``vhost-user-net``, ``vhost-user-blk``, ``vhost-user-rng``
and ``vhost-user-input`` follow the
"Backend program conventions" of QEMU's vhost-user.rst (``--socket-path`` or
``--fd``, ``--print-capabilities``, foreground, clean exit on SIGTERM) so a
libvirt-style launcher can run iovirt.

All three take the same access options (who may connect, the socket mode,
sealed guest memory; ``docs/security.md``), raise the soft RLIMIT_NOFILE to
the hard limit at start (each front-end's memory regions, eventfds and
inflight region are fds), and exit within :data:`SHUTDOWN_GRACE_S` plus a
little after SIGTERM or SIGINT whatever state their threads are in.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import signal
import sys
import threading
from typing import Any, Callable, TypeVar

from iovirt import sandbox, service
from iovirt.control.wiring import port_mac, serve_control
from iovirt.errors import IovirtError
from iovirt.inspect.dump import DumpOnSignal
from iovirt.vhost_user.peers import DEFAULT_SOCKET_MODE, AccessPolicy
from iovirt.vhost_user.isolate import run_isolated
from iovirt.vhost_user.device import VhostUserDevice
from iovirt.vhost_user.devices.net import NetConfigAdapter
from iovirt.vhost_user.devices.scsi import ScsiConfigAdapter
from iovirt.vhost_user.server import Endpoint, VhostUserServer
from iovirt.vhost_user.workers import DEFAULT_WORKERS, MAX_WORKERS
from iovirt.vhost_user.specs import (
    INPUT_KINDS,
    NET_USAGE,
    DeviceSpec,
    SpecError,
    apply_impairment,
    apply_limits,
    load_config,
    parse_blk,
    parse_input,
    parse_nat,
    parse_net,
    parse_router,
    parse_rng,
    parse_scsi,
    parse_vsock,
    scsi_images,
)
from iovirt.vhost_user.devices.vsock import attach as attach_vsock
from iovirt.virtio.blk.device import VirtioBlk
from iovirt.virtio.input.commands import CommandFifo
from iovirt.virtio.input.device import VirtioInput
from iovirt.virtio.net.device import VirtioNet
from iovirt.virtio.net.switch import DEFAULT_MAX_ENTRIES, DEFAULT_MAX_PER_PORT, LearningSwitch
from iovirt.virtio.net.nat import Nat
from iovirt.virtio.net.router import Router
from iovirt.virtio.net.tap import TapPort
from iovirt.virtio.rng.device import VirtioRng
from iovirt.virtio.scsi.device import VirtioScsi
from iovirt.virtio.vsock.device import VirtioVsock

log = logging.getLogger("iovirt")

SHUTDOWN_GRACE_S = 1.5
"""After SIGTERM, how long the threads get to stop before the process exits without them."""

EXIT_FORCED = 1
"""Exit status when the threads did not stop in time."""


_Spec = TypeVar("_Spec")


def _spec_type(parse: Callable[[str], _Spec]) -> Callable[[str], _Spec]:
    """An argparse ``type=`` from a :mod:`~iovirt.vhost_user.specs` parser (a usage error, not a traceback)."""
    def parse_arg(text: str) -> _Spec:
        try:
            return parse(text)
        except SpecError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse_arg


def _positive_queues(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 128:
        raise argparse.ArgumentTypeError("queue pairs must be 1..128")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``serve``, ``vhost-user-net`` and ``vhost-user-blk``."""
    serve = sub.add_parser(
        "serve",
        help="serve virtio devices (net, blk, scsi, vsock, rng, input) over vhost-user sockets",
        description=(
            "Serve virtio devices to VMMs over vhost-user UNIX sockets. Every net socket is a port of "
            "one built-in learning L2 switch (plus the optional TAP uplink), with 802.1Q access and trunk ports "
            "(vlan=, trunk=), and routed (--router) and NAT (--nat) modes (docs/network-modes.md). Point QEMU at a socket with "
            "-chardev socket,id=c0,path=SOCK -netdev vhost-user,id=n0,chardev=c0 -device virtio-net-pci,netdev=n0 "
            "(net) or -device vhost-user-blk-pci,chardev=c0 (blk); guest RAM must be shared "
            "(-object memory-backend-memfd,share=on). Devices also work behind a guest vIOMMU "
            "(-device intel-iommu,intremap=off,device-iotlb=on and iommu_platform=on,ats=on on the device): "
            "VIRTIO_F_ACCESS_PLATFORM is offered, and IOVAs are translated through the vhost-user IOTLB "
            "messages (misses are asked for on the back-end channel).\n\n"
            "At start the soft fd limit (RLIMIT_NOFILE) is raised to the hard limit. SIGTERM or SIGINT "
            f"stops the process; threads that have not stopped within {SHUTDOWN_GRACE_S} s are abandoned "
            f"(the socket files are removed and the exit status is {EXIT_FORCED})."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument(
        "--net", metavar=NET_USAGE, type=_spec_type(parse_net), action="append",
        default=[],
        help="a virtio-net device on SOCKET (repeatable). client: connects to a VMM listening on SOCKET (QEMU "
             "-chardev socket,server=on,wait=off) and reconnects whenever it goes away, instead of listening. "
             "config=on also offers VHOST_USER_PROTOCOL_F_CONFIG (the net config space over vhost-user, for "
             "front-ends that read it; QEMU does not, and warns when it is offered). pps and bps: rate limits "
             "(frames/s, bytes/s; frames beyond them are dropped). vlan=N: an 802.1Q access port of VLAN N "
             "(the guest sends and receives untagged); trunk=N:M:...: a trunk carrying those VLANs tagged (other "
             "VLANs and untagged frames are dropped and counted). VLAN ids 1..4094; a port without either is "
             "VLAN-unaware (docs/network-modes.md). drop, dup, corrupt, reorder (probabilities 0..1), "
             "delay, jitter (ms), rate (frames/s; frames wait, netem's rate), seed, dir=ingress|egress|both "
             "(default egress: what reaches the guest) and more: netem-style impairments, docs/impairments.md",
    )
    serve.add_argument(
        "--blk", metavar="[client:]SOCKET,IMAGE[,ro][,size=SIZE][,queues=N][,iops=N][,bps=N]",
        type=_spec_type(parse_blk), action="append", default=[],
        help="a virtio-blk device on SOCKET backed by the raw IMAGE (created at SIZE if missing; repeatable); "
             "client: as for --net; iops and bps: rate limits (requests/s, bytes/s)",
    )
    _scsi_serve_option(serve)
    serve.add_argument(
        "--rng", metavar="[client:]SOCKET[,source=PATH][,rate=BYTES]", type=_spec_type(parse_rng), action="append",
        default=[],
        help="a virtio-rng (entropy) device on SOCKET (QEMU -device vhost-user-rng-pci; repeatable): bytes from "
             "os.urandom, or from the file or FIFO PATH (a file that ends makes the device need a reset), at most "
             "BYTES bytes/s",
    )
    serve.add_argument(
        "--input", metavar="[client:]SOCKET,kind=keyboard|mouse|tablet", type=_spec_type(parse_input),
        action="append", default=[],
        help="a virtio-input device of that kind on SOCKET (QEMU -device vhost-user-input-pci; repeatable); "
             "events are injected from Python or with 'iovirt vhost-user-input --inject-fifo'",
    )
    serve.add_argument(
        "--vsock", metavar="[client:]SOCKET,cid=N,uds=PATH", type=_spec_type(parse_vsock), action="append",
        default=[],
        help="a virtio-vsock device on SOCKET (repeatable; QEMU -device vhost-user-vsock-pci,chardev=c0) for the "
             "guest with CID N. Hybrid vsock: a guest connect to CID 2 port P reaches the UNIX socket PATH_P; a "
             "host program connects to PATH and writes 'CONNECT P\\n' to reach the guest's port P",
    )
    serve.add_argument(
        "--config", metavar="FILE",
        help="read every device and option from a TOML file instead of the flags (docs/service.md); "
             "not combined with other serve options",
    )
    serve.add_argument("--queues", type=_positive_queues, default=1, help="queue pairs per net device (default 1)")
    serve.add_argument("--mtu", type=int, default=1500, help="MTU offered to net drivers (default 1500)")
    serve.add_argument("--tap", metavar="IFNAME", help="join a TAP device (created if missing) to the switch as uplink "
                       "(with --nat: the router's outside interface instead)")
    serve.add_argument(
        "--router", metavar="IP/PREFIX[,vlan=N]", type=_spec_type(parse_router), action="append", default=[],
        help="routed mode: a gateway port on the switch with address IP/PREFIX (repeatable, one per subnet; an "
             "access port of VLAN N with vlan=N). It answers ARP and ping for IP and forwards IPv4 between the "
             "subnets (TTL decremented, ICMP time exceeded when it runs out; docs/network-modes.md)",
    )
    serve.add_argument(
        "--nat", metavar="IP/PREFIX[,gw=IP][,ports=LOW-HIGH]", type=_spec_type(parse_nat),
        help="NAT mode (needs --router and --tap): the TAP device becomes the router's outside interface with "
             "address IP/PREFIX; packets to other destinations leave through it source-translated (TCP, UDP, "
             "ICMP echo; connection tracking with timeouts), via gw when not on the outside subnet; outside ports "
             "from LOW-HIGH (default 1024-65535)",
    )
    _switch_options(serve)
    _access_options(serve)
    _dataplane_options(serve)
    _worker_options(serve)
    serve.add_argument(
        "--isolate", action="store_true",
        help="run each device in its own worker process, restarted by this one when it dies or hangs",
    )
    serve.add_argument(
        "--dump-dir", metavar="DIR",
        help="on SIGUSR2 every connected device writes an ELF core of its guest memory and rings into DIR "
             "(see 'iovirt dump --help'); not with --isolate or --sandbox",
    )
    serve.add_argument("--control", metavar="PATH", help="serve the control socket (JSON lines; 'iovirt ctl', docs/control.md) on PATH; removed on exit; "
                            "not with --isolate")
    serve.add_argument("--control-mode", metavar="MODE", type=_mode, default=0o600,
                       help="permission bits of the control socket, in octal (default 0600)")
    sandbox.add_argument(serve)
    _log_format(serve)
    serve.set_defaults(func=run_serve, flag_defaults=_flag_defaults(serve))

    net = sub.add_parser(
        "vhost-user-net",
        help="one virtio-net back-end (vhost-user.rst back-end program conventions)",
        description="A single virtio-net vhost-user back-end, for libvirt-style launchers.",
    )
    _conventions(net)
    net.add_argument("--queues", type=_positive_queues, default=1, help="queue pairs (default 1)")
    net.add_argument("--tap", metavar="IFNAME", help="uplink TAP device joined to the port's switch")
    net.add_argument("--offer-config", action="store_true",
                     help="also offer VHOST_USER_PROTOCOL_F_CONFIG (the net config space over vhost-user; QEMU does "
                          "not use it and warns when it is offered)")
    _switch_options(net)
    net.set_defaults(func=run_net)

    blk = sub.add_parser(
        "vhost-user-blk",
        help="one virtio-blk back-end (vhost-user.rst back-end program conventions)",
        description="A single virtio-blk vhost-user back-end, for libvirt-style launchers.",
    )
    _conventions(blk)
    blk.add_argument("--blk-file", metavar="IMAGE", help="raw image file to serve")
    blk.add_argument("--read-only", action="store_true", help="serve the image read-only (VIRTIO_BLK_F_RO)")
    blk.add_argument("--num-queues", type=int, default=1, help="request queues (default 1)")
    blk.set_defaults(func=run_blk)
    _scsi_program(sub)

    rng = sub.add_parser(
        "vhost-user-rng",
        help="one virtio-rng back-end (vhost-user.rst back-end program conventions)",
        description="A single virtio-rng (entropy) vhost-user back-end, for libvirt-style launchers.",
    )
    _conventions(rng)
    rng.add_argument("--source", metavar="PATH",
                     help="read entropy from this file or FIFO instead of os.urandom (a FIFO is read without "
                          "blocking; a file that ends makes the device need a reset)")
    rng.add_argument("--rate", metavar="BYTES", type=_positive, help="serve at most BYTES bytes per second")
    rng.set_defaults(func=run_rng)

    inp = sub.add_parser(
        "vhost-user-input",
        help="one virtio-input back-end (vhost-user.rst back-end program conventions)",
        description=(
            "A single virtio-input vhost-user back-end (keyboard, mouse or tablet), for libvirt-style launchers. "
            "With --inject-fifo PATH, every line written to the FIFO PATH is an input command:\n"
            "  press KEY       press and release KEY (a, enter, leftshift, f1, ... or a key code)\n"
            "  key CODE VALUE  one EV_KEY event: VALUE 1 down, 0 up, 2 repeat\n"
            "  move DX DY      a relative move (mouse)\n"
            "  touch X Y       touch the tablet at X, Y (0..32767) and lift\n"
            "e.g. echo 'press a' > PATH. Bad lines are logged and skipped."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _conventions(inp)
    inp.add_argument("--kind", choices=INPUT_KINDS, default="keyboard", help="the device profile (default keyboard)")
    inp.add_argument("--inject-fifo", metavar="PATH",
                     help="read input commands from this FIFO (created if missing; see above)")
    inp.set_defaults(func=run_input)

    vsock = sub.add_parser(
        "vhost-user-vsock",
        help="one virtio-vsock back-end (vhost-user.rst back-end program conventions)",
        description="A single virtio-vsock vhost-user back-end (hybrid vsock to host UNIX sockets), with "
                    "vhost-device-vsock's option names.",
    )
    _conventions(vsock)
    vsock.add_argument("--guest-cid", type=int, default=3, help="the guest's context ID (default 3)")
    vsock.add_argument("--uds-path", metavar="PATH",
                       help="host side: guest connects to port P reach PATH_P; host programs connect to PATH")
    vsock.set_defaults(func=run_vsock)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _switch_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mac-table-size", metavar="N", type=_positive, default=DEFAULT_MAX_ENTRIES,
                        help=f"MACs the switch learns at most (default {DEFAULT_MAX_ENTRIES}; "
                             "frames from further MACs are switched, not learned)")
    parser.add_argument("--mac-table-per-port", metavar="N", type=_positive, default=DEFAULT_MAX_PER_PORT,
                        help=f"MACs the switch learns at most on one port (default {DEFAULT_MAX_PER_PORT})")


def _switch(args: argparse.Namespace) -> LearningSwitch:
    return LearningSwitch(max_entries=args.mac_table_size, max_per_port=args.mac_table_per_port)


def _conventions(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--socket-path", metavar="PATH",
                       help="listen on this UNIX socket (with --client: connect to a VMM listening on it)")
    where.add_argument("--fd", metavar="FDNUM", type=int, help="use this inherited socket fd (listening or connected)")
    parser.add_argument("--client", action="store_true",
                        help="connect to the VMM's socket at --socket-path (QEMU -chardev socket,server=on,wait=off) "
                             "and reconnect whenever it goes away, instead of listening")
    parser.add_argument("--print-capabilities", action="store_true", help="print the back-end's capabilities as JSON and exit")
    parser.epilog = ("Without --socket-path and --fd, a socket passed by systemd socket activation (LISTEN_FDS) is "
                     "served. READY=1 is sent to NOTIFY_SOCKET once the socket is set up.")
    _access_options(parser)
    _dataplane_options(parser)
    sandbox.add_argument(parser)
    _log_format(parser)


def _log_format(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-format", choices=service.LOG_FORMATS, default="text",
                        help="text (default), or json: one JSON object per line with time, level, logger, message")


def _flag_defaults(parser: argparse.ArgumentParser) -> dict[str, Any]:
    return {a.dest: a.default for a in parser._actions if a.dest not in ("help", "config", "log_format")}


def _uid(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"not a uid or gid: {text}")
    return value


def _mode(text: str) -> int:
    try:
        value = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--socket-mode wants octal permission bits such as 0600, got {text!r}")
    if not 0 <= value <= 0o777:
        raise argparse.ArgumentTypeError(f"--socket-mode wants permission bits 0000..0777, got {text!r}")
    return value


def _access_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "access", "Who may connect to the vhost-user sockets, and what memory they may hand over (docs/security.md)."
    )
    group.add_argument(
        "--allow-uid", metavar="UID", type=_uid, action="append", default=[],
        help="let front-ends running as UID connect (SO_PEERCRED; repeatable). Without --allow-uid and "
             "--allow-gid only this process's own uid may connect; a refused peer is logged with its pid "
             "and uid and disconnected",
    )
    group.add_argument(
        "--allow-gid", metavar="GID", type=_uid, action="append", default=[],
        help="let front-ends whose effective gid is GID connect (repeatable)",
    )
    group.add_argument(
        "--socket-mode", metavar="MODE", type=_mode, default=DEFAULT_SOCKET_MODE,
        help="permission bits of the socket files, in octal (default 0600: only the owner can connect; "
             "use e.g. 0660 with --allow-gid for a VMM running in the socket's group)",
    )
    group.add_argument(
        "--require-sealed-memory", action="store_true",
        help="refuse guest memory fds that are not sealed against shrinking (F_SEAL_SHRINK): a front-end "
             "that truncates its memory cannot then fault the back-end",
    )


def _poll_us(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--poll-us wants microseconds as a whole number, got {text!r}")
    if value < 0:
        raise argparse.ArgumentTypeError(f"--poll-us wants 0 or more microseconds, got {text!r}")
    return value


def _workers(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--workers wants a whole number of threads, got {text!r}")
    if not 1 <= value <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"--workers wants 1 to {MAX_WORKERS} threads, got {text!r}")
    return value


def _worker_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workers", metavar="N", type=_workers, default=None,
        help=f"data-plane threads (default: one per core, here {DEFAULT_WORKERS}; 1 without the C extensions). Each device's rings are served by "
             "one of them, given round robin in the order the devices are listed. A worker waits for kicks in a C "
             "loop without the interpreter lock: a flow from one port to another runs in C, whether both ports are "
             "on one worker or the frames cross to another through a lock-free channel (benchmarks/RESULTS.md: "
             "two flows crossing between two workers ran 1.26 times their rate on one). More workers also keep a "
             "stuck or misbehaving device from stalling the others. Not with --isolate (there every device has a process of its own)",
    )


def _dataplane_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data plane", "How the data-plane thread waits for work.")
    group.add_argument(
        "--poll-us", metavar="US", type=_poll_us, default=0,
        help="busy-poll mode, as DPDK's poll-mode drivers: after a ring's last work the data-plane thread keeps "
             "polling it for US microseconds with the driver's notifications suppressed (VRING_USED_F_NO_NOTIFY, "
             "packed: event suppression DISABLE), so a busy guest stops kicking; then notifications are enabled "
             "again and the ring looked at once more. Costs a core while polling; 0 (default): off, every ring "
             "waits for kicks",
    )


def _access(args: argparse.Namespace) -> AccessPolicy:
    if not args.allow_uid and not args.allow_gid:
        return AccessPolicy.owner(args.socket_mode)
    return AccessPolicy(frozenset(args.allow_uid), frozenset(args.allow_gid), args.socket_mode)


def _raise_fd_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit: every front-end brings fds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the fd limit from %d to %d: %s", soft, hard, exc)
            return
    log.info("fd limit: %s", "unlimited" if hard == resource.RLIM_INFINITY else hard)


def _new_server(args: argparse.Namespace) -> VhostUserServer:
    _raise_fd_limit()
    access = _access(args)
    log.info("front-ends allowed: %s; socket mode %04o", access.describe(), access.socket_mode)
    workers = getattr(args, "workers", None) or DEFAULT_WORKERS
    server = VhostUserServer(access=access, poll_us=args.poll_us, workers=workers)
    log.info("data plane: %d worker thread%s", workers, "" if workers == 1 else "s")
    if args.poll_us:
        log.info("busy polling: each kicked ring is polled for %d us after its last work", args.poll_us)
    # Before any socket listens: a SIGTERM while devices are still being set up
    # (a service manager stopping a slow start) ends the process cleanly too.
    _stop_on_signals(server)
    return server


def _stop_on_signals(server: VhostUserServer) -> None:
    """SIGTERM and SIGINT stop ``server`` (at once if its loop has not started yet)."""
    watchdog: list[threading.Timer] = []

    def on_signal(signum, frame):  # noqa: ARG001
        log.info("signal %d: shutting down", signum)
        server.stop()
        if not watchdog:
            # A thread may be stuck (a data-plane handler, a lock it holds):
            # the process still ends in time, without waiting for it.
            watchdog.append(threading.Timer(SHUTDOWN_GRACE_S, _exit_now, (server,)))
            watchdog[0].daemon = True
            watchdog[0].start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def _serve(server: VhostUserServer, sandbox_mode: str | None, dump_dir: str | None = None) -> int:
    DumpOnSignal(server, dump_dir)  # SIGUSR2: cores into dump_dir (logged and ignored without one)
    # Every socket listens (client endpoints dial from the loop): tell the
    # service manager, before the sandbox forbids creating its socket.
    if service.notify("READY=1"):
        log.info("notified the service manager: ready")
    if sandbox_mode:  # start-up is over: every image, TAP device and socket is open
        try:
            sandbox.apply(sandbox_mode)
        except sandbox.SandboxError as exc:
            server.close()
            print(f"iovirt: {exc}", file=sys.stderr)
            return 1
    server.serve_forever()
    return 0


CONFIG_ADAPTERS: dict[str, type[VhostUserDevice]] = {"net": NetConfigAdapter, "scsi": ScsiConfigAdapter}
"""The adapters that offer VHOST_USER_PROTOCOL_F_CONFIG, for ``config=on`` / ``--offer-config`` (off by default)."""


def _add_device(server: VhostUserServer, spec: DeviceSpec, device: Any, name: str, sealed: bool,
                inherited: list[service.ListenFd]) -> Endpoint:
    """Serve ``device`` as ``spec`` says: dial the VMM, or take a socket systemd passed, or listen."""
    adapter = CONFIG_ADAPTERS.get(spec.kind) if spec.config else None
    label = name.split(" ", 1)[0]
    if spec.client:
        endpoint = server.add_client(spec.socket, device, name, True, adapter, sealed)
    elif (fd := _take_inherited(inherited, spec.socket, label)) is not None:
        endpoint = server.add_fd(fd, device, name, True, adapter, sealed)
    else:
        endpoint = server.add_socket(spec.socket, device, name, True, adapter, sealed)
    if spec.limits:
        apply_limits(endpoint.device.device, spec.limits)
    return endpoint


def _take_inherited(inherited: list[service.ListenFd], path: str, label: str) -> int | None:
    """The socket systemd passed for ``path``: named ``label`` (``FileDescriptorName=``) or bound at ``path``."""
    for i, passed in enumerate(inherited):
        if passed.name == label or passed.path == os.path.abspath(path):
            log.info("%s: serving the socket passed by the service manager (fd %d, %s)", label, passed.fd,
                     passed.path or passed.name)
            return inherited.pop(i).fd
    return None


def _close_unused(inherited: list[service.ListenFd]) -> None:
    for passed in inherited:
        log.warning("fd %d (%s) passed by the service manager matches no device; closed", passed.fd,
                    passed.path or passed.name)
        os.close(passed.fd)


def apply_config(args: argparse.Namespace) -> None:
    """``--config FILE``: set every serve option from the TOML file; :class:`SpecError` on any error in it."""
    given = sorted(dest for dest, default in args.flag_defaults.items() if getattr(args, dest) != default)
    if given:
        flags = ", ".join("--" + dest.replace("_", "-") for dest in given)
        raise SpecError(f"{args.config}: do not combine it with {flags} (the file describes every device and option)")
    for dest, value in load_config(args.config).items():
        setattr(args, dest, value)


def serve_plan(args: argparse.Namespace) -> dict[str, Any]:
    """What ``serve`` will do, as parsed from flags or a configuration file (equal plans, same service)."""
    return {dest: getattr(args, dest) for dest in args.flag_defaults}


def _exit_now(server: VhostUserServer) -> None:
    server.remove_socket_files()
    log.error("threads did not stop within %.1f s of the signal; exiting without them", SHUTDOWN_GRACE_S)
    logging.shutdown()
    os._exit(EXIT_FORCED)


def _attach_tap(server: VhostUserServer, ifname: str | None, switch: LearningSwitch | Nat) -> None:
    if ifname:
        tap = TapPort(ifname, switch)
        server.dataplane.add_fd(tap.fd, tap.on_readable)
        log.info("TAP %s joined the %s", ifname, "switch" if isinstance(switch, LearningSwitch) else "NAT")


def _network_modes(args: argparse.Namespace, switch: LearningSwitch) -> LearningSwitch | Nat:
    """The router (``--router``) and the NAT (``--nat``); what the TAP uplink joins (docs/network-modes.md)."""
    if not args.router:
        return switch
    router = Router(switch)
    for spec in args.router:
        router.add_interface(spec.subnet, spec.vlan)
    if args.nat is None:
        return switch
    return Nat(router, args.nat.subnet, args.nat.gateway, args.nat.ports)


def run_serve(args: argparse.Namespace) -> int:
    """``iovirt serve``."""
    if args.config:
        try:
            apply_config(args)
        except SpecError as exc:
            print(f"iovirt serve: --config {exc}", file=sys.stderr)
            return 2
    if not (args.net or args.blk or args.rng or args.input or args.vsock or args.scsi):
        print("iovirt serve: give at least one --net, --blk, --rng, --input, --vsock or --scsi device", file=sys.stderr)
        return 2
    if args.dump_dir and (args.isolate or args.sandbox):
        # Workers are other processes; the sandbox forbids opening files after start-up.
        print("iovirt serve: --dump-dir cannot be combined with --isolate or --sandbox", file=sys.stderr)
        return 2
    if args.dump_dir and not os.path.isdir(args.dump_dir):
        print(f"iovirt serve: --dump-dir {args.dump_dir} is not a directory", file=sys.stderr)
        return 2
    if args.isolate:
        if args.rng or args.input or args.vsock or args.scsi:
            print("iovirt serve: --isolate serves net and blk devices only", file=sys.stderr)
            return 2
        if args.poll_us:
            print("iovirt serve: --isolate does not take --poll-us yet", file=sys.stderr)
            return 2
        if args.workers is not None:
            print("iovirt serve: --isolate does not take --workers (every device has a process of its own)",
                  file=sys.stderr)
            return 2
        if args.control:
            # The devices live in worker processes; the control socket would see none of them.
            print("iovirt serve: --control cannot be combined with --isolate yet", file=sys.stderr)
            return 2
        if args.router or any(spec.vlan for spec in args.net):
            print("iovirt serve: --isolate does not take vlan=, trunk= or --router yet", file=sys.stderr)
            return 2
        if any(spec.client or spec.config or spec.limits or spec.kind == "net" and spec.impairment
               for spec in [*args.net, *args.blk]):
            print("iovirt serve: --isolate does not take client:, config=on, rate limits or impairments yet",
                  file=sys.stderr)
            return 2
        _raise_fd_limit()
        return run_isolated(args, [port_mac(i) for i in range(len(args.net))], _access(args), _switch(args))
    if args.nat is not None and not (args.router and args.tap):
        print("iovirt serve: --nat needs --router (the inside subnets) and --tap (the outside interface)",
              file=sys.stderr)
        return 2
    server = _new_server(args)
    switch = _switch(args)
    sealed = args.require_sealed_memory
    inherited = service.listen_fds()
    try:
        for i, spec in enumerate(args.net):
            port = VirtioNet(port_mac(i), switch, queue_pairs=args.queues, mtu=args.mtu, label=f"net{i}")
            if spec.vlan is not None:
                switch.set_vlan(port, spec.vlan)
            endpoint = _add_device(server, spec, port, f"net{i} ({spec.socket})", sealed, inherited)
            if len(server.dataplane) > 1:
                switch.set_owner(port, endpoint.worker, server.dataplane.home)
            apply_impairment(switch, port, spec, endpoint.worker.call_later)
        for i, spec in enumerate(args.blk):
            disk = VirtioBlk(spec.image, read_only=spec.read_only, num_queues=spec.queues, size=spec.size,
                             label=f"blk{i}")
            _add_device(server, spec, disk, f"blk{i} ({spec.socket})", sealed, inherited)
        for i, spec in enumerate(args.rng):
            _add_device(server, spec, _rng(spec, f"rng{i}"), f"rng{i} ({spec.socket})", sealed, inherited)
        for i, spec in enumerate(args.input):
            dev = VirtioInput(spec.options["kind"], label=f"input{i}")
            _add_device(server, spec, dev, f"input{i} ({spec.socket})", sealed, inherited)
        detach = [_add_vsock(server, spec, f"vsock{i}", sealed, inherited) for i, spec in enumerate(args.vsock)]
        _add_scsi(server, args.scsi, sealed, inherited)
        _attach_tap(server, args.tap, _network_modes(args, switch))
        if args.control:
            detach.append(serve_control(server, switch, args).close)
    except (IovirtError, OSError) as exc:
        server.close()
        print(f"iovirt serve: {exc}", file=sys.stderr)
        return 1
    finally:
        _close_unused(inherited)
    try:
        return _serve(server, args.sandbox, os.path.abspath(args.dump_dir) if args.dump_dir else None)
    finally:
        for close in detach:
            close()


def _add_vsock(server: VhostUserServer, spec: DeviceSpec, label: str, sealed: bool,
               inherited: list[service.ListenFd]) -> Callable[[], None]:
    """A vsock device whose host sockets the data plane serves; returns what closes them."""
    device = VirtioVsock(spec.options["cid"], spec.options["uds"], label=label)
    endpoint = _add_device(server, spec, device, f"{label} ({spec.socket})", sealed, inherited)
    return attach_vsock(endpoint.worker, device)


def _program_spec(args: argparse.Namespace, kind: str, program: str, **fields: Any) -> DeviceSpec | int | str:
    """Where a ``vhost-user-*`` program serves: a spec (socket path), an fd, or an error message."""
    if args.client and args.socket_path is None:
        return f"iovirt {program}: --client needs --socket-path (the VMM's socket)"
    if args.fd is not None:
        return int(args.fd)
    if args.socket_path is not None:
        return DeviceSpec(kind, args.socket_path, args.client, **fields)
    inherited = service.listen_fds()
    if len(inherited) == 1:
        log.info("serving the socket passed by the service manager (fd %d)", inherited[0].fd)
        return inherited[0].fd
    _close_unused(inherited)
    return f"iovirt {program}: --socket-path or --fd is required (or exactly one socket from systemd, LISTEN_FDS)"


def _run_program(args: argparse.Namespace, program: str, where: DeviceSpec | int | str, make: Callable[[], Any],
                 spec_kind: str, config: bool = False, switch: LearningSwitch | None = None,
                 after: Callable[[VhostUserServer], Callable[[], None] | None] | None = None) -> int:
    if isinstance(where, str):
        print(where, file=sys.stderr)
        return 2
    server = _new_server(args)
    sealed = args.require_sealed_memory
    label = f"{spec_kind}0"
    try:
        device = make()
        if isinstance(where, int):
            adapter = CONFIG_ADAPTERS.get(spec_kind) if config else None
            server.add_fd(where, device, label, True, adapter, sealed)
        else:
            _add_device(server, where, device, f"{label} ({where.socket})", sealed, [])
        if switch is not None:
            _attach_tap(server, args.tap, switch)
        close = after(server) if after is not None else None
    except (IovirtError, OSError) as exc:
        server.close()
        print(f"iovirt {program}: {exc}", file=sys.stderr)
        return 1
    try:
        return _serve(server, args.sandbox)
    finally:
        if close is not None:
            close()


def run_net(args: argparse.Namespace) -> int:
    """``iovirt vhost-user-net``."""
    if args.print_capabilities:
        return _capabilities("net")
    switch = _switch(args)
    options = {"config": True} if args.offer_config else {}
    where = _program_spec(args, "net", "vhost-user-net", options=options)
    return _run_program(args, "vhost-user-net", where,
                        lambda: VirtioNet(port_mac(0), switch, queue_pairs=args.queues, label="net0"),
                        "net", args.offer_config, switch)


def run_blk(args: argparse.Namespace) -> int:
    """``iovirt vhost-user-blk``."""
    if args.print_capabilities:
        return _capabilities("block")
    if not args.blk_file:
        print("iovirt vhost-user-blk: --blk-file is required", file=sys.stderr)
        return 2
    where = _program_spec(args, "blk", "vhost-user-blk", image=args.blk_file, read_only=args.read_only)
    return _run_program(args, "vhost-user-blk", where,
                        lambda: VirtioBlk(args.blk_file, read_only=args.read_only, num_queues=args.num_queues,
                                          label="blk0"), "blk")


def _rng(spec: DeviceSpec, label: str) -> VirtioRng:
    return VirtioRng(spec.options.get("source"), spec.options.get("rate"), label=label)


def run_rng(args: argparse.Namespace) -> int:
    """``iovirt vhost-user-rng``."""
    if args.print_capabilities:
        return _capabilities("rng")
    options = {k: v for k, v in (("source", args.source), ("rate", args.rate)) if v is not None}
    where = _program_spec(args, "rng", "vhost-user-rng", options=options)
    return _run_program(args, "vhost-user-rng", where, lambda: _rng(DeviceSpec("rng", "", options=options), "rng0"),
                        "rng")


def run_input(args: argparse.Namespace) -> int:
    """``iovirt vhost-user-input``."""
    if args.print_capabilities:
        return _capabilities("input")
    where = _program_spec(args, "input", "vhost-user-input", options={"kind": args.kind})
    fifos: list[CommandFifo] = []

    def make() -> VirtioInput:
        device = VirtioInput(args.kind, label="input0")
        if args.inject_fifo:
            if not os.path.exists(args.inject_fifo):
                os.mkfifo(args.inject_fifo, 0o600)
            fifos.append(CommandFifo(args.inject_fifo, device))
        return device

    def watch_fifos(server: VhostUserServer) -> None:
        for fifo in fifos:
            server.dataplane.add_fd(fifo.fd, fifo.on_readable)

    return _run_program(args, "vhost-user-input", where, make, "input", after=watch_fifos)


def run_vsock(args: argparse.Namespace) -> int:
    """``iovirt vhost-user-vsock``."""
    if args.print_capabilities:
        return _capabilities("vsock")
    if not args.uds_path:
        print("iovirt vhost-user-vsock: --uds-path is required", file=sys.stderr)
        return 2
    where = _program_spec(args, "vsock", "vhost-user-vsock", options={"cid": args.guest_cid, "uds": args.uds_path})
    devices: list[VirtioVsock] = []

    def make() -> VirtioVsock:
        devices.append(VirtioVsock(args.guest_cid, args.uds_path, label="vsock0"))
        return devices[0]

    return _run_program(args, "vhost-user-vsock", where, make, "vsock",
                        after=lambda server: attach_vsock(server.endpoints[0].worker, devices[0]))


def _capabilities(kind: str) -> int:
    # vhost-user.rst "Backend program conventions": a JSON object with type and features.
    print(json.dumps(service.capabilities(kind)))
    return 0


# -- scsi ------------------------------------------------------------------------------------
def _scsi_serve_option(serve: argparse.ArgumentParser) -> None:
    serve.add_argument(
        "--scsi", metavar="[client:]SOCKET,IMAGE[,IMAGE...][,ro][,queues=N][,config=on]",
        type=_spec_type(parse_scsi),
        action="append", default=[],
        help="a virtio-scsi host adapter on SOCKET (QEMU -device vhost-user-scsi-pci,chardev=...) with target 0 "
             "and LUN i on the i-th raw IMAGE (repeatable); ro: every LUN read-only; queues: request queues "
             "(default 1; QEMU's num_queues must match); config=on: also offer VHOST_USER_PROTOCOL_F_CONFIG (QEMU "
             "does not use it and warns when it is offered)",
    )


def _scsi_program(sub: argparse._SubParsersAction) -> None:
    scsi = sub.add_parser(
        "vhost-user-scsi",
        help="one virtio-scsi back-end (vhost-user.rst back-end program conventions)",
        description="A single virtio-scsi vhost-user back-end (target 0, LUN i on the i-th IMAGE), "
                    "for libvirt-style launchers.",
    )
    _conventions(scsi)
    scsi.add_argument("images", metavar="IMAGE", nargs="*", help="raw images: LUN 0, LUN 1, ...")
    scsi.add_argument("--read-only", action="store_true", help="serve every LUN read-only")
    scsi.add_argument("--num-queues", type=int, default=1, help="request queues (default 1)")
    scsi.add_argument("--offer-config", action="store_true",
                      help="also offer VHOST_USER_PROTOCOL_F_CONFIG (the scsi config space over vhost-user; QEMU does "
                           "not use it and warns when it is offered)")
    scsi.set_defaults(func=run_scsi)


def _add_scsi(server: VhostUserServer, specs: list[DeviceSpec], sealed: bool,
              inherited: list[service.ListenFd]) -> None:
    for i, spec in enumerate(specs):
        device = VirtioScsi(scsi_images(spec), read_only=spec.read_only, num_queues=spec.queues, label=f"scsi{i}")
        _add_device(server, spec, device, f"scsi{i} ({spec.socket})", sealed, inherited)


def run_scsi(args: argparse.Namespace) -> int:
    """``iovirt vhost-user-scsi``."""
    if args.print_capabilities:
        return _capabilities("scsi")
    if not args.images:
        print("iovirt vhost-user-scsi: give at least one IMAGE", file=sys.stderr)
        return 2
    options = {"images": tuple(args.images), "queues": args.num_queues}
    if args.offer_config:
        options["config"] = True
    where = _program_spec(args, "scsi", "vhost-user-scsi", image=args.images[0], read_only=args.read_only,
                          options=options)
    return _run_program(args, "vhost-user-scsi", where,
                        lambda: VirtioScsi(args.images, read_only=args.read_only, num_queues=args.num_queues,
                                           label="scsi0"), "scsi", args.offer_config)
