"""vhost-user IOMMU support (QEMU's vhost-user.rst "IOMMU support", ``VHOST_USER_IOTLB_MSG`` and the back-end's
``IOTLB_MSG``): with VIRTIO_F_ACCESS_PLATFORM the back-end reaches guest memory only through translations the
front-end gave it.

The check plays a front-end with an I/O page table (:class:`~iovirt.vhost_user.viommu.FrontendIommu`): a
buffer in a page never translated is not touched before the back-end asked (MISS) and was answered
(UPDATE); after INVALIDATE and a remap the back-end does not use the old translation; a page the
back-end may only read is not written, and the back-end says so (ACCESS_FAIL) or asks for write access.
"""

from __future__ import annotations

import time

from iovirt.conformance.checks.common import Workload
from iovirt.conformance.link import Link
from iovirt.conformance.registry import CheckFailed, check, expect
from iovirt.conformance.target import Capabilities, Context, needs_protocol
from iovirt.memory import BumpAllocator
from iovirt.vhost_user.driver import IOVA_BASE
from iovirt.vhost_user.messages import IotlbMsg, IotlbPerm, IotlbType, ProtocolFeature as PF
from iovirt.vhost_user.viommu import FrontendIommu
from iovirt.virtio.defs import VIRTIO_F_ACCESS_PLATFORM

PAGE = 4096


def _applies(caps: Capabilities) -> str | None:
    if not caps.has(VIRTIO_F_ACCESS_PLATFORM):
        return "VIRTIO_F_ACCESS_PLATFORM not offered"
    return needs_protocol(PF.VHOST_USER_PROTOCOL_F_BACKEND_REQ)(caps)


def _fresh_page(link: Link) -> int:
    """An IOVA page of guest memory no request has used."""
    return link.alloc.alloc(PAGE, PAGE)


def _messages(iommu: FrontendIommu, page: int, kind: IotlbType, timeout: float) -> list[IotlbMsg]:
    """Back-end messages of ``kind`` about IOVA page ``page`` within ``timeout`` s (misses left unanswered)."""
    deadline = time.monotonic() + timeout
    found: list[IotlbMsg] = []
    while not found and time.monotonic() < deadline:
        found = [m for m in iommu.receive(min(0.01, max(0.0, deadline - time.monotonic())))
                 if m.type == kind and m.iova // PAGE == page // PAGE]
    return found


@check(
    "vhost-user:IOMMU support",
    "blk, ACCESS_PLATFORM: a buffer in an untranslated page is used only after MISS and UPDATE; after INVALIDATE "
    "and a remap the old translation is not used; a read-only page is not written (ACCESS_FAIL or a MISS for write)",
    devices={"blk"},
    applies=_applies,
)
def iotlb_ordering(ctx: Context) -> str:
    link = ctx.open(iommu=True)
    iommu = link.iommu
    expect(iommu is not None, "VIRTIO_F_ACCESS_PLATFORM offered but not negotiated")
    assert iommu is not None
    work = Workload(ctx, link)
    work.run()  # the rings and a first request, misses answered
    raw = link.frontend.memory  # guest-physical: what the IOMMU maps to

    # MISS before use, no use before UPDATE.
    page = _fresh_page(link)
    iommu.answer_misses = False
    work.post(alloc=BumpAllocator(page, PAGE))
    link.submit(work.index)
    misses = _messages(iommu, page, IotlbType.VHOST_IOTLB_MISS, ctx.timeout)
    expect(misses, f"no IOTLB MISS for IOVA page {page:#x} of a request that needs it")
    early = link.poll_used(work.index, 1, ctx.quiet)
    expect(not early, "a request was completed before its buffers' translation was given (no UPDATE sent)")
    iommu.answer_misses = True
    iommu.update(page)
    link.wait_used(work.index, 1)

    # INVALIDATE, then the IOVA page points elsewhere: the old translation must be gone.
    old_gpa = page - IOVA_BASE
    new_gpa = _fresh_page(link) - IOVA_BASE
    iommu.unmap(page, PAGE)  # sends INVALIDATE (acked before it returns)
    iommu.map(page, new_gpa, PAGE)
    raw.write(old_gpa, b"\x5a" * PAGE)  # a stale translation would find (and answer) this, not the new request
    before = raw.read(old_gpa, PAGE)
    work.post(alloc=BumpAllocator(page, PAGE))
    posted = raw.read(new_gpa, PAGE)  # the request as written, its status byte still unwritten
    link.submit(work.index)
    link.wait_used(work.index, 1)
    expect(raw.read(old_gpa, PAGE) == before, "after INVALIDATE the back-end still wrote through the old translation")
    expect(raw.read(new_gpa, PAGE) != posted, "the request after the remap was completed without writing the page now mapped")

    # A page the back-end may only read: no write into it.
    ro = _fresh_page(link)
    iommu.map(ro, ro - IOVA_BASE, PAGE, IotlbPerm.VHOST_ACCESS_RO)
    iommu.update(ro)
    work.post(alloc=BumpAllocator(ro, PAGE))  # header readable, data and status writable: all in the page
    snapshot = raw.read(ro - IOVA_BASE, PAGE)
    link.submit(work.index)
    deadline = time.monotonic() + ctx.timeout
    said = ""
    while not said and time.monotonic() < deadline:
        for m in iommu.receive(0.01):
            if m.iova // PAGE != ro // PAGE:
                continue
            if m.type == IotlbType.VHOST_IOTLB_ACCESS_FAIL:
                said = "ACCESS_FAIL"
            elif m.type == IotlbType.VHOST_IOTLB_MISS and m.perm & IotlbPerm.VHOST_ACCESS_WO:
                said = "a MISS asking for write access"
    if not said:
        raise CheckFailed(f"a request needing to write the read-only IOVA page {ro:#x}: neither ACCESS_FAIL nor a MISS for write")
    time.sleep(ctx.quiet)
    expect(raw.read(ro - IOVA_BASE, PAGE) == snapshot, "the back-end wrote into a page its IOTLB entry allows it only to read")
    return f"read-only page: {said}"
