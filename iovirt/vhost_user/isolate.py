"""``iovirt serve --isolate``: one worker process per device, under a supervisor that restarts them.

Layout.  The ``serve`` process becomes the supervisor.  It starts one worker
per device (each ``--net`` socket, each ``--blk`` device): a fresh
interpreter (``python -m iovirt.vhost_user.isolate SPEC``) running its own
:class:`~iovirt.vhost_user.server.VhostUserServer` on the device's socket, so
a crash, a hang or an exhausted resource in one worker touches no other
device.  The supervisor keeps no front-end state; it runs:

- the net switch: the :class:`~iovirt.virtio.net.switch.LearningSwitch`
  joining every net device, each worker attached through a
  :class:`~iovirt.virtio.net.switch_link.LinkPort` (a ``SOCK_SEQPACKET``
  pair; in the worker the link and the device are the two ports of a
  :class:`~iovirt.virtio.net.switch_link.Hub`), plus the ``--tap`` uplink if
  given;
- a heartbeat per worker over a ``SOCK_SEQPACKET`` pair: every
  :data:`HEARTBEAT_INTERVAL_S` the supervisor sends a ping.  The worker's
  control loop reads it and wakes its data plane through an eventfd; the data
  plane answers.  So an answer proves both of the worker's loops run.  No
  answer for :data:`HEARTBEAT_DEADLINE_S` means hung: SIGKILL.

A worker that exits, is killed or is declared hung is restarted on the same
socket path after a backoff (:data:`BACKOFF_MIN_S` doubling to
:data:`BACKOFF_MAX_S`; it starts again from the minimum once a worker has run
for :data:`STABLE_S`), and each step is logged with the worker's pid.  A
front-end reconnects to the restarted worker (QEMU: ``reconnect=1``); the
blk inflight region lets the front-end resubmit what was in flight.  When a
net worker dies its link leaves the switch, which forgets the MACs learned
behind it; the restarted worker joins with a new link.

A worker that fails before it is ready the first time (a bad image path, a
path that is not a socket) is a configuration error: the supervisor stops
the others and exits 1, as ``serve`` without ``--isolate`` does.  SIGTERM or
SIGINT to the supervisor sends SIGTERM to every worker, SIGKILLs any still
running after :data:`STOP_GRACE_S`, and exits 0.  A worker whose supervisor
is gone (heartbeat socket at end of file) stops by itself.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import selectors
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from iovirt import sandbox
from iovirt.vhost_user.peers import AccessPolicy
from iovirt.virtio.net.switch import LearningSwitch
from iovirt.virtio.net.switch_link import Hub, LinkPort, link_pair

log = logging.getLogger("iovirt.isolate")

HEARTBEAT_INTERVAL_S = 0.5
HEARTBEAT_DEADLINE_S = 3.0
START_GRACE_S = 20.0  # a worker's first answer waits for an interpreter start and iovirt's imports
BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 5.0
STABLE_S = 10.0
STOP_GRACE_S = 1.5  # SIGTERM to SIGKILL on shutdown: all stopped within 2 s
TICK_S = 0.1
UPLINK_WAIT_S = 0.005  # how long a net worker waits for room on its link before dropping (backpressure)

PING = b"?"
PONG = b"!"
READY = b"R"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"


@dataclass
class DeviceSpec:
    """What a worker serves: the device kind, its socket, and the device's arguments (plain data)."""

    kind: str  # "net" or "blk"
    name: str
    socket: str
    options: dict[str, Any]


@dataclass
class Worker:
    """One device's worker process as the supervisor sees it."""

    spec: DeviceSpec
    proc: subprocess.Popen | None = None
    pidfd: int = -1
    heartbeat: socket.socket | None = None
    link: LinkPort | None = None
    started: float = 0.0
    last_answer: float = 0.0
    ready: bool = False
    ever_ready: bool = False
    failures: int = 0
    restart_at: float | None = None
    last_ping: float = 0.0


def specs_from_args(args: argparse.Namespace, macs: list[bytes], access: AccessPolicy) -> list[DeviceSpec]:
    """The devices of an ``iovirt serve`` command line, named as ``serve`` names them.

    Every worker gets the command's access policy and memory policy: isolation
    adds to them, never replaces them.
    """
    common = {
        "allow_uids": sorted(access.uids), "allow_gids": sorted(access.gids), "socket_mode": access.socket_mode,
        "require_sealed_memory": args.require_sealed_memory,
        # The supervisor starts processes (forbidden under the filter): each worker applies it.
        "sandbox": args.sandbox,
    }
    specs = [
        DeviceSpec("net", f"net{i} ({net.socket})", net.socket,
                   {"mac": macs[i].hex(), "queues": args.queues, "mtu": args.mtu, "label": f"net{i}", **common})
        for i, net in enumerate(args.net)
    ]
    specs += [
        DeviceSpec("blk", f"blk{i} ({b.socket})", b.socket,
                   {"image": b.image, "read_only": b.read_only, "size": b.size, "queues": b.queues,
                    "label": f"blk{i}", **common})
        for i, b in enumerate(args.blk)
    ]
    return specs


def run_isolated(args: argparse.Namespace, macs: list[bytes], access: AccessPolicy, switch: LearningSwitch) -> int:
    """``iovirt serve --isolate``: run the supervisor (which owns ``switch``) until SIGTERM/SIGINT."""
    supervisor = Supervisor(specs_from_args(args, macs, access), switch, tap=args.tap)
    return supervisor.run()


class Supervisor:
    """Starts, watches and restarts one worker per device; owns the switch joining the net workers."""

    def __init__(self, specs: list[DeviceSpec], switch: LearningSwitch, tap: str | None = None) -> None:
        self.workers = [Worker(spec) for spec in specs]
        self.switch = switch
        self.tap_name = tap
        self.selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.selector.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self._stopping = False
        self.failed: str | None = None

    def stop(self) -> None:
        """Ask :meth:`run` to stop every worker and return (safe from a signal handler)."""
        self._stopping = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def run(self) -> int:
        """Serve until :meth:`stop`; 0, or 1 when a device could not start."""
        def on_signal(signum: int, frame: object) -> None:  # noqa: ARG001
            log.info("signal %d: stopping every worker", signum)
            self.stop()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        tap = None
        try:
            if self.tap_name:
                from iovirt.virtio.net.tap import TapPort

                tap = TapPort(self.tap_name, self.switch)
                self.selector.register(tap.fd, selectors.EVENT_READ, ("tap", tap))
                log.info("TAP %s joined the switch", self.tap_name)
            for worker in self.workers:
                self._start(worker)
            while not self._stopping:
                self._loop_once()
        except OSError as exc:
            self.failed = str(exc)
        finally:
            self._stop_all()
            if tap is not None:
                tap.close()
            self.selector.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
        if self.failed:
            print(f"iovirt serve: {self.failed}", file=sys.stderr)
            return 1
        return 0

    # -- the loop --------------------------------------------------------------------------
    def _loop_once(self) -> None:
        # Exits last: handling one closes that worker's other fds, which may be in the same batch.
        events = sorted(self.selector.select(timeout=TICK_S), key=lambda event: event[0].data[0] == "exit")
        for key, _ in events:
            kind, obj = key.data
            if kind == "wake":
                os.read(self._wake_r, 64)
            elif kind == "link":
                obj.on_readable()
            elif kind == "heartbeat":
                self._on_heartbeat(obj)
            elif kind == "exit":
                self._on_exit(obj)
            elif kind == "tap":
                obj.on_readable()
        now = time.monotonic()
        for worker in self.workers:
            if worker.proc is None:
                if worker.restart_at is not None and now >= worker.restart_at and not self._stopping:
                    self._start(worker)
                continue
            deadline = HEARTBEAT_DEADLINE_S if worker.ready else START_GRACE_S
            if now - worker.last_answer > deadline:
                log.error("%s: worker pid %d missed its heartbeat for %.1f s: hung, killing it",
                          worker.spec.name, worker.proc.pid, now - worker.last_answer)
                _kill(worker.proc)
                worker.last_answer = now  # its pidfd reports the death; kill again only if it outlasts a deadline
            elif worker.ready and now - worker.last_ping >= HEARTBEAT_INTERVAL_S and worker.heartbeat is not None:
                worker.last_ping = now
                try:
                    worker.heartbeat.send(PING)
                except BlockingIOError:
                    pass  # unanswered pings pile up only in a hung worker, which the deadline catches
                except OSError:
                    pass  # it died: its pidfd reports that

    def _on_heartbeat(self, worker: Worker) -> None:
        assert worker.heartbeat is not None
        try:
            data = worker.heartbeat.recv(64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # it is exiting: its pidfd reports that
            self._unregister(worker.heartbeat)
            worker.heartbeat.close()
            worker.heartbeat = None
            return
        worker.last_answer = time.monotonic()
        if READY in data and not worker.ready:
            worker.ready = worker.ever_ready = True
            assert worker.proc is not None
            log.info("%s: worker pid %d serving %s", worker.spec.name, worker.proc.pid, worker.spec.socket)

    def _on_exit(self, worker: Worker) -> None:
        assert worker.proc is not None
        code = worker.proc.wait()
        pid = worker.proc.pid
        self._detach(worker)
        how = f"killed by signal {-code}" if code < 0 else f"exited with status {code}"
        if self._stopping:
            return
        if not worker.ever_ready:
            self.failed = f"{worker.spec.name}: the worker {how} before serving (see its log above)"
            self.stop()
            return
        now = time.monotonic()
        if now - worker.started >= STABLE_S:
            worker.failures = 0
        worker.failures += 1
        delay = min(BACKOFF_MIN_S * 2 ** (worker.failures - 1), BACKOFF_MAX_S)
        worker.restart_at = now + delay
        log.warning("%s: worker pid %d %s; restarting in %.1f s", worker.spec.name, pid, how, delay)

    # -- starting and stopping workers -----------------------------------------------------------
    def _start(self, worker: Worker) -> None:
        spec = worker.spec
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        fds = [theirs.fileno()]
        link_theirs = None
        if spec.kind == "net":
            link_ours, link_theirs = link_pair()
            fds.append(link_theirs.fileno())
        message = {"kind": spec.kind, "name": spec.name, "socket": spec.socket, "options": spec.options,
                   "heartbeat_fd": fds[0], "link_fd": fds[1] if len(fds) > 1 else -1,
                   "log_level": logging.getLogger().getEffectiveLevel()}
        try:
            proc = subprocess.Popen([sys.executable, "-m", "iovirt.vhost_user.isolate", json.dumps(message)],
                                    pass_fds=fds, stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
            if link_theirs is not None:
                link_theirs.close()
        now = time.monotonic()
        worker.proc = proc
        worker.started = worker.last_answer = worker.last_ping = now
        worker.ready = False
        worker.restart_at = None
        ours.setblocking(False)
        worker.heartbeat = ours
        self.selector.register(ours, selectors.EVENT_READ, ("heartbeat", worker))
        worker.pidfd = os.pidfd_open(proc.pid)
        self.selector.register(worker.pidfd, selectors.EVENT_READ, ("exit", worker))
        if spec.kind == "net":
            worker.link = LinkPort(link_ours, self.switch, spec.name, on_closed=lambda: self._unregister(link_ours))
            self.selector.register(worker.link.sock, selectors.EVENT_READ, ("link", worker.link))
        log.info("%s: started worker pid %d", spec.name, proc.pid)

    def _detach(self, worker: Worker) -> None:
        """Forget a dead worker: its link leaves the switch (with its MACs), its fds close."""
        if worker.link is not None:
            self._unregister(worker.link.sock)
            worker.link.close()
            worker.link = None
        if worker.heartbeat is not None:
            self._unregister(worker.heartbeat)
            worker.heartbeat.close()
            worker.heartbeat = None
        if worker.pidfd >= 0:
            self._unregister(worker.pidfd)
            os.close(worker.pidfd)
            worker.pidfd = -1
        worker.proc = None
        worker.ready = False

    def _unregister(self, fileobj: Any) -> None:
        try:
            self.selector.unregister(fileobj)
        except (KeyError, ValueError):
            pass

    def _stop_all(self) -> None:
        running = [w for w in self.workers if w.proc is not None]
        for worker in running:
            assert worker.proc is not None
            try:
                worker.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + STOP_GRACE_S
        for worker in running:
            assert worker.proc is not None
            try:
                worker.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s: worker pid %d ignored SIGTERM: killing it", worker.spec.name, worker.proc.pid)
                _kill(worker.proc)
                worker.proc.wait()
            if worker.proc.returncode < 0:  # ended by a signal: it could not remove its socket
                _remove_stale_socket(worker.spec.socket)
            self._detach(worker)


def _kill(proc: subprocess.Popen) -> None:
    try:
        proc.kill()
    except ProcessLookupError:
        pass


def _remove_stale_socket(path: str) -> None:
    """A killed worker leaves its socket file; remove it (only if it is a socket)."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except OSError:
        pass


# -- the worker ------------------------------------------------------------------------------------


def worker_main(message: dict[str, Any]) -> int:
    """Serve one device (the supervisor's ``message``) until SIGTERM or until the supervisor is gone."""
    from iovirt.errors import IovirtError
    from iovirt.vhost_user.server import VhostUserServer
    from iovirt.virtio.blk.device import VirtioBlk
    from iovirt.virtio.net.device import VirtioNet

    logging.basicConfig(level=message["log_level"], format=LOG_FORMAT, stream=sys.stderr)
    heartbeat = socket.socket(fileno=message["heartbeat_fd"])
    heartbeat.setblocking(False)
    options = message["options"]
    access = AccessPolicy(frozenset(options["allow_uids"]), frozenset(options["allow_gids"]), options["socket_mode"])
    server = VhostUserServer(access=access)

    def on_signal(signum: int, frame: object) -> None:  # noqa: ARG001
        server.stop()

    # Before the socket is bound: a SIGTERM during start-up still ends in a clean close.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # ^C in a terminal reaches the supervisor, which stops us
    link: LinkPort | None = None
    try:
        if message["kind"] == "net":
            switch = Hub()
            device: Any = VirtioNet(bytes.fromhex(options["mac"]), switch, queue_pairs=options["queues"],
                                    mtu=options["mtu"], label=options["label"])
            link = uplink = LinkPort(socket.socket(fileno=message["link_fd"]), switch, "uplink",
                                     send_wait_s=UPLINK_WAIT_S)

            def link_closed() -> None:
                server.dataplane.remove(uplink.fileno())
                server.stop()

            uplink.on_closed = link_closed
            server.dataplane.add_fd(uplink.fileno(), uplink.on_readable)
        else:
            device = VirtioBlk(options["image"], read_only=options["read_only"], num_queues=options["queues"],
                               size=options["size"], label=options["label"])
        server.add_socket(message["socket"], device, name=message["name"], iommu=True,
                          require_sealed_memory=options["require_sealed_memory"])
    except (IovirtError, OSError) as exc:
        server.close()
        print(f"iovirt serve: {exc}", file=sys.stderr)
        return 1
    _heartbeat(server, heartbeat)
    if options["sandbox"]:  # start-up is over: the image, the socket and the link are open
        try:
            sandbox.apply(options["sandbox"])
        except sandbox.SandboxError as exc:
            server.close()
            print(f"iovirt serve: {exc}", file=sys.stderr)
            return 1
    heartbeat.send(READY)
    server.serve_forever()
    if link is not None:
        log.info("%s: link to the switch: %d frames sent, %d dropped (the switch was not keeping up), %d received",
                 message["name"], link.stats["tx_packets"], link.stats["tx_dropped"], link.stats["rx_packets"])
    return 0


def _heartbeat(server: Any, heartbeat: socket.socket) -> None:
    """Answer the supervisor's pings from the data plane, woken by the control loop: both must run."""
    wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def on_ping() -> None:  # control loop
        try:
            data = heartbeat.recv(64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the supervisor is gone: stop serving rather than outlive it
            server.remove_reader(heartbeat.fileno())
            server.stop()
            return
        os.eventfd_write(wake, 1)

    def answer() -> None:  # data plane
        try:
            heartbeat.send(PONG)
        except OSError:
            pass

    server.add_reader(heartbeat.fileno(), on_ping)
    server.dataplane.add_eventfd(wake, answer)


if __name__ == "__main__":
    sys.exit(worker_main(json.loads(sys.argv[1])))
