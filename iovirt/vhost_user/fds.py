"""Closing file descriptors a peer handed over, once and quietly.

Every fd that arrives with a vhost-user message is ours to keep or close
(see :mod:`iovirt.vhost_user.protocol`); closing one that is already gone is
not an error worth stopping for while tearing a connection down.
"""

from __future__ import annotations

import os
from typing import Iterable


def close_fds(fds: Iterable[int | None]) -> None:
    """Close every fd of ``fds`` (``None`` entries are skipped); errors are ignored."""
    for fd in fds:
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
