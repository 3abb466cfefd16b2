"""The root of every exception iovirt raises on purpose.

Bad input from a guest or a frontend is an expected event: it is raised as a
subclass of :class:`IovirtError` carrying structured attributes (the address,
the queue index, the message id) so that callers can log it once with context
and reset the offending device or connection.
"""

from __future__ import annotations


class IovirtError(Exception):
    """Root of iovirt's exceptions."""
