"""Running iovirt as a system service: systemd socket activation, ``sd_notify``, JSON logs, back-end descriptors.

No systemd library: the protocols are small and documented.

* Socket activation (``sd_listen_fds(3)``): systemd passes listening sockets
  as fds 3, 4, ... with ``LISTEN_FDS`` (their count), ``LISTEN_PID`` (the pid
  they are for) and optionally ``LISTEN_FDNAMES`` (colon-separated names,
  ``FileDescriptorName=`` of the ``.socket`` unit).  :func:`listen_fds`.
* Readiness (``sd_notify(3)``): a datagram ``READY=1`` to the AF_UNIX socket
  named by ``NOTIFY_SOCKET``; a name starting with ``@`` is in the abstract
  namespace.  :func:`notify`.
* ``--log-format json``: one JSON object per log line (:class:`JsonFormatter`).
* vhost-user back-end descriptors (QEMU ``docs/interop/vhost-user.json``,
  struct ``VhostUserBackend``: ``description``, ``type``, ``binary``; the
  features are what the binary's ``--print-capabilities`` reports, the
  ``VHostUserBackendCapabilities*`` structs), which libvirt reads from
  ``/usr/share/qemu/vhost-user/``: :func:`write_descriptors`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import MutableMapping

SD_LISTEN_FDS_START = 3
"""The first fd systemd passes (sd_listen_fds(3))."""

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclass(frozen=True)
class ListenFd:
    """One socket systemd passed: its fd, its name (``LISTEN_FDNAMES``, or "unknown"), its bound path if any."""

    fd: int
    name: str
    path: str | None


def listen_fds(environ: MutableMapping[str, str] | None = None) -> list[ListenFd]:
    """The sockets systemd passed to this process (none unless ``LISTEN_PID`` is our pid).

    The variables are removed from ``environ`` (as ``sd_listen_fds(1)``
    does) so that child processes do not take the fds for theirs; the fds
    are marked close-on-exec.
    """
    env = os.environ if environ is None else environ
    pid, count, names = env.get("LISTEN_PID"), env.get("LISTEN_FDS"), env.get("LISTEN_FDNAMES")
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(key, None)
    if pid is None or count is None or not pid.isdigit() or int(pid) != os.getpid() or not count.isdigit():
        return []
    n = int(count)
    labels = names.split(":") if names else []
    fds = []
    for i in range(n):
        fd = SD_LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        fds.append(ListenFd(fd, labels[i] if i < len(labels) and labels[i] else "unknown", _bound_path(fd)))
    return fds


def _bound_path(fd: int) -> str | None:
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            return None
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return None
    try:
        name = sock.getsockname()
    except OSError:
        return None
    finally:
        sock.close()
    return os.path.abspath(name) if isinstance(name, str) and name else None


def notify(state: str, environ: MutableMapping[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``READY=1``) to the service manager; False when there is none (no ``NOTIFY_SOCKET``)."""
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET")
    if not address or address[0] not in "/@":
        return False
    if address[0] == "@":  # the abstract namespace: a leading NUL byte
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto(state.encode(), address)
        except OSError as exc:
            logging.getLogger("iovirt").warning("cannot notify the service manager at %s: %s", env["NOTIFY_SOCKET"], exc)
            return False
    return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time`` (ISO 8601, UTC), ``level``, ``logger``, ``message`` (and ``exception``)."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str, fmt: str = "text") -> None:
    """Log to stderr at ``level`` in ``fmt`` (``text`` or ``json``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])


BACKENDS = {
    "net": ("vhost-user-net", "iovirt virtio-net vhost-user back-end (learning switch port)", []),
    "block": ("vhost-user-blk", "iovirt virtio-blk vhost-user back-end (raw image)", ["read-only", "blk-file"]),
    "rng": ("vhost-user-rng", "iovirt virtio-rng vhost-user back-end (os.urandom, a file or a FIFO)", []),
    "input": ("vhost-user-input", "iovirt virtio-input vhost-user back-end (keyboard, mouse or tablet)", []),
    "vsock": ("vhost-user-vsock", "iovirt virtio-vsock vhost-user back-end (hybrid vsock to host UNIX sockets)", []),
    "scsi": ("vhost-user-scsi", "iovirt virtio-scsi vhost-user back-end (raw images as LUNs)", []),
}
"""Per ``VHostUserBackendType``: the iovirt program, the description, the ``features`` it reports."""


def capabilities(kind: str) -> dict[str, object]:
    """``--print-capabilities`` of a back-end program (vhost-user.rst "Backend program conventions")."""
    return {"type": kind, "features": list(BACKENDS[kind][2])}


def write_descriptors(directory: str | Path, binary_dir: str | Path | None = None,
                      python: str = sys.executable) -> list[Path]:
    """Write one descriptor per back-end type into ``directory`` (e.g. ``/usr/share/qemu/vhost-user``).

    A descriptor's ``binary`` must be a program that takes the back-end
    conventions' options directly; ``iovirt vhost-user-net`` is a
    subcommand, so a two-line wrapper (``iovirt-vhost-user-net``) is written
    into ``binary_dir`` (default: ``directory``) and named by the descriptor.
    Returns the files written.
    """
    out, bins = Path(directory), Path(binary_dir or directory)
    out.mkdir(parents=True, exist_ok=True)
    bins.mkdir(parents=True, exist_ok=True)
    written = []
    for kind, (program, description, _features) in BACKENDS.items():
        wrapper = bins / f"iovirt-{program}"
        wrapper.write_text(f"#!/bin/sh\nexec {_sh_quote(python)} -m iovirt {program} \"$@\"\n")
        wrapper.chmod(0o755)
        descriptor = out / f"50-iovirt-{program.removeprefix('vhost-user-')}.json"
        body = {"description": description, "type": kind, "binary": str(wrapper.resolve())}
        descriptor.write_text(json.dumps(body, indent=2) + "\n")
        written += [descriptor, wrapper]
    return written


def _sh_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"
