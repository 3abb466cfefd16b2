"""vhost-user IOMMU support through the real ``VhostUserServer`` (vhost-user.rst "IOMMU support").

Front-ends with a :class:`~iovirt.vhost_user.viommu.FrontendIommu` (guest memory at
IOVAs ``IOVA_BASE + gpa``, deliberately not the GPAs) negotiate ACCESS_PLATFORM; the
back-end asks for translations with MISS on the back-end channel, waits without
blocking anything else, and applies UPDATE/INVALIDATE before acking them.
"""

from __future__ import annotations

import os
import struct
import threading
import time

import pytest

from iovirt.vhost_user.bringup import negotiate
from iovirt.vhost_user.driver import IOVA_BASE, VhostUserDriver
from iovirt.vhost_user.errors import NackError
from iovirt.vhost_user.frontend import VhostUserFrontend
from iovirt.vhost_user.messages import (
    FrontendRequest as R,
    IotlbMsg,
    IotlbPerm,
    IotlbType,
    ProtocolFeature as PF,
    U64,
)
from iovirt.vhost_user.server import VhostUserServer
from iovirt.virtio.blk.defs import SECTOR_SIZE, VIRTIO_BLK_T_OUT
from iovirt.virtio.blk.device import VirtioBlk
from iovirt.virtio.defs import VIRTIO_F_ACCESS_PLATFORM
from iovirt.virtio.net.defs import NetHdr
from iovirt.virtio.net.device import VirtioNet
from iovirt.virtio.net.switch import LearningSwitch

from backend_helpers import wait_until

ALL = (1 << 64) - 1
MAC = [bytes([0x02, 0, 0, 0, 0, 0xB0 + i]) for i in range(3)]
PAGE = 4096
UPDATE, INVALIDATE = IotlbType.VHOST_IOTLB_UPDATE, IotlbType.VHOST_IOTLB_INVALIDATE
RW = IotlbPerm.VHOST_ACCESS_RW


class IommuBackend:
    """Three net ports (two offering ACCESS_PLATFORM, one not) and a blk device, on one server."""

    def __init__(self, tmp) -> None:
        self.switch = LearningSwitch()
        self.server = VhostUserServer()
        self.net = [VirtioNet(MAC[i], self.switch, label=f"net{i}") for i in range(3)]
        self.net_paths = [str(tmp / f"net{i}.sock") for i in range(3)]
        for i, (dev, path) in enumerate(zip(self.net, self.net_paths)):
            self.server.add_socket(path, dev, name=dev.label, iommu=i < 2)
        self.blk = VirtioBlk(str(tmp / "disk.img"), size=1 << 20, label="blk0")
        self.blk_path = str(tmp / "blk.sock")
        self.server.add_socket(self.blk_path, self.blk, name="blk0", iommu=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def session(self, path: str):
        endpoint = next(e for e in self.server.endpoints if e.path == path)
        return endpoint.connection.session

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(timeout=10)
        self.blk.close()


@pytest.fixture
def backend(tmp_path):
    b = IommuBackend(tmp_path)
    yield b
    b.stop()


def port(backend, i: int, iommu: bool = True) -> VhostUserDriver:
    drv = VhostUserDriver(backend.net_paths[i], memory_size=4 << 20, iommu=iommu)
    drv.start_queues([0, 1], size=16)
    return drv


def frame(src: int, dst: int, n: int = 0) -> bytes:
    return MAC[dst] + MAC[src] + b"\x88\xb5" + bytes([n]) * 50


def send(drv: VhostUserDriver, data: bytes) -> None:
    """Transmit ``data`` from a buffer on a page of its own (so its translation is not known yet)."""
    buf = drv.alloc.alloc(PAGE, PAGE)
    drv.memory.write(buf, NetHdr().pack() + data)
    drv.queues[1].add_chain([(buf, 12 + len(data))])
    drv.kick(1)


def received(drv: VhostUserDriver, timeout: float = 5.0) -> list[bytes]:
    """Frames in the receive queue, answering misses meanwhile."""
    got: list[bytes] = []

    def arrived() -> bool:
        got.extend(u.data[12:] for u in drv.queues[0].get_used())
        return bool(got)

    if drv.iommu is not None:
        drv.iommu.serve_until(arrived, timeout)
    else:
        wait_until(arrived, timeout)
    return got


def test_access_platform_and_the_channel_are_offered_only_on_request(backend):
    with VhostUserFrontend.connect(backend.net_paths[0]) as front:
        assert front.get_features() >> VIRTIO_F_ACCESS_PLATFORM & 1
        protocol = front.get_protocol_features()
        assert protocol >> PF.VHOST_USER_PROTOCOL_F_BACKEND_REQ & 1 and protocol >> PF.VHOST_USER_PROTOCOL_F_REPLY_ACK & 1
    with VhostUserFrontend.connect(backend.net_paths[2]) as front:
        assert not front.get_features() >> VIRTIO_F_ACCESS_PLATFORM & 1


def test_traffic_between_two_iova_ports_goes_through_misses_and_updates(backend):
    a, b = port(backend, 0), port(backend, 1)
    with a, b:
        assert a.features >> VIRTIO_F_ACCESS_PLATFORM & 1
        assert a.queues[1].desc_addr >= IOVA_BASE  # the rings live at IOVAs, not at their GPAs
        assert wait_until(lambda: all(backend.session(p).device.queue(1) is not None for p in backend.net_paths[:2]))
        b.queues[0].add_data([], [2048])
        b.kick(0)
        send(a, frame(0, 1))
        assert b.iommu.serve_until(lambda: True, 0.1)
        a.iommu.serve_until(lambda: a.queues[1].used_idx() == 1)
        assert received(b) == [frame(0, 1)]
        misses = a.iommu.misses + b.iommu.misses
        assert misses and all(m.iova >= IOVA_BASE for m in misses)
        assert any(m.perm == IotlbPerm.VHOST_ACCESS_RO for m in a.iommu.misses)  # the TX buffer is read
        iotlb = backend.session(backend.net_paths[0]).vrings.iotlb
        assert iotlb.outstanding == {} and iotlb.stats["misses_sent"] == len(a.iommu.misses)


def test_a_receive_buffer_needs_only_write_permission(backend):
    a, b = port(backend, 0), port(backend, 1)
    with a, b:
        rx = b.alloc.alloc(PAGE, PAGE)
        b.iommu.map(rx, rx - IOVA_BASE, PAGE, IotlbPerm.VHOST_ACCESS_WO)
        b.queues[0].add_chain(writable=[(rx, 2048)])
        b.kick(0)
        b.iommu.serve(0.05)
        send(a, frame(0, 1))
        a.iommu.serve_until(lambda: a.queues[1].used_idx() == 1)
        assert received(b) == [frame(0, 1)]
        assert not backend.net[1].needs_reset


def test_blk_with_iovas_reads_back_what_it_wrote(backend):
    with VhostUserDriver(backend.blk_path, memory_size=4 << 20, iommu=True) as drv:
        drv.start_queues([0], size=16)
        queue = drv.queues[0]
        data = os.urandom(1024)
        for rtype, out, in_len in ((1, [data], []), (0, [], [1024])):  # OUT, then IN
            queue.add_data([struct.pack("<IIQ", rtype, 0, 8)] + out, in_len + [1])
            drv.kick(0)
            assert drv.iommu.serve_until(lambda: queue.used_idx() != queue.last_used_idx)
            (used,) = queue.get_used()
            assert used.data[-1] == 0  # VIRTIO_BLK_S_OK
        assert used.data[:-1] == data


def test_a_completed_request_s_translation_is_not_used_for_the_next_one(backend):
    """A guest may reuse an IOVA once its request completed, without an INVALIDATE.

    QEMU 7.2 forwards no invalidation for many of a Linux guest's unmaps, so
    a translation is good only while the request that asked for it is in
    flight.  Here request 1's header page is remapped, unannounced, to request
    2's header after request 1 completed; request 2 arrives while the device
    still runs (served when an UPDATE answers request 0's miss, no kick in
    between), and must be read through the new mapping, not request 1's.
    """
    with VhostUserDriver(backend.blk_path, memory_size=4 << 20, iommu=True) as drv:
        drv.start_queues([0], size=16)
        queue, iommu = drv.queues[0], drv.iommu
        hdr, data, waiter, fresh = (drv.alloc.alloc(PAGE, PAGE) for _ in range(4))

        def request(header: int, sector: int, fill: bytes, buf: int) -> None:
            drv.memory.write(header, struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, sector))
            drv.memory.write(buf, fill * SECTOR_SIZE)
            queue.add_chain([(header, 16), (buf, SECTOR_SIZE)], [(header + 16, 1)])

        request(hdr, 0, b"A", data)  # request 1: its pages translate whenever asked
        request(waiter, 16, b"W", waiter + SECTOR_SIZE)  # request 0: its page waits
        drv.kick(0)
        held: list[int] = []
        deadline = time.monotonic() + 5
        while (queue.used_idx() < 1 or not held) and time.monotonic() < deadline:
            for msg in iommu.receive(0.01):
                if msg.iova // PAGE == waiter // PAGE:
                    held.append(msg.iova)
                else:
                    iommu.update(msg.iova)
        assert queue.used_idx() == 1 and held, "request 1 done, request 0 waiting for its translation"
        # The guest reuses request 1's header IOVA for request 2, telling the back-end nothing.
        iommu.unmap(hdr, PAGE, invalidate=False)
        iommu.map(hdr, fresh - IOVA_BASE, PAGE)
        request(hdr, 8, b"B", data)
        queue.publish()  # no kick: the device sees it on its next run
        iommu.update(held[0])  # that run: request 0 completes, request 2 is popped
        assert iommu.serve_until(lambda: queue.used_idx() == 3)
        assert [u.data[-1] for u in queue.get_used()] == [0, 0, 0]  # VIRTIO_BLK_S_OK
    with open(backend.blk.path, "rb") as image:
        disk = image.read(24 * SECTOR_SIZE)
    sectors = [disk[s * SECTOR_SIZE : (s + 1) * SECTOR_SIZE] for s in (0, 8, 16)]
    assert sectors == [b"A" * SECTOR_SIZE, b"B" * SECTOR_SIZE, b"W" * SECTOR_SIZE]


def test_an_invalidation_takes_effect_before_its_ack(backend):
    a = port(backend, 0)
    with a:
        a.queues[1].add_data([NetHdr().pack() + frame(0, 2)])
        a.kick(1)
        assert a.iommu.serve_until(lambda: a.queues[1].used_idx() == 1)
        iotlb = backend.session(backend.net_paths[0]).vrings.iotlb
        buffer_page = max(m.iova for m in a.iommu.misses) // PAGE * PAGE
        assert any(e.iova <= buffer_page < e.end for e in iotlb.entries)
        a.iommu.unmap(buffer_page, PAGE)  # acked when this returns
        assert not any(e.iova <= buffer_page < e.end for e in iotlb.entries)


def test_invalidating_a_running_ring_suspends_it_until_the_translation_returns(backend):
    a, b = port(backend, 0), port(backend, 1)
    with a, b:
        b.queues[0].add_data([], [2048])
        b.kick(0)
        b.iommu.serve(0.05)
        used_page = a.queues[1].used_addr // PAGE * PAGE
        a.frontend.iotlb_msg(IotlbMsg(used_page, PAGE, 0, IotlbPerm.VHOST_ACCESS_NONE, INVALIDATE))
        session = backend.session(backend.net_paths[0])
        assert session.device.queue(1) is None and session.vrings[1].awaiting_translation
        send(a, frame(0, 1, 7))  # the kick resumes the ring once its pages are back
        a.iommu.serve_until(lambda: a.queues[1].used_idx() == 1)
        assert received(b) == [frame(0, 1, 7)]


def test_a_denied_access_is_reported_and_fails_the_device(backend):
    a = port(backend, 0)
    with a:
        buf = a.alloc.alloc(PAGE, PAGE)
        a.memory.write(buf, NetHdr().pack() + frame(0, 2))
        a.iommu.map(buf, buf - IOVA_BASE, PAGE, IotlbPerm.VHOST_ACCESS_WO)  # the device may not read it
        a.iommu.update(buf)
        a.queues[1].add_chain([(buf, 12 + 64)])
        a.kick(1)
        device = backend.net[0]
        assert a.iommu.serve_until(lambda: bool(a.iommu.access_fails))
        assert wait_until(lambda: device.needs_reset)
        assert [(m.iova, m.perm) for m in a.iommu.access_fails] == [(buf, IotlbPerm.VHOST_ACCESS_RO)]
        assert a.queues[1].used_idx() == 0


def test_a_front_end_that_never_answers_blocks_neither_other_queues_nor_other_devices(backend):
    a, b, c = port(backend, 0), port(backend, 1), port(backend, 2, iommu=False)
    with a, b, c:
        a.iommu.answer_misses = False
        send(a, frame(0, 2))
        assert a.iommu.serve_until(lambda: bool(a.iommu.misses), 5)  # asked, never answered
        c.queues[0].add_data([], [2048])
        c.kick(0)
        send(b, frame(1, 2))  # another device, through the same data plane
        b.iommu.serve_until(lambda: b.queues[1].used_idx() == 1)
        assert received(c) == [frame(1, 2)]
        assert a.queues[1].used_idx() == 0  # still waiting for its translation


@pytest.mark.parametrize(
    "msg, why",
    [
        (IotlbMsg(IOVA_BASE, 0, 0, RW, UPDATE), "size 0"),
        (IotlbMsg(IOVA_BASE, PAGE, 0x1000, RW, UPDATE), "user address outside the memory table"),
        (IotlbMsg(IOVA_BASE, PAGE, 0, IotlbPerm.VHOST_ACCESS_NONE, UPDATE), "no permission"),
        (IotlbMsg(IOVA_BASE, PAGE, 0, RW, IotlbType.VHOST_IOTLB_MISS), "a back-end message type"),
        (IotlbMsg(IOVA_BASE, PAGE, 0, RW, IotlbType.VHOST_IOTLB_ACCESS_FAIL), "a back-end message type"),
    ],
)
def test_bad_iotlb_messages_get_a_non_zero_reply_and_change_nothing(backend, msg, why):
    a = port(backend, 0)
    with a:
        entries = backend.session(backend.net_paths[0]).vrings.iotlb.entries
        with pytest.raises(NackError):
            a.frontend.iotlb_msg(msg)
        assert backend.session(backend.net_paths[0]).vrings.iotlb.entries == entries, why
        assert a.frontend.get_queue_num() == 1  # the connection goes on


@pytest.mark.parametrize(
    "body", [IotlbMsg(0, PAGE, 0, RW, UPDATE).pack()[:-8], IotlbMsg(0, PAGE, 0, RW, UPDATE).pack()[:-2] + b"\x09\x00",
             IotlbMsg(0, PAGE, 0, RW, UPDATE).pack()[:-2] + b"\x03\x07"],
    ids=["short", "bad-perm", "bad-type"],
)
def test_malformed_iotlb_payloads_get_a_non_zero_reply(backend, body):
    a = port(backend, 0)
    with a:
        reply = a.frontend.call(R.VHOST_USER_IOTLB_MSG, body)
        assert isinstance(reply.payload, U64) and reply.payload.value != 0
        assert a.frontend.get_queue_num() == 1


def test_iotlb_messages_without_access_platform_are_refused(backend):
    c = port(backend, 2, iommu=False)
    with c:
        with pytest.raises(NackError):
            c.frontend.iotlb_msg(IotlbMsg(0, PAGE, 0x7F00_0000_0000, RW, UPDATE))


def test_a_backend_channel_that_is_not_a_socket_is_refused(backend):
    with VhostUserFrontend.connect(backend.net_paths[0]) as front:
        negotiate(front, ALL, ALL, iommu=True)
        r, w = os.pipe()
        try:
            with pytest.raises(NackError):
                front.set_backend_req_fd(r)
        finally:
            os.close(r)
            os.close(w)
