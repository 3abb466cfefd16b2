"""ELF cores of guest memory: read with pyelftools, written with ``struct``.

QEMU's QMP ``dump-guest-memory`` with ``paging=false`` writes an ELF64 core
(``ET_CORE``) with one ``PT_LOAD`` per guest RAM block whose ``p_paddr`` is
the block's guest-physical address, plus ``PT_NOTE`` segments of CPU state.
``iovirt dump`` writes the same shape from a back-end's memory table, and a
``PT_NOTE`` holding one note named ``IOVIRT`` whose descriptor is JSON
describing the device's rings (:data:`NT_IOVIRT_RINGS`).

Both are read here: each ``PT_LOAD`` becomes a read-only
:class:`~iovirt.memory.MemoryRegion` mapped from the file at the segment's
offset.  A core file is untrusted input: a file that is not ELF, has no
``PT_LOAD``, or whose segments reach past the end of the file (a mapping
past the end of a file faults with SIGBUS on first access) is refused with
:class:`CoreFileError`.  ELF layout: the System V gABI, "ELF Header",
"Program Header" and "Note Section".
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Sequence

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from iovirt.errors import IovirtError
from iovirt.memory import GuestMemory, GuestMemoryError, MemoryRegion

# gABI constants, named as the gABI names them.
ELFCLASS64 = 2
ELFDATA2LSB = 1
EV_CURRENT = 1
ET_CORE = 4
EM_X86_64 = 62
PT_LOAD = 1
PT_NOTE = 4
PF_R = 4
PF_W = 2

IOVIRT_NOTE_NAME = "IOVIRT"
NT_IOVIRT_RINGS = 0x52494E47  # "RING": not a type pyelftools decodes for core files
SEGMENT_ALIGN = 4096  # data at page-aligned offsets, so each PT_LOAD can be mmapped

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_NHDR = struct.Struct("<III")


class CoreFileError(IovirtError):
    """A core file that cannot be read as guest memory; the text says why. ``path`` is the file."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass
class ElfCore:
    """A core file read: its guest memory and the rings its ``IOVIRT`` note describes (if any)."""

    path: str
    memory: GuestMemory
    iovirt_note: dict[str, Any] | None = None
    note_names: list[str] = field(default_factory=list)


def read_core(path: str) -> ElfCore:
    """Map every ``PT_LOAD`` of the ELF core at ``path`` read-only; parse an ``IOVIRT`` note.

    Raises :class:`CoreFileError` for a file that is not ELF, has no
    ``PT_LOAD`` with data, has segments beyond the end of the file or
    overlapping ones, or an ``IOVIRT`` note that is not a JSON object.
    """
    try:
        stream: BinaryIO = open(path, "rb")
    except OSError as exc:
        raise CoreFileError(path, f"cannot open: {exc.strerror}") from exc
    with stream:
        file_size = os.fstat(stream.fileno()).st_size
        try:
            elf = ELFFile(stream)
            segments = [(seg["p_type"], seg) for seg in elf.iter_segments()]
        except (ELFError, struct.error, ValueError) as exc:
            raise CoreFileError(path, f"not an ELF file ({exc})") from exc
        except Exception as exc:  # construct's errors for headers cut short
            raise CoreFileError(path, f"not a readable ELF file ({type(exc).__name__}: {exc})") from exc
        loads = [seg for kind, seg in segments if kind == "PT_LOAD" and seg["p_filesz"] > 0]
        if not loads:
            raise CoreFileError(path, "no PT_LOAD segment with data: not a guest-memory dump")
        for seg in loads + [seg for kind, seg in segments if kind == "PT_NOTE"]:
            end = seg["p_offset"] + seg["p_filesz"]
            if end > file_size:
                raise CoreFileError(
                    path,
                    f"truncated: the segment at file offset {seg['p_offset']:#x} size {seg['p_filesz']:#x} "
                    f"ends at {end:#x}, the file has {file_size:#x} bytes",
                )
        note, names = _iovirt_note(path, [seg for kind, seg in segments if kind == "PT_NOTE"])
        memory = GuestMemory()
        try:
            for seg in loads:
                memory.add_region(
                    MemoryRegion.from_fd(seg["p_paddr"], seg["p_filesz"], stream.fileno(), seg["p_offset"],
                                         readonly=True)
                )
        except GuestMemoryError as exc:
            memory.close()
            raise CoreFileError(path, f"PT_LOAD segments cannot be mapped as guest memory: {exc}") from exc
    return ElfCore(path, memory, note, names)


def _iovirt_note(path: str, notes: Sequence[Any]) -> tuple[dict[str, Any] | None, list[str]]:
    found: dict[str, Any] | None = None
    names: list[str] = []
    for seg in notes:
        try:
            entries = list(seg.iter_notes())
        except Exception as exc:  # pyelftools decodes some core notes; a broken one is not ours to fix
            raise CoreFileError(path, f"PT_NOTE at {seg['p_offset']:#x} cannot be parsed: {exc}") from exc
        for note in entries:
            names.append(str(note["n_name"]))
            if note["n_name"] != IOVIRT_NOTE_NAME:
                continue
            try:
                value = json.loads(bytes(note["n_descdata"]).rstrip(b"\0"))
            except (UnicodeDecodeError, ValueError) as exc:
                raise CoreFileError(path, f"the IOVIRT note is not JSON: {exc}") from exc
            if not isinstance(value, dict):
                raise CoreFileError(path, "the IOVIRT note is not a JSON object")
            found = value
    return found, names


def _pad4(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def note_bytes(name: str, note_type: int, desc: bytes) -> bytes:
    """One ELF note: namesz, descsz, type, then name (NUL-terminated) and desc, each padded to 4."""
    raw_name = name.encode() + b"\0"
    return _NHDR.pack(len(raw_name), len(desc), note_type) + _pad4(raw_name) + _pad4(desc)


def write_core(
    path: str, memory: GuestMemory, note: dict[str, Any], overlays: Sequence[tuple[int, bytes]] = ()
) -> None:
    """Write ``memory``'s regions as an ELF64 core: a ``PT_NOTE`` with ``note`` as JSON, a ``PT_LOAD`` per region.

    ``overlays`` ``(gpa, bytes)`` are written over the memory's contents
    (each within one region): snapshots taken earlier, e.g. of the rings
    the note describes, while memory went on changing.

    ``p_paddr`` of each ``PT_LOAD`` is the region's guest-physical address
    (``p_vaddr`` 0, as QEMU's ``dump-guest-memory`` without paging).  The
    file is written to ``path + ".tmp"`` and renamed, so a reader never
    sees half a core.
    """
    regions = memory.regions
    notes = note_bytes(IOVIRT_NOTE_NAME, NT_IOVIRT_RINGS, json.dumps(note, sort_keys=True).encode())
    phnum = 1 + len(regions)
    note_offset = _EHDR.size + phnum * _PHDR.size
    offset = note_offset + len(notes)
    phdrs = [_PHDR.pack(PT_NOTE, 0, note_offset, 0, 0, len(notes), len(notes), 4)]
    placed = []
    for region in regions:
        offset += -offset % SEGMENT_ALIGN
        phdrs.append(_PHDR.pack(PT_LOAD, PF_R | PF_W, offset, 0, region.gpa, region.size, region.size, SEGMENT_ALIGN))
        placed.append((offset, region))
        offset += region.size
    ident = b"\x7fELF" + bytes([ELFCLASS64, ELFDATA2LSB, EV_CURRENT])
    header = _EHDR.pack(ident, ET_CORE, EM_X86_64, EV_CURRENT, 0, _EHDR.size, 0, 0,
                        _EHDR.size, _PHDR.size, phnum, 0, 0, 0)
    tmp = path + ".tmp"
    with open(tmp, "wb") as out:
        out.write(header + b"".join(phdrs) + notes)
        for seg_offset, region in placed:
            out.seek(seg_offset)
            out.write(region.view)
        for gpa, data in overlays:
            seg_offset, region = next((o, r) for o, r in placed if r.gpa <= gpa and gpa + len(data) <= r.end)
            out.seek(seg_offset + gpa - region.gpa)
            out.write(data)
    os.rename(tmp, path)
