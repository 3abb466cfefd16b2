"""``iovirt dump``: a running back-end writes an ELF core of each connected device's guest memory.

There is no control socket yet, so the request is a signal: ``iovirt serve
--dump-dir DIR`` installs :class:`DumpOnSignal`, and SIGUSR2 makes every
connected device's session write ``DIR/<device>-<time>.core``
(:func:`dump_session`), then ``DIR/iovirt-<pid>-<time>.json`` listing the
cores written: the index ``iovirt dump PID`` (:func:`request_dump`) waits for.

The signal handler only writes a byte to a pipe; the cores are written by
the server's control loop (:meth:`VhostUserServer.add_reader`), the thread
that applies every front-end request, so no memory table changes under a
dump.  The data-path lock is held only while the rings' state and bytes
are snapshotted, not while the memory is written: the other devices go on.
The rings in the core are that snapshot (consistent with the note); the
rest of memory is as it was while being written.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import time
from typing import TYPE_CHECKING, Any

from iovirt.errors import IovirtError
from iovirt.inspect.elfcore import write_core
from iovirt.memory import GuestMemoryError
from iovirt.virtio.defs import VIRTIO_F_EVENT_IDX, avail_ring_size, desc_table_size, used_ring_size

if TYPE_CHECKING:
    from iovirt.vhost_user.backend import BackendSession
    from iovirt.vhost_user.server import VhostUserServer

log = logging.getLogger("iovirt.inspect")

DUMP_SIGNAL = signal.SIGUSR2
NOTE_FORMAT = 1  # version of the IOVIRT note's JSON


class DumpError(IovirtError):
    """A dump that could not be requested or did not arrive; the text says why."""


def ring_note(session: BackendSession) -> tuple[list[dict[str, Any]], list[tuple[int, bytes]]]:
    """The rings of ``session`` as note entries, and a copy of each ring part ``(gpa, bytes)``.

    A running ring is described as the device's queue has it; a stopped one
    (``"stopped": true``) by its addresses and where it stopped.

    Call under the data-path lock.  Ring addresses are guest-physical; with
    VIRTIO_F_ACCESS_PLATFORM they are IOVAs translated through the IOTLB
    (the note keeps the IOVAs too).  A ring whose parts do not translate
    to one guest-physical run is described without GPAs, with ``error``.
    """
    rings: list[dict[str, Any]] = []
    parts: list[tuple[int, bytes]] = []
    dma = session.vrings.dma_memory
    phys = session.table.memory
    for vring in session.vrings.rings:
        queue = session.device.queue(vring.index)
        entry: dict[str, Any] = {"device": session.device.label, "queue": vring.index, "enabled": vring.enabled}
        if queue is not None:
            state = queue.state()
            size = state.size
            entry.update(size=size, last_avail_idx=state.last_avail_idx, used_idx=state.used_idx,
                         event_idx=bool(state.event_idx), stopped=False)
            addrs = {"desc": state.desc_addr, "avail": state.avail_addr, "used": state.used_addr}
        elif vring.addr is not None and vring.num:
            # Stopped (GET_VRING_BASE; QEMU stops every ring when the VM stops): where it stopped.
            size = vring.num
            entry.update(size=size, last_avail_idx=vring.base, used_idx=vring.used_idx,
                         event_idx=bool(session.features >> VIRTIO_F_EVENT_IDX & 1), stopped=True)
            try:
                addrs = dict(zip(("desc", "avail", "used"), session.vrings.placement(vring)))
            except IovirtError as exc:
                entry["error"] = str(exc)
                rings.append(entry)
                continue
        else:
            continue
        lengths = {"desc": desc_table_size(size), "avail": avail_ring_size(size), "used": used_ring_size(size)}
        if session.vrings.iotlb is not None:
            entry["iova"] = dict(addrs)
        try:
            for name, addr in addrs.items():
                pieces = dma.translate(addr, lengths[name])
                if len(pieces) != 1:
                    raise DumpError(f"{name} ring [{addr:#x}, +{lengths[name]:#x}) is not one guest-physical run")
                entry[name] = pieces[0][0]
                parts.append((pieces[0][0], phys.read(pieces[0][0], lengths[name])))
        except (GuestMemoryError, DumpError) as exc:
            entry["error"] = str(exc)
            for name in addrs:
                entry.pop(name, None)
        rings.append(entry)
    return rings, parts


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "device"


def _stamp() -> str:
    now = time.time()
    return time.strftime("%Y%m%dT%H%M%S", time.localtime(now)) + f".{int(now * 1000) % 1000:03d}"


def dump_session(session: BackendSession, directory: str, stamp: str | None = None) -> str:
    """Write ``directory/<device>-<stamp>.core`` for ``session``; returns its path.

    Runs on the control thread; holds the data-path lock only to take the
    rings' snapshot (:func:`ring_note`).
    """
    with session.dataplane.lock:
        rings, parts = ring_note(session)
        note = {"format": NOTE_FORMAT, "device": session.device.label, "session": session.label,
                "features": session.features, "rings": rings}
    path = os.path.join(directory, f"{_safe(session.device.label)}-{stamp or _stamp()}.core")
    write_core(path, session.table.memory, note, overlays=parts)
    return path


class DumpOnSignal:
    """SIGUSR2 → every connected session of ``server`` writes a core into ``directory``.

    ``directory`` None: the signal is logged and ignored (so a stray SIGUSR2
    never kills a back-end started without ``--dump-dir``).
    """

    def __init__(self, server: VhostUserServer, directory: str | None) -> None:
        self.server = server
        self.directory = directory
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        server.add_reader(self._r, self._dump_all)
        signal.signal(DUMP_SIGNAL, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:  # noqa: ARG002
        try:
            os.write(self._w, b"d")
        except OSError:
            pass  # a dump is already pending

    def _dump_all(self) -> None:
        try:
            os.read(self._r, 64)
        except BlockingIOError:
            return
        if self.directory is None:
            log.warning("SIGUSR2: no --dump-dir was given, nothing dumped")
            return
        stamp = _stamp()
        written: list[str] = []
        errors: list[str] = []
        for endpoint in list(self.server.endpoints):
            conn = endpoint.connection
            if conn is None:
                continue
            try:
                written.append(dump_session(conn.session, self.directory, stamp))
            except (OSError, IovirtError) as exc:
                errors.append(f"{endpoint.name}: {exc}")
                log.warning("%s: dump failed: %s", endpoint.name, exc)
        index = os.path.join(self.directory, f"iovirt-{os.getpid()}-{stamp}.json")
        try:
            with open(index + ".tmp", "w") as out:
                json.dump({"pid": os.getpid(), "cores": written, "errors": errors}, out)
            os.rename(index + ".tmp", index)
        except OSError as exc:
            log.warning("dump index %s cannot be written: %s", index, exc)
            return
        log.info("dumped %d device(s) into %s", len(written), self.directory)

    def close(self) -> None:
        """Stop watching the pipe and close it; SIGUSR2 goes back to its default."""
        signal.signal(DUMP_SIGNAL, signal.SIG_DFL)
        self.server.remove_reader(self._r)
        for fd in (self._r, self._w):
            os.close(fd)


def _dump_dir_of(pid: int) -> str | None:
    """The ``--dump-dir`` of process ``pid`` from its command line, or None."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0")]
    except OSError as exc:
        raise DumpError(f"no process {pid}: {exc.strerror}") from exc
    for i, arg in enumerate(argv):
        if arg == "--dump-dir" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--dump-dir="):
            return arg.partition("=")[2]
    return None


def request_dump(pid: int, directory: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
    """Signal back-end ``pid`` to dump and wait for its index; returns the index (``cores``, ``errors``).

    The process must have been started with ``--dump-dir`` (checked on its
    command line first: SIGUSR2 would end a process that does not handle
    it); ``directory`` defaults to that one.
    """
    own = _dump_dir_of(pid)
    if own is None:
        raise DumpError(f"process {pid} was not started with --dump-dir; not signalling it")
    directory = directory or own
    if not os.path.isabs(directory):
        directory = os.path.join(os.readlink(f"/proc/{pid}/cwd"), directory)
    prefix = f"iovirt-{pid}-"
    before = {n for n in _listdir(directory) if n.startswith(prefix)}
    os.kill(pid, DUMP_SIGNAL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = sorted(n for n in _listdir(directory) if n.startswith(prefix) and n.endswith(".json") and n not in before)
        if new:
            with open(os.path.join(directory, new[-1])) as f:
                index: dict[str, Any] = json.load(f)
            return index
        time.sleep(0.02)
    raise DumpError(f"process {pid} wrote no dump index into {directory} within {timeout} s")


def _listdir(directory: str) -> list[str]:
    try:
        return os.listdir(directory)
    except OSError as exc:
        raise DumpError(f"dump directory {directory}: {exc.strerror}") from exc
