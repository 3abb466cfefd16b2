"""The back-end request channel: messages from the back-end to the front-end.

vhost-user.rst "Back-end communication": with ``VHOST_USER_PROTOCOL_F_BACKEND_REQ``
negotiated the front-end hands over one end of a socket pair with
``VHOST_USER_SET_BACKEND_REQ_FD``; the back-end sends ``VHOST_USER_BACKEND_*``
requests on it (here: IOTLB misses and access failures).

Sends come from the data-plane thread, so they never block: a front-end that
stops reading its channel must not stall every other device of the process.
A message the socket cannot take whole is not sent (the caller may try again
later); a message it takes only in part breaks the channel for good, since
the stream can no longer be framed.
"""

from __future__ import annotations

import logging
import socket

from iovirt.vhost_user.framing import build_message, request_flags
from iovirt.vhost_user.messages import BackendRequest, Payload

log = logging.getLogger("iovirt.vhost_user")


class BackendChannel:
    """The back-end's end of the channel set with VHOST_USER_SET_BACKEND_REQ_FD.

    Takes ``fd`` over; raises ``OSError`` (and leaves ``fd`` alone) if it is not a socket.
    """

    def __init__(self, fd: int, label: str = "") -> None:
        self.sock = socket.socket(fileno=fd)
        self.label = label
        self.broken = False
        self.sent = 0
        self._full_logged = False

    def send(self, request: BackendRequest, payload: Payload) -> bool:
        """Send one request without need_reply; False if it was not sent (whole)."""
        if self.broken:
            return False
        data = build_message(request, request_flags(), payload)
        try:
            n = self.sock.send(data, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        except BlockingIOError:
            if not self._full_logged:
                log.warning("%s: back-end channel full (the front-end is not reading it); %s not sent",
                            self.label, request.name)
                self._full_logged = True
            return False
        except OSError as exc:
            self.broken = True
            log.warning("%s: back-end channel failed: %s", self.label, exc)
            return False
        if n != len(data):
            self.broken = True
            log.error("%s: back-end channel took %d of %d bytes of %s; channel no longer usable",
                      self.label, n, len(data), request.name)
            return False
        self._full_logged = False
        self.sent += 1
        return True

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()
