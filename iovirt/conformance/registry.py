"""Checks labelled by specification clause, and the verdicts they give.

A clause id names the document and the clause: ``virtio-1.2:2.7.7.2`` is
section 2.7.7.2 of the OASIS virtio 1.2 specification (cs01 numbering),
``vhost-user:Ring states`` a section or message of QEMU's
``docs/interop/vhost-user.rst``.  A suffix after ``#`` tells apart several
checks drawn from one clause.

A check belongs to one kind of target (``transport``): ``"vhost-user"``
checks take a :class:`~iovirt.conformance.target.Context` (a back-end
behind a socket), ``"pci"`` checks a
:class:`~iovirt.conformance.platform_target.PciContext` (a device behind
the in-process virtio-pci transport).  A check is a function of its context.  It
passes by returning (optionally a note for the report), fails by raising :class:`CheckFailed` (usually through
:func:`expect`), and is not applicable when its ``applies`` predicate gives a
reason or when it raises :class:`NotApplicable` (a feature the back-end does
not offer is never a failure).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol, TypeVar

from iovirt.errors import IovirtError

if TYPE_CHECKING:
    from iovirt.conformance.target import Capabilities


class Verdict(str, enum.Enum):
    """The outcome of one check."""

    PASS = "pass"
    FAIL = "fail"
    NA = "n/a"


class CheckFailed(IovirtError):
    """The back-end broke the clause; the message says what was seen and what was expected."""


class NotApplicable(IovirtError):
    """The clause does not apply to this back-end (a feature it does not offer, ...)."""


Applies = Callable[["Capabilities"], "str | None"]
"""Returns why a check does not apply to a back-end, or ``None`` when it does."""


class CheckContext(Protocol):
    """What the runner needs of one check's context, whichever the transport."""

    opened: bool
    """Whether the check got as far as a working connection (or machine)."""

    def close(self) -> None:
        """Release what the check opened."""


CheckContextT = TypeVar("CheckContextT", bound=CheckContext)


@dataclass(frozen=True)
class Check:
    """One check: the clause it comes from, what it verifies, and for which devices."""

    clause: str
    title: str
    devices: frozenset[str]
    func: Callable[[Any], "str | None"]
    """Takes the context of its ``transport``'s target (the registry holds checks of every transport)."""
    applies: Applies | None = None
    transport: str = "vhost-user"

    def other_device(self, device: str) -> str | None:
        """Why this check does not apply to a ``device`` back-end at all (``None``: it is one of its devices)."""
        if device not in self.devices:
            return f"only for {'/'.join(sorted(self.devices))} devices"
        return None

    def not_applicable(self, caps: "Capabilities") -> str | None:
        """Why this check does not apply to ``caps`` (``None``: it applies)."""
        return self.other_device(caps.device) or (self.applies(caps) if self.applies is not None else None)


@dataclass(frozen=True)
class CheckResult:
    """One row of a report."""

    clause: str
    title: str
    verdict: Verdict
    reason: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, str]:
        """The JSON row: clause, title, verdict, reason."""
        return {"clause": self.clause, "title": self.title, "verdict": self.verdict.value, "reason": self.reason}


REGISTRY: list[Check] = []
"""Every check, in the order the modules of :mod:`iovirt.conformance.checks` define them."""

ANY_DEVICE = frozenset({"net", "blk"})
"""The devices with a request the generic checks can drive (:class:`~iovirt.conformance.checks.common.Workload`)."""

PROTOCOL_DEVICES = ANY_DEVICE | {"fs"}
"""The devices checked on the message-level vhost-user rules, which need no request on a device queue.

``fs`` (vhost-user-fs, virtio 1.2 5.11) is checked on these only: the suite has no FUSE driver, so a
check that moves data through a queue does not apply to it.
"""


TRANSPORTS = ("vhost-user", "pci")


def check(
    clause: str,
    title: str,
    *,
    devices: frozenset[str] | set[str] = ANY_DEVICE,
    applies: Applies | None = None,
    transport: str = "vhost-user",
) -> Callable[[Callable[[CheckContextT], "str | None"]], Callable[[CheckContextT], "str | None"]]:
    """Register the decorated function as the check of ``clause`` for targets of ``transport``."""
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")

    def register(func: Callable[[CheckContextT], "str | None"]) -> Callable[[CheckContextT], "str | None"]:
        if any(c.clause == clause and c.transport == transport for c in REGISTRY):
            raise ValueError(f"clause {clause!r} registered twice for {transport}")
        REGISTRY.append(Check(clause, title, frozenset(devices), func, applies, transport))
        return func

    return register


def expect(condition: object, message: str) -> None:
    """Fail the running check with ``message`` unless ``condition`` holds."""
    if not condition:
        raise CheckFailed(message)


def all_checks(transport: str | None = None) -> list[Check]:
    """Every registered check, or those for targets of ``transport`` (importing the check modules registers them)."""
    import iovirt.conformance.checks  # noqa: F401  (registers on import)

    return [c for c in REGISTRY if transport is None or c.transport == transport]
