"""A client for QEMU's qtest protocol: QEMU's device models driven with no guest CPU.

QEMU started with ``-qtest unix:PATH`` connects to a UNIX socket and takes one
text command per line (``outl 0xcf8 0x80000000``, ``readl 0xfed90000``,
``write ADDR SIZE 0xHEX``, ``clock_step``, ``irq_intercept_in QOM-PATH``);
each command gets one reply line, ``OK`` with an optional value or ``FAIL``
with a reason.  Interrupt lines a test intercepts are reported asynchronously
as ``IRQ raise N`` / ``IRQ lower N`` lines, between replies.

Round trips dominate the cost of a comparison, so :meth:`QtestClient.batch`
pipelines: every command of a batch is written before any reply is read, and
the replies come back in order (QEMU handles one connection's commands in
sequence).

Debian's QEMU has no ``qtest`` accelerator; ``-accel tcg -S`` keeps the vCPU
stopped, so no guest code runs and nothing but these commands touches the
devices.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Sequence

from iovirt.errors import IovirtError

QEMU = "qemu-system-x86_64"
BASE_ARGS = (
    "-machine", "q35", "-accel", "tcg", "-S", "-display", "none", "-nodefaults",
    "-nic", "none", "-qtest-log", "/dev/null",
)
_CONNECT_TIMEOUT = 20.0
_REPLY_TIMEOUT = 30.0

_IN = {1: "inb", 2: "inw", 4: "inl"}
_OUT = {1: "outb", 2: "outw", 4: "outl"}
_READ = {1: "readb", 2: "readw", 4: "readl", 8: "readq"}
_WRITE = {1: "writeb", 2: "writew", 4: "writel", 8: "writeq"}


class QtestError(IovirtError):
    """QEMU failed to start, closed the connection, or answered ``FAIL``."""

    def __init__(self, message: str, command: str = "") -> None:
        self.command = command
        super().__init__(f"{message} (command {command!r})" if command else message)


@dataclass(frozen=True)
class IrqEvent:
    """An ``IRQ raise N`` / ``IRQ lower N`` line: an intercepted interrupt line changed."""

    raised: bool
    line: int


def halt_firmware(directory: str) -> str:
    """A 64 KiB firmware image of ``hlt`` (x86 0xF4) in ``directory``: a VM that runs, on it, executes nothing.

    Some devices serve a running VM only (virtio-rng drops requests, virtio-net holds transmits while it is
    stopped); with ``-bios`` this image and QMP ``cont`` the VM runs while its vCPU halts at the reset vector.
    """
    path = os.path.join(directory, "halt.bin")
    with open(path, "wb") as f:
        f.write(b"\xf4" * 0x10000)
    return path


def qemu_available() -> bool:
    """Whether ``qemu-system-x86_64`` is on PATH."""
    return shutil.which(QEMU) is not None


class QtestClient:
    """One QEMU process and its qtest connection.

    ``QtestClient(device_args)`` starts ``qemu-system-x86_64`` (q35, TCG,
    stopped CPU, no default devices) with the extra arguments given and
    waits for it to connect; :meth:`close` (or ``with``) ends it.  Accessors
    return integers; interrupt lines seen so far accumulate in :attr:`irqs`.
    """

    def __init__(self, device_args: Sequence[str] = (), *, qemu: str = QEMU) -> None:
        self._dir = tempfile.mkdtemp(prefix="iovirt-qtest-")
        path = os.path.join(self._dir, "qtest.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1)
        listener.settimeout(_CONNECT_TIMEOUT)
        self.args = [qemu, *BASE_ARGS, "-qtest", f"unix:{path}", *device_args]
        self._stderr_path = os.path.join(self._dir, "stderr")
        with open(self._stderr_path, "wb") as stderr:
            self._proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            self._sock, _ = listener.accept()
        except OSError as err:
            self._proc.kill()
            self._proc.wait()
            message = f"QEMU did not connect: {err}; stderr: {self.stderr()}"
            shutil.rmtree(self._dir, ignore_errors=True)
            raise QtestError(message) from err
        finally:
            listener.close()
        self._sock.settimeout(_REPLY_TIMEOUT)
        self._buf = b""
        self.irqs: list[IrqEvent] = []
        self.round_trips = 0

    # -- wire ------------------------------------------------------------------

    def _line(self) -> str:
        while b"\n" not in self._buf:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise QtestError("QEMU closed the qtest connection")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def _reply(self, command: str) -> str:
        while True:
            line = self._line()
            if line.startswith("IRQ "):
                # "IRQ raise N" / "IRQ lower N": asynchronous, between replies.
                _, what, number = line.split()
                self.irqs.append(IrqEvent(what == "raise", int(number)))
                continue
            if line.startswith("OK"):
                return line[3:]
            raise QtestError(f"QEMU answered {line!r}", command)

    def batch(self, commands: Sequence[str]) -> list[str]:
        """Send every command, then read every reply (pipelined); returns the text after ``OK``."""
        if not commands:
            return []
        self._sock.sendall(("\n".join(commands) + "\n").encode())
        self.round_trips += 1
        return [self._reply(command) for command in commands]

    def command(self, command: str) -> str:
        """One command and its reply."""
        return self.batch([command])[0]

    # -- commands (one round trip each; build batches with the *_cmd helpers) ----

    @staticmethod
    def out_cmd(port: int, size: int, value: int) -> str:
        """``outb``/``outw``/``outl``."""
        return f"{_OUT[size]} {port:#x} {value:#x}"

    @staticmethod
    def in_cmd(port: int, size: int) -> str:
        """``inb``/``inw``/``inl``."""
        return f"{_IN[size]} {port:#x}"

    @staticmethod
    def read_cmd(addr: int, size: int) -> str:
        """``readb``/``readw``/``readl``/``readq``."""
        return f"{_READ[size]} {addr:#x}"

    @staticmethod
    def write_cmd(addr: int, size: int, value: int) -> str:
        """``writeb``/``writew``/``writel``/``writeq``."""
        return f"{_WRITE[size]} {addr:#x} {value:#x}"

    def outb(self, port: int, value: int) -> None:
        """Byte I/O write."""
        self.command(self.out_cmd(port, 1, value))

    def outw(self, port: int, value: int) -> None:
        """Word I/O write."""
        self.command(self.out_cmd(port, 2, value))

    def outl(self, port: int, value: int) -> None:
        """Dword I/O write."""
        self.command(self.out_cmd(port, 4, value))

    def inb(self, port: int) -> int:
        """Byte I/O read."""
        return int(self.command(self.in_cmd(port, 1)), 16)

    def inw(self, port: int) -> int:
        """Word I/O read."""
        return int(self.command(self.in_cmd(port, 2)), 16)

    def inl(self, port: int) -> int:
        """Dword I/O read."""
        return int(self.command(self.in_cmd(port, 4)), 16)

    def readb(self, addr: int) -> int:
        """Byte memory read."""
        return int(self.command(self.read_cmd(addr, 1)), 16)

    def readw(self, addr: int) -> int:
        """Word memory read."""
        return int(self.command(self.read_cmd(addr, 2)), 16)

    def readl(self, addr: int) -> int:
        """Dword memory read."""
        return int(self.command(self.read_cmd(addr, 4)), 16)

    def readq(self, addr: int) -> int:
        """Qword memory read."""
        return int(self.command(self.read_cmd(addr, 8)), 16)

    def writeb(self, addr: int, value: int) -> None:
        """Byte memory write."""
        self.command(self.write_cmd(addr, 1, value))

    def writew(self, addr: int, value: int) -> None:
        """Word memory write."""
        self.command(self.write_cmd(addr, 2, value))

    def writel(self, addr: int, value: int) -> None:
        """Dword memory write."""
        self.command(self.write_cmd(addr, 4, value))

    def writeq(self, addr: int, value: int) -> None:
        """Qword memory write."""
        self.command(self.write_cmd(addr, 8, value))

    def read(self, addr: int, size: int) -> bytes:
        """``size`` bytes of guest memory."""
        reply = self.command(f"read {addr:#x} {size:#x}")
        return bytes.fromhex(reply[2:]) if reply.startswith("0x") else bytes.fromhex(reply)

    def write(self, addr: int, data: bytes) -> None:
        """Write bytes to guest memory."""
        self.command(f"write {addr:#x} {len(data):#x} 0x{data.hex()}")

    def memset(self, addr: int, size: int, value: int) -> None:
        """Fill ``size`` bytes of guest memory with ``value``."""
        self.command(f"memset {addr:#x} {size:#x} {value:#x}")

    def clock_step(self, ns: int | None = None) -> int:
        """Advance the virtual clock (to the next timer without ``ns``); returns the new time."""
        return int(self.command("clock_step" if ns is None else f"clock_step {ns}"))

    def irq_intercept_in(self, qom_path: str) -> None:
        """Report the GPIO-in lines of ``qom_path`` (e.g. the IOAPIC's) as ``IRQ`` events."""
        self.command(f"irq_intercept_in {qom_path}")

    def irq_intercept_out(self, qom_path: str) -> None:
        """Report the GPIO-out lines of ``qom_path`` as ``IRQ`` events."""
        self.command(f"irq_intercept_out {qom_path}")

    # -- lifetime ----------------------------------------------------------------

    def stderr(self) -> str:
        """What QEMU wrote to stderr so far."""
        try:
            with open(self._stderr_path, "rb") as f:
                return f.read().decode(errors="replace").strip()
        except OSError:
            return ""

    def close(self) -> None:
        """Close the connection, stop QEMU (SIGTERM, then SIGKILL) and remove the socket directory."""
        try:
            self._sock.close()
        finally:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> QtestClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
