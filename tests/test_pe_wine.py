"""Windows executables from this machine: a real PyInstaller Windows bootloader, a model
inserted by `qpack build --target windows-x86_64 --stub`, run under wine.

The stub is made as PyInstaller's EXE makes a one-file Windows executable: the debug bootloader
(run_d.exe from PyInstaller's own win_amd64 wheel, downloaded from PyPI at the installed
version) with a PKG archive from PyInstaller's CArchiveWriter appended as overlay. The result
is judged by pefile, PyInstaller's CArchiveReader, zipfile, Info-ZIP's unzip, and the
bootloader itself under wine64: it must find its archive's cookie where the packer moved it
and extract every member; it then stops at loading python311.dll, which the test archive does
not carry.

What only a real Windows machine shows (the build workflow's windows-latest job): the real
runtime stub (CPython's DLL, the MSVC-built kernels) starting, the model mapped in place by
Windows' mmap, Defender's scan of the extracted files, the loader's 4 GiB limit, Ctrl-C.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from gguf_fixtures import tiny_llama
from qpack.builder.cli import main as qpack_cli
from qpack.runtime import embedded

pefile = pytest.importorskip("pefile")
from PyInstaller.archive.readers import CArchiveReader  # noqa: E402
from PyInstaller.archive.writers import CArchiveWriter  # noqa: E402

pytestmark = pytest.mark.slow
MAGIC = b"MEI\014\013\012\013\016"
WINE = shutil.which("wine64") or shutil.which("wine")


def windows_bootloader(directory: Path, name: str = "run_d.exe") -> Path:
    """PyInstaller's Windows bootloader from its win_amd64 wheel on PyPI."""
    version = importlib.metadata.version("pyinstaller")
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--platform", "win_amd64", f"pyinstaller=={version}", "-d", str(directory)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    wheels = list(directory.glob("pyinstaller-*-win_amd64.whl"))
    if r.returncode != 0 or not wheels:
        pytest.skip(f"PyInstaller's win_amd64 wheel is not reachable: {r.stderr[-300:]}")
    with zipfile.ZipFile(wheels[0]) as zf:
        data = zf.read(f"PyInstaller/bootloader/Windows-64bit-intel/{name}")
    out = directory / name
    out.write_bytes(data)
    return out


@pytest.fixture(scope="module")
def windows_stub(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("winstub")
    bootloader = windows_bootloader(d)
    (d / "payload.bin").write_bytes(os.urandom(300_000))
    (d / "notes.txt").write_text("the archive's second member\n" * 100)
    CArchiveWriter(
        str(d / "PKG"),
        [("payload.bin", str(d / "payload.bin"), False, "x"),
         ("notes.txt", str(d / "notes.txt"), True, "x")],
        "python311.dll",
    )  # fmt: skip
    stub = d / "qpack-stub.exe"
    stub.write_bytes(bootloader.read_bytes() + (d / "PKG").read_bytes())
    return stub


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("model") / "tiny-llama-Q8_0.gguf")


@pytest.fixture(scope="module")
def built(windows_stub, model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out")
    result = CliRunner().invoke(
        qpack_cli,
        ["build", str(model), "--target", "windows-x86_64", "--stub", str(windows_stub),
         "-o", str(out), "--name", "tiny", "--args", "-c 64"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "(pe layout)" in result.output
    return out / "tiny.exe"


def run_under_wine(exe: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {"WINEDEBUG": "-all", "WINEPREFIX": str(tmp_path / "wineprefix"), "PATH": "/usr/bin:/bin",
           "HOME": str(tmp_path)}  # fmt: skip
    return subprocess.run(
        [WINE, str(exe)], capture_output=True, text=True, errors="replace", env=env, timeout=600
    )


def test_pe_headers_overlay_and_checksum(built, windows_stub):
    pe = pefile.PE(str(built))
    end_of_image = max(s.PointerToRawData + s.SizeOfRawData for s in pe.sections)
    member = embedded.locate_model(str(built))
    assert end_of_image < member.offset  # the model lies in the overlay, before the archive
    assert pe.OPTIONAL_HEADER.CheckSum == pe.generate_checksum()
    stub_pe = pefile.PE(str(windows_stub))
    assert [s.Name for s in pe.sections] == [s.Name for s in stub_pe.sections]


def test_zip_view_reads_the_model(built, model):
    with zipfile.ZipFile(built) as zf:
        assert zf.testzip() is None
        assert zf.read("model.gguf") == model.read_bytes()
        assert zf.read(".args") == b"-c\n64\n"
    if shutil.which("unzip"):
        assert subprocess.run(["unzip", "-tq", str(built)], capture_output=True).returncode == 0
        listing = subprocess.run(["unzip", "-l", str(built)], capture_output=True, text=True)
        assert "model.gguf" in listing.stdout
    assert embedded.locate_model(str(built)).offset % 65536 == 0


def test_pyinstaller_reads_its_archive_where_it_moved(built, windows_stub):
    reader = CArchiveReader(str(built))
    assert sorted(reader.toc) == ["notes.txt", "payload.bin"]
    assert reader.extract("notes.txt") == b"the archive's second member\n" * 100
    original = CArchiveReader(str(windows_stub))
    assert reader.extract("payload.bin") == original.extract("payload.bin")


@pytest.mark.skipif(WINE is None, reason="needs wine (Debian: wine, wine64)")
def test_the_bootloader_finds_its_archive_under_wine(built, windows_stub, tmp_path):
    """run_d.exe logs each step: the cookie where the packer moved it, the extraction of every
    member, then the Python DLL this test archive does not carry."""
    for exe in (windows_stub, built):  # the stub first: the fixture itself must behave
        r = run_under_wine(exe, tmp_path)
        log = r.stderr
        cookie = exe.read_bytes().rindex(MAGIC)
        assert f"cookie found at offset 0x{cookie:X}" in log, log[-3000:]
        assert "extracting files to temporary directory" in log
        assert "Failed to extract" not in log and "ERROR] Could not" not in log
        assert "loading Python DLL" in log and "python311.dll" in log, log[-3000:]
