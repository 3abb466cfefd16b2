"""The campaign harness shared by the two fuzzers: a real ``iovirt serve``, canaries, checks, workers.

A campaign runs in epochs.  In each epoch every worker process (one per
fuzz slot, each slot its own sockets of the same server) runs its fuzzer for
a fixed number of units (protocol messages or descriptor chains) from a seed
derived from ``(seed, epoch, worker)``, then the harness checks the server:

* it is alive (a crash: the exit status, e.g. -7 for SIGBUS);
* a canary on separate connections still works: a blk write/read compare and
  a frame from one net port to another across the switch, each under a
  deadline (a hang: the canary timed out);
* its fd count (``/proc/PID/fd``) and RSS (``VmRSS``) stay within a bound of
  the values measured before fuzzing (drift);
* its log has no ``Traceback``.

A crash, hang or drift restarts the server (the finding names the seeds and
each worker's last messages); the campaign goes on.  The summary is plain data
(:class:`Summary`), printed by ``tests/fuzz/campaign.py`` as a JSON line.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import random
import shutil
import signal
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from iovirt.serve_process import ServeProcess
from iovirt.vhost_user.driver import VhostUserDriver
from iovirt.virtio.blk.defs import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from iovirt.virtio.driver import DriverQueue
from iovirt.virtio.net.defs import NetHdr

IMAGE_SIZE = 256 << 10
CANARY_MEMORY = 1 << 20
NET_HDR = 12
BROADCAST = b"\xff" * 6
CANARY_ETHERTYPE = b"\x88\xb6"
IMAGE_DIR = Path("/dev/shm")
"""Where the images go when it exists: on tmpfs a FLUSH's ``fdatasync`` costs no disk write."""


@dataclass(frozen=True)
class Slot:
    """The sockets one worker fuzzes: net socket paths, and blk (socket, image) pairs."""

    net: tuple[str, ...]
    blk: tuple[tuple[str, str], ...]


class Fuzzer(Protocol):
    """What a worker process runs: ``run`` one epoch, return its counters (and ``last`` messages)."""

    def run(self, seed: int, count: int) -> dict[str, Any]:
        """Fuzz ``count`` units from ``seed``; return counters, ``units`` and ``last``."""
        ...

    def close(self) -> None:
        """Release sockets and memory."""
        ...


FuzzerFactory = Callable[[Slot, int], Fuzzer]


# -- the server under test ---------------------------------------------------------------


class Target:
    """``iovirt serve`` with ``slots`` fuzz slots and the canary devices, in ``workdir``.

    The images are in a directory of their own under :data:`IMAGE_DIR` (removed
    by :meth:`cleanup`), or in ``workdir`` without it.
    """

    def __init__(self, workdir: Path, slots: int, nets_per_slot: int, blks_per_slot: int) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.image_dir = Path(tempfile.mkdtemp(prefix="iovirt-fuzz-", dir=IMAGE_DIR)) if IMAGE_DIR.is_dir() else None
        images = self.image_dir or workdir
        self.slots = [
            Slot(
                tuple(str(workdir / f"s{i}n{j}.sock") for j in range(nets_per_slot)),
                tuple((str(workdir / f"s{i}b{j}.sock"), str(images / f"s{i}b{j}.img")) for j in range(blks_per_slot)),
            )
            for i in range(slots)
        ]
        self.canary_net = (str(workdir / "canary-a.sock"), str(workdir / "canary-b.sock"))
        self.canary_blk = (str(workdir / "canary.sock"), str(images / "canary.img"))
        self.log_path = workdir / "serve.log"
        self._log_offset = 0
        self.process: ServeProcess | None = None
        self.starts = 0

    def start(self) -> None:
        """Start a fresh server (fresh images) and wait for its sockets."""
        args: list[str] = []
        sockets: list[str] = []
        for path in [p for s in self.slots for p in s.net] + list(self.canary_net):
            args += ["--net", path]
            sockets.append(path)
        for sock, image in [b for s in self.slots for b in s.blk] + [self.canary_blk]:
            Path(image).write_bytes(bytes(IMAGE_SIZE))
            args += ["--blk", f"{sock},{image},size={IMAGE_SIZE}"]
            sockets.append(sock)
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.process = ServeProcess(args, self.log_path, sockets).start()
        self.starts += 1

    @property
    def pid(self) -> int:
        """The server's pid."""
        assert self.process is not None and self.process.proc is not None
        return self.process.proc.pid

    def exit_status(self) -> int | None:
        """None while the server runs, else its exit status (negative: the signal)."""
        assert self.process is not None and self.process.proc is not None
        return self.process.proc.poll()

    def fd_count(self) -> int:
        """Open fds of the server."""
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def rss_kib(self) -> int:
        """The server's resident set (VmRSS, KiB)."""
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def new_log(self) -> str:
        """Log text written since the last call."""
        with open(self.log_path, "rb") as log:
            log.seek(self._log_offset)
            data = log.read()
        self._log_offset += len(data)
        return data.decode(errors="replace")

    def stop(self) -> str:
        """SIGTERM (2 s), then SIGKILL; says which one ended it."""
        if self.process is None or self.process.proc is None:
            return "not running"
        if self.process.proc.poll() is not None:
            return f"already exited ({self.process.proc.returncode})"
        status = self.process.stop(signal.SIGTERM, timeout=2.0)
        self.process = None
        return "ended by SIGTERM" if status != -signal.SIGKILL else "SIGTERM ignored for 2 s; SIGKILLed"

    def cleanup(self) -> None:
        """Remove the image directory (after :meth:`stop`)."""
        if self.image_dir is not None:
            shutil.rmtree(self.image_dir, ignore_errors=True)


# -- the canary ----------------------------------------------------------------------------


class CanaryError(Exception):
    """The canary device did not work within its deadline."""


def _wait_used(queue: DriverQueue, target: int, deadline: float, what: str) -> None:
    while queue.used_idx() != target & 0xFFFF:
        if time.monotonic() > deadline:
            raise CanaryError(f"{what}: used idx {queue.used_idx()}, expected {target & 0xFFFF}")
        time.sleep(0.0005)


class Canary:
    """A blk device and two net ports on their own connections, checked between epochs.

    Buffers are allocated once and reused (the driver's bump allocator never frees).
    """

    RX_BUFFERS = 240
    RX_QUEUE_SIZE = 256
    RESEND = 0.2
    """s: the canary frame goes again after this; the fuzzers flood the switch, and a port's backlog is bounded."""

    def __init__(self, target: Target, timeout: float) -> None:
        self.timeout = timeout
        self.rng = random.Random(0xC0FFEE)
        self.image = target.canary_blk[1]
        self.drivers: list[VhostUserDriver] = []
        try:
            self.blk = self._driver(target.canary_blk[0], [0])
            self.a = self._driver(target.canary_net[0], [0, 1])
            self.b = self._driver(target.canary_net[1], [0, 1], self.RX_QUEUE_SIZE)
        except BaseException:
            self.close()
            raise
        alloc = self.blk.alloc
        self.hdr, self.data, self.status = alloc.alloc(16), alloc.alloc(4096), alloc.alloc(16)
        self.tx = self.a.alloc.alloc(2048)
        self.rx = {self.b.alloc.alloc(2048): 0 for _ in range(self.RX_BUFFERS)}
        self.rx_heads: dict[int, int] = {}
        for addr in self.rx:
            self._post_rx(addr)
        self.b.kick(0)

    def _driver(self, path: str, queues: list[int], size: int = 64) -> VhostUserDriver:
        drv = VhostUserDriver(path, memory_size=CANARY_MEMORY, timeout=self.timeout)
        self.drivers.append(drv)
        drv.start_queues(queues, size=size)
        return drv

    def _post_rx(self, addr: int) -> None:
        head = self.b.queues[0].add_chain(writable=[(addr, 2048)])
        self.rx_heads[head] = addr

    def check(self) -> None:
        """One blk write/read compare and one frame from port a to port b; raises :class:`CanaryError`."""
        deadline = time.monotonic() + self.timeout
        self._check_blk(deadline)
        self._check_net(deadline)

    def _blk(self, rtype: int, sector: int, deadline: float) -> None:
        mem, queue = self.blk.memory, self.blk.queues[0]
        mem.write(self.hdr, rtype.to_bytes(4, "little") + bytes(4) + sector.to_bytes(8, "little"))
        mem.write(self.status, b"\xff")
        data = (self.data, 4096)
        if rtype == VIRTIO_BLK_T_OUT:
            queue.add_chain(readable=[(self.hdr, 16), data], writable=[(self.status, 1)])
        else:
            queue.add_chain(readable=[(self.hdr, 16)], writable=[data, (self.status, 1)])
        self.blk.kick(0)
        _wait_used(queue, queue.avail_idx, deadline, f"canary blk request type {rtype}")
        queue.get_used()
        if mem.read(self.status, 1)[0] != VIRTIO_BLK_S_OK:
            raise CanaryError(f"canary blk request type {rtype} sector {sector}: status {mem.read(self.status, 1)[0]}")

    def _check_blk(self, deadline: float) -> None:
        sector = self.rng.randrange(IMAGE_SIZE // 512 - 8)
        payload = self.rng.randbytes(4096)
        self.blk.memory.write(self.data, payload)
        self._blk(VIRTIO_BLK_T_OUT, sector, deadline)
        self.blk.memory.write(self.data, bytes(4096))
        self._blk(VIRTIO_BLK_T_IN, sector, deadline)
        if self.blk.memory.read(self.data, 4096) != payload:
            raise CanaryError(f"canary blk sector {sector}: read back differs from what was written")

    def _recycle_rx(self) -> list[bytes]:
        used = self.b.queues[0].get_used()
        addrs = [self.rx_heads.pop(u.head) for u in used]  # before reposting: heads are reused
        for addr in addrs:
            self._post_rx(addr)
        self.b.kick(0)
        return [u.data[NET_HDR:] for u in used]

    def _check_net(self, deadline: float) -> None:
        self._recycle_rx()  # frames flooded by the fuzzers since the last check
        nonce = self.rng.randbytes(16)
        # Broadcast: a fuzzer may have taught the switch any MAC, but floods reach port b.
        frame = BROADCAST + bytes([2, 0, 0, 0xCA, 0, 1]) + CANARY_ETHERTYPE + nonce + bytes(30)
        queue = self.a.queues[1]
        self.a.memory.write(self.tx, NetHdr().pack() + frame)
        resend = 0.0
        while True:
            if time.monotonic() >= resend:
                queue.add_chain(readable=[(self.tx, NET_HDR + len(frame))])
                self.a.kick(1)
                _wait_used(queue, queue.avail_idx, deadline, "canary net transmit")
                queue.get_used()
                resend = time.monotonic() + self.RESEND
            if any(f[14:30] == nonce and f[12:14] == CANARY_ETHERTYPE for f in self._recycle_rx()):
                return
            if time.monotonic() > deadline:
                raise CanaryError("canary net frame did not cross the switch")
            time.sleep(0.0005)

    def close(self) -> None:
        """Disconnect every canary front-end."""
        for drv in self.drivers:
            try:
                drv.close()
            except OSError:
                pass
        self.drivers = []


# -- worker processes ------------------------------------------------------------------------


def _worker_main(conn: multiprocessing.connection.Connection, factory: FuzzerFactory, slot: Slot, index: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    fuzzer = factory(slot, index)
    try:
        while True:
            command = conn.recv()
            if command is None:
                return
            seed, count = command
            try:
                result = fuzzer.run(seed, count)
            except Exception:
                result = {"units": 0, "harness_error": traceback.format_exc()}
            conn.send(result)
    finally:
        fuzzer.close()


class Worker:
    """One fuzzing process and its command pipe."""

    def __init__(self, factory: FuzzerFactory, slot: Slot, index: int) -> None:
        self.factory, self.slot, self.index = factory, slot, index
        self.conn, child = multiprocessing.Pipe()
        context = multiprocessing.get_context("fork")
        self.process = context.Process(target=_worker_main, args=(child, factory, slot, index), daemon=True)
        self.process.start()
        child.close()

    def stop(self) -> None:
        """Ask the process to end, then kill it."""
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.process.join(2)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(2)
        self.conn.close()


# -- the campaign ------------------------------------------------------------------------------


@dataclass
class Finding:
    """One problem the campaign saw."""

    kind: str  # crash, hang, traceback, fd-drift, rss-drift, wild-write, image-write, worker-stuck
    epoch: int
    detail: str
    seeds: list[int]
    last_messages: dict[int, list[str]] = field(default_factory=dict)


@dataclass
class Summary:
    """A campaign's figures (``units`` are messages or chains)."""

    fuzzer: str
    seed: int
    workers: int
    units: int = 0
    seconds: float = 0.0
    rate: float = 0.0
    epochs: int = 0
    crashes: int = 0
    hangs: int = 0
    tracebacks: int = 0
    drifts: int = 0
    bad_writes: int = 0
    harness_errors: int = 0
    restarts: int = 0
    counters: dict[str, int] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        """Plain data; findings grouped by kind and first line, with a count and the first seeds."""
        data = asdict(self)
        groups: dict[tuple[str, str], dict[str, Any]] = {}
        for f in self.findings:
            line = f.detail.splitlines()[0][:300] if f.detail else ""
            group = groups.setdefault((f.kind, line), {"kind": f.kind, "detail": line, "count": 0,
                                                       "first_epoch": f.epoch, "seeds": f.seeds})
            group["count"] += 1
        data["findings"] = list(groups.values())
        return data


def epoch_seed(seed: int, epoch: int, worker: int) -> int:
    """The seed of one worker's epoch (replay it with the fuzzer's ``replay``)."""
    return (seed * 1_000_003 + epoch * 1009 + worker) & ((1 << 63) - 1)


@dataclass
class Campaign:
    """Run ``factory`` fuzzers in ``workers`` processes against one ``iovirt serve`` until ``total`` units."""

    name: str
    factory: FuzzerFactory
    workdir: Path
    total: int
    seed: int = 1
    workers: int = 2
    epoch_units: int = 2000
    nets_per_slot: int = 1
    blks_per_slot: int = 1
    canary_timeout: float = 3.0
    epoch_timeout: float = 30.0
    canary_interval: float = 1.0
    fd_slack: int = 24
    rss_slack_kib: int = 96 << 10
    max_seconds: float | None = None
    on_epoch: Callable[[Summary], None] | None = None

    def run(self) -> Summary:
        """The campaign; every finding is in the summary (and in ``workdir/findings.txt``)."""
        summary = Summary(self.name, self.seed, self.workers)
        target = Target(self.workdir, self.workers, self.nets_per_slot, self.blks_per_slot)
        workers: list[Worker] = []
        canary: Canary | None = None
        started = time.monotonic()
        baseline: tuple[int, int] | None = None
        try:
            target.start()
            canary, baseline = self._canary(target), (target.fd_count(), target.rss_kib())
            workers = [Worker(self.factory, slot, i) for i, slot in enumerate(target.slots)]
            epoch = 0
            while summary.units < self.total:
                if self.max_seconds is not None and time.monotonic() - started > self.max_seconds:
                    break
                seeds = [epoch_seed(self.seed, epoch, i) for i in range(self.workers)]
                restart = self._epoch(epoch, seeds, target, canary, baseline, workers, summary)
                epoch += 1
                summary.epochs = epoch
                if restart:
                    summary.restarts += 1
                    if canary is not None:
                        canary.close()
                    target.stop()
                    target.start()
                    canary, baseline = self._canary(target), (target.fd_count(), target.rss_kib())
                if self.on_epoch is not None:
                    self.on_epoch(summary)
        finally:
            for worker in workers:
                worker.stop()
            if canary is not None:
                canary.close()
            target.stop()
            target.cleanup()
            summary.seconds = round(time.monotonic() - started, 2)
            summary.rate = round(summary.units / summary.seconds, 1) if summary.seconds else 0.0
            self._write_findings(summary)
        return summary

    def _canary(self, target: Target) -> Canary:
        canary = Canary(target, self.canary_timeout)
        canary.check()
        return canary

    def _epoch(
        self,
        epoch: int,
        seeds: list[int],
        target: Target,
        canary: Canary,
        baseline: tuple[int, int],
        workers: list[Worker],
        summary: Summary,
    ) -> bool:
        """One epoch and its checks; True if the server must be restarted."""
        count = max(1, self.epoch_units // self.workers)
        for worker, seed in zip(workers, seeds):
            worker.conn.send((seed, count))
        results: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + self.epoch_timeout
        next_canary = time.monotonic() + self.canary_interval
        failure: tuple[str, str] | None = None  # (kind, detail): the server crashed or hung
        while len(results) < len(workers) and time.monotonic() < deadline:
            for i, worker in enumerate(workers):
                if i not in results and worker.conn.poll(0.01):
                    results[i] = worker.conn.recv()
            if failure is None:
                failure = self._server_failure(target, canary, now=time.monotonic() > next_canary)
                if time.monotonic() > next_canary:
                    next_canary = time.monotonic() + self.canary_interval
                if failure is not None:
                    # Stop it now: the workers then fail fast and end their epoch.
                    failure = (failure[0], f"{failure[1]}; {target.stop()}")
        if failure is None:
            failure = self._server_failure(target, canary, now=True)
        last = {i: r.get("last", []) for i, r in results.items()}
        restart = False
        for i, worker in enumerate(workers):
            if i not in results:
                # Stuck in a send or a connect (or the worker has a bug): replace it.
                summary.hangs += 1
                summary.findings.append(Finding("worker-stuck", epoch, f"worker {i} did not finish its epoch in "
                                                f"{self.epoch_timeout} s", seeds, last))
                worker.stop()
                workers[i] = Worker(self.factory, worker.slot, i)
                restart = True
        for i, result in results.items():
            summary.units += result.get("units", 0)
            for key, value in result.get("counters", {}).items():
                summary.counters[key] = summary.counters.get(key, 0) + value
            if "harness_error" in result:
                summary.harness_errors += 1
                summary.findings.append(Finding("harness-error", epoch, result["harness_error"], seeds, last))
            for problem in result.get("problems", []):
                summary.bad_writes += 1
                summary.findings.append(Finding(problem["kind"], epoch, problem["detail"], seeds, last))
        if failure is not None:
            kind, detail = failure
            if kind == "crash":
                summary.crashes += 1
            else:
                summary.hangs += 1
            summary.findings.append(Finding(kind, epoch, detail, seeds, last))
            self._scan_log(target, epoch, seeds, last, summary)
            return True
        self._scan_log(target, epoch, seeds, last, summary)
        return restart or self._drift(target, baseline, epoch, seeds, last, summary)

    def _server_failure(self, target: Target, canary: Canary, now: bool) -> tuple[str, str] | None:
        """("crash", how) if the server exited, ("hang", why) if the canary failed (checked when ``now``)."""
        status = target.exit_status()
        if status is not None:
            how = f"signal {signal.Signals(-status).name}" if status < 0 else f"exit status {status}"
            return "crash", f"iovirt serve died ({how})"
        if not now:
            return None
        try:
            canary.check()
        except (CanaryError, OSError) as exc:
            status = target.exit_status()
            if status is not None:
                return self._server_failure(target, canary, now)
            return "hang", f"canary failed: {exc}"
        return None

    def _scan_log(self, target: Target, epoch: int, seeds: list[int], last: dict[int, list[str]], summary: Summary) -> None:
        text = target.new_log()
        if "Traceback" not in text:
            return
        lines = text.splitlines()
        for n, line in enumerate(lines):
            if line.startswith("Traceback"):
                block = [lines[n - 1] if n else ""] + lines[n : n + 40]
                end = next((k for k in range(1, len(block)) if block[k] and not block[k].startswith(" ")
                            and not block[k].startswith("Traceback")), len(block) - 1)
                tb = "\n".join(block[: end + 1])
                summary.tracebacks += 1
                summary.findings.append(Finding("traceback", epoch, block[end] + "\n" + tb, seeds, last))

    def _drift(self, target: Target, baseline: tuple[int, int], epoch: int, seeds: list[int],
               last: dict[int, list[str]], summary: Summary) -> bool:
        fd_base, rss_base = baseline
        deadline = time.monotonic() + 2.0
        fds = target.fd_count()
        while fds > fd_base + self.fd_slack and time.monotonic() < deadline:
            time.sleep(0.05)  # closed connections are torn down by the control loop
            fds = target.fd_count()
        rss = target.rss_kib()
        if fds > fd_base + self.fd_slack:
            summary.drifts += 1
            summary.findings.append(Finding("fd-drift", epoch, f"{fds} fds open (baseline {fd_base}, bound +{self.fd_slack})", seeds, last))
            return True
        if rss > rss_base + self.rss_slack_kib:
            summary.drifts += 1
            summary.findings.append(Finding("rss-drift", epoch, f"VmRSS {rss} KiB (baseline {rss_base}, bound +{self.rss_slack_kib})", seeds, last))
            return True
        return False

    def _write_findings(self, summary: Summary) -> None:
        with open(self.workdir / "findings.txt", "w") as out:
            for f in summary.findings:
                out.write(f"== {f.kind} in epoch {f.epoch}, seeds {f.seeds}\n{f.detail}\n")
                for worker, messages in f.last_messages.items():
                    out.write(f"-- worker {worker}, last messages:\n" + "\n".join(messages) + "\n")
                out.write("\n")
