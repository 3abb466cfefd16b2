"""Back-end rules of single vhost-user messages (QEMU's docs/interop/vhost-user.rst): a ring is served
only once started; NET_SET_MTU and SET_SLAVE_REQ_FD answer REPLY_ACK as the document says.
"""

from __future__ import annotations

import os
import socket

from iovirt.conformance.checks.common import Workload
from iovirt.conformance.registry import PROTOCOL_DEVICES, check, expect
from iovirt.conformance.target import Context, needs_protocol
from iovirt.vhost_user.errors import NackError
from iovirt.vhost_user.messages import (
    U64,
    DeviceStateTransfer,
    FrontendRequest as R,
    MigrationPhase,
    ProtocolFeature as PF,
    TransferDirection,
)

NET_MTU_VALID = 1500
NET_MTU_INVALID = 20  # below IPv4's 68 bytes (virtio 1.2 5.1.4.1: mtu 68..65535)


def _needs_both(first: PF, second: PF):
    a, b = needs_protocol(first), needs_protocol(second)
    return lambda caps: a(caps) or b(caps)


@check(
    "vhost-user:Ring states#started",
    "a ring set up without SET_VRING_KICK is not started: nothing is used until its kick fd arrives",
)
def started_only(ctx: Context) -> None:
    link = ctx.open()
    work = Workload(ctx, link, kick=False)
    work.post()
    link.queues[work.index].publish()
    early = link.poll_used(work.index, 1, ctx.quiet)
    expect(not early, "a buffer was used on a ring that had no SET_VRING_KICK yet (not started)")
    for index in link.queues:  # every ring of the device (some back-ends start none before all have kick fds)
        link.frontend.set_vring_kick(index)
    link.frontend.kick(work.index)
    link.wait_used(work.index, 1)


@check(
    "vhost-user:NET_SET_MTU",
    "net: NET_SET_MTU is acked 0 for a valid MTU and non-zero for an invalid one",
    devices={"net"},
    applies=_needs_both(PF.VHOST_USER_PROTOCOL_F_MTU, PF.VHOST_USER_PROTOCOL_F_REPLY_ACK),
)
def net_set_mtu(ctx: Context) -> None:
    fe = ctx.open().frontend
    fe.call(R.VHOST_USER_NET_SET_MTU, U64(NET_MTU_VALID), need_reply=True)  # a non-zero ack raises NackError
    try:
        fe.call(R.VHOST_USER_NET_SET_MTU, U64(NET_MTU_INVALID), need_reply=True)
    except NackError:
        return
    expect(False, f"NET_SET_MTU {NET_MTU_INVALID} (below 68) was acked 0 (success)")


@check(
    "vhost-user:SET_SLAVE_REQ_FD",
    "SET_SLAVE_REQ_FD (SET_BACKEND_REQ_FD) with a socket is acked 0",
    devices=PROTOCOL_DEVICES,
    applies=_needs_both(PF.VHOST_USER_PROTOCOL_F_BACKEND_REQ, PF.VHOST_USER_PROTOCOL_F_REPLY_ACK),
)
def backend_req_fd(ctx: Context) -> None:
    fe = ctx.open().frontend
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            fe.call(R.VHOST_USER_SET_BACKEND_REQ_FD, None, [theirs.fileno()], need_reply=True)
        except NackError as exc:
            expect(False, f"SET_SLAVE_REQ_FD with a UNIX socket: {exc} (MUST be 0 for success)")
    finally:
        ours.close()
        theirs.close()



SAVE = DeviceStateTransfer(TransferDirection.SAVE, MigrationPhase.STOPPED)
LOAD = DeviceStateTransfer(TransferDirection.LOAD, MigrationPhase.STOPPED)


@check(
    "vhost-user:DEVICE_STATE#round-trip",
    "state saved from a stopped device loads into a new connection (CHECK_DEVICE_STATE 0), a corrupted copy is refused, "
    "and the device works after the load",
    applies=needs_protocol(PF.VHOST_USER_PROTOCOL_F_DEVICE_STATE),
)
def device_state_round_trip(ctx: Context) -> None:
    source = ctx.open()
    Workload(ctx, source).run(2)
    for index in list(source.queues):
        source.frontend.get_vring_base(index)
    state = _transfer(source.frontend, SAVE)
    expect(state, "the saved device state is empty")
    ctx.close_link(source)
    corrupt = bytearray(state)
    corrupt[len(corrupt) // 2] ^= 0xFF
    target = ctx.open()
    try:
        _transfer(target.frontend, LOAD, bytes(corrupt))
    except NackError:
        pass
    else:
        expect(False, "CHECK_DEVICE_STATE acked 0 after loading a corrupted copy of the state")
    _transfer(target.frontend, LOAD, state)
    Workload(ctx, target).run(2)


def _transfer(fe, transfer: DeviceStateTransfer, data: bytes = b"") -> bytes:
    """SET_DEVICE_STATE_FD with a pipe (or the back-end's own fd), move the bytes, CHECK_DEVICE_STATE."""
    r, w = os.pipe()
    ours, theirs = (r, w) if transfer.direction == TransferDirection.SAVE else (w, r)
    try:
        own = fe.set_device_state_fd(transfer, theirs)
    finally:
        os.close(theirs)
    if own is not None:  # the back-end asked to use its fd instead
        os.close(ours)
        ours = own
    if transfer.direction == TransferDirection.SAVE:
        with os.fdopen(ours, "rb") as reader:
            data = reader.read()
    else:
        with os.fdopen(ours, "wb") as writer:
            writer.write(data)
    fe.check_device_state()
    return data
