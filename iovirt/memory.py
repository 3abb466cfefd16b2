"""Guest memory: regions of guest-physical address space and bounds-checked access.

A :class:`GuestMemory` is a set of non-overlapping :class:`MemoryRegion`\\ s,
each a guest-physical range backed by a buffer: an ``mmap`` of a file
descriptor at an offset (the way vhost-user hands memory over in
``VHOST_USER_SET_MEM_TABLE``), an anonymous ``mmap``, or a ``bytearray`` for
tests.  Every access is checked against the regions; an access to an address
that no region backs raises :class:`UnmappedAddressError` with the address.

In front of the regions sits a *translator* (identity by default).  An IOMMU
is slotted in with :meth:`GuestMemory.with_translator`, which returns a view
of the same regions whose addresses are IOVAs: the ring code takes either and
does not know which it has (rust-vmm ``vm-memory``'s ``IommuMemory`` seam).

Guest memory is untrusted input: nothing here trusts an address or a length
that came from a guest, including lengths that would wrap 2^64.  Nor an fd
to map: :func:`check_mappable_fd` runs before every ``mmap`` of a file
descriptor that came from outside (a mapping that reaches past the end of its
file faults with SIGBUS on first access, which kills the whole process).
"""

from __future__ import annotations

import array
import bisect
import enum
import fcntl
import mmap
import os
import stat
import struct
from dataclasses import dataclass
from typing import Iterable, Protocol, Sequence

from iovirt.errors import IovirtError

U64_MAX = (1 << 64) - 1
OFF_T_LIMIT = 1 << 63  # off_t and mmap lengths are signed 64-bit: offsets and sizes stay below

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class Access(enum.IntFlag):
    """The kind of access a translation is asked for (VT-d R/W permissions)."""

    READ = 1
    WRITE = 2


class GuestMemoryError(IovirtError):
    """An access to guest memory that the memory map does not allow.

    Attributes: ``addr`` and ``length`` of the access.
    """

    def __init__(self, message: str, addr: int, length: int) -> None:
        super().__init__(message)
        self.addr = addr
        self.length = length


class UnmappedAddressError(GuestMemoryError):
    """The range is not (entirely) backed by a memory region."""

    def __init__(self, addr: int, length: int, first_missing: int | None = None) -> None:
        missing = addr if first_missing is None else first_missing
        super().__init__(
            f"guest range [{addr:#x}, +{length:#x}) is not backed by guest memory "
            f"(no region at {missing:#x})",
            addr,
            length,
        )
        self.first_missing = missing


class AddressWrapError(GuestMemoryError):
    """The range ``addr + length`` wraps past 2^64."""

    def __init__(self, addr: int, length: int) -> None:
        super().__init__(
            f"guest range [{addr:#x}, +{length:#x}) wraps past 2^64", addr, length
        )


class RegionLayoutError(GuestMemoryError):
    """A region cannot be added: zero size, overlap, or a backing too small."""


class TranslationFault(GuestMemoryError):
    """A translator (IOMMU) refused to translate an address.

    Raised by translators; ``access`` is the :class:`Access` asked for and
    ``reason`` a short spec-named reason (e.g. ``"not-present"``).
    """

    def __init__(self, addr: int, length: int, access: Access, reason: str) -> None:
        super().__init__(
            f"translation of [{addr:#x}, +{length:#x}) for {access.name} failed: {reason}",
            addr,
            length,
        )
        self.access = access
        self.reason = reason


class TranslationPending(TranslationFault):
    """The translation is not known yet and has been asked for (a device-IOTLB miss).

    Not a fault of the driver: whoever asked must retry once the mapping
    arrives (vhost-user IOTLB: the back-end sent a MISS and waits for the
    front-end's UPDATE).  The ring code leaves the chain available and stops.
    """

    def __init__(self, addr: int, length: int, access: Access) -> None:
        super().__init__(addr, length, access, "translation pending (IOTLB miss sent)")


class Translator(Protocol):
    """Translates an address range into guest-physical pieces.

    ``translate`` returns ``[(gpa, length), ...]`` covering ``length`` bytes
    in order, or raises :class:`TranslationFault`.
    """

    def translate(self, addr: int, length: int, access: Access) -> list[tuple[int, int]]:
        """Translate ``[addr, addr+length)`` for ``access``."""
        ...


class UnmappableFdError(IovirtError):
    """An fd that cannot be mapped safely for the range asked; the text says why."""


@dataclass(frozen=True)
class MappableFd:
    """What :func:`check_mappable_fd` found out about an fd it accepted.

    ``shrink_sealed``: the fd carries ``F_SEAL_SHRINK`` (memfd_create(2)), so
    it can never become shorter than ``file_size`` and a mapping checked
    against it can never fault.  Any other file can be truncated by whoever
    else holds it, after the check.
    """

    kind: str  # "memfd" or "file"
    file_size: int
    shrink_sealed: bool


def check_mappable_fd(fd: int, offset: int, size: int) -> MappableFd:
    """Check that ``size`` bytes of ``fd`` at ``offset`` can be mapped and touched.

    Only regular files qualify (memfds and hugetlbfs files are regular
    files): a shared mapping of a character device such as ``/dev/zero`` is
    only as long as the mapping itself, so a page at a non-zero offset lies
    past its end, and other types cannot be mapped at all.  The range must
    be below 2^63 and lie within the file's current size.  Raises
    :class:`UnmappableFdError`.
    """
    if not 0 < size < OFF_T_LIMIT or not 0 <= offset < OFF_T_LIMIT:
        raise UnmappableFdError(f"offset {offset:#x} size {size:#x} is beyond what mmap can map (2^63)")
    # Seals first: a seal never goes away, so a size read after it is a lower
    # bound for ever; read before it, the file could shrink in between.
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        seals = 0  # not a memfd or shmem file: nothing can be sealed
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise UnmappableFdError(f"fd {fd} cannot be examined: {exc}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise UnmappableFdError(f"fd {fd} is {_fd_type(fd, st.st_mode)}, not a regular file, memfd or hugetlbfs file")
    if offset + size > st.st_size:
        raise UnmappableFdError(
            f"fd is {st.st_size} bytes, the region needs offset+size {offset:#x}+{size:#x} = {offset + size}"
        )
    kind = "memfd" if _fd_target(fd).startswith("/memfd:") else "file"
    return MappableFd(kind, st.st_size, bool(seals & fcntl.F_SEAL_SHRINK))


def _fd_target(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


def _fd_type(fd: int, mode: int) -> str:
    """A readable name of a non-regular file's type, with what it points to."""
    for test, name in (
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a pipe"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a directory"),
    ):
        if test(mode):
            return f"{name} ({_fd_target(fd)})"
    return f"a special file ({_fd_target(fd)})"


class MemoryRegion:
    """One guest-physical range and the buffer that backs it."""

    def __init__(
        self,
        gpa: int,
        size: int,
        backing: mmap.mmap | bytearray,
        offset: int = 0,
        readonly: bool = False,
    ) -> None:
        if size <= 0:
            raise RegionLayoutError(f"region at {gpa:#x} has size {size}", gpa, size)
        if gpa < 0 or gpa + size - 1 > U64_MAX:
            raise AddressWrapError(gpa, size)
        if offset < 0 or offset + size > len(backing):
            raise RegionLayoutError(
                f"region at {gpa:#x} size {size:#x} needs backing bytes "
                f"[{offset:#x}, {offset + size:#x}) but the backing has {len(backing):#x}",
                gpa,
                size,
            )
        self.gpa = gpa
        self.size = size
        self.end = gpa + size  # exclusive
        self.readonly = readonly
        self.fd_info: MappableFd | None = None  # what the mapped fd was, for from_fd regions
        self._backing = backing
        self._owns_backing = False
        view = memoryview(backing)
        self.view = view[offset : offset + size]
        self._base_view = view

    @classmethod
    def from_fd(
        cls,
        gpa: int,
        size: int,
        fd: int,
        mmap_offset: int = 0,
        readonly: bool = False,
    ) -> "MemoryRegion":
        """Map ``size`` bytes of ``fd`` at ``mmap_offset`` (vhost-user memory regions).

        The fd is checked first (:func:`check_mappable_fd`); ``fd_info`` of
        the region says what it was.  The mmap offset must be page aligned
        for ``mmap``; an unaligned ``mmap_offset`` is mapped from the page
        below and sliced.
        """
        page = mmap.ALLOCATIONGRANULARITY
        aligned = mmap_offset - (mmap_offset % page)
        skew = mmap_offset - aligned
        prot = mmap.PROT_READ | (0 if readonly else mmap.PROT_WRITE)
        try:
            info = check_mappable_fd(fd, mmap_offset, size)
            mm = mmap.mmap(fd, size + skew, flags=mmap.MAP_SHARED, prot=prot, offset=aligned)
        except (UnmappableFdError, OSError, ValueError, OverflowError) as exc:
            raise RegionLayoutError(
                f"cannot mmap fd {fd} for region at {gpa:#x} size {size:#x} "
                f"offset {mmap_offset:#x}: {exc}",
                gpa,
                size,
            ) from exc
        region = cls(gpa, size, mm, skew, readonly=readonly)
        region._owns_backing = True
        region.fd_info = info
        return region

    @classmethod
    def anonymous(cls, gpa: int, size: int) -> "MemoryRegion":
        """A region backed by a fresh anonymous shared mmap."""
        mm = mmap.mmap(-1, size, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        region = cls(gpa, size, mm)
        region._owns_backing = True
        return region

    @classmethod
    def memfd(cls, gpa: int, size: int, name: str = "iovirt-guest") -> tuple["MemoryRegion", int]:
        """A region backed by a new memfd; returns the region and the fd (caller closes).

        The memfd is sealed against resizing, as QEMU's memory-backend-memfd
        seals guest RAM by default (``seal=on``), so a back-end can map it
        knowing it will never shrink.
        """
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            return cls.from_fd(gpa, size, fd), fd
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        """Release the views and unmap the backing if this region created it.

        Raises ``BufferError`` if a caller still holds a view into it.
        """
        self.view.release()
        self._base_view.release()
        if self._owns_backing:
            self._backing.close()  # type: ignore[union-attr]

    def __repr__(self) -> str:
        return f"MemoryRegion(gpa={self.gpa:#x}, size={self.size:#x})"


class RegionTable:
    """The sorted, non-overlapping regions shared by every view of one memory.

    ``generation`` increases on every change, so that code that resolved
    addresses to host buffers (the ring fast path) knows to resolve again.
    It lives in a one-element ``uint64`` buffer, :attr:`generation_cell`,
    that C code keeps a pointer into: the rings read it on every pop and
    push, where a Python attribute read cost a fifth of the ring's time.
    """

    def __init__(self) -> None:
        self.regions: list[MemoryRegion] = []
        self._starts: list[int] = []
        self.generation_cell = array.array("Q", [0])
        """The generation, for C readers (never resized: they hold a pointer into it)."""

    @property
    def generation(self) -> int:
        """Increases whenever a region is added or removed."""
        return self.generation_cell[0]

    def add(self, region: MemoryRegion) -> None:
        i = bisect.bisect_left(self._starts, region.gpa)
        prev = self.regions[i - 1] if i > 0 else None
        nxt = self.regions[i] if i < len(self.regions) else None
        for other in (prev, nxt):
            if other is not None and region.gpa < other.end and other.gpa < region.end:
                raise RegionLayoutError(
                    f"region [{region.gpa:#x}, {region.end:#x}) overlaps "
                    f"[{other.gpa:#x}, {other.end:#x})",
                    region.gpa,
                    region.size,
                )
        self.regions.insert(i, region)
        self._starts.insert(i, region.gpa)
        self.generation_cell[0] += 1

    def remove(self, gpa: int, size: int | None = None) -> MemoryRegion:
        i = bisect.bisect_left(self._starts, gpa)
        if i == len(self._starts) or self._starts[i] != gpa or (
            size is not None and self.regions[i].size != size
        ):
            raise RegionLayoutError(f"no region starts at {gpa:#x}", gpa, size or 0)
        region = self.regions.pop(i)
        del self._starts[i]
        self.generation_cell[0] += 1
        return region

    def find(self, addr: int) -> MemoryRegion | None:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0:
            region = self.regions[i]
            if addr < region.end:
                return region
        return None


class GuestMemory:
    """Bounds-checked access to guest memory, with an optional translator in front.

    Build one with :meth:`from_ranges` (tests) or by adding regions from a
    VMM's memory table.  Reads and writes may span adjacent regions;
    :meth:`view` returns a zero-copy ``memoryview`` and needs the range to lie
    in one region, :meth:`views` returns one per region the range crosses.
    """

    def __init__(
        self,
        regions: Iterable[MemoryRegion] = (),
        translator: Translator | None = None,
        _table: RegionTable | None = None,
    ) -> None:
        self._table = _table if _table is not None else RegionTable()
        for region in regions:
            self._table.add(region)
        self._translator = translator

    @classmethod
    def from_ranges(
        cls, ranges: Sequence[tuple[int, int]], backing: str = "mmap"
    ) -> "GuestMemory":
        """Memory with one region per ``(gpa, size)``, anonymous mmap or bytearray backed."""
        regions = []
        for gpa, size in ranges:
            if backing == "mmap":
                regions.append(MemoryRegion.anonymous(gpa, size))
            else:
                regions.append(MemoryRegion(gpa, size, bytearray(size)))
        return cls(regions)

    @classmethod
    def from_elf_core(cls, path: str) -> "GuestMemory":
        """Guest memory from an ELF core: QEMU's ``dump-guest-memory`` (``paging=false``) or ``iovirt dump``.

        Each ``PT_LOAD`` becomes a read-only region at its ``p_paddr``,
        mapped from the file.  Raises
        :class:`~iovirt.inspect.elfcore.CoreFileError` for a file that is
        not ELF, has no ``PT_LOAD`` or is truncated (:mod:`iovirt.inspect.elfcore`).
        """
        from iovirt.inspect.elfcore import read_core  # it builds on this module

        return read_core(path).memory

    def with_translator(self, translator: Translator | None) -> "GuestMemory":
        """The same regions seen through ``translator`` (e.g. one device's IOVA space)."""
        return GuestMemory(translator=translator, _table=self._table)

    @property
    def translator(self) -> Translator | None:
        """The translator in front of the regions (``None``: addresses are guest-physical).

        Fixed for this view's lifetime (:meth:`with_translator` makes another
        view): code that resolved addresses once, such as the rings' host
        pointers, checks only the region table's generation.
        """
        return self._translator

    # -- the region map (for VMM-side owners) ----------------------------
    @property
    def regions(self) -> tuple[MemoryRegion, ...]:
        """The regions, sorted by guest-physical address."""
        return tuple(self._table.regions)

    @property
    def generation(self) -> int:
        """Increases whenever a region is added or removed."""
        return self._table.generation

    @property
    def region_table(self) -> RegionTable:
        """The region table every view of this memory shares.

        For hot paths that resolve addresses themselves: keep a pointer into
        its ``generation_cell`` and compare it to notice map changes.
        """
        return self._table

    def add_region(self, region: MemoryRegion) -> None:
        """Add a region; it must not overlap an existing one."""
        self._table.add(region)

    def remove_region(self, gpa: int, size: int | None = None) -> MemoryRegion:
        """Remove and return the region starting at ``gpa`` (the caller closes it)."""
        return self._table.remove(gpa, size)

    def find_region(self, gpa: int) -> MemoryRegion | None:
        """The region holding guest-physical ``gpa``, or ``None``."""
        return self._table.find(gpa)

    def close(self) -> None:
        """Remove and close every region."""
        for region in list(self._table.regions):
            self._table.remove(region.gpa)
            region.close()

    # -- translation -------------------------------------------------------
    def translate(self, addr: int, length: int, access: Access = Access.READ) -> list[tuple[int, int]]:
        """Guest-physical pieces covering ``[addr, addr+length)``, checked against the regions."""
        if addr < 0 or length < 0 or addr + length - 1 > U64_MAX:
            raise AddressWrapError(addr, length)
        pieces = [(addr, length)] if self._translator is None else self._translator.translate(addr, length, access)
        out: list[tuple[int, int]] = []
        for gpa, plen in pieces:
            for piece in self._phys_pieces(gpa, plen, addr, length):
                # A translator splits at page boundaries; pages that are
                # contiguous in the same region are one piece again.
                if out and out[-1][0] + out[-1][1] == piece[0] and self._table.find(out[-1][0]) is self._table.find(piece[0]):
                    out[-1] = (out[-1][0], out[-1][1] + piece[1])
                else:
                    out.append(piece)
        return out

    def _phys_pieces(self, gpa: int, length: int, orig: int, orig_len: int) -> list[tuple[int, int]]:
        """Split a guest-physical range at region boundaries; every byte must be backed."""
        out = []
        while length > 0:
            region = self._table.find(gpa)
            if region is None:
                raise UnmappedAddressError(orig, orig_len, gpa)
            n = min(length, region.end - gpa)
            out.append((gpa, n))
            gpa += n
            length -= n
        return out

    def check_range(self, addr: int, length: int, access: Access = Access.READ) -> None:
        """Raise unless every byte of ``[addr, addr+length)`` is accessible."""
        self.translate(addr, length, access)

    # -- byte access -----------------------------------------------------------
    def _region_view(self, gpa: int, length: int) -> memoryview:
        region = self._table.find(gpa)
        assert region is not None  # translate() checked it
        start = gpa - region.gpa
        return region.view[start : start + length]

    def read(self, addr: int, length: int) -> bytes:
        """Copy ``length`` bytes out of guest memory."""
        pieces = self.translate(addr, length, Access.READ)
        if len(pieces) == 1:
            return bytes(self._region_view(*pieces[0]))
        return b"".join(bytes(self._region_view(g, n)) for g, n in pieces)

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` into guest memory at ``addr``."""
        src = memoryview(data).cast("B")
        pos = 0
        for gpa, n in self.translate(addr, len(src), Access.WRITE):
            region = self._table.find(gpa)
            if region is not None and region.readonly:
                raise GuestMemoryError(f"region at {region.gpa:#x} is read-only", addr, len(src))
            self._region_view(gpa, n)[:] = src[pos : pos + n]
            pos += n

    def fill(self, addr: int, length: int, byte: int = 0) -> None:
        """Set ``length`` bytes at ``addr`` to ``byte``."""
        self.write(addr, bytes([byte]) * length)

    def view(self, addr: int, length: int, access: Access = Access.READ) -> memoryview:
        """A zero-copy view of ``[addr, addr+length)``; the range must lie in one region.

        The caller must release the view before the region is removed.
        """
        pieces = self.translate(addr, length, access)
        if len(pieces) != 1:
            raise GuestMemoryError(
                f"guest range [{addr:#x}, +{length:#x}) is not contiguous in one region",
                addr,
                length,
            )
        return self._region_view(*pieces[0]) if pieces else memoryview(b"")

    def views(self, addr: int, length: int, access: Access = Access.READ) -> list[memoryview]:
        """Zero-copy views covering ``[addr, addr+length)`` in order: a scatter list.

        One view per piece that is contiguous in one region: the range is
        split where it crosses from one region into the next (adjacent
        regions, e.g. hot-plugged DIMMs or ADD_MEM_REG slots) and, with a
        translator, where its pages are not contiguous in guest-physical
        space.  Every byte must be backed, as for :meth:`view`; a
        ``WRITE`` access to a read-only region raises.  The caller must
        release the views before a region is removed.
        """
        pieces = self.translate(addr, length, access)
        if access & Access.WRITE:
            for gpa, _n in pieces:
                region = self._table.find(gpa)
                if region is not None and region.readonly:
                    raise GuestMemoryError(f"region at {region.gpa:#x} is read-only", addr, length)
        return [self._region_view(gpa, n) for gpa, n in pieces]

    def read_u16(self, addr: int) -> int:
        """Little-endian u16 at ``addr`` (virtio fields are little-endian)."""
        return _U16.unpack(self.read(addr, 2))[0]

    def read_u32(self, addr: int) -> int:
        """Little-endian u32 at ``addr``."""
        return _U32.unpack(self.read(addr, 4))[0]

    def read_u64(self, addr: int) -> int:
        """Little-endian u64 at ``addr``."""
        return _U64.unpack(self.read(addr, 8))[0]

    def write_u16(self, addr: int, value: int) -> None:
        """Store a little-endian u16."""
        self.write(addr, _U16.pack(value & 0xFFFF))

    def write_u32(self, addr: int, value: int) -> None:
        """Store a little-endian u32."""
        self.write(addr, _U32.pack(value & 0xFFFFFFFF))

    def write_u64(self, addr: int, value: int) -> None:
        """Store a little-endian u64."""
        self.write(addr, _U64.pack(value & U64_MAX))


class BumpAllocator:
    """Hands out aligned guest-physical ranges from ``[base, base+size)``.

    A test and driver-side utility (a VMM's or a guest driver's allocator
    stand-in); it never frees.
    """

    def __init__(self, base: int, size: int) -> None:
        self.base = base
        self.end = base + size
        self.next = base

    def alloc(self, size: int, align: int = 16) -> int:
        """Return the address of ``size`` fresh bytes aligned to ``align``."""
        addr = (self.next + align - 1) & ~(align - 1)
        if addr + size > self.end:
            raise GuestMemoryError(
                f"allocator [{self.base:#x}, {self.end:#x}) exhausted by a {size:#x}-byte request",
                addr,
                size,
            )
        self.next = addr + size
        return addr
