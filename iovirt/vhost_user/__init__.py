"""iovirt.vhost_user: the vhost-user protocol (QEMU ``docs/interop/vhost-user.rst``).

* :mod:`~iovirt.vhost_user.messages` - wire format: header flags, request
  codes, feature bits, typed payloads with pack/unpack.
* :mod:`~iovirt.vhost_user.framing` - the header and the one framer both
  roles share: message bytes out, messages with their fds in.
* :mod:`~iovirt.vhost_user.protocol` - sans-I/O connections on that framer:
  back-end (bytes and fds in, typed request events out; replies out) and
  front-end (requests out; replies checked in).
* :mod:`~iovirt.vhost_user.frontend` - a front-end (client) over a UNIX socket,
  for tests, the bench and the conformance suite; :mod:`~iovirt.vhost_user.bringup`
  is the VMM's bring-up sequence it runs.
* :mod:`~iovirt.vhost_user.errors` - the exceptions of these layers.
"""
