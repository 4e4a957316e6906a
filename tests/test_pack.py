"""The packer and the embedded-model reader, without PyInstaller (fast).

The stub here is a real ELF (/bin/true) given a `pydata` section by objcopy, as PyInstaller
does, so binutils (objcopy, readelf) and the zip readers (Python's zipfile, Info-ZIP's unzip)
judge the result independently of our code; a synthetic PE image is judged by `pefile`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import struct
import subprocess
import threading
import zipfile
import zlib
from pathlib import Path

import pytest
from click.testing import CliRunner
from gguf_fixtures import TinyLlamaConfig, tiny_llama, write_gguf
from qpack.builder import copier, digests, pack, zipfmt
from qpack.builder.cli import main as qpack_cli
from qpack.builder.digests import DigestCache, Digests, file_key
from qpack.runtime import embedded
from qpack.runtime.errors import EmbeddedModelError, GGUFError, QpackError, UnsupportedModel

needs_binutils = pytest.mark.skipif(
    not (shutil.which("objcopy") and shutil.which("readelf")), reason="needs binutils"
)
# The fake PyInstaller archive: bytes ending with the bootloader's cookie magic.
ARCHIVE = bytes(range(256)) * 40 + b"MEI\014\013\012\013\016" + b"\0" * 80


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("model") / "tiny-llama-Q8_0.gguf")


@pytest.fixture(scope="module")
def elf_stub(tmp_path_factory) -> Path:
    if not (shutil.which("objcopy") and Path("/bin/true").is_file()):
        pytest.skip("needs objcopy and /bin/true")
    d = tmp_path_factory.mktemp("stub")
    (d / "archive").write_bytes(ARCHIVE)
    stub = d / "stub"
    shutil.copy("/bin/true", stub)
    subprocess.run(["objcopy", "--add-section", f"pydata={d / 'archive'}", str(stub)], check=True)
    return stub


def build(model: Path, stub: Path, out: Path, **kw) -> pack.BuildReport:
    kw.setdefault("name", "tiny")
    kw.setdefault("target", "linux-x86_64")
    return pack.build_executable(model, out, stub, show_progress=False, **kw)


def section(path: Path, name: str) -> tuple[int, int]:
    """(offset, size) of an ELF section, as readelf reports it."""
    out = subprocess.run(
        ["readelf", "-S", "-W", str(path)], capture_output=True, text=True, check=True
    ).stdout
    for line in out.splitlines():
        fields = line.replace("[ ", "[").split()
        if len(fields) > 5 and fields[1] == name:
            return int(fields[4], 16), int(fields[5], 16)
    raise AssertionError(f"no section {name} in {path}")


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# --- the ELF layout ----------------------------------------------------------------------------


@needs_binutils
def test_elf_layout_is_valid_zip_and_elf(model, elf_stub, tmp_path):
    out = tmp_path / "tiny.bin"
    report = build(model, elf_stub, out, args=["-c", "128"])
    data = out.read_bytes()
    gguf_bytes = model.read_bytes()

    # Python's zipfile: members, order, CRCs, and the model's bytes.
    with zipfile.ZipFile(out) as zf:
        assert [i.filename for i in zf.infolist()] == ["model.gguf", ".args", "qpack.json"]
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
        assert zf.testzip() is None
        assert zf.read("model.gguf") == gguf_bytes
        assert zf.read(".args") == b"-c\n128\n"
        manifest = json.loads(zf.read("qpack.json"))
    assert manifest["model"]["sha256"] == hashlib.sha256(gguf_bytes).hexdigest()
    assert manifest["model"]["architecture"] == "llama"
    assert manifest["model"]["quant_mix"]["Q8_0"]["tensors"] == 2 * 7 + 2
    assert manifest["stub"]["sha256"] == hashlib.sha256(elf_stub.read_bytes()).hexdigest()

    # The model data is 64 KiB-aligned in the file, and our reader finds it there.
    assert report.data_offset % 65536 == 0
    assert data[report.data_offset : report.data_offset + len(gguf_bytes)] == gguf_bytes
    member = embedded.locate_model(str(out))
    assert (member.offset, member.length) == (report.data_offset, len(gguf_bytes))
    assert member.args() == ["-c", "128"]
    assert member.manifest() == manifest

    # binutils: the ELF is clean, pydata moved intact past the model, and it still runs.
    readelf = subprocess.run(
        ["readelf", "-h", "-S", "-l", "-W", str(out)], capture_output=True, text=True
    )
    assert readelf.returncode == 0 and "warning" not in (readelf.stdout + readelf.stderr).lower()
    dumped = tmp_path / "pydata"
    subprocess.run(
        ["objcopy", "--dump-section", f"pydata={dumped}", str(out), str(tmp_path / "scratch")],
        check=True,
    )
    assert dumped.read_bytes() == ARCHIVE
    pydata_at, pydata_size = section(out, "pydata")
    assert pydata_at > report.data_offset + len(gguf_bytes)  # the model sits before the archive
    with zipfile.ZipFile(out) as zf:
        assert zf.start_dir >= pydata_at + pydata_size  # only the central directory follows it
    assert subprocess.run([str(out)]).returncode == 0

    if shutil.which("unzip"):
        listing = subprocess.run(["unzip", "-l", str(out)], capture_output=True, text=True)
        assert listing.returncode == 0 and "model.gguf" in listing.stdout
        assert "qpack.json" in listing.stdout
        assert subprocess.run(["unzip", "-tq", str(out)], capture_output=True).returncode == 0


@needs_binutils
def test_same_inputs_give_identical_bytes(model, elf_stub, tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    build(model, elf_stub, a, args=["--temp", "0"])
    build(model, elf_stub, b, args=["--temp", "0"])
    assert a.read_bytes() == b.read_bytes()
    assert a.stat().st_mode & 0o111  # executable


def test_unknown_stub_falls_back_to_append_with_a_warning(model, tmp_path, capsys):
    stub = tmp_path / "stub.sh"
    stub.write_bytes(b"#!/bin/sh\nexit 0\n" + ARCHIVE)
    out = tmp_path / "tiny.bin"
    report = build(model, stub, out)
    assert report.layout == "append"
    assert "neither ELF, PE nor Mach-O" in capsys.readouterr().err
    data = out.read_bytes()
    assert data.startswith(stub.read_bytes())
    with zipfile.ZipFile(out) as zf:
        assert zf.read("model.gguf") == model.read_bytes()
    assert embedded.locate_model(str(out)).offset % 65536 == 0


def test_unreadable_macho_stub_is_refused(model, tmp_path):
    """Mach-O stubs have their own tests (test_macho.py); a bogus one is refused, not appended to."""
    stub = tmp_path / "stub"
    stub.write_bytes(b"\xcf\xfa\xed\xfe" + bytes(60) + ARCHIVE)
    with pytest.raises(QpackError, match="not a 64-bit x86_64 or arm64 Mach-O"):
        build(model, stub, tmp_path / "tiny.bin", target="macos-arm64")


# --- the PE layout -----------------------------------------------------------------------------


def synthetic_pe(overlay: bytes, signed: bool = False) -> bytes:
    """A minimal PE32+ image: headers, one 512-byte section, then `overlay`."""
    image = bytearray(0x400)
    image[0:2] = b"MZ"
    struct.pack_into("<I", image, 0x3C, 0x80)
    image[0x80:0x84] = b"PE\0\0"
    opt_size = 112 + 16 * 8
    struct.pack_into("<HHIIIHH", image, 0x84, 0x8664, 1, 0, 0, 0, opt_size, 0x22)
    opt = 0x98
    struct.pack_into("<HBB", image, opt, 0x20B, 14, 0)
    struct.pack_into("<I", image, opt + 16, 0x1000)  # AddressOfEntryPoint
    struct.pack_into("<Q", image, opt + 24, 0x140000000)  # ImageBase
    struct.pack_into("<II", image, opt + 32, 0x1000, 0x200)  # Section/FileAlignment
    struct.pack_into("<HH", image, opt + 48, 6, 0)  # MajorSubsystemVersion
    struct.pack_into("<II", image, opt + 56, 0x2000, 0x200)  # SizeOfImage, SizeOfHeaders
    struct.pack_into("<H", image, opt + 68, 3)  # console subsystem
    struct.pack_into("<I", image, opt + 108, 16)  # NumberOfRvaAndSizes
    if signed:
        struct.pack_into("<II", image, opt + 112 + 4 * 8, 0x400, 16)
    sec = opt + opt_size
    image[sec : sec + 8] = b".text\0\0\0"
    struct.pack_into("<IIII", image, sec + 8, 0x10, 0x1000, 0x200, 0x200)
    struct.pack_into("<I", image, sec + 36, 0x60000020)
    image[0x200:0x210] = b"\xc3" * 16
    return bytes(image) + overlay


def test_pe_layout_inserts_before_the_overlay_and_fixes_the_checksum(model, tmp_path):
    pefile = pytest.importorskip("pefile")
    stub = tmp_path / "stub.exe"
    stub.write_bytes(synthetic_pe(ARCHIVE))
    out = tmp_path / "tiny.exe"
    report = build(model, stub, out, target="windows-x86_64")
    assert report.layout == "pe"
    pe = pefile.PE(str(out))
    assert pe.get_overlay_data_start_offset() == 0x400  # the image itself is unchanged
    assert pe.OPTIONAL_HEADER.CheckSum == pe.generate_checksum()
    data = out.read_bytes()
    with zipfile.ZipFile(out) as zf:
        assert zf.read("model.gguf") == model.read_bytes()
        cd_offset = zf.start_dir
    assert report.data_offset % 65536 == 0
    assert data[cd_offset - len(ARCHIVE) : cd_offset] == ARCHIVE  # archive stays next to the end


def test_signed_pe_stub_is_refused(model, tmp_path):
    stub = tmp_path / "stub.exe"
    stub.write_bytes(synthetic_pe(ARCHIVE, signed=True))
    with pytest.raises(QpackError, match="signed"):
        build(model, stub, tmp_path / "x.exe")
    assert leftovers(tmp_path) == ["stub.exe"]


# --- zip64 -------------------------------------------------------------------------------------


def test_zip64_records_read_by_zipfile_and_by_our_reader(tmp_path):
    """A member past 4 GiB, in a sparse file: sizes and offsets go through zip64 records."""
    size = (5 << 30) + 123
    path = tmp_path / "big.zip"
    name = b"model.gguf"
    zip64_extra = zipfmt.EXTRA_HEADER.pack(1, 16) + struct.pack("<QQ", size, size)
    base = zipfmt.LOCAL_HEADER.size + len(name) + len(zip64_extra)
    extra = zip64_extra + zipfmt.padding_field(base, len(zip64_extra))
    with open(path, "wb") as f:
        f.write(zipfmt.local_header(name, 0x1234, size, extra, zip64=True))
        data_at = f.tell()
        f.truncate(data_at + size)
        f.seek(data_at + size)
        args_at = f.tell()
        f.write(zipfmt.local_header(b".args", 0, 0, b"", zip64=False))
        members = [
            zipfmt.ZipMember(name, 0x1234, size, 0),
            zipfmt.ZipMember(b".args", 0, 0, args_at),
        ]
        cd_at = f.tell()
        directory = zipfmt.central_directory(members)
        f.write(directory + zipfmt.end_records(2, cd_at, len(directory)))
    assert data_at == 65536
    with zipfile.ZipFile(path) as zf:
        infos = {i.filename: i for i in zf.infolist()}
    assert infos["model.gguf"].file_size == size and infos["model.gguf"].header_offset == 0
    assert infos[".args"].header_offset == args_at > 0xFFFFFFFF
    member = embedded.locate_model(str(path))
    assert (member.offset, member.length, member.crc32) == (65536, size, 0x1234)
    if shutil.which("unzip"):
        listing = subprocess.run(["unzip", "-l", str(path)], capture_output=True, text=True)
        assert str(size) in listing.stdout


# --- inputs ------------------------------------------------------------------------------------


def deflate64_zip(path: Path, name: str, data: bytes) -> None:
    """A one-member zip compressed with Deflate64 (method 9) by `inflate64` (zipfile cannot
    write the method; zipfile_deflate64 only reads it)."""
    inflate64 = pytest.importorskip("inflate64")
    deflater = inflate64.Deflater()
    packed = deflater.deflate(data) + deflater.flush()
    crc, raw = zlib.crc32(data), name.encode()
    header = struct.pack(
        "<IHHHHHIIIHH", 0x04034B50, 21, 0, 9, 0, 0x21, crc, len(packed), len(data), len(raw), 0
    )
    central = struct.pack(
        "<IHHHHHHIIIHHHHHII", 0x02014B50, 21, 21, 0, 9, 0, 0x21, crc, len(packed), len(data),
        len(raw), 0, 0, 0, 0, 0, 0,
    ) + raw  # fmt: skip
    body = header + raw + packed
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(central), len(body), 0)
    path.write_bytes(body + central + end)


@pytest.mark.parametrize("method", ["deflate", "deflate64"])
def test_zipped_model_is_streamed_out_stored(model, elf_stub, tmp_path, method):
    zipped = tmp_path / "model.zip"
    if method == "deflate":
        with zipfile.ZipFile(zipped, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.write(model, "models/tiny-llama-Q8_0.gguf")
            zf.writestr("README.txt", "not a model")
    else:
        deflate64_zip(zipped, "models/tiny-llama-Q8_0.gguf", model.read_bytes())
        assert zipped.stat().st_size < model.stat().st_size  # really compressed
    out = tmp_path / "tiny.bin"
    report = build(model=zipped, stub=elf_stub, out=out)
    member = embedded.locate_model(str(out))
    with open(out, "rb") as f:
        f.seek(member.offset)
        assert f.read(member.length) == model.read_bytes()
    assert member.manifest()["model"]["file"] == "tiny-llama-Q8_0.gguf"
    assert report.model.architecture == "llama"


@pytest.mark.parametrize("writer", ["inflate64", "7z"])
def test_deflate64_reads_the_same_through_both_readers(model, tmp_path, monkeypatch, writer):
    """zipfile-deflate64 (Linux, Windows) and the inflate64 fallback (macOS) stream the same
    bytes out of the same Deflate64 zips: one written by inflate64, one by 7-Zip."""
    from qpack.builder import sources

    pytest.importorskip("zipfile_deflate64")
    zipped = tmp_path / "model.zip"
    if writer == "7z":
        if shutil.which("7z") is None:
            pytest.skip("needs 7z (Debian: p7zip-full)")
        (tmp_path / "in").mkdir()
        shutil.copy(model, tmp_path / "in" / "tiny.gguf")
        cmd = ["7z", "a", "-tzip", "-mm=Deflate64", str(zipped), "tiny.gguf"]
        subprocess.run(cmd, cwd=tmp_path / "in", check=True, capture_output=True)
    else:
        deflate64_zip(zipped, "tiny.gguf", model.read_bytes())
    assert zipfile.ZipFile(zipped).infolist()[0].compress_type == 9
    got = {}
    for reader in ("zipfile-deflate64", "inflate64"):
        monkeypatch.setattr(sources, "deflate64_reader", lambda reader=reader: reader)
        source = pack.open_model_source(zipped)
        with source.open() as f:
            chunks = []
            while chunk := f.read(4096):
                chunks.append(chunk)
        got[reader] = b"".join(chunks)
    assert got["inflate64"] == got["zipfile-deflate64"] == model.read_bytes()

    # a flipped CRC-32 in the directory: both readers refuse the member
    data = bytearray(zipped.read_bytes())
    cd = data.rindex(b"PK\x01\x02")
    data[cd + 16] ^= 0xFF
    zipped.write_bytes(bytes(data))
    for reader in ("zipfile-deflate64", "inflate64"):
        monkeypatch.setattr(sources, "deflate64_reader", lambda reader=reader: reader)
        with pytest.raises(zipfile.BadZipFile), pack.open_model_source(zipped).open() as f:
            while f.read(1 << 20):
                pass


def test_zip_without_exactly_one_gguf_is_refused(model, elf_stub, tmp_path):
    zipped = tmp_path / "two.zip"
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.write(model, "a.gguf")
        zf.write(model, "b.gguf")
    with pytest.raises(QpackError, match="exactly one .gguf"):
        build(zipped, elf_stub, tmp_path / "x.bin")
    assert "x.bin" not in leftovers(tmp_path)


def test_corrupt_gguf_inside_a_zip_leaves_no_output(model, elf_stub, tmp_path):
    zipped = tmp_path / "bad.zip"
    with zipfile.ZipFile(zipped, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("bad.gguf", model.read_bytes()[:3000])
    with pytest.raises(GGUFError) as e:
        build(zipped, elf_stub, tmp_path / "x.bin")
    assert "bad.zip:bad.gguf" in str(e.value)
    assert leftovers(tmp_path) == ["bad.zip"]


def test_not_a_gguf(elf_stub, tmp_path):
    bogus = tmp_path / "notes.gguf"
    bogus.write_bytes(b"hello, this is not a model\n" * 100)
    with pytest.raises(GGUFError, match="notes.gguf"):
        build(bogus, elf_stub, tmp_path / "x.bin")
    assert leftovers(tmp_path) == ["notes.gguf"]


def test_truncated_gguf(model, elf_stub, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    with pytest.raises(GGUFError, match="cut.gguf"):
        build(cut, elf_stub, tmp_path / "x.bin")
    assert leftovers(tmp_path) == ["cut.gguf"]


def test_unsupported_tensor_type(elf_stub, tmp_path):
    path = tiny_llama(tmp_path / "nv.gguf", TinyLlamaConfig(weight_type="NVFP4"))
    with pytest.raises(UnsupportedModel, match="NVFP4"):
        build(path, elf_stub, tmp_path / "x.bin")
    assert leftovers(tmp_path) == ["nv.gguf"]


def test_unsupported_tokenizer(elf_stub, tmp_path):
    config = TinyLlamaConfig(extra_metadata={"tokenizer.ggml.model": "bert"})
    path = tiny_llama(tmp_path / "bert.gguf", config)
    with pytest.raises(UnsupportedModel, match="bert"):
        build(path, elf_stub, tmp_path / "x.bin")
    assert leftovers(tmp_path) == ["bert.gguf"]


def test_unsupported_architecture(elf_stub, tmp_path):
    import numpy as np

    path = write_gguf(
        tmp_path / "gpt2.gguf",
        {"gpt2.block_count": 1},
        {"token_embd.weight": (np.zeros((4, 32), np.float32), "F32")},
        arch="gpt2",
    )
    with pytest.raises(UnsupportedModel, match="gpt2"):
        build(path, elf_stub, tmp_path / "x.bin")
    assert leftovers(tmp_path) == ["gpt2.gguf"]


def test_unwritable_output_directory(model, elf_stub, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory should be")
    with pytest.raises(QpackError, match="output directory"):
        build(model, elf_stub, blocker / "x.bin")


def test_not_enough_disk_space(model, elf_stub, tmp_path, monkeypatch):
    monkeypatch.setattr(pack.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1, 1, 1000))
    with pytest.raises(QpackError, match="free"):
        build(model, elf_stub, tmp_path / "x.bin")
    assert leftovers(tmp_path) == []


def copy_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("qpack-copy")]


def test_interrupted_copy_leaves_nothing(model, elf_stub, tmp_path, monkeypatch):
    """Ctrl-C on the main thread while the copy and digest threads run (small chunks keep
    them busy): no output, and no thread left behind."""
    monkeypatch.setattr(copier, "COPY_CHUNK", 4096)
    monkeypatch.setattr(copier, "DIGEST_CHUNK", 4096)

    def interrupted(path, *args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(pack, "check_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(model, elf_stub, tmp_path / "x.bin")
    assert leftovers(tmp_path) == []
    assert copy_threads() == []


def test_model_changing_during_the_copy_is_an_error(model, elf_stub, tmp_path, monkeypatch):
    """The size seen when the build started no longer matches the file (it was cut short)."""
    real = pack.open_model_source

    def grown(path):
        source = real(path)
        source.size += 1000
        return source

    monkeypatch.setattr(pack, "open_model_source", grown)
    with pytest.raises(QpackError, match="truncated"):
        build(model, elf_stub, tmp_path / "x.bin")
    assert leftovers(tmp_path) == []
    assert copy_threads() == []


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_model_cut_short_during_the_copy_is_an_error(
    model, elf_stub, tmp_path, monkeypatch, kernel_copy
):
    """The source loses its second half once the copy has begun."""
    source = tmp_path / "model" / "tiny.gguf"
    source.parent.mkdir()
    shutil.copy(model, source)
    half = source.stat().st_size // 2
    summary = pack.check_model(source)  # validated whole, before the cut
    monkeypatch.setattr(pack, "check_model", lambda *args, **kw: summary)
    real = getattr(pack.os, "copy_file_range", None)

    def cut_then_copy(src, dst, count, src_at=None, dst_at=None):
        if count > 100_000:  # the model, not the stub's small head
            os.truncate(source, half)
            if not kernel_copy:
                raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real(src, dst, count, src_at, dst_at)

    monkeypatch.setattr(pack.os, "copy_file_range", cut_then_copy, raising=False)
    with pytest.raises(QpackError, match=f"tiny.gguf: ended at byte {half} .*truncated"):
        build(source, elf_stub, tmp_path / "x.bin")
    assert leftovers(tmp_path) == ["model"]


def test_full_disk_is_one_clear_error(model, elf_stub, tmp_path, monkeypatch):
    """An OSError on a copy thread (here ENOSPC) reaches the user as a QpackError."""
    real = pack.os.copy_file_range

    def full(src, dst, count, src_at=None, dst_at=None):
        if count > 100_000:  # the model, not the stub's small head
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst, count, src_at, dst_at)

    monkeypatch.setattr(pack.os, "copy_file_range", full)
    with pytest.raises(QpackError, match="No space left on device"):
        build(model, elf_stub, tmp_path / "x.bin")
    assert leftovers(tmp_path) == []
    assert copy_threads() == []


@needs_binutils
def test_copy_through_a_buffer_gives_the_same_bytes(model, elf_stub, tmp_path, monkeypatch):
    """Where copy_file_range and SEEK_DATA are missing (macOS, Windows) or refused (across
    filesystems), the copy goes through a buffer: same output, byte for byte."""
    kernel = tmp_path / "kernel.bin"
    build(model, elf_stub, kernel, args=["-c", "64"])

    def refused(*args):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(pack.os, "copy_file_range", refused, raising=False)
    monkeypatch.delattr(pack.os, "SEEK_DATA", raising=False)
    monkeypatch.setattr(copier, "COPY_CHUNK", 1000)  # many chunks, and a short last one
    buffered = tmp_path / "buffered.bin"
    build(model, elf_stub, buffered, args=["-c", "64"])
    assert buffered.read_bytes() == kernel.read_bytes()


def test_holes_in_the_model_stay_holes(elf_stub, tmp_path):
    """A sparse GGUF (a large tensor of zeros never written) is copied without filling the
    hole, and its digests still cover the zeros."""
    from gguf_fixtures import sparse_gguf

    hole = 64 << 20
    path = sparse_gguf(tmp_path / "sparse.gguf", hole)
    if path.stat().st_blocks * 512 > hole // 2:
        pytest.skip("this filesystem does not keep holes")
    out = tmp_path / "sparse.bin"
    build(path, elf_stub, out)
    assert out.stat().st_blocks * 512 < out.stat().st_size - hole // 2  # the hole is still one
    with zipfile.ZipFile(out) as zf:
        assert zf.testzip() is None  # the CRC-32 covers the zeros
        manifest = json.loads(zf.read("qpack.json"))
    assert manifest["model"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_progress_bar_on_stderr(model, elf_stub, tmp_path, capsys):
    pack.build_executable(
        model, tmp_path / "x.bin", elf_stub, name="tiny", target="linux-x86_64",
        show_progress=True,
    )  # fmt: skip
    assert "writing model.gguf" in capsys.readouterr().err


@pytest.mark.parametrize(
    "file_name, name",
    [
        ("SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct"),
        ("gemma-3-270m-q4_k_m.gguf", "gemma-3-270m"),
        ("Qwen2.5-0.5B-Instruct-Q8_0.gguf", "Qwen2.5-0.5B-Instruct"),
        ("mistral-7b-v0.1.IQ4_XS.gguf", "mistral-7b-v0.1"),
        ("tinyllama-f16.gguf", "tinyllama"),
        ("model.gguf", "model"),
    ],
)
def test_default_name(file_name, name):
    assert pack.default_name(file_name) == name


# --- the command line --------------------------------------------------------------------------


@needs_binutils
def test_cli_build(model, elf_stub, tmp_path, monkeypatch):
    monkeypatch.setenv("QPACK_CACHE_DIR", str(tmp_path / "cache"))
    result = CliRunner().invoke(
        qpack_cli,
        ["build", str(model), "--stub", str(elf_stub), "-o", str(tmp_path),
         "--args", "-c 2048 --port '9000'"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    out = tmp_path / "tiny-llama.bin"  # the file name minus its quant suffix
    assert "tiny-llama.bin" in result.output
    member = embedded.locate_model(str(out))
    assert member.args() == ["-c", "2048", "--port", "9000"]
    assert member.manifest()["name"] == "tiny-llama"
    remembered = DigestCache(tmp_path / "cache").get(file_key(model, os.stat(model)))
    assert remembered.sha256 == member.manifest()["model"]["sha256"]


def test_cli_build_error_is_one_line(elf_stub, tmp_path):
    bogus = tmp_path / "x.gguf"
    bogus.write_bytes(b"nope")
    result = CliRunner().invoke(qpack_cli, ["build", str(bogus), "--stub", str(elf_stub)])
    assert result.exit_code == 1
    assert result.output.startswith("qpack: error: ") and "Traceback" not in result.output


# --- remembered digests -----------------------------------------------------------------------


def test_second_build_takes_the_digests_from_the_cache(model, elf_stub, tmp_path):
    cache = DigestCache(tmp_path / "cache")
    first = build(model, elf_stub, tmp_path / "a.bin", digest_cache=cache)
    model_key = file_key(model, os.stat(model))
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    assert cache.get(model_key) == Digests(sha, zlib.crc32(model.read_bytes()))
    assert cache.get(file_key(elf_stub, os.stat(elf_stub))).sha256 == (
        hashlib.sha256(elf_stub.read_bytes()).hexdigest()
    )
    assert first.model_sha256 == sha
    # A remembered digest is used as it is, not computed again (the cache's whole point):
    # planted wrong values show up in the manifest and the zip directory.
    cache.put({model_key: Digests("ab" * 32, 0x12345678)})
    planted = build(model, elf_stub, tmp_path / "b.bin", digest_cache=cache)
    member = embedded.locate_model(str(tmp_path / "b.bin"))
    assert planted.model_sha256 == member.manifest()["model"]["sha256"] == "ab" * 32
    assert member.crc32 == 0x12345678
    # With the right values back, the output is byte-identical to the first build's.
    cache.put({model_key: Digests(sha, zlib.crc32(model.read_bytes()))})
    build(model, elf_stub, tmp_path / "c.bin", digest_cache=cache)
    assert (tmp_path / "c.bin").read_bytes() == (tmp_path / "a.bin").read_bytes()


def test_a_changed_model_is_hashed_again(model, elf_stub, tmp_path):
    cache = DigestCache(tmp_path / "cache")
    copy = tmp_path / "model.gguf"
    shutil.copy(model, copy)
    build(copy, elf_stub, tmp_path / "a.bin", digest_cache=cache)
    stat = os.stat(copy)
    data = bytearray(copy.read_bytes())
    data[-1] ^= 1  # a tensor byte: the model stays valid
    copy.write_bytes(data)
    os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and mtime: ctime moved
    report = build(copy, elf_stub, tmp_path / "b.bin", digest_cache=cache)
    assert report.model_sha256 == hashlib.sha256(data).hexdigest()
    assert embedded.verify(embedded.locate_model(str(tmp_path / "b.bin"))).sha256 == (
        report.model_sha256
    )


@pytest.mark.parametrize(
    "content", ["", "not json", "[1, 2]", '{"k": {"sha256": "x", "crc32": 1}}', '{"k": 5}']
)
def test_a_broken_cache_file_is_ignored(tmp_path, content):
    (tmp_path / "digests.json").write_text(content)
    cache = DigestCache(tmp_path)
    assert cache.get("k") is None
    cache.put({"k": Digests("0" * 64, 7)})
    assert cache.get("k") == Digests("0" * 64, 7)


def test_the_cache_keeps_only_the_newest_entries(tmp_path):
    cache = DigestCache(tmp_path)
    for i in range(digests.MAX_ENTRIES + 3):
        cache.put({str(i): Digests(f"{i:064x}", i)})
    assert cache.get("0") is None and cache.get("2") is None
    assert cache.get("3") == Digests(f"{3:064x}", 3)
    last = digests.MAX_ENTRIES + 2
    assert cache.get(str(last)) == Digests(f"{last:064x}", last)


# --- the reader's errors -----------------------------------------------------------------------


@pytest.fixture
def built(model, tmp_path) -> Path:
    stub = tmp_path / "stub"
    stub.write_bytes(b"\0stub\0" * 10 + ARCHIVE)
    out = tmp_path / "tiny.bin"
    build(model, stub, out)
    return out


def test_verify_passes_then_catches_a_flipped_byte(built):
    member = embedded.locate_model(str(built))
    report = embedded.verify(member)
    assert report.sha256 == member.manifest()["model"]["sha256"]
    data = bytearray(built.read_bytes())
    data[member.offset + member.length // 2] ^= 0x40
    built.write_bytes(data)
    with pytest.raises(EmbeddedModelError, match="CRC-32"):
        embedded.verify(embedded.locate_model(str(built)))


def test_missing_model_member(built):
    data = built.read_bytes()
    cd = data.rindex(b"model.gguf")  # the central directory's copy of the name
    built.write_bytes(data[:cd] + b"other.gguf" + data[cd + 10 :])
    with pytest.raises(EmbeddedModelError, match="no model.gguf member"):
        embedded.locate_model(str(built))


def test_cut_out_middle_is_truncation(built):
    data = built.read_bytes()
    built.write_bytes(data[: len(data) // 2] + data[-300:])
    with pytest.raises(EmbeddedModelError, match="truncated"):
        embedded.locate_model(str(built))


def test_cut_end_means_no_zip(built):
    data = built.read_bytes()
    built.write_bytes(data[:-10])
    assert embedded.locate_model(str(built)) is None


def test_broken_local_header(built):
    member = embedded.locate_model(str(built))
    data = bytearray(built.read_bytes())
    at = member.entries["model.gguf"].header_offset
    data[at : at + 4] = b"XXXX"
    built.write_bytes(data)
    with pytest.raises(EmbeddedModelError, match="no zip local header"):
        embedded.locate_model(str(built))


def test_misaligned_and_compressed_members_are_refused(model, tmp_path):
    plain = tmp_path / "plain.zip"  # stdlib zipfile: stored but not aligned
    with zipfile.ZipFile(plain, "w") as zf:
        zf.write(model, "model.gguf")
    with pytest.raises(EmbeddedModelError, match="64 KiB boundary"):
        embedded.locate_model(str(plain))
    deflated = tmp_path / "deflated.zip"
    with zipfile.ZipFile(deflated, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.write(model, "model.gguf")
    with pytest.raises(EmbeddedModelError, match="compressed"):
        embedded.locate_model(str(deflated))


def test_forged_central_directory_size(built):
    data = bytearray(built.read_bytes())
    end = len(data) - embedded.END_RECORD.size
    struct.pack_into("<I", data, end + 12, 0x7FFFFFFF)  # cd_size
    built.write_bytes(data)
    with pytest.raises(EmbeddedModelError):
        embedded.locate_model(str(built))


def test_merge_args_puts_the_command_line_last_or_at_the_marker():
    assert embedded.merge_args(["-c", "512"], ["-c", "1024"]) == ["-c", "512", "-c", "1024"]
    assert embedded.merge_args(["-a", "...", "-b"], ["-x"]) == ["-a", "-x", "-b"]
    assert embedded.merge_args([], ["--version"]) == ["--version"]


# --- --split and other targets --------------------------------------------------------------------


def test_split_writes_the_model_beside_the_executable(model, elf_stub, tmp_path):
    out = tmp_path / "tiny.bin"
    report = build(model, elf_stub, out, args=["-c", "64"], split=True)
    sibling = tmp_path / "tiny.gguf"
    assert sibling.read_bytes() == model.read_bytes()
    with zipfile.ZipFile(out) as zf:
        assert [i.filename for i in zf.infolist()] == [".args", "qpack.json"]
        manifest = json.loads(zf.read("qpack.json"))
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    assert manifest["model"]["split_file"] == "tiny.gguf"
    assert manifest["model"]["sha256"] == digest == report.model_sha256
    assert manifest["model"]["crc32"] == zlib.crc32(model.read_bytes())
    member = embedded.locate_model(str(out))
    assert (member.path, member.offset, member.length) == (str(sibling), 0, sibling.stat().st_size)
    assert member.executable == str(out) and member.args() == ["-c", "64"]
    assert embedded.verify(member).sha256 == digest
    subprocess.run(["readelf", "-h", "-S", "-W", str(out)], check=True, capture_output=True)
    from qpack.runtime import inspect as facts

    gf, note = facts.open_model(out)  # `qpack inspect tiny.bin` describes the sibling
    with gf:
        assert "tiny.gguf, --split" in note and gf.architecture == "llama"

    data = bytearray(sibling.read_bytes())  # a changed sibling fails --verify
    data[-1] ^= 1
    sibling.write_bytes(bytes(data))
    with pytest.raises(EmbeddedModelError, match="CRC-32"):
        embedded.verify(embedded.locate_model(str(out)))
    sibling.write_bytes(bytes(data[:-1]))  # another size: refused at start
    with pytest.raises(EmbeddedModelError, match="not the one it was built with"):
        embedded.locate_model(str(out))
    sibling.unlink()
    with pytest.raises(EmbeddedModelError, match="tiny.gguf: missing.*--split"):
        embedded.locate_model(str(out))


def test_split_of_a_zipped_model_writes_the_gguf(model, elf_stub, tmp_path):
    zipped = tmp_path / "model.zip"
    with zipfile.ZipFile(zipped, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.write(model, "tiny.gguf")
    (tmp_path / "out").mkdir()
    build(zipped, elf_stub, tmp_path / "out" / "tiny.bin", split=True)
    assert (tmp_path / "out" / "tiny.gguf").read_bytes() == model.read_bytes()


def test_split_digests_wait_for_a_slow_copy(model, elf_stub, tmp_path, monkeypatch):
    """The digest threads map the sibling before the copy reaches it (a loaded machine made
    this race real): the sibling must already have its size."""
    import time

    from qpack.builder import copier

    slow = copier._copy_zipped

    def late_copy(*args):
        time.sleep(0.3)
        slow(*args)

    monkeypatch.setattr(copier, "_copy_zipped", late_copy)
    zipped = tmp_path / "model.zip"
    with zipfile.ZipFile(zipped, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.write(model, "tiny.gguf")
    build(zipped, elf_stub, tmp_path / "tiny.bin", split=True)
    assert (tmp_path / "tiny.gguf").read_bytes() == model.read_bytes()


def test_windows_target_over_4_gib_is_refused_naming_split(tmp_path):
    stub = tmp_path / "stub.exe"
    stub.write_bytes(synthetic_pe(ARCHIVE))
    big = tmp_path / "big.gguf"
    with open(big, "wb") as f:  # sparse: refused on its size, before anything is read
        f.write(b"GGUF")
        f.truncate(4 << 30)
    with pytest.raises(QpackError, match="over 4 GiB: build with --split"):
        build(big, stub, tmp_path / "big.exe", target="windows-x86_64")
    assert leftovers(tmp_path) == ["big.gguf", "stub.exe"]


def test_a_stub_of_another_os_is_refused_for_the_target(model, elf_stub, tmp_path):
    with pytest.raises(QpackError, match="an ELF executable, not a runtime stub for --target"):
        build(model, elf_stub, tmp_path / "x.exe", target="windows-x86_64")


def test_target_stub_comes_from_the_cache(tmp_path, monkeypatch):
    from qpack.builder import stub
    from qpack.runtime.version import __version__

    monkeypatch.setenv("QPACK_CACHE_DIR", str(tmp_path))
    with pytest.raises(QpackError, match="no windows-x86_64 runtime stub.*--stub FILE"):
        stub.get_stub("windows-x86_64")
    cached = tmp_path / f"qpack-stub-{__version__}-windows-x86_64-0123456789abcdef.exe"
    cached.write_bytes(b"MZ")
    assert stub.get_stub("windows-x86_64") == cached
