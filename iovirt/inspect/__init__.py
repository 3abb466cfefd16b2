"""iovirt.inspect: post-mortem views of guest memory and its virtqueues.

* :mod:`~iovirt.inspect.elfcore` - ELF cores of guest memory: QEMU's
  ``dump-guest-memory`` cores and iovirt's own, read with pyelftools (each
  PT_LOAD a guest-physical region, ``p_paddr`` its address) and written
  with ``struct`` (iovirt's, with an ``IOVIRT`` note describing the rings).
* :mod:`~iovirt.inspect.rings` - a read-only decoder of one split ring:
  descriptor table, avail and used rings, in-flight chains, event-idx
  values, and warnings about inconsistent state.
* :mod:`~iovirt.inspect.dump` - the back-end side of ``iovirt dump``: the
  rings of a session and the core written on SIGUSR2.
* :mod:`~iovirt.inspect.cli` - ``iovirt inspect`` and ``iovirt dump``.
"""
