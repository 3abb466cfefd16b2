"""A running QEMU guest: start it, watch its serial console, get its script's result.

Typical use (a vhost-user NIC on socket ``sock``, a script, its result)::

    with Guest(tmp_path, devices=[VhostUserNet(sock, ip="10.77.0.1/24")],
               script="iovirt_wait_ping 10.77.0.2 && cat /sys/class/net/eth0/address") as g:
        result = g.start().wait_result(timeout=120)
    assert result.status == 0, result.output

The guest's side of the protocol (markers, ``iovirt.ip`` parameters, shell
helpers) is described in :mod:`iovirt.guest.init_script`.
"""

from __future__ import annotations

import codecs
import os
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from iovirt.guest import init_script
from iovirt.guest.errors import GuestFailed, GuestTimeout, HostPartMissing
from iovirt.guest.initramfs import guest_initrd
from iovirt.guest.kernel import GuestKernel, find_kernel
from iovirt.guest.modules import VIRTIO_MODULES
from iovirt.guest.pvh import boot_image
from iovirt.guest.qemu import QEMU, Device, Machine
from iovirt.guest.qmp import QMPClient

# Markers match only once their line is complete ("\n"): '$' would also match
# at the end of a line still arriving, e.g. "status=1" of "status=12".
_END = re.compile(rf"^{init_script.MARK_SCRIPT_END} status=(\d+)\n", re.M)
_INIT_FAILED = re.compile(rf"^{init_script.MARK_INIT_FAILED} (.*)\n", re.M)
_TAIL_LINES = 40


@dataclass(frozen=True)
class GuestResult:
    """How a guest's script ended.

    ``status`` is the script's exit status, ``output`` what the console showed
    between the script's begin and end markers (kernel messages included),
    ``console`` the whole console, ``boot_seconds`` the time from starting
    QEMU to the script's start, ``seconds`` to its end.
    """

    status: int
    output: str
    console: str
    boot_seconds: float
    seconds: float


class Guest:
    """One QEMU guest booting the kit's kernel and initramfs, with a console on a pipe.

    ``workdir`` receives ``<name>-initrd.cpio``, ``<name>-console.log``,
    ``<name>-qemu.stderr`` and ``<name>-qemu.cmd`` (the command line, to
    rerun by hand); several guests may share one workdir. ``script`` is busybox-sh text run after boot (``None``:
    a shell reads commands sent with :meth:`send`). ``files`` maps extra
    initramfs paths to contents; ``modules`` are the kernel modules to load
    (dependencies added); ``compress`` gzips the cached base image. The
    context manager stops QEMU on exit, on failure too.

    QEMU is started under ``setpriv --pdeathsig KILL``, so it dies with the
    thread that started it even when this process is killed; start a guest
    from a thread that outlives it (the main thread in tests).

    Migration: ``qmp=True`` gives QEMU a QMP socket ``<name>-qmp.sock``
    (:meth:`qmp` talks to it). A destination guest is another ``Guest``
    with ``incoming=URI``, the same devices (other vhost-user sockets, the
    same MACs) and the source's initramfs (``initrd=source.machine.initrd``:
    it is reused, not built); its console shows what the guest prints after
    the migration, so wait for the script's end with :meth:`wait_end`.
    """

    def __init__(self, workdir: str | Path, devices: list[Device] | tuple[Device, ...] = (), *,
                 script: str | None = None, files: dict[str, bytes] | None = None, name: str = "guest",
                 memory_mb: int = 256, smp: int = 1, viommu: bool = False, append: tuple[str, ...] = (),
                 extra_args: tuple[str, ...] = (), kernel: GuestKernel | None = None,
                 modules: tuple[str, ...] = VIRTIO_MODULES, compress: bool = False, qmp: bool = False,
                 incoming: str | None = None, initrd: Path | None = None) -> None:
        self.name = name
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.console_path = self.workdir / f"{name}-console.log"
        self.stderr_path = self.workdir / f"{name}-qemu.stderr"
        self._script = script
        self._files = files
        self._modules = modules
        self._compress = compress
        self._build_initrd = initrd is None
        kernel = kernel or find_kernel()
        self.machine = Machine(kernel=kernel, initrd=initrd or self.workdir / f"{name}-initrd.cpio",
                               devices=list(devices), memory_mb=memory_mb, smp=smp, viommu=viommu,
                               append=list(append), extra_args=list(extra_args),
                               qmp_socket=self.workdir / f"{name}-qmp.sock" if qmp else None,
                               incoming=incoming)
        self._qmp: QMPClient | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._cond = threading.Condition()
        self._text: list[str] = []
        self._eof = False
        self._started_at = 0.0
        self._seen_at: dict[str, float] = {}

    # -- lifecycle -------------------------------------------------------

    def start(self) -> Guest:
        """Build the initrd and start QEMU without waiting for the guest. Returns ``self``."""
        if self._proc is not None:
            raise GuestFailed(self.name, "start() called twice", self.returncode, self.tail())
        if shutil.which(self.machine.qemu) is None:
            raise HostPartMissing("QEMU", self.machine.qemu, f"Debian package qemu-system-x86 ({QEMU})")
        if self._build_initrd:
            guest_initrd(self.machine.initrd, self.machine.kernel, self._script, self._files, self._modules,
                         self._compress)
        if self.machine.boot_image is None:
            self.machine.boot_image = boot_image(self.machine.kernel)
        if self.machine.qmp_socket is not None and self.machine.qmp_socket.exists():
            self.machine.qmp_socket.unlink()  # a stale one would be connected to before QEMU binds its own
        argv = self.machine.argv()
        setpriv = shutil.which("setpriv")
        if setpriv:
            argv = [setpriv, "--pdeathsig", "KILL", "--", *argv]
        (self.workdir / f"{self.name}-qemu.cmd").write_text(self.machine.shell_command() + "\n")
        self._started_at = time.monotonic()
        with open(self.stderr_path, "wb") as stderr:
            self._proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=stderr, close_fds=True)
        self._reader = threading.Thread(target=self._read_console, name=f"console-{self.name}", daemon=True)
        self._reader.start()
        return self

    def stop(self, timeout: float = 5.0) -> int | None:
        """Make sure QEMU is gone: SIGTERM, then SIGKILL after ``timeout``. Returns its exit status."""
        proc = self._proc
        if proc is None:
            return None
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdin:
            try:
                proc.stdin.close()
            except BrokenPipeError:
                pass
        if self._reader is not None:
            self._reader.join(timeout)
        return proc.returncode

    def __enter__(self) -> Guest:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def returncode(self) -> int | None:
        """QEMU's exit status, ``None`` while it runs or before it started."""
        return None if self._proc is None else self._proc.poll()

    @property
    def pid(self) -> int | None:
        """The process id of QEMU (or of ``setpriv``, which execs QEMU: the same process)."""
        return None if self._proc is None else self._proc.pid

    # -- console ---------------------------------------------------------

    def _read_console(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        with open(self.console_path, "w") as log:
            while True:
                chunk = os.read(fd, 65536)
                # The guest tty writes CR LF; keep plain LF so '$' in patterns works.
                text = decoder.decode(chunk, final=not chunk).replace("\r", "")
                log.write(text)
                log.flush()
                with self._cond:
                    self._text.append(text)
                    if not chunk:
                        self._eof = True
                    self._cond.notify_all()
                if not chunk:
                    return

    @property
    def console(self) -> str:
        """Everything the guest printed on its serial console so far."""
        with self._cond:
            text = "".join(self._text)
            self._text[:] = [text]
            return text

    def tail(self, lines: int = _TAIL_LINES) -> str:
        """The last console lines, then QEMU's stderr if it wrote any (for error messages)."""
        text = "\n".join(self.console.splitlines()[-lines:])
        stderr = self.stderr_path.read_text(errors="replace").strip() if self.stderr_path.exists() else ""
        return text + (f"\n--- QEMU stderr ---\n{stderr}" if stderr else "")

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float = 60.0) -> re.Match[str]:
        """Wait until the console matches ``pattern`` (a regex, multi-line mode); return the match.

        Output arrives in pieces: a pattern ending in ``$`` can match a line
        not yet complete; end it with ``\\n`` to match whole lines only.

        Raises :class:`GuestTimeout` after ``timeout`` seconds and
        :class:`GuestFailed` when QEMU exits or /init reports a failure first.
        """
        regex = pattern if isinstance(pattern, re.Pattern) else re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        with self._cond:  # an RLock: console and tail() may take it again
            while True:
                text = self.console
                match = regex.search(text)
                if match:
                    self._seen_at.setdefault(regex.pattern, time.monotonic())
                    return match
                failed = _INIT_FAILED.search(text)
                if failed:
                    raise GuestFailed(self.name, f"/init failed: {failed.group(1)}", self.returncode, self.tail())
                if self._eof:
                    # The pipe closes when QEMU exits; collect its status for the message.
                    if self._proc is not None:
                        self._proc.wait(5)
                    raise GuestFailed(self.name, f"QEMU exited before the console showed {regex.pattern!r}",
                                      self.returncode, self.tail())
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise GuestTimeout(self.name, f"no {regex.pattern!r} on the console within {timeout:g} s",
                                       self.returncode, self.tail())
                self._cond.wait(remaining)

    def wait_result(self, timeout: float = 120.0) -> GuestResult:
        """Wait for the script's end marker and for QEMU to power off; return the result."""
        begin = self.wait_for(rf"^{init_script.MARK_SCRIPT_BEGIN}\n", timeout)
        boot_seconds = self._seen_at[begin.re.pattern] - self._started_at
        end = self.wait_for(_END, max(1.0, self._started_at + timeout - time.monotonic()))
        seconds = time.monotonic() - self._started_at
        if self._proc is not None:
            try:
                self._proc.wait(10)  # poweroff -f follows the marker at once
            except subprocess.TimeoutExpired:
                pass
        console = self.console
        return GuestResult(status=int(end.group(1)), output=console[begin.end():end.start()],
                           console=console, boot_seconds=boot_seconds, seconds=seconds)

    def wait_end(self, timeout: float = 120.0) -> int:
        """Wait for the script's end marker only (a migration destination never shows the begin marker).

        Returns the script's exit status.
        """
        return int(self.wait_for(_END, timeout).group(1))

    # -- talking to the guest --------------------------------------------

    def qmp(self, timeout: float = 30.0) -> QMPClient:
        """The QMP session of a guest made with ``qmp=True`` (connected on first use)."""
        if self.machine.qmp_socket is None:
            raise GuestFailed(self.name, "qmp() on a guest made without qmp=True", self.returncode, "")
        if self._qmp is None:
            self._qmp = QMPClient.connect(self.machine.qmp_socket, timeout)
        return self._qmp

    def send(self, text: str) -> None:
        """Write ``text`` to the guest's serial console (its script's or shell's stdin)."""
        if self._proc is None or self._proc.stdin is None:
            raise GuestFailed(self.name, "send() before start()", None, "")
        self._proc.stdin.write(text.encode())
        self._proc.stdin.flush()

    def release(self, token: str, timeout: float = 60.0) -> None:
        """Wait until the script calls ``iovirt_wait_host TOKEN``, then let it continue."""
        self.wait_for(rf"^{init_script.MARK_WAIT} {re.escape(token)}\n", timeout)
        self.send(token + "\n")
