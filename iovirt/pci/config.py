"""A function's configuration space: value, writable and write-1-to-clear masks.

Each byte has a current value, a *writable* mask (bits a config write may
change), a *write-1-to-clear* mask (bits a config write of 1 clears, RW1C in
PCI 3.0 §6.2.3) and a default (the value restored on reset).  This is the
scheme of QEMU's ``hw/pci/pci.c`` (``config``/``wmask``/``w1cmask``), which of
the emulators studied is the only one that gets RW1C right.

Registers whose semantics go beyond masks (BARs, MSI-X Message Control,
SR-IOV Control, virtio-pci's ``pci_cfg`` window) install a :class:`ConfigHook`
on the dwords they occupy: a hooked dword's reads and writes go to the hook,
which may call :meth:`ConfigSpace.default_write` / :meth:`ConfigSpace.get` to
reuse the mask semantics.  Hooks are kept per dword so the access path is one
list index, and since an access is naturally aligned and at most 4 bytes it
never spans two dwords.
"""

from __future__ import annotations

from typing import Protocol

from iovirt.pci.errors import PciConfigAccessError, PciConfigValueError, PciLayoutError
from iovirt.pci.regs import PCI_CFG_SPACE_EXP_SIZE, PCI_CFG_SPACE_SIZE

_LIMIT = (0, 0x100, 0x10000, 0, 0x100000000)


class ConfigHook(Protocol):
    """Intercepts config accesses to the dwords it was installed on.

    ``offset`` is the absolute config-space offset and ``size`` is 1, 2 or 4;
    the access is already checked (aligned, in range, value fits).
    """

    def config_read(self, offset: int, size: int) -> int:
        """Return the value the access reads."""
        ...

    def config_write(self, offset: int, size: int, value: int) -> None:
        """Apply a write (typically ``default_write`` and then react)."""
        ...


class ConfigSpace:
    """256 bytes (conventional PCI) or 4 KiB (PCI Express) of config space.

    Host-side API: :meth:`read` and :meth:`write` are the accesses a CPU makes
    (masks and hooks apply) and raise :class:`PciConfigAccessError` on an
    unaligned, wrongly sized or out-of-range access.  Device-side API:
    :meth:`init` (build time: value, masks and default), :meth:`get` and
    :meth:`set` (raw, no masks, no hooks), :meth:`set_wmask` (registers whose
    writability changes at run time).
    """

    __slots__ = ("size", "_data", "_wmask", "_w1cmask", "_default", "_hooks")

    def __init__(self, size: int = PCI_CFG_SPACE_SIZE) -> None:
        if size not in (PCI_CFG_SPACE_SIZE, PCI_CFG_SPACE_EXP_SIZE):
            raise PciLayoutError(f"config space size {size:#x} is not 0x100 or 0x1000")
        self.size = size
        self._data = bytearray(size)
        self._wmask = bytearray(size)
        self._w1cmask = bytearray(size)
        self._default = bytearray(size)
        self._hooks: list[ConfigHook | None] = [None] * (size // 4)

    # -- host side ---------------------------------------------------------

    def _check(self, offset: int, size: int) -> None:
        if size not in (1, 2, 4):
            reason = "width is not 1, 2 or 4 bytes"
        elif offset < 0 or offset + size > self.size:
            reason = "out of range"
        elif offset & (size - 1):
            reason = "not naturally aligned"
        else:
            return
        raise PciConfigAccessError(offset, size, self.size, reason)

    def read(self, offset: int, size: int) -> int:
        """Read ``size`` bytes at ``offset`` as a CPU config read does."""
        if size not in (1, 2, 4) or offset & (size - 1) or not 0 <= offset <= self.size - size:
            self._check(offset, size)
        hook = self._hooks[offset >> 2]
        if hook is not None:
            return hook.config_read(offset, size)
        return int.from_bytes(self._data[offset : offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        """Write ``value`` (``size`` bytes) at ``offset`` as a CPU config write does."""
        if size not in (1, 2, 4) or offset & (size - 1) or not 0 <= offset <= self.size - size:
            self._check(offset, size)
        if not 0 <= value < _LIMIT[size]:
            raise PciConfigValueError(offset, size, value)
        hook = self._hooks[offset >> 2]
        if hook is not None:
            hook.config_write(offset, size, value)
        else:
            self.default_write(offset, size, value)

    def default_write(self, offset: int, size: int, value: int) -> None:
        """Apply the mask semantics: writable bits take ``value``, W1C bits clear on 1.

        For hooks; the access must already be checked.
        """
        end = offset + size
        old = int.from_bytes(self._data[offset:end], "little")
        wmask = int.from_bytes(self._wmask[offset:end], "little")
        w1c = int.from_bytes(self._w1cmask[offset:end], "little")
        new = ((old & ~wmask) | (value & wmask)) & ~(value & w1c)
        if new != old:
            self._data[offset:end] = new.to_bytes(size, "little")

    # -- device side -------------------------------------------------------

    def _span(self, offset: int, size: int) -> None:
        if size < 1 or offset < 0 or offset + size > self.size:
            raise PciLayoutError(f"{size} byte(s) do not fit in {self.size:#x} bytes", offset)

    def init(self, offset: int, size: int, value: int, wmask: int = 0, w1cmask: int = 0) -> None:
        """Set a register's value, default and masks (build time); ``size`` may be 1-8."""
        self._span(offset, size)
        end = offset + size
        raw = value.to_bytes(size, "little")
        self._data[offset:end] = raw
        self._default[offset:end] = raw
        self._wmask[offset:end] = wmask.to_bytes(size, "little")
        self._w1cmask[offset:end] = w1cmask.to_bytes(size, "little")

    def get(self, offset: int, size: int) -> int:
        """Raw stored value, bypassing hooks."""
        return int.from_bytes(self._data[offset : offset + size], "little")

    def set(self, offset: int, size: int, value: int) -> None:
        """Store a value as the device (not the CPU) changes it: no masks, no hooks."""
        self._data[offset : offset + size] = value.to_bytes(size, "little")

    def set_default(self, offset: int, size: int, value: int) -> None:
        """Change the value a register takes on reset, and its current value."""
        self._span(offset, size)
        raw = value.to_bytes(size, "little")
        self._data[offset : offset + size] = raw
        self._default[offset : offset + size] = raw

    def wmask(self, offset: int, size: int) -> int:
        """The writable mask of a register."""
        return int.from_bytes(self._wmask[offset : offset + size], "little")

    def set_wmask(self, offset: int, size: int, mask: int) -> None:
        """Change which bits of a register the CPU may write (e.g. SR-IOV NumVFs when VFE=1)."""
        self._span(offset, size)
        self._wmask[offset : offset + size] = mask.to_bytes(size, "little")

    def w1cmask(self, offset: int, size: int) -> int:
        """The write-1-to-clear mask of a register."""
        return int.from_bytes(self._w1cmask[offset : offset + size], "little")

    def add_hook(self, offset: int, length: int, hook: ConfigHook) -> None:
        """Route accesses to the dwords ``[offset, offset+length)`` to ``hook``.

        The range must be dword aligned and must not already be hooked.
        """
        self._span(offset, length)
        if offset & 3 or length & 3:
            raise PciLayoutError(f"hook range of {length:#x} bytes is not dword aligned", offset)
        for dword in range(offset >> 2, (offset + length) >> 2):
            if self._hooks[dword] is not None and self._hooks[dword] is not hook:
                raise PciLayoutError("config dword is already hooked", dword << 2)
            self._hooks[dword] = hook

    def reset(self) -> None:
        """Restore every register to its default (hooks' own state is theirs to reset)."""
        self._data[:] = self._default

    def snapshot(self) -> bytes:
        """The raw stored bytes (hooks not consulted)."""
        return bytes(self._data)
