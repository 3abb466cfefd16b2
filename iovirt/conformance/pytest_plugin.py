"""pytest plugin: ``pytest --iovirt-socket=PATH --iovirt-device=net|blk`` turns every check into a test.

``pytest --iovirt-in-process=net|blk`` does the same for the virtio-pci checks
against iovirt's device behind the in-process platform.

Each check becomes one item named after its clause; a failing check fails
its item with the reason, a check that does not apply is skipped with the
reason.  The back-end is probed once per session.  Register through the
``pytest11`` entry point ``iovirt_conformance = iovirt.conformance.pytest_plugin``
or with ``-p iovirt.conformance.pytest_plugin``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from iovirt.conformance.platform_target import PlatformTarget
from iovirt.conformance.registry import Check, Verdict, all_checks
from iovirt.conformance.runner import Runner
from iovirt.conformance.target import DEVICES, Target

if TYPE_CHECKING:
    from _pytest._code.code import TerminalRepr, TracebackStyle  # the types of pytest.Item.repr_failure


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--iovirt-socket``, ``--iovirt-device``, ``--iovirt-peer-socket``, ``--iovirt-timeout``."""
    group = parser.getgroup("iovirt", "iovirt conformance suite")
    group.addoption("--iovirt-socket", metavar="PATH", help="check the vhost-user back-end listening here")
    group.addoption("--iovirt-device", choices=DEVICES, help="its device type")
    group.addoption("--iovirt-peer-socket", metavar="PATH", help="net: another port of the same network")
    group.addoption("--iovirt-timeout", type=float, default=5.0, metavar="S", help="bound on every wait")
    group.addoption(
        "--iovirt-in-process", choices=("net", "blk"), help="check iovirt's device of this type behind the in-process virtio-pci platform"
    )


class ConformanceFailure(Exception):
    """A check failed; the message is its reason."""


class ConformanceItem(pytest.Item):
    """One conformance check as a pytest item."""

    def __init__(self, *, check: Check, runner: Runner, **kwargs) -> None:
        super().__init__(**kwargs)
        self.check = check
        self.runner = runner

    def runtest(self) -> None:
        """Run the check; fail or skip with its reason."""
        result = self.runner.run_one(self.check)
        if result.verdict is Verdict.NA:
            pytest.skip(result.reason)
        if result.verdict is Verdict.FAIL:
            raise ConformanceFailure(result.reason)

    def repr_failure(
        self, excinfo: pytest.ExceptionInfo[BaseException], style: TracebackStyle | None = None
    ) -> str | TerminalRepr:
        """Just the clause and the reason, not a traceback into the suite."""
        if isinstance(excinfo.value, ConformanceFailure):
            return f"{self.check.clause}: {excinfo.value}"
        return super().repr_failure(excinfo)

    def reportinfo(self):
        """Shown by ``-v``: the clause and what it checks."""
        return self.path, None, f"{self.check.clause} - {self.check.title}"


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    """Append one item per check when ``--iovirt-socket`` or ``--iovirt-in-process`` is given."""
    socket = config.getoption("--iovirt-socket")
    in_process = config.getoption("--iovirt-in-process")
    target: Target | PlatformTarget
    if in_process:
        if socket:
            raise pytest.UsageError("--iovirt-in-process and --iovirt-socket exclude each other")
        target = PlatformTarget(in_process, config.getoption("--iovirt-timeout"))
    elif not socket:
        return
    else:
        device = config.getoption("--iovirt-device")
        if device is None:
            raise pytest.UsageError("--iovirt-socket needs --iovirt-device net|blk")
        target = Target(socket, device, config.getoption("--iovirt-timeout"), config.getoption("--iovirt-peer-socket"))
    runner = Runner(target)
    for check in all_checks(target.transport):
        items.append(ConformanceItem.from_parent(session, name=check.clause, check=check, runner=runner))
