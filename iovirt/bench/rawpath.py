"""The bench port's raw data path: the Cython twin where it loads, else the Python reference.

``_rawpath_c`` (Cython) and ``_rawpath_py`` (the readable reference) have
the same functions with the same results; :mod:`iovirt._accel` decides
which runs (``iovirt info`` lists it as "bench raw path").  The twins do
the per-frame driver-side work of a :class:`~iovirt.bench.port.BenchPort`:
:func:`publish`, :func:`tx_post`, :func:`tx_reap`, :func:`rx_post`, :func:`rx_harvest`.
"""

from __future__ import annotations

from typing import Any

from iovirt import _accel
from iovirt.bench import _rawpath_py

__all__ = ["IMPLEMENTATION", "NUM_BUFFERS_OFFSET", "RawFrame", "Window", "monotonic_ns", "publish", "rx_harvest", "rx_post", "tx_post", "tx_reap"]

accel: Any = _accel.load("iovirt.bench._rawpath_c")
_impl: Any = accel if accel is not None else _rawpath_py

IMPLEMENTATION: str = _impl.IMPLEMENTATION
NUM_BUFFERS_OFFSET: int = _rawpath_py.NUM_BUFFERS_OFFSET
RawFrame: Any = _impl.RawFrame
"""One received frame: ``hdr``, ``data``, ``t_ns``, ``buffer_lens``, and ``packet`` (scapy, on demand)."""
Window: Any = _impl.Window
monotonic_ns: Any = _impl.monotonic_ns
publish: Any = _impl.publish
tx_post: Any = _impl.tx_post
tx_reap: Any = _impl.tx_reap
rx_post: Any = _impl.rx_post
rx_harvest: Any = _impl.rx_harvest
