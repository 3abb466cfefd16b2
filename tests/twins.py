"""Comparing what the two twins of an accelerated part did, errors included.

The twins must fail the same way, not just with the same class: the same
type, the same text and the same structured attributes (queue, desc, head,
addr, length, fault reason, ...), because callers log and act on them.
"""

from __future__ import annotations

from typing import Any, Callable


def error_record(exc: BaseException) -> tuple[type, str, dict[str, Any]]:
    """An exception's type, text and public attributes, as one comparable value."""
    attrs = {name: value for name, value in vars(exc).items() if not name.startswith("_")}
    return type(exc), str(exc), attrs


def outcome(call: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[str, Any]:
    """``("ok", result)`` or ``("raised", error_record(exc))`` of ``call(*args, **kwargs)``."""
    try:
        return "ok", call(*args, **kwargs)
    except Exception as exc:  # every error the twins raise is compared whole
        return "raised", error_record(exc)


def assert_same_error(a: BaseException, b: BaseException) -> None:
    """Fail unless ``a`` and ``b`` agree in type, text and attributes."""
    assert error_record(a) == error_record(b)
