"""iovirt.vhost_user: the vhost-user protocol (QEMU ``docs/interop/vhost-user.rst``).

* :mod:`~iovirt.vhost_user.messages` - wire format: header, request codes,
  feature bits, typed payloads with pack/unpack.
* :mod:`~iovirt.vhost_user.protocol` - sans-I/O back-end connection: bytes and
  fds in, typed request events out; replies out.
* :mod:`~iovirt.vhost_user.frontend` - a front-end (client) over a UNIX socket,
  for tests, the bench and the conformance suite.
* :mod:`~iovirt.vhost_user.errors` - the exceptions of these layers.
"""
