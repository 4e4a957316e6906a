"""Executables for macOS: the model inside __LINKEDIT, before PyInstaller's archive, re-signed ad hoc.

The stubs are made here as PyInstaller 6.22 makes a one-file macOS executable: its real
bootloader (tests/data, both slices of the universal2 file), thinned, its signature removed,
a PKG archive from PyInstaller's own CArchiveWriter appended, __LINKEDIT stretched by
PyInstaller's own osx.fix_exe_for_code_signing (macholib), then signed ad hoc as `codesign -s -`
lays a signature out. The results are judged by LIEF's Mach-O parser, a CodeDirectory check
written here (SHA-256 of each page recomputed from the file), PyInstaller's CArchiveReader, the
bootloader's backward cookie scan replayed byte for byte, zipfile and Info-ZIP's unzip.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from gguf_fixtures import tiny_llama
from qpack.builder import macho, pack
from qpack.runtime import embedded
from qpack.runtime.errors import QpackError

lief = pytest.importorskip("lief")
pytest.importorskip("macholib")
from PyInstaller.archive.readers import CArchiveReader  # noqa: E402
from PyInstaller.archive.writers import CArchiveWriter  # noqa: E402
from PyInstaller.utils import osx  # noqa: E402

BOOTLOADER = Path(__file__).parent / "data" / "pyinstaller-6.22.3-darwin-run"
CPU = {"x86_64": 0x01000007, "arm64": 0x0100000C}
LC_SEGMENT_64, LC_CODE_SIGNATURE = 0x19, 0x1D
MAGIC = b"MEI\014\013\012\013\016"
ARCHS = ["arm64", "x86_64"]


# --- making a stub as PyInstaller does -----------------------------------------------------------


def load_commands(data: bytes):
    ncmds = struct.unpack_from("<I", data, 16)[0]
    at = 32
    for _ in range(ncmds):
        cmd, size = struct.unpack_from("<II", data, at)
        yield at, cmd, size
        at += size


def segment(data: bytes, name: bytes) -> tuple[int, int, int]:
    """(command offset, fileoff, filesize) of a segment."""
    for at, cmd, _ in load_commands(data):
        if cmd == LC_SEGMENT_64 and data[at + 8 : at + 24].rstrip(b"\0") == name:
            fileoff, filesize = struct.unpack_from("<QQ", data, at + 40)
            return at, fileoff, filesize
    raise AssertionError(f"no {name} segment")


def set_linkedit_end(data: bytearray, end: int, arch: str) -> None:
    at, fileoff, _ = segment(data, b"__LINKEDIT")
    page = macho.VM_PAGE[arch]
    struct.pack_into(
        "<QQQ", data, at + 32, -(-(end - fileoff) // page) * page, fileoff, end - fileoff
    )


def thin(fat: bytes, arch: str) -> bytes:
    """`lipo -thin ARCH`."""
    (n,) = struct.unpack_from(">I", fat, 4)
    for i in range(n):
        cputype, _, offset, size, _ = struct.unpack_from(">iiIII", fat, 8 + 20 * i)
        if cputype == CPU[arch]:
            return fat[offset : offset + size]
    raise AssertionError(arch)


def remove_signature(data: bytearray, arch: str) -> bytearray:
    """`codesign --remove`: the command goes, the file ends where the signature began."""
    for at, cmd, size in load_commands(data):
        if cmd == LC_CODE_SIGNATURE:
            dataoff = struct.unpack_from("<I", data, at + 8)[0]
            ncmds, sizeofcmds = struct.unpack_from("<II", data, 16)
            end = 32 + sizeofcmds
            data[at:end] = data[at + size : end] + bytes(size)
            struct.pack_into("<II", data, 16, ncmds - 1, sizeofcmds - size)
            del data[dataoff:]
            set_linkedit_end(data, dataoff, arch)
            break
    return data


def sign_adhoc(path: Path, arch: str, identifier: bytes = b"tiny") -> None:
    """`codesign -s -`: a signature at the 16-aligned end of the file, __LINKEDIT over it."""
    data = bytearray(path.read_bytes())
    commands = {cmd: at for at, cmd, _ in load_commands(data)}
    if LC_CODE_SIGNATURE not in commands:  # the x86_64 slice comes unsigned
        ncmds, sizeofcmds = struct.unpack_from("<II", data, 16)
        at = 32 + sizeofcmds
        assert not any(data[at : at + 16])  # room left in the header
        struct.pack_into("<IIII", data, at, LC_CODE_SIGNATURE, 16, 0, 0)
        struct.pack_into("<II", data, 16, ncmds + 1, sizeofcmds + 16)
        commands[LC_CODE_SIGNATURE] = at
    data += bytes(-len(data) % 16)
    sig_at = len(data)
    size = macho.signature_size(sig_at, identifier, macho.PAGE_SHIFT[arch])
    struct.pack_into("<II", data, commands[LC_CODE_SIGNATURE] + 8, sig_at, size)
    set_linkedit_end(data, sig_at + size, arch)
    _, text_off, text_size = segment(data, b"__TEXT")
    sig = macho.code_signature(
        bytes(data), identifier, macho.PAGE_SHIFT[arch], text_off + text_size
    )
    path.write_bytes(bytes(data) + sig)


def pyinstaller_stub(directory: Path, arch: str) -> Path:
    """A one-file macOS stub, assembled as PyInstaller's EXE does it on macOS."""
    directory.mkdir(parents=True, exist_ok=True)
    data = remove_signature(bytearray(thin(BOOTLOADER.read_bytes(), arch)), arch)
    payload = directory / "payload.bin"
    payload.write_bytes(os.urandom(300_000))
    notes = directory / "notes.txt"
    notes.write_text("the archive's second member\n" * 100)
    pkg = directory / "PKG"
    CArchiveWriter(
        str(pkg),
        [("payload.bin", str(payload), False, "x"), ("notes.txt", str(notes), True, "x")],
        "Python",
    )
    stub = directory / "stub"
    stub.write_bytes(bytes(data) + pkg.read_bytes())
    osx.fix_exe_for_code_signing(str(stub))
    sign_adhoc(stub, arch)
    return stub


# --- independent judges ------------------------------------------------------------------------


def check_signature(path: Path) -> dict:
    """Parse the signature LIEF locates and recompute every page hash from the file."""
    data = path.read_bytes()
    binary = lief.MachO.parse(str(path)).at(0)
    off, size = binary.code_signature.data_offset, binary.code_signature.data_size
    assert off % 16 == 0 and off + size <= len(data)
    magic, length, count = struct.unpack_from(">III", data, off)
    assert magic == 0xFADE0CC0 and length <= size
    slots = dict(struct.unpack_from(">II", data, off + 12 + 8 * i) for i in range(count))
    cd = off + slots[0]
    (cd_magic, _, version, flags, hash_off, ident_off, n_special, n_code, code_limit) = (
        struct.unpack_from(">9I", data, cd)
    )
    hash_size, hash_type, platform, page_shift = struct.unpack_from(">4B", data, cd + 36)
    exec_base, exec_limit, exec_flags = struct.unpack_from(">QQQ", data, cd + 64)
    assert (cd_magic, hash_size, hash_type, platform) == (0xFADE0C02, 32, 2, 0)
    assert version >= 0x20400 and flags & 0x2  # ad hoc
    assert code_limit == off  # strict validation: the hashes end where the signature starts
    page = 1 << page_shift
    assert n_code == -(-code_limit // page)
    for i in range(n_code):
        expected = hashlib.sha256(data[i * page : min((i + 1) * page, code_limit)]).digest()
        assert data[cd + hash_off + 32 * i : cd + hash_off + 32 * (i + 1)] == expected, i
    req = off + slots[2]
    req_len = struct.unpack_from(">I", data, req + 4)[0]
    assert n_special >= 2
    assert (
        data[cd + hash_off - 64 : cd + hash_off - 32]
        == hashlib.sha256(data[req : req + req_len]).digest()
    )
    text = binary.get_segment("__TEXT")
    assert (exec_base, exec_limit, exec_flags) == (0, text.file_offset + text.file_size, 1)
    ident = data[cd + ident_off : data.index(b"\0", cd + ident_off)]
    return {"offset": off, "size": size, "page_shift": page_shift, "identifier": ident}


def check_layout(path: Path) -> None:
    """Every range a load command names lies in the file; __LINKEDIT ends it and holds them."""
    size = path.stat().st_size
    binary = lief.MachO.parse(str(path)).at(0)
    linkedit = binary.get_segment("__LINKEDIT")
    for seg in binary.segments:
        assert seg.file_offset + seg.file_size <= size, seg.name
        assert seg.virtual_size >= seg.file_size
    assert linkedit.file_offset + linkedit.file_size == size
    assert linkedit.virtual_size % 0x1000 == 0
    blobs = []
    for command in binary.commands:
        if hasattr(command, "data_offset") and command.data_size:
            blobs.append((command.data_offset, command.data_size))
    symtab = binary.symbol_command
    blobs.append((symtab.strings_offset, symtab.strings_size))
    blobs.append((symtab.symbol_offset, symtab.numberof_symbols * 16))
    blobs.sort()
    for (a, n), (b, _) in zip(blobs, blobs[1:], strict=False):
        assert a + n <= b  # no overlaps (dyld checks this)
    for a, n in blobs:
        assert linkedit.file_offset <= a and a + n <= size
    macholib = pytest.importorskip("macholib.MachO")
    assert macholib.MachO(str(path)).headers[0].header.ncmds == len(binary.commands)


def bootloader_scan(data: bytes) -> tuple[int, int]:
    """pyi_utils_find_magic_pattern: 8 KiB chunks from the end, overlapping by 7 bytes;
    returns the cookie's offset and the lowest byte read."""
    end = len(data)
    while True:
        start = max(end - 8192, 0)
        chunk = data[start:end]
        for i in range(len(chunk) - len(MAGIC), -1, -1):
            if chunk[i : i + len(MAGIC)] == MAGIC:
                return start + i, start
        if start == 0:
            raise AssertionError("no cookie")
        end = start + len(MAGIC) - 1


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("model") / "tiny-llama-Q8_0.gguf")


@pytest.fixture(scope="module", params=ARCHS)
def stub(request, tmp_path_factory) -> tuple[str, Path]:
    arch = request.param
    return arch, pyinstaller_stub(tmp_path_factory.mktemp(f"stub-{arch}"), arch)


def build(model: Path, stub: Path, out: Path, arch: str = "arm64", **kw) -> pack.BuildReport:
    return pack.build_executable(
        model, out, stub, name="tiny", target=f"macos-{arch}", show_progress=False, **kw
    )


# --- tests -------------------------------------------------------------------------------------


def test_the_stub_is_what_pyinstaller_makes(stub):
    arch, path = stub
    check_layout(path)
    info = check_signature(path)
    assert info["page_shift"] == macho.PAGE_SHIFT[arch]
    assert len(CArchiveReader(str(path)).toc) == 2


def test_model_goes_before_the_archive_and_the_result_is_signed(model, stub, tmp_path, capsys):
    arch, path = stub
    out = tmp_path / "tiny.bin"
    report = build(model, path, out, arch, args=["--temp", "0"])
    assert report.layout == "macho"
    assert "warning" not in capsys.readouterr().err
    data = out.read_bytes()
    stub_data = path.read_bytes()
    check_layout(out)
    info = check_signature(out)
    assert info["identifier"] == b"tiny"  # kept from the stub's signature

    # The model member: stored, 64 KiB aligned, after the signature.
    found = embedded.locate_model(str(out))
    assert found.offset % 65536 == 0 and found.offset > info["offset"] + info["size"]
    assert data[found.offset : found.offset + found.length] == model.read_bytes()
    assert found.args() == ["--temp", "0"]
    assert found.manifest()["target"] == f"macos-{arch}"

    # The bootloader finds its archive reading only the zip directory and the archive's end.
    cookie, lowest = bootloader_scan(data)
    assert lowest > found.offset + found.length
    reader = CArchiveReader(str(out))
    pkg_len = struct.unpack_from("!I", data, cookie + 8)[0]
    pkg = data[cookie + 88 - pkg_len : cookie + 88]
    assert pkg in stub_data  # the archive is moved whole, byte for byte
    assert sorted(reader.toc) == ["notes.txt", "payload.bin"]

    with zipfile.ZipFile(out) as zf:
        assert zf.namelist() == ["model.gguf", ".args", "qpack.json"]
        assert zf.testzip() is None
    if shutil.which("unzip"):
        listing = subprocess.run(["unzip", "-l", str(out)], capture_output=True, text=True)
        assert "model.gguf" in listing.stdout, listing.stderr
        tested = subprocess.run(["unzip", "-tq", str(out)], capture_output=True, text=True)
        assert tested.returncode == 0 and "No errors" in tested.stdout, (
            tested.stdout + tested.stderr
        )


def test_archive_members_survive(model, stub, tmp_path):
    arch, path = stub
    out = tmp_path / "tiny.bin"
    build(model, path, out, arch)
    before, after = CArchiveReader(str(path)), CArchiveReader(str(out))
    for name in ("payload.bin", "notes.txt"):
        assert after.extract(name) == before.extract(name)


def test_same_inputs_same_bytes(model, stub, tmp_path):
    arch, path = stub
    build(model, path, tmp_path / "a.bin", arch)
    build(model, path, tmp_path / "b.bin", arch)
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()


def test_past_4_gib_the_payload_trails_linkedit(stub, tmp_path):
    """Only the load commands and the signature are written for the size: no 4 GiB file."""
    arch, path = stub
    copy = tmp_path / "copy"
    shutil.copy(path, copy)
    plan = macho.plan_macho(path.read_bytes(), str(path))
    with open(copy, "r+b") as f:
        warning = plan.finish(f.fileno(), (1 << 32) + 12345)
    assert "--no-strict" in warning
    data = copy.read_bytes()
    _, fileoff, filesize = segment(data, b"__LINKEDIT")
    assert fileoff + filesize == plan.signature_at + plan.signature_size


def test_fat_stub_is_refused_naming_the_fix(model, tmp_path):
    with pytest.raises(QpackError, match="universal.*lipo"):
        build(model, BOOTLOADER, tmp_path / "tiny.bin")
    assert not (tmp_path / "tiny.bin").exists()


def corrupt(stub: Path, tmp_path: Path, edit) -> Path:
    data = bytearray(stub.read_bytes())
    edit(data)
    out = tmp_path / "bad-stub"
    out.write_bytes(bytes(data))
    return out


def signature_offset(data: bytes) -> int:
    for at, cmd, _ in load_commands(data):
        if cmd == LC_CODE_SIGNATURE:
            return struct.unpack_from("<I", data, at + 8)[0]
    raise AssertionError


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.__setitem__(slice(signature_offset(d), signature_offset(d) + 4), b"\0" * 4),
         "code signature at byte .* is corrupt"),
        (lambda d: remove_signature(d, "arm64"), "no code signature"),
        # the CodeDirectory's flags without CS_ADHOC: a signature made with an identity
        (lambda d: d.__setitem__(slice(signature_offset(d) + 36 + 12, signature_offset(d) + 36 + 16),
                                 b"\0\0\0\0"), "signed with an identity"),
        # data between the archive and the signature
        # (the fixture's archive ends 14 bytes before the 16-aligned signature)
        (lambda d: d.__setitem__(signature_offset(d) - 1, 1),
         "data between the PyInstaller archive and the code signature"),
        (lambda d: d.__setitem__(slice(0, 4), b"\xce\xfa\xed\xfe"), "not a 64-bit"),
    ],
    ids=["corrupt-signature", "no-signature", "identity", "data-after-archive", "32-bit"],
)  # fmt: skip
def test_unexpected_stubs_are_refused(model, tmp_path, edit, message):
    path = pyinstaller_stub(tmp_path / "stub", "arm64")
    bad = corrupt(path, tmp_path, edit)
    with pytest.raises(QpackError, match=message):
        build(model, bad, tmp_path / "tiny.bin")
    assert not (tmp_path / "tiny.bin").exists()


def test_no_archive_is_refused(model, tmp_path):
    data = remove_signature(bytearray(thin(BOOTLOADER.read_bytes(), "arm64")), "arm64")
    path = tmp_path / "bare"
    path.write_bytes(bytes(data))
    sign_adhoc(path, "arm64")
    with pytest.raises(QpackError, match="no PyInstaller archive"):
        build(model, path, tmp_path / "tiny.bin")


@pytest.mark.skipif(
    not (sys.platform == "darwin" and Path("/usr/bin/codesign").exists()),
    reason="Apple's codesign and kernel are the judges only on macOS",
)
def test_macos_verifies_and_starts_it(model, stub, tmp_path):
    """codesign's strict check, then the kernel: it kills a binary whose signature it rejects
    (SIGKILL); accepted, the bootloader starts and fails on the test archive, which holds no
    Python, with an exit status of its own."""
    arch, path = stub
    # arm64 Macs run x86_64 code under Rosetta (when installed); Intel Macs no arm64 code.
    runs = arch == platform.machine() or Path("/Library/Apple/usr/libexec/oah").exists()
    out = tmp_path / "tiny.bin"
    build(model, path, out, arch)
    for binary in (path, out):  # the stub first: the fixture itself must pass
        verify = subprocess.run(
            ["/usr/bin/codesign", "--verify", "--strict", "--verbose=2", str(binary)],
            capture_output=True,
            text=True,
        )
        assert verify.returncode == 0, verify.stderr
        if not runs:
            continue
        started = subprocess.run([str(binary)], capture_output=True, timeout=60)
        assert started.returncode >= 0, (started.returncode, started.stderr)


def test_target_macos_from_this_machine_through_the_cli(model, stub, tmp_path, monkeypatch):
    """`qpack build --target macos-ARCH` on Linux: the stub from the cache (as the workflow's
    artifact would be put there), the Mach-O layout, signed; a --stub of the wrong OS refused."""
    from click.testing import CliRunner
    from qpack.builder import stub as stubs
    from qpack.builder.cli import main as qpack_cli
    from qpack.runtime.version import __version__

    arch, path = stub
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copy(path, cache / f"qpack-stub-{__version__}-macos-{arch}-0123456789abcdef")
    monkeypatch.setenv("QPACK_CACHE_DIR", str(cache))
    assert stubs.get_stub(f"macos-{arch}").parent == cache
    result = CliRunner().invoke(
        qpack_cli, ["build", str(model), "--target", f"macos-{arch}", "-o", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    assert "(macho layout)" in result.output
    out = tmp_path / "tiny-llama.bin"
    check_layout(out)
    check_signature(out)
    wrong = CliRunner().invoke(
        qpack_cli, ["build", str(model), "--target", "windows-x86_64", "--stub", str(path)]
    )
    assert wrong.exit_code == 1 and "a Mach-O executable, not a runtime stub" in wrong.output
