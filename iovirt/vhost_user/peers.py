"""Who may connect to a vhost-user socket (issue 12, "Who may connect"; ``docs/security.md``).

A front-end that connects owns a device: it maps memory into the back-end and
drives its rings.  So the server checks the connecting peer's credentials, as
the kernel reports them (``SO_PEERCRED``, socket(7): the effective uid and gid
of the peer when it called ``connect``), against an :class:`AccessPolicy`
before it reads a byte, and creates its socket files with the policy's mode
(0600 by default) so that the file system refuses other users first.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass, field

_UCRED = struct.Struct("3i")
"""struct ucred: pid, uid, gid (socket(7), SO_PEERCRED)."""

DEFAULT_SOCKET_MODE = 0o600


@dataclass(frozen=True)
class PeerCredentials:
    """The peer of a UNIX socket connection, as ``SO_PEERCRED`` reports it."""

    pid: int
    uid: int
    gid: int

    def __str__(self) -> str:
        return f"pid {self.pid}, uid {self.uid}, gid {self.gid}"


def peer_credentials(sock: socket.socket) -> PeerCredentials | None:
    """The credentials of ``sock``'s peer, or ``None`` if the socket cannot tell (not AF_UNIX)."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    return PeerCredentials(*_UCRED.unpack(raw))


@dataclass(frozen=True)
class AccessPolicy:
    """Which peers may connect, and the mode of the socket files.

    A peer is allowed when its uid is in ``uids`` or its gid is in ``gids``.
    The default (:meth:`owner`) allows only the effective uid of this
    process.  A peer whose credentials cannot be read is refused.
    """

    uids: frozenset[int]
    gids: frozenset[int] = field(default_factory=frozenset)
    socket_mode: int = DEFAULT_SOCKET_MODE

    @classmethod
    def owner(cls, socket_mode: int = DEFAULT_SOCKET_MODE) -> "AccessPolicy":
        """Only the owner of this process (its effective uid)."""
        return cls(frozenset({os.geteuid()}), frozenset(), socket_mode)

    def allows(self, peer: PeerCredentials | None) -> bool:
        """True if ``peer`` may connect."""
        return peer is not None and (peer.uid in self.uids or peer.gid in self.gids)

    def describe(self) -> str:
        """The allowed uids and gids, for a log line."""
        uids = ", ".join(map(str, sorted(self.uids))) or "none"
        gids = ", ".join(map(str, sorted(self.gids))) or "none"
        return f"uids {uids}; gids {gids}"
