"""Mach-O stubs: room for the model before PyInstaller's archive, and a fresh ad-hoc signature.

A PyInstaller one-file stub for macOS is a thin Mach-O whose last segment, __LINKEDIT, ends with
the string table (stretched by PyInstaller to take in the appended PKG archive) and then the
code signature (`codesign -s -`). qpack writes

    [image ... symbol strings][code signature][zip local header + padding][model.gguf]
    [.args][qpack.json][PKG archive][zip central directory + end records]

The string table shrinks back to the symbol strings; the new ad-hoc signature follows them and
hashes [0, signature) — the bootloader image only; the model, the members and the archive lie
in __LINKEDIT after it, which is stretched to the end of the file. Why there:
- the bootloader scans the file backwards from its end for the archive's cookie on every start
  (pyi_utils_find_magic_pattern): here it reads the zip directory and then finds the cookie,
  neither the model nor the signature;
- unzip and the runtime find the zip's end record at the very end of the file;
- the kernel and dyld are content: the signature lies within the file and within __LINKEDIT,
  every executable page lies below the code limit (xnu mach_loader.c load_code_signature and
  load_segment), and pages past the code limit are simply unsigned data, as the signature's
  own pages always are. A signature that hashed the model instead would make the kernel
  SHA-256 every model page as it is first mapped, and put ~8 MiB per GiB (4 KiB pages) of
  hashes in front of the archive for the bootloader to read through.
- `codesign --verify --strict` passes: __LINKEDIT ends at the end of the file (Security's
  MachO::validateStructure) and the code limit is the signature's offset
  (SingleDiskRep::strictValidate). What the signature does not cover is the payload; qpack's
  own `--verify` checks the model's CRC-32 and SHA-256.
dyld checks __LINKEDIT's contents with 32-bit sizes (MachOLayout.cpp), so past 4 GiB __LINKEDIT
ends with the signature and the payload trails it (the kernel ignores data after the last
segment; not tried on a Mac), and `codesign --verify` then needs `--no-strict`. Re-signing with an identity (`codesign -s NAME`) is refused by
codesign_allocate for this layout ("link edit information does not fill the __LINKEDIT
segment").
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from qpack.builder.fileio import read_at, write_at
from qpack.runtime.errors import QpackError

MH_MAGIC_64 = 0xFEEDFACF
FAT_MAGICS = (b"\xca\xfe\xba\xbe", b"\xca\xfe\xba\xbf")
MAGICS = (b"\xcf\xfa\xed\xfe", b"\xce\xfa\xed\xfe", *FAT_MAGICS)  # 64-bit, 32-bit, universal
MH_EXECUTE = 2
CPU_ARCH = {0x01000007: "x86_64", 0x0100000C: "arm64"}
# Hash page size (log2) as codesign chooses it (machorep.cpp pageSize), and the VM page
# __LINKEDIT's vmsize is rounded to (as PyInstaller's osx.fix_exe_for_code_signing does).
PAGE_SHIFT = {"x86_64": 12, "arm64": 14}
VM_PAGE = {"x86_64": 0x1000, "arm64": 0x4000}

LC_SYMTAB, LC_DYSYMTAB, LC_SEGMENT_64, LC_CODE_SIGNATURE = 0x2, 0xB, 0x19, 0x1D
LC_DYLD_INFO, LC_DYLD_INFO_ONLY = 0x22, 0x80000022
# linkedit_data_command users: split info, function starts, data in code, dylib code-sign
# DRs, linker optimization hints, exports trie, chained fixups, atom info.
LINKEDIT_DATA = {0x1E, 0x26, 0x29, 0x2B, 0x2E, 0x80000033, 0x80000034, 0x36}

HEADER = struct.Struct("<IiiIIIII")
LOAD_COMMAND = struct.Struct("<II")
SEGMENT_64 = struct.Struct("<II16sQQQQiiII")
SYMTAB = struct.Struct("<IIIIII")
LINKEDIT_DATA_COMMAND = struct.Struct("<IIII")

# PyInstaller's CArchive cookie (bootloader pyi_archive.h ARCHIVE_COOKIE, big-endian).
PKG_MAGIC = b"MEI\014\013\012\013\016"
PKG_COOKIE = struct.Struct("!8sIIII64s")

# Code signature blobs (xnu osfmk/kern/cs_blobs.h), big-endian.
CSMAGIC_EMBEDDED_SIGNATURE = 0xFADE0CC0
CSMAGIC_CODEDIRECTORY = 0xFADE0C02
CSMAGIC_REQUIREMENTS = 0xFADE0C01
CSMAGIC_BLOBWRAPPER = 0xFADE0B01
CSSLOT_CODEDIRECTORY, CSSLOT_REQUIREMENTS, CSSLOT_SIGNATURESLOT = 0, 2, 0x10000
CS_ADHOC = 0x2
CS_EXECSEG_MAIN_BINARY = 0x1
CS_HASHTYPE_SHA256 = 2
CS_VERSION = 0x20400  # up to the exec segment fields
SUPERBLOB = struct.Struct(">III")
BLOB_INDEX = struct.Struct(">II")
# magic, length, version, flags, hashOffset, identOffset, nSpecialSlots, nCodeSlots, codeLimit,
# hashSize, hashType, platform, pageSize, spare2, scatterOffset, teamOffset, spare3,
# codeLimit64, execSegBase, execSegLimit, execSegFlags
CODE_DIRECTORY = struct.Struct(">IIIIIIIIIBBBBIIIIQQQQ")
EMPTY_REQUIREMENTS = struct.pack(">III", CSMAGIC_REQUIREMENTS, 12, 0)
EMPTY_CMS = struct.pack(">II", CSMAGIC_BLOBWRAPPER, 8)
N_SPECIAL_SLOTS = 2  # -1 Info.plist (none: zeros), -2 requirements
HASH_SIZE = 32
# The offsets dyld and the kernel read are 32-bit in places (LC_SYMTAB, LC_CODE_SIGNATURE,
# dyld's linkedit checks): __LINKEDIT stretches to the end of the file only below this.
LINKEDIT_LIMIT = 1 << 32


@dataclass
class MachOStub:
    """Where things are in a PyInstaller one-file Mach-O stub, and what the output changes."""

    arch: str
    identifier: bytes  # the signing identifier, kept from the stub's signature
    pkg_start: int  # the PKG archive: [pkg_start, pkg_end) of the stub
    pkg_end: int
    signature_at: int  # of the new signature, in the output (= in the stub: nothing moves)
    signature_size: int
    text_end: int  # __TEXT's file end: execSegLimit
    linkedit_cmd: int  # offsets of the load commands to rewrite
    linkedit_fileoff: int
    symtab_cmd: int
    stroff: int
    signature_cmd: int

    @property
    def reserve(self) -> int:
        """Bytes between the kept image (which ends at pkg_start) and the zip's first header."""
        return self.signature_at + self.signature_size - self.pkg_start

    def finish(self, fd: int, size: int) -> str | None:
        """Rewrite the load commands for an output of `size` bytes and write its signature
        (the image before the signature is read back: a few hundred KiB). Returns a warning
        when the output is too large for __LINKEDIT to reach its end."""
        warning = None
        linkedit_end = size
        if size >= LINKEDIT_LIMIT:
            linkedit_end = self.signature_at + self.signature_size
            warning = (
                "the executable passes 4 GiB, past what dyld's 32-bit __LINKEDIT checks reach: "
                "the model trails __LINKEDIT instead (the kernel ignores data after the last "
                "segment), and `codesign --verify` needs --no-strict"
            )
        filesize = linkedit_end - self.linkedit_fileoff
        vmsize = -(-filesize // VM_PAGE[self.arch]) * VM_PAGE[self.arch]
        write_at(
            fd, struct.pack("<QQQ", vmsize, self.linkedit_fileoff, filesize), self.linkedit_cmd + 32
        )
        write_at(fd, struct.pack("<I", self.pkg_start - self.stroff), self.symtab_cmd + 20)
        write_at(
            fd, struct.pack("<II", self.signature_at, self.signature_size), self.signature_cmd + 8
        )
        image = read_at(fd, self.signature_at, 0)
        if len(image) != self.signature_at:
            raise QpackError("the output was cut short while it was signed")
        signature = code_signature(image, self.identifier, PAGE_SHIFT[self.arch], self.text_end)
        assert len(signature) <= self.signature_size
        write_at(fd, signature, self.signature_at)
        return warning


def signature_size(code_limit: int, identifier: bytes, page_shift: int) -> int:
    """Bytes of the SuperBlob `code_signature` writes, rounded up to 16."""
    n_pages = -(-code_limit // (1 << page_shift))
    cd = CODE_DIRECTORY.size + len(identifier) + 1 + (N_SPECIAL_SLOTS + n_pages) * HASH_SIZE
    total = SUPERBLOB.size + 3 * BLOB_INDEX.size + cd + len(EMPTY_REQUIREMENTS) + len(EMPTY_CMS)
    return -(-total // 16) * 16


def code_signature(image: bytes, identifier: bytes, page_shift: int, text_end: int) -> bytes:
    """An ad-hoc signature of `image` (the file up to the signature), laid out as `codesign -s -`
    writes one for a plain executable: a SHA-256 CodeDirectory, empty requirements, an empty
    CMS wrapper; padded with zeros to `signature_size`."""
    page = 1 << page_shift
    hashes = b"".join(
        hashlib.sha256(image[at : at + page]).digest() for at in range(0, len(image), page)
    )
    n_pages = len(hashes) // HASH_SIZE
    special = hashlib.sha256(EMPTY_REQUIREMENTS).digest() + bytes(HASH_SIZE)  # slots -2, -1
    ident_at = CODE_DIRECTORY.size
    hash_at = ident_at + len(identifier) + 1 + len(special)
    cd_len = hash_at + len(hashes)
    cd = (
        CODE_DIRECTORY.pack(
            CSMAGIC_CODEDIRECTORY,
            cd_len,
            CS_VERSION,
            CS_ADHOC,
            hash_at,
            ident_at,
            N_SPECIAL_SLOTS,
            n_pages,
            len(image),
            HASH_SIZE,
            CS_HASHTYPE_SHA256,
            0,  # platform: not a platform binary
            page_shift,
            0,
            0,  # no scatter
            0,  # no team
            0,
            0,  # codeLimit64: only past 4 GiB
            0,  # execSegBase: __TEXT starts the file
            text_end,
            CS_EXECSEG_MAIN_BINARY,
        )
        + identifier
        + b"\0"
        + special
        + hashes
    )
    blobs = [
        (CSSLOT_CODEDIRECTORY, cd),
        (CSSLOT_REQUIREMENTS, EMPTY_REQUIREMENTS),
        (CSSLOT_SIGNATURESLOT, EMPTY_CMS),
    ]
    at = SUPERBLOB.size + len(blobs) * BLOB_INDEX.size
    index, body = b"", b""
    for slot, blob in blobs:
        index += BLOB_INDEX.pack(slot, at + len(body))
        body += blob
    length = at + len(body)
    out = SUPERBLOB.pack(CSMAGIC_EMBEDDED_SIGNATURE, length, len(blobs)) + index + body
    return out + bytes(signature_size(len(image), identifier, page_shift) - len(out))


def plan_macho(stub: bytes, stub_name: str) -> MachOStub:
    """Read a PyInstaller one-file Mach-O stub; QpackError (naming the fix) for anything else."""
    if stub[:4] in FAT_MAGICS:
        raise QpackError(
            f"{stub_name} is a universal (fat) Mach-O; qpack writes a thin executable for one "
            "architecture: build the stub for that one (PyInstaller's default target_arch, or "
            "`lipo STUB -thin arm64 -output STUB.arm64` when that slice is the last one)"
        )

    def bad(problem: str) -> QpackError:
        return QpackError(
            f"{stub_name}: {problem}; not a PyInstaller one-file macOS stub as qpack expects: "
            "rebuild it (qpack build --rebuild-stub)"
        )

    if len(stub) < HEADER.size:
        raise bad("too short for a Mach-O header")
    magic, cputype, _, filetype, ncmds, sizeofcmds, _, _ = HEADER.unpack_from(stub, 0)
    if magic != MH_MAGIC_64 or cputype not in CPU_ARCH:
        raise bad("not a 64-bit x86_64 or arm64 Mach-O")
    if filetype != MH_EXECUTE:
        raise bad(f"Mach-O file type {filetype}, not an executable")
    if HEADER.size + sizeofcmds > len(stub):
        raise bad("load commands run past the end of the file")
    arch = CPU_ARCH[cputype]

    text = linkedit = symtab = signature = None
    segments_end = 0
    ranges: list[tuple[str, int, int]] = []  # linkedit contents other than the strings
    at = HEADER.size
    for _ in range(ncmds):
        if at + LOAD_COMMAND.size > HEADER.size + sizeofcmds:
            raise bad("load commands run past sizeofcmds")
        cmd, size = LOAD_COMMAND.unpack_from(stub, at)
        if size < LOAD_COMMAND.size or at + size > HEADER.size + sizeofcmds:
            raise bad(f"load command {cmd:#x} at byte {at} has size {size}")
        if cmd == LC_SEGMENT_64:
            _, _, name, _, _, fileoff, filesize, *_ = SEGMENT_64.unpack_from(stub, at)
            name = name.rstrip(b"\0")
            if name == b"__TEXT":
                text = (fileoff, filesize)
            elif name == b"__LINKEDIT":
                if linkedit is not None:
                    raise bad("two __LINKEDIT segments")
                linkedit = (at, fileoff, filesize)
            elif filesize:
                segments_end = max(segments_end, fileoff + filesize)
        elif cmd == LC_SYMTAB:
            _, _, symoff, nsyms, stroff, strsize = SYMTAB.unpack_from(stub, at)
            symtab = (at, stroff, strsize)
            ranges.append(("symbol table", symoff, nsyms * 16))
        elif cmd == LC_CODE_SIGNATURE:
            signature = LINKEDIT_DATA_COMMAND.unpack_from(stub, at)[2:] + (at,)
        elif cmd in LINKEDIT_DATA:
            _, _, off, n = LINKEDIT_DATA_COMMAND.unpack_from(stub, at)
            ranges.append((f"load command {cmd:#x}", off, n))
        elif cmd in (LC_DYLD_INFO, LC_DYLD_INFO_ONLY):
            fields = struct.unpack_from("<10I", stub, at + 8)
            ranges += [("dyld info", fields[i], fields[i + 1]) for i in range(0, 10, 2)]
        elif cmd == LC_DYSYMTAB:
            f = struct.unpack_from("<18I", stub, at + 8)
            # toc, module table, external refs, indirect symbols, external/local relocations
            for off, n, entry in (
                (6, 7, 8),
                (8, 9, 56),
                (10, 11, 4),
                (12, 13, 4),
                (14, 15, 8),
                (16, 17, 8),
            ):
                ranges.append(("dynamic symbol table", f[off], f[n] * entry))
        at += size

    if text is None or linkedit is None or symtab is None:
        raise bad("no __TEXT, __LINKEDIT or LC_SYMTAB")
    if signature is None:
        raise bad("no code signature (PyInstaller signs its macOS stubs ad hoc)")
    linkedit_cmd, linkedit_fileoff, linkedit_filesize = linkedit
    sig_off, sig_size, signature_cmd = signature
    if linkedit_fileoff < segments_end or linkedit_fileoff + linkedit_filesize != len(stub):
        raise bad("__LINKEDIT is not the last segment, ending the file")
    if not linkedit_fileoff <= sig_off <= sig_off + sig_size <= len(stub):
        raise bad(f"the code signature (byte {sig_off}, {sig_size} bytes) lies outside __LINKEDIT")
    identifier = _signature_identifier(stub, stub_name, sig_off, sig_size, bad)

    cookie_at = stub.rfind(PKG_MAGIC, linkedit_fileoff, sig_off)
    if cookie_at < 0 or cookie_at + PKG_COOKIE.size > sig_off:
        raise bad("no PyInstaller archive before the code signature")
    pkg_length = PKG_COOKIE.unpack_from(stub, cookie_at)[1]
    pkg_end = cookie_at + PKG_COOKIE.size
    pkg_start = pkg_end - pkg_length
    _, stroff, _ = symtab
    if pkg_start < max(stroff, linkedit_fileoff):
        raise bad(f"the PyInstaller archive (byte {pkg_start}) starts before the symbol strings")
    if any(stub[pkg_end:sig_off]):
        raise bad("there are data between the PyInstaller archive and the code signature")
    for what, off, n in ranges:
        if n and off + n > pkg_start:
            raise bad(f"the {what} (byte {off}, {n} bytes) reaches into the PyInstaller archive")

    signature_at = -(-pkg_start // 16) * 16  # codesign_allocate's alignment
    return MachOStub(
        arch=arch,
        identifier=identifier,
        pkg_start=pkg_start,
        pkg_end=pkg_end,
        signature_at=signature_at,
        signature_size=signature_size(signature_at, identifier, PAGE_SHIFT[arch]),
        text_end=text[0] + text[1],
        linkedit_cmd=linkedit_cmd,
        linkedit_fileoff=linkedit_fileoff,
        symtab_cmd=symtab[0],
        stroff=stroff,
        signature_cmd=signature_cmd,
    )


def _signature_identifier(stub: bytes, stub_name: str, at: int, size: int, bad) -> bytes:
    """The identifier of the stub's ad-hoc signature (its CodeDirectory), checking the blob."""
    if size < SUPERBLOB.size:
        raise bad("the code signature is cut short")
    magic, length, count = SUPERBLOB.unpack_from(stub, at)
    if magic != CSMAGIC_EMBEDDED_SIGNATURE or length > size or 12 + 8 * count > length:
        raise bad(f"the code signature at byte {at} is corrupt")
    for i in range(count):
        slot, offset = BLOB_INDEX.unpack_from(stub, at + 12 + 8 * i)
        if slot != CSSLOT_CODEDIRECTORY:
            continue
        if offset + CODE_DIRECTORY.size > length:
            raise bad(f"the code signature at byte {at} is corrupt")
        fields = CODE_DIRECTORY.unpack_from(stub, at + offset)
        cd_magic, cd_length, _, flags, _, ident_at = fields[:6]
        if cd_magic != CSMAGIC_CODEDIRECTORY or offset + cd_length > length:
            raise bad(f"the code signature at byte {at} is corrupt")
        if not flags & CS_ADHOC:
            raise QpackError(
                f"{stub_name} is signed with an identity; qpack re-signs the executable ad hoc and "
                "cannot keep it: build from an ad-hoc signed stub (PyInstaller's default)"
            )
        start = at + offset + ident_at
        end = stub.find(b"\0", start, at + offset + cd_length)
        if end < 0:
            raise bad(f"the code signature at byte {at} is corrupt")
        return bytes(stub[start:end])
    raise bad(f"the code signature at byte {at} has no CodeDirectory")
