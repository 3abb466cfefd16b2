"""The front-end's side of vhost-user IOMMU support: a guest I/O page table and a miss server.

:class:`FrontendIommu` plays what QEMU does for a device behind a vIOMMU
(vhost-user.rst "IOMMU support"; QEMU ``vhost_device_iotlb_miss``): it holds
the guest's I/O page table (IOVA page → guest-physical page, permissions),
hands the back-end its end of a back-end channel (SET_BACKEND_REQ_FD), reads
the MISS and ACCESS_FAIL messages the back-end sends there, and answers a
miss with an UPDATE of the page on the main socket, or with nothing when the
IOVA is unmapped or the access not allowed (as QEMU).  ``memory`` is the
driver's DMA view of guest memory: IOVAs translated through the page table.

It is not thread-safe: the tests, the bench and the conformance suite call
:meth:`FrontendIommu.serve` from the thread that drives the front-end.
"""

from __future__ import annotations

import select
import socket
import time
from typing import Callable

from iovirt.memory import Access, TranslationFault
from iovirt.vhost_user.errors import VhostUserProtocolError
from iovirt.vhost_user.frontend import VhostUserFrontend
from iovirt.vhost_user.framing import Framer, ProtocolFailure
from iovirt.vhost_user.messages import BackendRequest, IotlbMsg, IotlbPerm, IotlbType

PAGE_SIZE = 4096


class FrontendIommu:
    """A guest I/O page table behind ``frontend``, with the back-end channel that asks it."""

    def __init__(self, frontend: VhostUserFrontend) -> None:
        self.frontend = frontend
        self.pages: dict[int, tuple[int, IotlbPerm]] = {}
        """IOVA page number → (guest-physical page number, permissions)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            frontend.set_backend_req_fd(theirs.fileno())
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.channel = ours
        self.memory = frontend.memory.with_translator(self)
        """The driver's view: IOVAs through the page table."""
        self.misses: list[IotlbMsg] = []
        """Every MISS received."""
        self.access_fails: list[IotlbMsg] = []
        """Every ACCESS_FAIL received."""
        self.answer_misses = True
        """False: receive misses but leave them unanswered (a front-end that never answers)."""
        self._framer = Framer()
        """Frames the back-end channel (no fds travel on it: BACKEND_SEND_FD is never negotiated)."""

    # -- the guest's I/O page table ----------------------------------------------------------
    def map(self, iova: int, gpa: int, size: int, perm: IotlbPerm = IotlbPerm.VHOST_ACCESS_RW) -> None:
        """Map ``size`` bytes of IOVA space at ``iova`` to guest-physical ``gpa`` (page aligned)."""
        if iova % PAGE_SIZE or gpa % PAGE_SIZE or size % PAGE_SIZE:
            raise ValueError(f"map [{iova:#x}, +{size:#x}) -> {gpa:#x} is not page aligned")
        for i in range(size // PAGE_SIZE):
            self.pages[iova // PAGE_SIZE + i] = (gpa // PAGE_SIZE + i, perm)

    def unmap(self, iova: int, size: int, *, invalidate: bool = True) -> None:
        """Unmap pages and (as a guest's IOMMU driver flushing the IOTLB) send INVALIDATE."""
        for page in range(iova // PAGE_SIZE, (iova + size + PAGE_SIZE - 1) // PAGE_SIZE):
            self.pages.pop(page, None)
        if invalidate:
            self.frontend.iotlb_msg(IotlbMsg(iova, size, 0, IotlbPerm.VHOST_ACCESS_NONE, IotlbType.VHOST_IOTLB_INVALIDATE))

    def translate(self, addr: int, length: int, access: Access) -> list[tuple[int, int]]:
        """The driver's translation (the CPU side: no permission checks)."""
        pieces = []
        while length > 0:
            entry = self.pages.get(addr // PAGE_SIZE)
            if entry is None:
                raise TranslationFault(addr, length, access, "not mapped in the guest's I/O page table")
            n = min(length, PAGE_SIZE - addr % PAGE_SIZE)
            pieces.append((entry[0] * PAGE_SIZE + addr % PAGE_SIZE, n))
            addr += n
            length -= n
        return pieces

    def update(self, iova: int) -> bool:
        """Send the UPDATE for the page holding ``iova``; False if it is unmapped."""
        entry = self.pages.get(iova // PAGE_SIZE)
        if entry is None:
            return False
        gpa_page, perm = entry
        uaddr = self.frontend.user_addr(gpa_page * PAGE_SIZE)
        page = iova - iova % PAGE_SIZE
        self.frontend.iotlb_msg(IotlbMsg(page, PAGE_SIZE, uaddr, perm, IotlbType.VHOST_IOTLB_UPDATE))
        return True

    # -- the back-end channel ------------------------------------------------------------------
    def receive(self, timeout: float = 0.0) -> list[IotlbMsg]:
        """The IOTLB messages the back-end sent, waiting up to ``timeout`` s for the first."""
        readable, _, _ = select.select([self.channel], [], [], timeout)
        out: list[IotlbMsg] = []
        while readable:
            chunk = self.channel.recv(65536)
            if not chunk:
                break  # the back-end closed its end
            for framed in self._framer.feed(chunk):
                if isinstance(framed, ProtocolFailure):
                    raise framed.error
                request = framed.header.request
                if request != BackendRequest.VHOST_USER_BACKEND_IOTLB_MSG:
                    raise VhostUserProtocolError(
                        f"back-end sent request {request} on its channel, expected IOTLB_MSG", request
                    )
                msg = IotlbMsg.unpack(framed.body, request)
                (self.misses if msg.type == IotlbType.VHOST_IOTLB_MISS else self.access_fails).append(msg)
                out.append(msg)
            readable, _, _ = select.select([self.channel], [], [], 0)
        return out

    def serve(self, timeout: float = 0.0) -> int:
        """Receive messages (waiting up to ``timeout`` s for the first) and answer the misses.

        A miss for an unmapped IOVA, or for an access its page does not
        allow, gets no answer (QEMU's behaviour).  Returns the UPDATEs sent.
        """
        answered = 0
        for msg in self.receive(timeout):
            if msg.type != IotlbType.VHOST_IOTLB_MISS or not self.answer_misses:
                continue
            entry = self.pages.get(msg.iova // PAGE_SIZE)
            if entry is not None and not msg.perm & ~entry[1] and self.update(msg.iova):
                answered += 1
        return answered

    def serve_until(self, done: Callable[[], bool], timeout: float = 5.0) -> bool:
        """Answer misses until ``done()`` holds; False if it does not within ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.serve(min(remaining, 0.01))
        return True

    def close(self) -> None:
        """Close the front-end's end of the channel."""
        self.channel.close()
