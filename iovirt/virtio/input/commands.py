"""Input events as text lines, for ``iovirt vhost-user-input --inject-fifo``.

One command a line (blank lines and ``#`` comments are skipped):

* ``press KEY``: press and release a key (a name such as ``a``, ``enter``,
  ``leftshift``, see :data:`~iovirt.virtio.input.defs.KEYS`, or a key code);
* ``key CODE VALUE``: one EV_KEY event (1 down, 0 up, 2 repeat) and SYN;
* ``move DX DY``: a relative move (mouse);
* ``touch X Y``: touch the tablet at X, Y and lift.

A line that is not one of these is logged and skipped; it never stops the reader.
"""

from __future__ import annotations

import logging
import os

from iovirt.virtio.input.device import VirtioInput

log = logging.getLogger("iovirt.virtio-input")

MAX_LINE = 256
"""A longer line is not a command: it is dropped."""


def run_command(device: VirtioInput, line: str) -> None:
    """Apply one command line to ``device``; ``ValueError`` names what is wrong with it."""
    words = line.split()
    if not words or words[0].startswith("#"):
        return
    op, args = words[0], words[1:]
    try:
        if op == "press" and len(args) == 1:
            key: str | int = int(args[0]) if args[0].isdigit() else args[0]
            device.press(key)
        elif op == "key" and len(args) == 2:
            device.key(int(args[0]), int(args[1]))
        elif op == "move" and len(args) == 2:
            device.move(int(args[0]), int(args[1]))
        elif op == "touch" and len(args) == 2:
            device.touch(int(args[0]), int(args[1]))
        else:
            raise ValueError("want press KEY, key CODE VALUE, move DX DY or touch X Y")
    except KeyError:
        raise ValueError(f"unknown key {args[0]!r}") from None


class CommandFifo:
    """Reads command lines from a FIFO without blocking and applies them to a device.

    The FIFO is opened read-write, so it never reads as ended when a writer
    closes it: ``echo press a > FIFO`` may be run any number of times.
    """

    def __init__(self, path: str, device: VirtioInput) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self.device = device
        self._partial = b""

    def on_readable(self) -> None:
        """Read what is there and run every complete line."""
        try:
            data = os.read(self.fd, 4096)
        except BlockingIOError:
            return
        *lines, self._partial = (self._partial + data).split(b"\n")
        if len(self._partial) > MAX_LINE:
            log.warning("%s: input command longer than %d bytes dropped", self.device.label, MAX_LINE)
            self._partial = b""
        for raw in lines:
            line = raw.decode(errors="replace")
            try:
                run_command(self.device, line)
            except ValueError as exc:
                log.warning("%s: input command %r: %s", self.device.label, line[:MAX_LINE], exc)

    def close(self) -> None:
        """Close the FIFO."""
        os.close(self.fd)
