"""Run checks against a target, one fresh connection (or machine) each, surviving a broken back-end.

Every wait inside a check is bounded by the target's timeout.  Whatever a
check raises becomes its verdict: :class:`~.registry.CheckFailed` and any
front-end error (no reply, closed socket, NACK, malformed reply) a fail with
the reason, :class:`~.registry.NotApplicable` an n/a.  Then the next check
reconnects.  When the socket is gone, or the back-end cannot even be
negotiated with in two checks in a row, the remaining checks fail at once
with that reason instead of each waiting out its timeout.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable, Iterable

from iovirt.conformance.registry import Check, CheckContext, CheckFailed, CheckResult, NotApplicable, Verdict, all_checks
from iovirt.conformance.target import Capabilities, Target
from iovirt.errors import IovirtError

if TYPE_CHECKING:
    from iovirt.conformance.platform_target import PlatformTarget

log = logging.getLogger("iovirt.conformance")

Progress = Callable[[int, int, Check, CheckResult], None]
"""Called after each check with (number done, total, check, result)."""

DEAD_AFTER = 2  # consecutive checks that could not open a connection


class Runner:
    """Runs checks against one target."""

    def __init__(self, target: Target | PlatformTarget, checks: Iterable[Check] | None = None) -> None:
        self.target = target
        self.checks = list(all_checks(target.transport) if checks is None else checks)
        self.caps: Capabilities | None = None
        self.dead: str | None = None
        self._setup_failures = 0

    def start(self) -> None:
        """Probe the back-end once; a back-end that cannot be probed fails every check."""
        try:
            self.caps = self.target.probe()
        except (IovirtError, OSError) as exc:
            self.dead = f"back-end unusable: {_describe(exc)}"
            self.caps = Capabilities(self.target.device)

    def run(self, progress: Progress | None = None) -> list[CheckResult]:
        """Run every check; returns one result per check, in order."""
        if self.caps is None:
            self.start()
        results = []
        for i, check in enumerate(self.checks):
            result = self.run_one(check)
            results.append(result)
            if progress is not None:
                progress(i + 1, len(self.checks), check, result)
        return results

    def run_one(self, check: Check) -> CheckResult:
        """Run one check on a fresh context."""
        if self.caps is None:
            self.start()
        assert self.caps is not None
        # A dead back-end fails what would have run; a check of another device type stays n/a whatever happened.
        reason = check.not_applicable(self.caps) if self.dead is None else check.other_device(self.caps.device)
        if reason is not None:
            return CheckResult(check.clause, check.title, Verdict.NA, reason)
        if self.dead is not None:
            return CheckResult(check.clause, check.title, Verdict.FAIL, self.dead)
        ctx = self.target.context(self.caps)
        started = time.monotonic()
        verdict, reason = Verdict.PASS, ""
        try:
            reason = check.func(ctx) or ""  # a passing check may leave a note
        except NotApplicable as exc:
            verdict, reason = Verdict.NA, str(exc)
        except CheckFailed as exc:
            verdict, reason = Verdict.FAIL, str(exc)
        except (IovirtError, OSError) as exc:
            verdict, reason = Verdict.FAIL, _describe(exc)
            self._note_setup_failure(ctx, exc)
        except Exception as exc:  # a check tripping over nonsense must not end the run
            log.exception("%s: unexpected error", check.clause)
            verdict, reason = Verdict.FAIL, f"unexpected error: {_describe(exc)}"
        finally:
            opened = ctx.opened
            try:
                ctx.close()
            except OSError as exc:
                log.warning("%s: closing its links: %s", check.clause, exc)
        if opened:
            self._setup_failures = 0
        return CheckResult(check.clause, check.title, verdict, reason, time.monotonic() - started)

    def _note_setup_failure(self, ctx: CheckContext, exc: BaseException) -> None:
        if isinstance(exc, (FileNotFoundError, ConnectionRefusedError)):
            self.dead = f"socket gone: {_describe(exc)}"
            return
        if ctx.opened:
            return
        self._setup_failures += 1
        if self._setup_failures >= DEAD_AFTER:
            self.dead = f"back-end unusable ({DEAD_AFTER} checks in a row could not set up a connection): {_describe(exc)}"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, (ConnectionResetError, BrokenPipeError)):
        return f"back-end closed the connection ({type(exc).__name__})"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
