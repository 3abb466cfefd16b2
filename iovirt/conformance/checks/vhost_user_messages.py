"""Back-end rules of single vhost-user messages (QEMU's docs/interop/vhost-user.rst): a ring is served
only once started; NET_SET_MTU and SET_SLAVE_REQ_FD answer REPLY_ACK as the document says.
"""

from __future__ import annotations

import socket

from iovirt.conformance.checks.common import Workload
from iovirt.conformance.registry import check, expect
from iovirt.conformance.target import Context, needs_protocol
from iovirt.vhost_user.errors import NackError
from iovirt.vhost_user.messages import FrontendRequest as R, ProtocolFeature as PF, U64

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
    link.frontend.set_vring_kick(work.index)
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

