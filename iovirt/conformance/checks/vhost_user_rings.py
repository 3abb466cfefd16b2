"""vhost-user ring rules beyond start and stop: SET_VRING_ENABLE both ways, configuration changed
while rings run, dirty-page logging of every device write, and GET_VRING_BASE draining what is in
flight (QEMU's docs/interop/vhost-user.rst, "Starting and stopping rings", "Migration" and
``VHOST_USER_GET_VRING_BASE``).
"""

from __future__ import annotations

import mmap
import os
import struct
import time

from iovirt.conformance.checks.common import Workload
from iovirt.conformance.devices import RX_BUFFER, BlkPort, NetPort, marker_frame, new_tag
from iovirt.conformance.registry import check, expect
from iovirt.conformance.target import Context, needs_frame_path, needs_protocol
from iovirt.vhost_user import bringup
from iovirt.vhost_user.messages import (
    VHOST_F_LOG_ALL,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_VRING_F_LOG,
    FrontendRequest as R,
    Log,
    ProtocolFeature as PF,
)
from iovirt.virtio.blk.defs import SECTOR_SIZE, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from iovirt.virtio.defs import used_ring_size
from iovirt.virtio.net.defs import NetHdr

PAGE = 4096  # vhost-user.rst "Migration": one log bit per 4 KiB page


def _needs_bit30(caps) -> str | None:
    return None if caps.has(VHOST_USER_F_PROTOCOL_FEATURES) else "VHOST_USER_F_PROTOCOL_FEATURES not offered"


ENABLE_ATTEMPTS = 3


@check(
    "vhost-user:SET_VRING_ENABLE#both",
    "a ring enabled, then disabled with SET_VRING_ENABLE 0, passes no data until enabled again",
    applies=_needs_bit30,
)
def enable_both_ways(ctx: Context) -> None:
    link = ctx.open()
    fe = link.frontend
    if ctx.caps.device == "blk":
        work = Workload(ctx, link)
        work.run()
        fe.set_vring_enable(work.index, False)
        work.post()
        link.submit(work.index)
        late = link.poll_used(work.index, 1, ctx.quiet)
        expect(not late, "a request completed on a ring disabled again with SET_VRING_ENABLE 0")
        fe.set_vring_enable(work.index, True)
        fe.kick(work.index)
        link.wait_used(work.index, 1)
        return
    dut = ctx.net_port(link)
    injector, _sink = ctx.net_ends(dut)
    for enabled in (True, False, True):
        fe.set_vring_enable(NetPort.RX, enabled)
        if not enabled:
            tag = new_tag()
            injector.send([marker_frame(tag)])
            expect(dut.receive(tag, ctx.quiet) is None, "a frame was received on receiveq1 disabled with SET_VRING_ENABLE 0")
            continue
        # A network may lose a frame: a switch in front of the device may start forwarding to the ring a
        # little after the enable (OVS 3.1 drops the first frame for about 20 ms).  One of a few must arrive.
        for _attempt in range(ENABLE_ATTEMPTS):
            tag = new_tag()
            injector.send([marker_frame(tag)])
            if dut.receive(tag, ctx.timeout / ENABLE_ATTEMPTS) is not None:
                break
        else:
            expect(False, f"none of {ENABLE_ATTEMPTS} frames received on receiveq1 enabled (again) with SET_VRING_ENABLE 1")


@check(
    "vhost-user:Ring states#on-the-fly",
    "while a ring runs: a new call eventfd takes effect, and a region added with ADD_MEM_REG serves buffers",
)
def on_the_fly(ctx: Context) -> None:
    slots = ctx.caps.has_protocol(PF.VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS)
    link = ctx.open(mem_slots=slots)
    work = Workload(ctx, link)
    fe = link.frontend
    work.run()
    fe.set_vring_call(work.index)  # a new eventfd, the ring not stopped
    fe.wait_call(work.index, 0)
    work.run()
    expect(fe.wait_call(work.index, ctx.timeout), "no call on the call eventfd replaced while the ring ran")
    if not slots:
        return
    region = link.add_region(mem_slots=True)
    work.post(alloc=link.allocs[-1])
    link.submit(work.index)
    link.wait_used(work.index, 1)
    fe.rem_mem_reg(region)
    link.allocs.pop()
    work.run()


@check(
    "vhost-user:Migration#dirty-log",
    "with LOG_ALL on, every page the device writes (buffers, used ring) is set in the shared log",
    applies=needs_protocol(PF.VHOST_USER_PROTOCOL_F_LOG_SHMFD),
)
def dirty_log(ctx: Context) -> None:
    link = ctx.open()
    fe = link.frontend
    if ctx.caps.device == "blk":
        port: BlkPort | NetPort = BlkPort(link)
        index = 0
    else:
        port = ctx.net_port(link, rx_buffers=0)
        index = NetPort.RX
    q = link.split_queue(index)
    fd, size = bringup.make_log(fe)
    try:
        _start_logging(fe, fd, size, link)
        log = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    try:
        log[:] = bytes(size)
        written: list[tuple[int, int]] = []
        if isinstance(port, BlkPort):
            for sector in range(3):
                _head, data, status = port.post(VIRTIO_BLK_T_IN, sector, in_len=2 * SECTOR_SIZE)
                written += [(data, 2 * SECTOR_SIZE), (status, 1)]
            link.submit(index)
            link.wait_used(index, 3)
        else:
            injector, _sink = ctx.net_ends(port)
            mine = {}
            for _ in range(4):
                addr = link.alloc.alloc(PAGE, PAGE)
                mine[link.add_buffers(index, [], [(addr, PAGE)])] = addr
            link.submit(index)
            for tag in [new_tag() for _ in range(2)]:
                injector.send([marker_frame(tag, 200)])
                expect(port.receive(tag, ctx.timeout) is not None, "a frame sent while logging was not received")
            for slot in range(q.used_idx()):  # the ring started at 0 with this link
                head, length = struct.unpack_from("<II", link.memory.read(q.used_addr + 4 + 8 * (slot % q.size), 8))
                if head in mine and length:
                    written.append((mine[head], length))
        used_end = q.used_addr + used_ring_size(q.size)
        written.append((q.used_addr, used_end - q.used_addr))
        missing = sorted({p for addr, n in written for p in _pages(addr, n)} - _dirty(log))
        expect(not missing, f"pages {[hex(p) for p in missing]} written by the device are not set in the dirty log")
    finally:
        log.close()


def _pages(addr: int, length: int) -> range:
    return range(addr // PAGE * PAGE, addr + length, PAGE)


def _dirty(log: mmap.mmap) -> set[int]:
    data = bytes(log)
    return {(i * 8 + b) * PAGE for i, byte in enumerate(data) if byte for b in range(8) if byte >> b & 1}



def _start_logging(fe, fd: int, size: int, link) -> None:
    """QEMU's order (SET_LOG_BASE, SET_FEATURES with LOG_ALL, SET_VRING_ADDR with the log flag per ring).

    vhost-user.rst gives SET_LOG_BASE a reply under LOG_SHMFD but no content ("slave payload: N/A"):
    as QEMU, wait for a reply to it and do not read it.
    """
    fe.send(R.VHOST_USER_SET_LOG_BASE, Log(size, 0), [fd])
    for extra in fe.recv_message(request=R.VHOST_USER_SET_LOG_BASE).fds:
        os.close(extra)
    fe.set_features(fe.features | 1 << VHOST_F_LOG_ALL)
    for i, q in link.queues.items():
        fe.set_vring_addr(i, q.desc_addr, q.avail_addr, q.used_addr, flags=1 << VHOST_VRING_F_LOG, log_guest_addr=q.used_addr)


MAX_PAIRS = 4  # queue pairs exercised at most
FLOWS = 16  # source MACs, so that a device spreading flows over its receive queues uses each of them


def _needs_mq(caps) -> str | None:
    return needs_protocol(PF.VHOST_USER_PROTOCOL_F_MQ)(caps) or needs_frame_path(caps)


@check(
    "vhost-user:Multiple queue support#data-path",
    "net: every queue pair transmits; received frames arrive once each, on enabled receive queues only",
    devices={"net"},
    applies=_needs_mq,
)
def mq_data_path(ctx: Context) -> str:
    link = ctx.open()
    pairs = max(1, min(link.frontend.get_queue_num(), MAX_PAIRS))
    # Every ring before DRIVER_OK (virtio 1.2 3.1.1 steps 7 and 8, QEMU's order): a back-end may size its
    # queue set when the device starts (OVS polls the pairs that exist at DPDK's new_device callback).
    for pair in range(1, pairs):
        link.queue(2 * pair, 256)
        link.queue(2 * pair + 1, 256)
        _post_rx(link, 2 * pair, 32)
    dut = ctx.net_port(link)
    injector, sink = ctx.net_ends(dut)
    rx = [2 * p for p in range(pairs)]
    for pair in range(pairs):
        tag = new_tag()
        hdr = NetHdr().pack(link.net_hdr_len)
        link.add(2 * pair + 1, [hdr + marker_frame(tag)])
        link.submit(2 * pair + 1)
        # a loopback back-end may send the frame back on any receive queue (testpmd: on the same pair)
        left = _seen_on(ctx, link, rx, tag) if injector is dut else sink.receive(tag, ctx.timeout) is not None
        expect(left, f"a frame sent on transmitq{pair + 1} never left the device")
    if injector is dut:
        return f"{pairs} pairs transmit; loopback target: receive spreading not checked"
    used = _spray(ctx, link, injector, rx)
    note = f"{pairs} queue pairs; receive queues used: {sorted(used)}"
    if pairs > 1:
        disabled = rx[-1]
        link.frontend.set_vring_enable(disabled, False)
        used = _spray(ctx, link, injector, [q for q in rx if q != disabled], disabled)
        note += f", with receiveq{pairs} disabled: {sorted(used)}"
    return note


def _seen_on(ctx: Context, link, queues: list[int], tag: bytes) -> bool:
    """Whether a frame carrying ``tag`` arrives (bounded wait) on one of the receive ``queues``."""
    deadline = time.monotonic() + ctx.timeout
    while time.monotonic() < deadline:
        for index in queues:
            for elem in link.read_used(index):
                _post_rx(link, index, 1)
                if tag in elem.data[link.net_hdr_len :]:
                    return True
        time.sleep(0.001)
    return False


def _post_rx(link, index: int, count: int) -> None:
    for _ in range(count):
        link.add(index, (), [RX_BUFFER])
    link.submit(index)


def _spray(ctx: Context, link, injector: NetPort, enabled: list[int], disabled: int | None = None) -> set[int]:
    """Send FLOWS frames of distinct sources; each must arrive once, on an enabled receive queue."""
    tags = {new_tag(): i for i in range(FLOWS)}
    for tag, i in tags.items():
        frame = bytearray(marker_frame(tag))
        frame[6:12] = bytes([0x52, 0x54, 0, 0xF1, 0, i])
        injector.send([bytes(frame)])
    seen: dict[bytes, int] = {}
    queues = enabled + ([disabled] if disabled is not None else [])
    deadline = time.monotonic() + ctx.timeout
    while len(seen) < len(tags) and time.monotonic() < deadline:
        for index in queues:
            for elem in link.read_used(index):
                _post_rx(link, index, 1)
                data = elem.data[link.net_hdr_len :]
                found = next((t for t in tags if t in data), None)
                if found is None:
                    continue
                expect(found not in seen, f"a frame arrived twice (receive queues {seen.get(found)} and {index})")
                expect(index != disabled, f"a frame arrived on receive queue {index}, disabled with SET_VRING_ENABLE 0")
                seen[found] = index
        time.sleep(0.001)
    expect(len(seen) == len(tags), f"{len(tags) - len(seen)} of {len(tags)} frames of distinct flows never arrived")
    return set(seen.values())


DRAIN_REQUESTS = 16  # three descriptors each (blk): within the 64-entry ring
DRAIN_BYTES = 64 << 10  # per blk write: I/O that takes a while, so requests are in flight at GET_VRING_BASE


@check(
    "vhost-user:GET_VRING_BASE#drain",
    "requests the back-end took are all finished when GET_VRING_BASE replies (used idx == the base), none after",
)
def get_vring_base_drains(ctx: Context) -> None:
    # vhost-user.rst (QEMU 9.x, VHOST_USER_PROTOCOL_F_GET_VRING_BASE_INFLIGHT): GET_VRING_BASE stops the ring
    # and drains its in-flight requests; the base counts every request taken, so one still running when the
    # reply leaves would be lost to a front-end that restarts the ring from that base.
    link = ctx.open()
    work = Workload(ctx, link)
    blk = ctx.caps.device == "blk"
    if blk:
        assert isinstance(work.port, BlkPort)
        for i in range(DRAIN_REQUESTS):
            work.port.post(VIRTIO_BLK_T_OUT, i * (DRAIN_BYTES // SECTOR_SIZE), out=os.urandom(DRAIN_BYTES))
    else:
        for _ in range(DRAIN_REQUESTS):
            work.post()
    link.submit(work.index)
    q = link.split_queue(work.index)
    deadline = time.monotonic() + ctx.timeout
    while q.used_idx() == 0:  # stop once the back-end is busy with the batch, not before it began
        expect(time.monotonic() < deadline, f"none of {DRAIN_REQUESTS} requests was used within {ctx.timeout:g} s")
        time.sleep(0.0002)
    base = link.frontend.get_vring_base(work.index)
    used = q.used_idx()
    expect(0 < base <= DRAIN_REQUESTS, f"GET_VRING_BASE returned {base} for {DRAIN_REQUESTS} requests made available")
    expect(used == base, f"GET_VRING_BASE replied with base {base} while only {used} of those requests were used "
                         "(requests in flight at the reply)")
    late = link.poll_used(work.index, DRAIN_REQUESTS, ctx.quiet)
    expect(len(late) == used, f"{len(late) - used} buffers used after GET_VRING_BASE replied")
