"""Errors of the real-guest kit: a missing host part, a guest that failed or hung."""

from __future__ import annotations

from iovirt.errors import IovirtError


class GuestKitError(IovirtError):
    """Root of the real-guest kit's errors."""


class HostPartMissing(GuestKitError):
    """A host file the kit needs (kernel, module, busybox, QEMU) is absent.

    ``what`` names the part, ``path`` where it was looked for, ``hint`` the
    Debian package that provides it.
    """

    def __init__(self, what: str, path: str, hint: str) -> None:
        self.what = what
        self.path = path
        self.hint = hint
        super().__init__(f"{what} not found at {path}; expected it from {hint}")


class ModuleDependencyError(GuestKitError):
    """A kernel module's ``depends=`` names a module that is not on disk."""

    def __init__(self, module: str, needed_by: str, modules_dir: str) -> None:
        self.module = module
        self.needed_by = needed_by
        self.modules_dir = modules_dir
        super().__init__(
            f"module {module!r} (needed by {needed_by!r}) has no .ko under {modules_dir}; "
            "expected every dependency named in .modinfo to be installed"
        )


class GuestFailed(GuestKitError):
    """A guest ended, or did not get where it was expected to, in time.

    ``name`` is the guest's name, ``reason`` what went wrong, ``returncode``
    QEMU's exit status (``None`` while it runs), and ``tail`` the last console
    lines (and QEMU's stderr), so that a failing test shows what the guest said.
    """

    def __init__(self, name: str, reason: str, returncode: int | None, tail: str) -> None:
        self.name = name
        self.reason = reason
        self.returncode = returncode
        self.tail = tail
        super().__init__(
            f"guest {name!r}: {reason} (QEMU returncode={returncode})\n--- last console lines ---\n{tail}"
        )


class GuestTimeout(GuestFailed):
    """A guest did not print the awaited marker within the timeout."""
