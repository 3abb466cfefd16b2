"""Kernel modules for the guest: find them, read their ``.modinfo``, order them.

A module's dependencies are the comma-separated ``depends=`` entry of its
``.modinfo`` ELF section (what ``modinfo``/``depmod`` read), so the load
order is derived from the modules themselves and follows a different kernel
build. Debian ships them as plain ``.ko``; ``.ko.xz`` and ``.ko.gz`` (other
distributions, newer kernels) are decompressed in Python, since busybox's
``insmod`` in the guest takes only an uncompressed module.
"""

from __future__ import annotations

import gzip
import io
import lzma
from dataclasses import dataclass
from pathlib import Path

from elftools.elf.elffile import ELFFile

from iovirt.guest.errors import GuestKitError, ModuleDependencyError

#: The modules a guest needs for virtio-net and virtio-blk over virtio-pci,
#: in load order (each after the modules it uses); :func:`resolve` adds anything their
#: ``depends=`` name. intel-iommu is built into Debian's kernel
#: (``CONFIG_INTEL_IOMMU=y``), so the vIOMMU guest needs nothing more.
VIRTIO_MODULES: tuple[str, ...] = (
    "virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci",
    "failover", "net_failover", "virtio_net", "virtio_blk",
)

#: What a guest adds for virtio-vsock (virtio 1.2 section 5.10): AF_VSOCK and its virtio transport.
VSOCK_MODULES: tuple[str, ...] = ("vsock", "vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport")

_SUFFIXES = (".ko", ".ko.xz", ".ko.gz")


@dataclass(frozen=True)
class KernelModule:
    """One module: its name (``_`` form), its file, its decompressed bytes and dependencies."""

    name: str
    path: Path
    data: bytes
    depends: tuple[str, ...]


def _canonical(name: str) -> str:
    # The kernel treats '-' and '_' in module names alike; files use both.
    return name.replace("-", "_")


def _module_name(path: Path) -> str:
    for suffix in _SUFFIXES:
        if path.name.endswith(suffix):
            return _canonical(path.name[: -len(suffix)])
    raise ValueError(path)


def index_modules(modules_dir: Path) -> dict[str, Path]:
    """Map every module name under ``modules_dir/kernel`` to its file."""
    index: dict[str, Path] = {}
    for suffix in _SUFFIXES:
        for path in (modules_dir / "kernel").rglob(f"*{suffix}"):
            index.setdefault(_module_name(path), path)
    return index


def read_module(path: Path) -> bytes:
    """Return the module's ELF bytes, decompressing ``.xz``/``.gz`` files."""
    raw = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(raw)
    if path.name.endswith(".gz"):
        return gzip.decompress(raw)
    return raw


def modinfo(data: bytes) -> dict[str, list[str]]:
    """Parse a module's ``.modinfo`` section: NUL-separated ``key=value`` strings.

    Keys such as ``alias`` repeat, so each key maps to a list of values.
    """
    section = ELFFile(io.BytesIO(data)).get_section_by_name(".modinfo")
    if section is None:
        raise GuestKitError("kernel module has no .modinfo section; expected an ELF .ko file")
    info: dict[str, list[str]] = {}
    for entry in section.data().split(b"\0"):
        if b"=" in entry:
            key, value = entry.decode("utf-8", "replace").split("=", 1)
            info.setdefault(key, []).append(value)
    return info


def load_module(name: str, index: dict[str, Path]) -> KernelModule:
    """Read module ``name`` from ``index`` and parse its dependencies."""
    data = read_module(index[name])
    depends = modinfo(data).get("depends", [""])[0]
    return KernelModule(name=name, path=index[name], data=data,
                        depends=tuple(_canonical(d) for d in depends.split(",") if d))


def resolve(names: tuple[str, ...] | list[str], modules_dir: Path) -> list[KernelModule]:
    """Return ``names`` and every module they depend on, each after its dependencies.

    The order of ``names`` is kept wherever the dependencies allow it.
    Raises :class:`ModuleDependencyError` for a module (asked for or
    depended on) that has no file under ``modules_dir``.
    """
    index = index_modules(modules_dir)
    loaded: dict[str, KernelModule] = {}
    order: list[KernelModule] = []
    visiting: set[str] = set()

    def visit(name: str, needed_by: str) -> None:
        if name in loaded:
            return
        if name not in index:
            raise ModuleDependencyError(name, needed_by, str(modules_dir))
        if name in visiting:  # a cycle cannot load; modprobe refuses it too
            raise GuestKitError(f"module dependency cycle through {name!r}; expected an acyclic depends= graph")
        visiting.add(name)
        module = load_module(name, index)
        for dep in module.depends:
            visit(dep, name)
        visiting.discard(name)
        loaded[name] = module
        order.append(module)

    for name in names:
        visit(_canonical(name), "the caller")
    return order
