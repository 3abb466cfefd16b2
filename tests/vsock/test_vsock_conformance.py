"""``iovirt conform --device vsock`` passes against iovirt's own vsock device."""

from __future__ import annotations

import socket
import threading

from iovirt.conformance.registry import Verdict
from iovirt.conformance.runner import Runner
from iovirt.conformance.target import Target
from iovirt.vhost_user.devices.vsock import attach
from iovirt.vhost_user.driver import VhostUserDriver
from iovirt.vhost_user.server import VhostUserServer
from iovirt.virtio.vsock.defs import VIRTIO_VSOCK_F_NO_IMPLIED_STREAM, VIRTIO_VSOCK_F_STREAM, VIRTIO_VSOCK_OP_REQUEST, VIRTIO_VSOCK_OP_RST
from iovirt.virtio.vsock.device import VirtioVsock
from iovirt.virtio.vsock.driver import VsockDriver

from vsock_helpers import GUEST_CID


def test_vsock_checks_pass_against_iovirt(served):
    results = {r.clause: r for r in Runner(Target(served.socket, "vsock")).run()}
    vsock = {c: r for c, r in results.items() if c.startswith("virtio-1.2:5.10")}
    assert len(vsock) == 6
    assert all(r.verdict is Verdict.PASS for r in vsock.values()), {c: r.reason for c, r in vsock.items()}
    assert not [c for c, r in results.items() if r.verdict is Verdict.FAIL]


class NoImpliedStreamMissing(VirtioVsock):
    """Offers no feature bit at all (iovirt before NO_IMPLIED_STREAM was offered)."""

    def device_features(self):
        return super().device_features() & ~(1 << VIRTIO_VSOCK_F_NO_IMPLIED_STREAM | 1 << VIRTIO_VSOCK_F_STREAM)


def test_no_implied_stream_check_fails_without_the_offer(tmp_path):
    device = NoImpliedStreamMissing(GUEST_CID, str(tmp_path / "v.sock"))
    server = VhostUserServer()
    server.add_socket(str(tmp_path / "vhost.sock"), device)
    detach = attach(server.dataplane, device)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        results = {r.clause: r for r in Runner(Target(str(tmp_path / "vhost.sock"), "vsock")).run()}
    finally:
        server.stop()
        thread.join(timeout=10)
        detach()
    failed = {c for c, r in results.items() if r.verdict is Verdict.FAIL}
    assert failed == {"virtio-1.2:5.10.3#no-implied-stream"}, failed


def test_no_streams_when_no_implied_stream_is_negotiated_without_stream(served):
    # 5.10.3: NO_IMPLIED_STREAM without STREAM means the driver has no stream sockets: a guest connect to a
    # listening host port is reset, and a host connect never reaches the guest.
    listener = served.listen(4321)
    with VhostUserDriver(served.socket, features=~(1 << VIRTIO_VSOCK_F_STREAM)) as drv:
        guest = VsockDriver(drv, GUEST_CID)
        guest.send(guest.header(5002, 4321, VIRTIO_VSOCK_OP_REQUEST))
        hdr, _ = guest.wait_op(VIRTIO_VSOCK_OP_RST, 5002)
        assert hdr.dst_port == 5002
        host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        host.settimeout(5)
        host.connect(served.uds)
        try:  # the device closes the host socket at once; the request may or may not get out first
            host.sendall(b"CONNECT 79\n")
            assert host.recv(16) == b""
        except (BrokenPipeError, ConnectionResetError):
            pass
        host.close()
        assert not guest.quiet(0.2)
    listener.close()
