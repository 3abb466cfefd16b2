"""Back-end rules of QEMU's docs/interop/vhost-user.rst (clause ids name its sections and messages)."""

from __future__ import annotations

import mmap
import os
import select
import struct

from iovirt.conformance.checks.common import Workload, has_workload, still_serving
from iovirt.conformance.devices import BlkPort, NetPort, marker_frame, new_tag
from iovirt.conformance.registry import PROTOCOL_DEVICES, check, expect
from iovirt.conformance.target import Context, needs_protocol
from iovirt.vhost_user.errors import BackendClosedError, NackError
from iovirt.vhost_user.framing import Header
from iovirt.vhost_user.inflight import DESC_STATE, QUEUE_HEADER
from iovirt.vhost_user.messages import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_VERSION,
    FrontendRequest as R,
    ProtocolFeature as PF,
    SingleMemRegion,
    U64,
    VringState,
)
from iovirt.virtio.blk.defs import SECTOR_SIZE, VIRTIO_BLK_F_RO, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT


def _needs_bit30(caps) -> str | None:
    return None if caps.has(VHOST_USER_F_PROTOCOL_FEATURES) else "VHOST_USER_F_PROTOCOL_FEATURES not offered"


def _recv(link, request: int) -> tuple[Header, bytes]:
    message = link.frontend.recv_message(request=request)
    for fd in message.fds:
        os.close(fd)
    return message.header, message.body


@check("vhost-user:Header", "replies carry version 1, the reply flag, the request code and an exact size", devices=PROTOCOL_DEVICES)
def header(ctx: Context) -> None:
    link = ctx.open()
    link.frontend.send(R.VHOST_USER_GET_FEATURES)
    h, body = _recv(link, R.VHOST_USER_GET_FEATURES)
    expect(h.request == R.VHOST_USER_GET_FEATURES, f"reply request code {h.request}, expected 1 (GET_FEATURES)")
    expect(h.version == VHOST_USER_VERSION, f"reply version bits {h.version}, expected 1")
    expect(h.is_reply, f"reply flags {h.flags:#x} lack the reply bit (bit 2)")
    expect(h.size == 8 and len(body) == 8, f"GET_FEATURES reply size {h.size}, expected 8 (u64)")


@check("vhost-user:Communication", "requests without a reply (need_reply clear) get none; GET_* get theirs", devices=PROTOCOL_DEVICES)
def no_unasked_reply(ctx: Context) -> None:
    link = ctx.open(protocol_features=0)
    link.frontend.send(R.VHOST_USER_SET_VRING_NUM, VringState(0, 64))
    link.frontend.send(R.VHOST_USER_GET_FEATURES)
    h, _ = _recv(link, R.VHOST_USER_GET_FEATURES)
    expect(
        h.request == R.VHOST_USER_GET_FEATURES,
        f"got a reply to request {h.request} first; SET_VRING_NUM without need_reply must not be answered",
    )


@check(
    "vhost-user:REPLY_ACK",
    "need_reply gets a u64 ack (0 = success); requests with their own reply get only that",
    devices=PROTOCOL_DEVICES,
    applies=needs_protocol(PF.VHOST_USER_PROTOCOL_F_REPLY_ACK),
)
def reply_ack(ctx: Context) -> None:
    link = ctx.open()
    expect(link.frontend.reply_ack, "REPLY_ACK offered but not negotiated")
    link.frontend.send(R.VHOST_USER_SET_VRING_NUM, VringState(0, 64), need_reply=True)
    h, body = _recv(link, R.VHOST_USER_SET_VRING_NUM)
    expect(h.request == R.VHOST_USER_SET_VRING_NUM and h.is_reply, f"ack header {h} is not a reply to SET_VRING_NUM")
    expect(len(body) == 8 and U64.unpack(body).value == 0, f"ack payload {body.hex()} is not u64 0 for a valid request")
    link.frontend.send(R.VHOST_USER_GET_FEATURES, need_reply=True)
    link.frontend.send(R.VHOST_USER_GET_PROTOCOL_FEATURES)
    h1, _ = _recv(link, R.VHOST_USER_GET_FEATURES)
    h2, _ = _recv(link, R.VHOST_USER_GET_PROTOCOL_FEATURES)
    expect(
        (h1.request, h2.request) == (R.VHOST_USER_GET_FEATURES, R.VHOST_USER_GET_PROTOCOL_FEATURES),
        f"replies came for requests {h1.request}, {h2.request}; need_reply on GET_FEATURES must add no second reply",
    )


@check(
    "vhost-user:GET_PROTOCOL_FEATURES",
    "GET/SET_PROTOCOL_FEATURES are served before SET_FEATURES when bit 30 is offered",
    devices=PROTOCOL_DEVICES,
    applies=_needs_bit30,
)
def protocol_before_set_features(ctx: Context) -> str | None:
    # Link sends GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, SET_OWNER, SET_FEATURES (QEMU's order).
    link = ctx.open()
    expect(link.negotiated.has(VHOST_USER_F_PROTOCOL_FEATURES), "bit 30 offered but not negotiated")
    # Served before SET_FEATURES means answered in full there: a back-end that offers less until SET_FEATURES
    # hides protocol features from a front-end that, as QEMU, negotiates them first.
    after = link.frontend.get_protocol_features()
    before = link.negotiated.protocol_features
    expect(after == before, f"GET_PROTOCOL_FEATURES answered {before:#x} before SET_FEATURES, {after:#x} after it")
    if not has_workload(ctx):
        return still_serving(ctx, link, "the negotiation")
    Workload(ctx, link).run()
    return None


@check(
    "vhost-user:Ring states#no-bit30",
    "SET_FEATURES without VHOST_USER_F_PROTOCOL_FEATURES enables every ring immediately",
)
def enabled_without_bit30(ctx: Context) -> None:
    link = ctx.open(protocol=False)
    if ctx.caps.device == "blk":
        Workload(ctx, link).run()
        return
    # A disabled net ring also consumes TX: only delivery shows the ring is enabled.
    dut = ctx.net_port(link)
    injector, sink = ctx.net_ends(dut)
    tag = new_tag()
    dut.send([marker_frame(tag)])
    expect(sink.receive(tag, ctx.timeout) is not None, "a frame sent without bit 30 negotiated never arrived: TX ring not enabled")
    tag = new_tag()
    injector.send([marker_frame(tag)])
    expect(dut.receive(tag, ctx.timeout) is not None, "no frame received without bit 30 negotiated: RX ring not enabled")


@check(
    "vhost-user:Ring states#disabled",
    "a started but disabled ring causes no side effects (no request completes until SET_VRING_ENABLE 1)",
    devices={"blk"},
    applies=_needs_bit30,
)
def disabled_blk(ctx: Context) -> None:
    link = ctx.open()
    work = Workload(ctx, link, enable=False)
    work.post()
    link.submit(work.index)
    early = link.poll_used(work.index, 1, ctx.quiet)
    expect(not early, "a request on a disabled ring completed (writing guest memory) before SET_VRING_ENABLE")
    link.frontend.set_vring_enable(work.index, True)
    link.wait_used(work.index, 1)


@check(
    "vhost-user:Ring states#disabled-net-tx",
    "net: a disabled TX ring is processed and its frames discarded",
    devices={"net"},
    applies=_needs_bit30,
)
def disabled_net_tx(ctx: Context) -> None:
    link = ctx.open()
    dut = ctx.net_port(link, enable_tx=False)
    sink = None
    if ctx.caps.frame_path is not None:
        _injector, sink = ctx.net_ends(dut)
    tag = new_tag()
    dut.send([marker_frame(tag)])
    got = link.poll_used(NetPort.TX, 1, ctx.timeout)
    expect(got, "a frame on a started but disabled TX ring was never consumed (must be processed and discarded)")
    if sink is not None:
        expect(sink.receive(tag, ctx.quiet) is None, "a frame sent on a disabled TX ring was delivered")


@check(
    "vhost-user:Ring states#disabled-net-rx",
    "net: a disabled RX ring receives no packets",
    devices={"net"},
    applies=lambda caps: _needs_bit30(caps) or (None if caps.frame_path else "no frame source (see target)"),
)
def disabled_net_rx(ctx: Context) -> None:
    link = ctx.open()
    dut = ctx.net_port(link, enable_rx=False)
    injector, _sink = ctx.net_ends(dut)
    tag = new_tag()
    injector.send([marker_frame(tag)])
    got = link.poll_used(NetPort.RX, 1, ctx.quiet)
    expect(not got, f"{len(got)} receive buffers used on a disabled RX ring")


@check(
    "vhost-user:GET_VRING_BASE",
    "GET_VRING_BASE returns the next avail index and stops the ring",
    devices=PROTOCOL_DEVICES,
)
def get_vring_base(ctx: Context) -> str | None:
    link = ctx.open()
    if not has_workload(ctx):
        return _idle_ring_base(ctx, link, 0)
    work = Workload(ctx, link)
    work.run(3)
    base = link.frontend.get_vring_base(work.index)
    expect(base == 3, f"GET_VRING_BASE returned {base} after 3 buffers were used, expected 3")
    work.post()
    link.queues[work.index].publish()
    link.frontend.kick(work.index)
    late = link.poll_used(work.index, 1, ctx.quiet)
    expect(not late, "a buffer was used after GET_VRING_BASE stopped the ring")
    return None


IDLE_BASE = 7


def _idle_ring_base(ctx: Context, link, base: int) -> str:
    """Devices without a workload: start queue 0 with nothing available (from ``base``); GET_VRING_BASE must say ``base``."""
    link.queue(0, 64)
    link.driver_ok()
    if base:
        link.rebase(0, base)  # GET_VRING_BASE, then SET_VRING_BASE ``base`` with avail and used idx there
    got = link.frontend.get_vring_base(0)
    expect(got == base, f"GET_VRING_BASE returned {got} for a ring started at avail index {base} with nothing made available")
    return f"an idle ring started at {base}; no data path checked on a {ctx.caps.device} device"


@check(
    "vhost-user:SET_VRING_BASE",
    "a ring restarted with SET_VRING_BASE resumes at that avail index",
    devices=PROTOCOL_DEVICES,
)
def set_vring_base(ctx: Context) -> str | None:
    link = ctx.open()
    if not has_workload(ctx):
        return _idle_ring_base(ctx, link, IDLE_BASE)
    work = Workload(ctx, link)
    work.run(2)
    base = link.frontend.get_vring_base(work.index)
    expect(base == 2, f"GET_VRING_BASE returned {base}, expected 2")
    for _ in range(2):
        work.post()
    link.queues[work.index].publish()
    link.restart(work.index, base)
    if link.negotiated.has(VHOST_USER_F_PROTOCOL_FEATURES):
        link.frontend.set_vring_enable(work.index, True)
    link.frontend.kick(work.index)
    link.wait_used(work.index, 2)
    extra = link.poll_used(work.index, 1, ctx.quiet) if link.outstanding(work.index) == 0 else []
    expect(not extra, "buffers before the restart base were used again")
    return None


@check("vhost-user:SET_VRING_CALL#nofd", "a ring whose call has the invalid-FD bit (8) set is still served")
def call_nofd(ctx: Context) -> None:
    link = ctx.open()
    Workload(ctx, link, call=False).run(2)


def _use_every_region(ctx: Context, link) -> None:
    """One buffer in each of the link's memory regions; every one must come back used."""
    work = Workload(ctx, link)
    for alloc in link.allocs:
        work.post(alloc=alloc)
    link.submit(work.index)
    link.wait_used(work.index, len(link.allocs))


@check(
    "vhost-user:SET_MEM_TABLE",
    "eight memory regions, rings and buffers in different ones, are all usable",
    devices=PROTOCOL_DEVICES,
)
def mem_table_8(ctx: Context) -> str | None:
    link = ctx.open(regions=8)
    if not has_workload(ctx):
        return still_serving(ctx, link, "SET_MEM_TABLE of 8 regions")
    _use_every_region(ctx, link)
    return None


@check(
    "vhost-user:CONFIGURE_MEM_SLOTS",
    "GET_MAX_MEM_SLOTS answers; regions added with ADD_MEM_REG (beyond 8 when allowed) are usable",
    devices=PROTOCOL_DEVICES,
    applies=needs_protocol(PF.VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS),
)
def mem_slots(ctx: Context) -> str | None:
    link = ctx.open(mem_slots=True)
    slots = link.frontend.get_max_mem_slots()
    expect(slots >= 1, f"GET_MAX_MEM_SLOTS returned {slots}")
    for _ in range(min(slots, 10) - 1):
        link.add_region(mem_slots=True)
    if not has_workload(ctx):
        return still_serving(ctx, link, f"ADD_MEM_REG of {len(link.regions)} regions")
    _use_every_region(ctx, link)
    return None


@check(
    "vhost-user:REM_MEM_REG",
    "REM_MEM_REG unmaps a region, and an fd sent with it is closed by the back-end",
    devices=PROTOCOL_DEVICES,
    applies=needs_protocol(PF.VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS),
)
def rem_mem_reg(ctx: Context) -> str | None:
    link = ctx.open(mem_slots=True)
    extra = link.add_region(mem_slots=True)
    r, w = os.pipe()
    try:
        desc = SingleMemRegion(link.frontend.region_desc(extra))
        try:
            link.frontend.call(R.VHOST_USER_REM_MEM_REG, desc, [w])
        except NackError:
            pass  # "MAY accept messages with one file descriptor"; it must close it either way
        os.close(w)
        w = -1
        readable, _, _ = select.select([r], [], [], ctx.timeout)
        expect(readable and os.read(r, 1) == b"", "the back-end kept the fd sent with REM_MEM_REG open (MUST close it)")
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    link.allocs.pop()
    link.alloc = link.allocs[-1]
    if not has_workload(ctx):
        return still_serving(ctx, link, "REM_MEM_REG")
    Workload(ctx, link).run()
    return None


@check(
    "vhost-user:GET_CONFIG",
    "GET_CONFIG replies with exactly the size asked",
    devices=PROTOCOL_DEVICES,
    applies=needs_protocol(PF.VHOST_USER_PROTOCOL_F_CONFIG),
)
def get_config(ctx: Context) -> None:
    link = ctx.open()
    for offset, size in ((0, 8), (0, 4), (4, 2)):
        data = link.frontend.get_config(offset, size)  # a size mismatch raises BadReplyError
        expect(len(data) == size, f"GET_CONFIG [{offset}, +{size}) returned {len(data)} bytes")


@check(
    "vhost-user:SET_CONFIG",
    "blk: SET_CONFIG of the read-only capacity (flags 0) is not accepted",
    devices={"blk"},
    applies=needs_protocol(PF.VHOST_USER_PROTOCOL_F_CONFIG),
)
def set_config_ro(ctx: Context) -> str:
    link = ctx.open()
    before = link.frontend.get_config(0, 8)
    bogus = struct.pack("<Q", struct.unpack("<Q", before)[0] ^ 0x5A5A)
    note = ""
    try:
        link.frontend.set_config(0, bogus)
        expect(not link.frontend.reply_ack, "SET_CONFIG of a read-only field was acked with 0 (success)")
    except NackError:
        pass
    except (BackendClosedError, ConnectionResetError, BrokenPipeError):
        # Not accepted, though REPLY_ACK asks for a non-zero u64 rather than a closed connection.
        note = "refused by closing the connection, not by a non-zero REPLY_ACK"
        link = ctx.open()
    after = link.frontend.get_config(0, 8)
    expect(after == before, f"capacity changed from {before.hex()} to {after.hex()} through SET_CONFIG")
    return note


@check(
    "vhost-user:Inflight I/O tracking",
    "blk: GET_INFLIGHT_FD gives an fd and a split-ring region kept as the spec lays it out",
    devices={"blk"},
    applies=needs_protocol(PF.VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD),
)
def inflight(ctx: Context) -> None:
    link = ctx.open()
    size = 64
    info, fd = link.frontend.get_inflight_fd(1, size)
    try:
        need = QUEUE_HEADER.size + DESC_STATE.size * size
        expect(info.mmap_size >= need, f"inflight mmap_size {info.mmap_size} < {need} for one queue of {size}")
        link.frontend.set_inflight_fd(info, fd)
        area = mmap.mmap(fd, info.mmap_size, mmap.MAP_SHARED, offset=info.mmap_offset)
    finally:
        os.close(fd)
    try:
        work = Workload(ctx, link)
        work.run(3)
        _features, version, desc_num, _last, used_idx = QUEUE_HEADER.unpack_from(area, 0)
        expect(version == 1, f"queue region version {version}, expected 1")
        expect(desc_num == size, f"queue region desc_num {desc_num}, expected the queue size {size}")
        ring_idx = link.split_queue(0).used_idx()
        expect(used_idx == ring_idx, f"queue region used_idx {used_idx}, used ring idx {ring_idx}")
        busy = [i for i in range(size) if DESC_STATE.unpack_from(area, QUEUE_HEADER.size + DESC_STATE.size * i)[0]]
        expect(not busy, f"descriptors {busy} still marked inflight after their requests completed")
    finally:
        area.close()


@check(
    "vhost-user:GET_QUEUE_NUM",
    "GET_QUEUE_NUM answers at least one queue",
    devices=PROTOCOL_DEVICES,
    applies=needs_protocol(PF.VHOST_USER_PROTOCOL_F_MQ),
)
def queue_num(ctx: Context) -> None:
    link = ctx.open()
    n = link.frontend.get_queue_num()
    expect(n >= 1, f"GET_QUEUE_NUM returned {n}")



INFLIGHT_QUEUE = 16


@check(
    "vhost-user:Inflight I/O tracking#resubmit",
    "blk: a new back-end connection given the inflight region a crashed one left resubmits exactly the requests "
    "still marked in flight",
    devices={"blk"},
    applies=lambda caps: needs_protocol(PF.VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD)(caps)
    or (None if not caps.has(VIRTIO_BLK_F_RO) else "VIRTIO_BLK_F_RO offered: the device is read-only"),
)
def inflight_resubmit(ctx: Context) -> None:
    first = ctx.open()
    info, fd = first.frontend.get_inflight_fd(1, INFLIGHT_QUEUE)
    try:
        area = mmap.mmap(fd, info.mmap_size, mmap.MAP_SHARED, offset=info.mmap_offset)
        before = BlkPort(first, 0, INFLIGHT_QUEUE)
        old = os.urandom(SECTOR_SIZE)
        expect(before.request(VIRTIO_BLK_T_OUT, 1, out=old).status == VIRTIO_BLK_S_OK, "OUT of sector 1")
        ctx.close_link(first)  # the back-end "crashes": a VMM keeps the region and reconnects
        link = ctx.open()
        link.frontend.set_inflight_fd(info, fd)
    finally:
        os.close(fd)
    try:
        link.queue(0, INFLIGHT_QUEUE, enable=False, kick=False)
        link.driver_ok()
        port = BlkPort.on(link, 0)
        q = link.split_queue(0)
        data = [os.urandom(SECTOR_SIZE) for _ in range(3)]
        a, b, c = (port.post(VIRTIO_BLK_T_OUT, sector, out=data[sector])[0] for sector in range(3))
        q.publish()
        # What the dead back-end left: B completed (in the used ring), A and C popped and in flight.
        link.memory.write(q.used_addr + 4, struct.pack("<II", b, 1))
        link.memory.write_u16(q.used_addr + 2, 1)
        QUEUE_HEADER.pack_into(area, 0, 0, 1, INFLIGHT_QUEUE, b, 1)
        area[QUEUE_HEADER.size : QUEUE_HEADER.size + DESC_STATE.size * INFLIGHT_QUEUE] = bytes(DESC_STATE.size * INFLIGHT_QUEUE)
        for head, inflight, counter in ((a, 1, 1), (b, 0, 2), (c, 1, 3)):
            DESC_STATE.pack_into(area, QUEUE_HEADER.size + DESC_STATE.size * head, inflight, 0, counter)
        fe = link.frontend
        fe.set_vring_base(0, 1)  # QEMU restarts from the used idx; the back-end resumes from the region
        fe.set_vring_addr(0, q.desc_addr, q.avail_addr, q.used_addr)
        fe.set_vring_kick(0)
        fe.set_vring_enable(0, True)
        used = link.wait_used(0, 3)
        heads = [u.head for u in used]
        expect(heads[0] == b and sorted(heads[1:]) == sorted([a, c]),
               f"used heads {heads}: expected B ({b}) as left, then the in-flight A ({a}) and C ({c}) resubmitted")
        for sector, want in ((0, data[0]), (1, old), (2, data[2])):
            got = port.request(VIRTIO_BLK_T_IN, sector, in_len=SECTOR_SIZE)
            expect(got.status == VIRTIO_BLK_S_OK and got.data == want,
                   f"sector {sector} after recovery: " + ("B was served again" if sector == 1 else "not written"))
    finally:
        area.close()
