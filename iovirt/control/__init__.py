"""iovirt.control: the control socket of ``iovirt serve --control PATH`` (docs/control.md).

* :mod:`~iovirt.control.protocol` - the line protocol: one JSON object per
  line each way, size-limited and validated (sans-I/O, as QMP's framing).
* :mod:`~iovirt.control.commands` - the command table: devices, stats, fdb,
  add/remove, log level, limits, metrics.
* :mod:`~iovirt.control.snapshot` - devices and counters read as plain data.
* :mod:`~iovirt.control.metrics` - the Prometheus text exposition format.
* :mod:`~iovirt.control.server` - the UNIX socket, served from the
  vhost-user server's control loop.
* :mod:`~iovirt.control.cli` - ``iovirt ctl PATH COMMAND [ARGS]``.
"""
