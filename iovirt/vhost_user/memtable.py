"""The memory table a front-end shares: mapped regions and the VMM's address map.

vhost-user.rst "Memory region description": every region is a
guest-physical range, the VMM's own (user) address of the same memory, and
an fd to map it from.  :class:`GuestMemoryTable` maps the regions given with
SET_MEM_TABLE or ADD_MEM_REG into a :class:`~iovirt.memory.GuestMemory`,
counts ADD_MEM_REG of the same region (QEMU's vhost-user net adds each
region once per queue pair on one connection), and translates the VMM's
addresses, in which ring addresses arrive, to guest-physical ones.

Every region is checked before anything changes: a refused table leaves the
old one in place.  Rings resolve host pointers into the mappings, so a
change runs ``on_change`` (rings re-resolve) before old mappings close.

Which fds are mapped (:class:`SealPolicy`; docs/security.md "Guest memory").
Every fd is checked before ``mmap`` (:func:`~iovirt.memory.check_mappable_fd`:
a regular file, memfd or hugetlbfs file, long enough for offset + size), so
no mapping starts out reaching past its file's end.  A file can still shrink
afterwards: the front-end holds it too, and an access to a page past the new
end raises SIGBUS, which kills the process and every device in it.  A memfd
sealed with ``F_SEAL_SHRINK`` cannot shrink (QEMU's memory-backend-memfd
seals by default) and is accepted silently.  Other fds are accepted with
one warning per connection, or refused when the session requires sealed
memory (``require_sealed_memory``).  Recovering from the SIGBUS instead is
not done: the fault lands inside the Cython data path with the GIL released,
in the middle of a chain, and a Python signal handler runs only after the
faulting instruction returns, which it never does.  Refusing unsealed fds by
default would break ``memory-backend-file`` users, since hugetlbfs and
ordinary files cannot be sealed.  The same policy covers the inflight
region (:mod:`iovirt.vhost_user.inflight`), which the data plane writes too.
"""

from __future__ import annotations

import bisect
import logging
from typing import Callable, Sequence

from iovirt.errors import IovirtError
from iovirt.memory import GuestMemory, GuestMemoryError, MappableFd, MemoryRegion
from iovirt.vhost_user.fds import close_fds
from iovirt.vhost_user.messages import MemRegion

log = logging.getLogger("iovirt.vhost_user")

MAX_MEM_SLOTS = 509  # as libvhost-user and rust-vmm: KVM's slot count less the VMM's own
U64_LIMIT = 1 << 64


class MemoryTableError(IovirtError):
    """A region the back-end will not map (its text says why); nothing changed."""


class SealPolicy:
    """Whether one connection's mapped fds must be sealed against shrinking (see the module docstring)."""

    def __init__(self, label: str, require_sealed: bool) -> None:
        self.label = label
        self.require_sealed = require_sealed
        self._warned = False

    def admit(self, info: MappableFd | None, fd: int, what: str) -> None:
        """Accept a mapping of ``fd`` (``info``: what the check found), warn once, or refuse it.

        Raises :class:`MemoryTableError` for an unsealed fd when sealed memory is required.
        """
        if info is not None and info.shrink_sealed:
            return
        kind = "fd" if info is None else info.kind
        if self.require_sealed:
            raise MemoryTableError(
                f"{what}: fd {fd} ({kind}) is not sealed with F_SEAL_SHRINK and sealed memory is required"
            )
        if not self._warned:
            self._warned = True
            log.warning(
                "%s: %s: fd %d (%s) is not sealed with F_SEAL_SHRINK; if the front-end shrinks it, the next "
                "access kills this process (SIGBUS). Share sealed memfds, or refuse unsealed memory with "
                "--require-sealed-memory (warned once per connection)", self.label, what, fd, kind,
            )


class GuestMemoryTable:
    """The regions of one front-end connection, mapped, and their user addresses.

    ``require_sealed_memory`` refuses regions whose fd is not sealed against
    shrinking (:class:`SealPolicy`); ``seals`` is the policy, for the
    connection's other mappings.
    """

    def __init__(self, label: str, on_change: Callable[[], None], require_sealed_memory: bool = False) -> None:
        self.label = label
        self.seals = SealPolicy(label, require_sealed_memory)
        self.memory = GuestMemory()
        self.on_change = on_change
        self._refs: dict[int, int] = {}  # ADD_MEM_REG count per region, by gpa
        self._user: list[tuple[int, int, int]] = []  # (user_addr, end, gpa), sorted

    # -- changes -----------------------------------------------------------------
    def set_table(self, regions: Sequence[MemRegion], fds: Sequence[int]) -> None:
        """SET_MEM_TABLE: replace every region (fds closed on success; on error, the caller's)."""
        mapped = self._map(regions, fds)
        self._swap(list(self.memory.regions), mapped, regions)
        self._refs = {r.gpa: 1 for r in mapped}
        log.info("%s: memory table of %d regions: %s", self.label, len(mapped),
                 ", ".join(f"[{r.gpa:#x}, +{r.size:#x})" for r in mapped))

    def add(self, region: MemRegion, fds: Sequence[int]) -> None:
        """ADD_MEM_REG: map one more region, or count one more add of a mapped one."""
        same = self._same(region)
        if same is not None:
            close_fds(fds)
            self._refs[same.gpa] += 1
            return
        if len(self.memory.regions) >= MAX_MEM_SLOTS:
            raise MemoryTableError(f"all {MAX_MEM_SLOTS} memory slots are in use")
        mapped = self._map([region], fds)
        self._swap([], mapped, [region])
        self._refs[region.guest_phys_addr] = 1
        log.info("%s: added region [%#x, +%#x)", self.label, region.guest_phys_addr, region.memory_size)

    def remove(self, region: MemRegion, fds: Sequence[int]) -> None:
        """REM_MEM_REG: drop one add of ``region``; unmap it with the last.

        Spec: an fd sent with REM_MEM_REG must be closed unused.
        """
        found = self._same(region)
        if found is None:
            raise MemoryTableError(f"no region [{region.guest_phys_addr:#x}, +{region.memory_size:#x}) mapped")
        close_fds(fds)
        self._refs[found.gpa] -= 1
        if self._refs[found.gpa] == 0:
            del self._refs[found.gpa]
            self._swap([found], [], [])

    def close(self) -> None:
        """Unmap everything."""
        self.memory.close()
        self._refs.clear()
        self._user = []

    # -- the VMM's addresses ----------------------------------------------------------
    def user_to_guest(self, uaddr: int) -> int:
        """The guest-physical address of VMM address ``uaddr`` (ring addresses without an IOMMU)."""
        return self.user_pieces(uaddr, 1)[0][0]

    def user_pieces(self, uaddr: int, size: int) -> list[tuple[int, int]]:
        """Guest-physical ``(gpa, length)`` pieces of VMM range ``[uaddr, uaddr+size)``.

        Raises :class:`MemoryTableError` if part of it is in no region.
        """
        starts = [u for u, _, _ in self._user]
        pieces = []
        while size > 0:
            i = bisect.bisect_right(starts, uaddr) - 1
            if i < 0 or uaddr >= self._user[i][1]:
                raise MemoryTableError(f"user address {uaddr:#x} is in no region of the memory table")
            start, end, gpa = self._user[i]
            n = min(size, end - uaddr)
            pieces.append((gpa + (uaddr - start), n))
            uaddr += n
            size -= n
        return pieces

    # -- helpers ------------------------------------------------------------------------
    def _same(self, region: MemRegion) -> MemoryRegion | None:
        found = self.memory.find_region(region.guest_phys_addr)
        if (
            found is not None
            and found.gpa == region.guest_phys_addr
            and found.size == region.memory_size
            and self._user_addr(found.gpa) == region.userspace_addr
        ):
            return found
        return None

    def _user_addr(self, gpa: int) -> int | None:
        return next((u for u, _, g in self._user if g == gpa), None)

    def _map(self, regions: Sequence[MemRegion], fds: Sequence[int]) -> list[MemoryRegion]:
        """Map every region or none; the fds are closed once all are mapped."""
        mapped: list[MemoryRegion] = []
        try:
            for region, fd in zip(regions, fds):
                if region.memory_size == 0:
                    raise MemoryTableError(f"region at {region.guest_phys_addr:#x} has size 0")
                if (
                    region.guest_phys_addr + region.memory_size > U64_LIMIT
                    or region.userspace_addr + region.memory_size > U64_LIMIT
                ):
                    raise MemoryTableError(f"region at {region.guest_phys_addr:#x} wraps 2^64")
                try:
                    mapped.append(
                        MemoryRegion.from_fd(region.guest_phys_addr, region.memory_size, fd, region.mmap_offset)
                    )
                except GuestMemoryError as exc:
                    raise MemoryTableError(str(exc)) from exc
                self.seals.admit(mapped[-1].fd_info, fd, f"region at {region.guest_phys_addr:#x}")
            spans = sorted(mapped, key=lambda r: r.gpa)
            for a, b in zip(spans, spans[1:]):
                if b.gpa < a.end:
                    raise MemoryTableError(
                        f"regions [{a.gpa:#x}, {a.end:#x}) and [{b.gpa:#x}, {b.end:#x}) overlap"
                    )
        except MemoryTableError:
            for m in mapped:
                m.close()
            raise
        close_fds(fds)  # the mappings keep the memory; the fds are not needed
        return mapped

    def _swap(self, old: list[MemoryRegion], new: list[MemoryRegion], described: Sequence[MemRegion]) -> None:
        """Replace ``old`` by ``new`` (described by ``described``); rings re-resolve before old maps close."""
        for region in old:
            self.memory.remove_region(region.gpa)
        try:
            for region in new:
                self.memory.add_region(region)
        except GuestMemoryError as exc:
            for region in new:
                if self.memory.find_region(region.gpa) is region:
                    self.memory.remove_region(region.gpa)
                region.close()
            for region in old:
                self.memory.add_region(region)
            raise MemoryTableError(str(exc)) from exc
        gone = {r.gpa for r in old}
        self._user = sorted(
            [u for u in self._user if u[2] not in gone]
            + [(d.userspace_addr, d.userspace_addr + d.memory_size, d.guest_phys_addr) for d in described]
        )
        self.on_change()
        for region in old:
            region.close()
