"""Reading QEMU-style cores (hand-built here) and refusing files that are not guest-memory cores."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess

import pytest

from iovirt.cli import main
from iovirt.inspect.elfcore import CoreFileError, note_bytes, write_core
from iovirt.memory import BumpAllocator, GuestMemory, GuestMemoryError
from iovirt.virtio.driver import DriverQueue

EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
PHDR = struct.Struct("<IIQQQQQQ")
PT_LOAD, PT_NOTE = 1, 4
LOW, HIGH = (0x0, 0x3000), (0x100000, 0x2000)  # two RAM blocks, as QEMU's pc machine below/above a hole


def qemu_style_core(path, blocks, contents, notes=True, loads=True):
    """An ELF64 ET_CORE as QEMU's dump-guest-memory (paging=false) lays it out: notes, then PT_LOADs
    with p_paddr = GPA, p_vaddr 0, and data at unaligned file offsets."""
    note = note_bytes("CORE", 1, bytes(336)) + note_bytes("QEMU", 0, bytes(0x1b8)) if notes else b""
    phdrs = []
    phnum = (1 if notes else 0) + (len(blocks) if loads else 0)
    offset = EHDR.size + PHDR.size * phnum
    if notes:
        phdrs.append(PHDR.pack(PT_NOTE, 0, offset, 0, 0, len(note), len(note), 0))
    offset += len(note) + 8  # deliberately not page aligned
    data = b""
    for gpa, size in blocks if loads else []:
        phdrs.append(PHDR.pack(PT_LOAD, 0, offset + len(data), 0, gpa, size, size, 0))
        data += contents[gpa]
    ident = b"\x7fELF" + bytes([2, 1, 1])
    header = EHDR.pack(ident, 4, 62, 1, 0, EHDR.size, 0, 0, EHDR.size, PHDR.size, phnum, 0, 0, 0)
    path.write_bytes(header + b"".join(phdrs) + note + bytes(8) + data)
    return path


@pytest.fixture
def guest():
    """Guest memory of two blocks with a ring in the high one and two chains in flight."""
    memory = GuestMemory.from_ranges([LOW, HIGH], backing="bytearray")
    queue = DriverQueue(memory, BumpAllocator(HIGH[0], HIGH[1]), 16)
    queue.add_data([b"request"], [512])
    queue.add_data([b"more"])
    queue.publish()
    memory.write(0x10, b"low block")
    yield memory, queue
    memory.close()


def contents(memory):
    return {r.gpa: bytes(r.view) for r in memory.regions}


def test_from_elf_core_maps_every_pt_load(tmp_path, guest):
    memory, _queue = guest
    core = qemu_style_core(tmp_path / "qemu.core", [LOW, HIGH], contents(memory))
    dumped = GuestMemory.from_elf_core(str(core))
    try:
        assert [(r.gpa, r.size) for r in dumped.regions] == [LOW, HIGH]
        assert dumped.read(0x10, 9) == b"low block"
        assert dumped.read(HIGH[0], HIGH[1]) == memory.read(HIGH[0], HIGH[1])
        with pytest.raises(GuestMemoryError):
            dumped.write(0x10, b"x")  # read-only: a post-mortem never changes the dump
    finally:
        dumped.close()


def test_inspect_qemu_core_with_ring_addresses(tmp_path, guest, capsys):
    memory, queue = guest
    core = qemu_style_core(tmp_path / "qemu.core", [LOW, HIGH], contents(memory))
    ring = f"16,{queue.desc_addr:#x},{queue.avail_addr:#x},{queue.used_addr:#x}"
    assert main(["inspect", str(core), "--ring", ring, "--json"]) == 0
    (decoded,) = json.loads(capsys.readouterr().out)["rings"]
    assert (decoded["avail_idx"], decoded["used_idx"], decoded["warnings"]) == (2, 0, [])
    assert [len(c["buffers"]) for c in decoded["in_flight"]] == [2, 1]
    assert main(["inspect", str(core), "--ring", ring]) == 0
    assert "in flight: 2" in capsys.readouterr().out


def test_iovirt_core_passes_readelf(tmp_path, guest):
    memory, _queue = guest
    path = str(tmp_path / "iovirt.core")
    write_core(path, memory, {"rings": []})
    if shutil.which("readelf") is None:
        pytest.skip("binutils' readelf is not installed")
    out = subprocess.run(["readelf", "-l", "-n", path], capture_output=True, text=True, check=True).stdout
    assert out.count("LOAD") == 2 and "NOTE" in out and "IOVIRT" in out
    assert "0x0000000000100000" in out  # the high block's p_paddr


def bad_input(tmp_path, capsys, path, words):
    with pytest.raises(CoreFileError) as info:
        GuestMemory.from_elf_core(str(path))
    assert all(w in str(info.value) for w in words), str(info.value)
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words) and "Traceback" not in err


def test_not_elf(tmp_path, capsys):
    path = tmp_path / "notes.txt"
    path.write_text("this is not a core\n" * 10)
    bad_input(tmp_path, capsys, path, ["not an ELF file"])


def test_empty_file(tmp_path, capsys):
    path = tmp_path / "empty.core"
    path.write_bytes(b"")
    bad_input(tmp_path, capsys, path, ["ELF"])


def test_no_pt_load(tmp_path, guest, capsys):
    memory, _queue = guest
    path = qemu_style_core(tmp_path / "noload.core", [LOW, HIGH], contents(memory), loads=False)
    bad_input(tmp_path, capsys, path, ["no PT_LOAD"])


def test_truncated(tmp_path, guest, capsys):
    memory, _queue = guest
    path = qemu_style_core(tmp_path / "cut.core", [LOW, HIGH], contents(memory))
    path.write_bytes(path.read_bytes()[:-100])
    bad_input(tmp_path, capsys, path, ["truncated", "ends at"])


def test_truncated_headers(tmp_path, guest, capsys):
    memory, _queue = guest
    path = qemu_style_core(tmp_path / "cut.core", [LOW, HIGH], contents(memory))
    path.write_bytes(path.read_bytes()[:EHDR.size + 10])
    with pytest.raises(CoreFileError):
        GuestMemory.from_elf_core(str(path))
    assert main(["inspect", str(path)]) == 2


def test_missing_file(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nothing.core")]) == 2
    assert "cannot open" in capsys.readouterr().err


def test_bad_iovirt_note(tmp_path, guest, capsys):
    memory, _queue = guest
    path = str(tmp_path / "badnote.core")
    write_core(path, memory, {"rings": [{"queue": 0, "size": "big"}]})
    assert main(["inspect", path]) == 2
    assert "'size'" in capsys.readouterr().err
