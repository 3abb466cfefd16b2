"""iovirt.vhost_user: the vhost-user protocol (QEMU ``docs/interop/vhost-user.rst``).

Wire and framing (both roles):

* :mod:`~iovirt.vhost_user.messages` - wire format: header flags, request
  codes, feature bits, typed payloads with pack/unpack.
* :mod:`~iovirt.vhost_user.framing` - the header and the one framer both
  roles share: message bytes out, messages with their fds in.
* :mod:`~iovirt.vhost_user.protocol` - sans-I/O connections on that framer:
  back-end (bytes and fds in, typed requests (:mod:`~iovirt.vhost_user.requests`)
  out; replies out) and front-end (requests out; replies checked in).
* :mod:`~iovirt.vhost_user.errors` - the exceptions of these layers.

The back-end, split by job:

* :mod:`~iovirt.vhost_user.server` - the UNIX sockets (the only module that touches them);
  :mod:`~iovirt.vhost_user.peers` - who may connect (SO_PEERCRED, socket mode);
  :mod:`~iovirt.vhost_user.fds` - closing what a peer handed over.
* :mod:`~iovirt.vhost_user.isolate` - ``iovirt serve --isolate``: one worker
  process per device under a supervisor that restarts it.
* :mod:`~iovirt.vhost_user.backend` - one connection's session: dispatch,
  features, config, status, inflight region, IOTLB messages;
  :mod:`~iovirt.vhost_user.migration_log` - its dirty-page log (SET_LOG_BASE/FD);
  :mod:`~iovirt.vhost_user.state_migration` - its device-state requests.
* :mod:`~iovirt.vhost_user.vrings` - vring lifecycle: kick/call/err, start/stop,
  IOTLB suspend/resume; :mod:`~iovirt.vhost_user.memtable` - the memory table.
* :mod:`~iovirt.vhost_user.inflight` - inflight I/O tracking, a queue wrapper.
* :mod:`~iovirt.vhost_user.devstate` - device state for SET_DEVICE_STATE_FD: the
  stream format and the transfer on the front-end's channel.
* :mod:`~iovirt.vhost_user.iotlb` and :mod:`~iovirt.vhost_user.channel` - the
  device IOTLB and the back-end request channel.
* :mod:`~iovirt.vhost_user.dataplane` - the worker thread that serves kicks.
* :mod:`~iovirt.vhost_user.device` - the seam: what the back-end needs from a
  device, with defaults; :mod:`~iovirt.vhost_user.devices` - one adapter per type.

The front-end: :mod:`~iovirt.vhost_user.frontend` (a client over a UNIX
socket), :mod:`~iovirt.vhost_user.bringup` (the VMM's bring-up sequence it
runs), :mod:`~iovirt.vhost_user.driver` (VMM + guest driver) and
:mod:`~iovirt.vhost_user.viommu` (the VMM's IOMMU side), for tests, the bench
and the conformance suite.
"""
