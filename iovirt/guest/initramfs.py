"""Build the guest's initramfs from the host's kernel modules and busybox, cached.

The base image holds busybox, the virtio modules (dependencies resolved
from their ``.modinfo``), ``/init`` and its helpers. It depends only on the
kernel, busybox, the module list and the init script, so it is built once
and cached under :func:`cache_dir`, keyed by a hash of all of those. A
guest's own script goes into a small second archive appended to the base
(:func:`script_overlay`): the kernel unpacks concatenated archives in turn.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
from pathlib import Path

from iovirt.guest import init_script
from iovirt.guest.cpio import CpioWriter
from iovirt.guest.errors import HostPartMissing
from iovirt.guest.kernel import GuestKernel
from iovirt.guest.modules import VIRTIO_MODULES, resolve

BUSYBOX = Path("/bin/busybox")

# Bumped when the layout below changes in a way the hash inputs do not show.
_FORMAT = b"iovirt-initramfs-1"

_DIRS = ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "mnt", "root",
         "lib", "lib/modules", "iovirt")


def cache_dir() -> Path:
    """Where built images are kept: ``$IOVIRT_CACHE_DIR`` or ``$XDG_CACHE_HOME/iovirt/guest``."""
    if os.environ.get("IOVIRT_CACHE_DIR"):
        return Path(os.environ["IOVIRT_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "iovirt" / "guest"


def file_identity(path: Path) -> bytes:
    """``path`` with its size and mtime, which change whenever a package upgrade replaces the file."""
    st = path.stat()
    return f"{path}:{st.st_size}:{st.st_mtime_ns}".encode()


def cache_key(kernel: GuestKernel, modules: tuple[str, ...], compress: bool,
              busybox: Path = BUSYBOX) -> str:
    """The hash naming a base image: kernel version and files, busybox, modules, init script."""
    h = hashlib.sha256(_FORMAT)
    for part in (kernel.version.encode(), file_identity(kernel.vmlinuz), file_identity(busybox),
                 ",".join(modules).encode(), init_script.INIT.encode(), init_script.LIB.encode(),
                 b"gzip" if compress else b"raw"):
        h.update(len(part).to_bytes(4, "little") + part)
    return h.hexdigest()[:16]


def build_base(kernel: GuestKernel, modules: tuple[str, ...] = VIRTIO_MODULES,
               busybox: Path = BUSYBOX) -> bytes:
    """Return the uncompressed base archive (no caching)."""
    if not busybox.is_file():
        raise HostPartMissing("static busybox", str(busybox), "Debian package busybox-static")
    cpio = CpioWriter()
    for d in _DIRS:
        cpio.directory(d)
    # The kernel opens /dev/console for /init's stdio before /init can
    # mount devtmpfs, so the node must be in the archive.
    cpio.char_device("dev/console", 5, 1)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    order = resolve(modules, kernel.modules_dir)
    for module in order:
        cpio.file(f"lib/modules/{module.name}.ko", module.data)
    cpio.file("iovirt/modules", "".join(f"{m.name}\n" for m in order).encode())
    cpio.file("iovirt/lib.sh", init_script.LIB.encode())
    cpio.file("init", init_script.INIT.encode(), 0o755)
    return cpio.finish()


def base_image(kernel: GuestKernel, modules: tuple[str, ...] = VIRTIO_MODULES,
               compress: bool = False) -> Path:
    """Return the path of the cached base image, building it on a cache miss.

    Uncompressed is the default: it boots as fast as the gzipped image
    (about 5 s either way under TCG, measured) and skips gzip at build time.
    """
    path = cache_dir() / f"initramfs-{kernel.version}-{cache_key(kernel, modules, compress)}.cpio"
    if compress:
        path = path.with_name(path.name + ".gz")
    if path.exists():
        return path
    data = build_base(kernel, modules)
    if compress:
        data = gzip.compress(data, compresslevel=6, mtime=0)
    write_cached(path, data)
    return path


def write_cached(path: Path, data: bytes) -> None:
    """Write ``data`` to cache file ``path`` (its folder made if need be) through a temporary file and a rename,
    so concurrent guests never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def script_overlay(script: str | None, files: dict[str, bytes] | None = None) -> bytes:
    """Return an archive holding ``/iovirt/script.sh`` and any extra ``files`` (path -> bytes).

    Extra files' parent directories must already exist in the base image
    (``/iovirt``, ``/root``, ``/tmp``, ...).
    """
    cpio = CpioWriter()
    if script is not None:
        cpio.file("iovirt/script.sh", script.encode(), 0o755)
    for name, data in (files or {}).items():
        cpio.file(name, data, 0o755)
    return cpio.finish()


def guest_initrd(dest: Path, kernel: GuestKernel, script: str | None,
                 files: dict[str, bytes] | None = None, modules: tuple[str, ...] = VIRTIO_MODULES,
                 compress: bool = False) -> Path:
    """Write ``dest``: the cached base image followed by the script overlay. Returns ``dest``."""
    base = base_image(kernel, modules, compress).read_bytes()
    with open(dest, "wb") as out:
        out.write(base)
        # The kernel (init/initramfs.c, unpack_to_rootfs) takes a following
        # uncompressed archive only at a 4-byte aligned offset and skips NUL
        # padding; a gzip stream's length is arbitrary.
        out.write(b"\0" * (-len(base) % 4))
        out.write(script_overlay(script, files))
    return dest
