"""The ELF layout (Linux): the model goes before PyInstaller's `pydata` section.

PyInstaller 6 stores its archive as the `pydata` section near the end of an ELF stub, followed
by the section header table; inserting bytes before it and shifting `e_shoff` and the later
sections' `sh_offset` keeps the ELF valid. No loaded segment may reach past the insertion point.
"""

from __future__ import annotations

import struct

from qpack.builder.layout import StubLayout
from qpack.runtime.errors import QpackError


def plan_elf(stub: bytes, stub_name: str) -> StubLayout:
    ei_class, ei_data = stub[4], stub[5]
    if ei_class not in (1, 2) or ei_data not in (1, 2):
        raise QpackError(f"{stub_name}: unknown ELF class {ei_class} / data encoding {ei_data}")
    is64 = ei_class == 2
    end = "<" if ei_data == 1 else ">"
    word = "Q" if is64 else "I"
    ehdr = struct.Struct(f"{end}16sHHI{word}{word}{word}IHHHHHH")
    (_, _, _, _, _, phoff, shoff, _, _, phentsize, phnum, shentsize, shnum, shstrndx) = (
        ehdr.unpack_from(stub, 0)
    )
    shoff_field = 0x28 if is64 else 0x20
    # Shdr: name, type, flags, addr, offset, size, link, info, addralign, entsize
    shdr = struct.Struct(f"{end}II{word}{word}{word}{word}II{word}{word}")
    sh_offset_field = 24 if is64 else 16
    if shoff == 0 or shnum == 0 or shentsize != shdr.size or shoff + shnum * shdr.size > len(stub):
        raise QpackError(f"{stub_name}: ELF section header table is missing or cut short")
    sections = [shdr.unpack_from(stub, shoff + i * shdr.size) for i in range(shnum)]
    if shstrndx >= shnum:
        raise QpackError(f"{stub_name}: ELF section name table index {shstrndx} is out of range")
    strtab_off, strtab_size = sections[shstrndx][4], sections[shstrndx][5]
    strtab = stub[strtab_off : strtab_off + strtab_size]

    def section_name(sh) -> bytes:
        start = sh[0]
        return strtab[start : strtab.find(b"\0", start)]

    pydata = [sh for sh in sections if section_name(sh) == b"pydata"]
    if not pydata:
        return StubLayout(
            "append",
            len(stub),
            warning=(
                f"{stub_name}: ELF without a `pydata` section (not a PyInstaller 6 one-file "
                "stub?): the model is appended, so every start reads the whole model"
            ),
        )
    insert_at = pydata[0][4]
    # Nothing that is loaded into memory may lie after the insertion point.
    phdr = struct.Struct(f"{end}IIQQQQQQ" if is64 else f"{end}IIIIIIII")
    for i in range(phnum):
        fields = phdr.unpack_from(stub, phoff + i * phentsize)
        p_offset, p_filesz = (fields[2], fields[5]) if is64 else (fields[1], fields[4])
        if p_filesz and p_offset + p_filesz > insert_at:
            raise QpackError(
                f"{stub_name}: an ELF segment (offset {p_offset}, {p_filesz} bytes) reaches past "
                f"the pydata section at byte {insert_at}; cannot insert the model there"
            )
    limit = 0xFFFFFFFFFFFFFFFF if is64 else 0xFFFFFFFF

    if shoff < insert_at < shoff + shnum * shdr.size:
        raise QpackError(f"{stub_name}: the ELF section header table straddles the pydata section")

    def edits(shift: int) -> list[tuple[int, bytes]]:
        if shoff + shift > limit:
            raise QpackError(f"{stub_name}: a 32-bit ELF cannot hold a model this large")
        offset = struct.Struct(f"{end}{word}")
        fields = [(shoff_field, offset.pack(shoff + shift))] if shoff >= insert_at else []
        for i, sh in enumerate(sections):
            if sh[4] >= insert_at and sh[1] != 8:  # SHT_NOBITS occupies no file bytes
                fields.append((shoff + i * shdr.size + sh_offset_field, offset.pack(sh[4] + shift)))
        return fields

    return StubLayout("elf", insert_at, edits)
