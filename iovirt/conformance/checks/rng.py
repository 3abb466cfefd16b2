"""virtio-rng device requirements of virtio 1.2 section 5.4."""

from __future__ import annotations

from iovirt.conformance.registry import check, expect
from iovirt.conformance.target import Context
from iovirt.virtio.rng.defs import REQUESTQ

RNG = {"rng"}


def _requestq(ctx: Context):
    link = ctx.open()
    link.queue(REQUESTQ, 64)
    link.driver_ok()
    return link


@check("virtio-1.2:5.4.6.2#bytes", "rng: each request gets one or more bytes, no more than its buffer", devices=RNG)
def fills_requests(ctx: Context) -> None:
    link = _requestq(ctx)
    sizes = (1, 64, 4096)
    heads = [link.add(REQUESTQ, (), [n]) for n in sizes]
    link.submit(REQUESTQ)
    used = {u.head: u for u in link.wait_used(REQUESTQ, len(heads))}
    for head, size in zip(heads, sizes):
        got = used[head]
        expect(1 <= got.len <= size, f"request of {size} bytes: used len {got.len}, want 1..{size}")


@check("virtio-1.2:5.4.6.2#chain", "rng: a request over several device-writable buffers is filled within them",
       devices=RNG)
def fills_chains(ctx: Context) -> None:
    link = _requestq(ctx)
    head = link.add(REQUESTQ, (), [7, 100, 1])
    link.submit(REQUESTQ)
    (got,) = link.wait_used(REQUESTQ, 1)
    expect(got.head == head and 1 <= got.len <= 108, f"used len {got.len} for a 108-byte chain")
    expect(any(got.data[: got.len]) or got.len < 8, "the bytes written are all zero")
