"""The C runtime compiled for the other platforms of the build workflow, from this machine.

- every kernel variant setup.py builds on macOS arm64 and x86-64, Windows x86-64 and Linux
  arm64, compiled by ziglang's clang with setup.py's own flags and warnings as errors (slow:
  ~15 s each, every function code-generated);
- macOS' universal2 Python: setup.py sets ARCHFLAGS to the machine's own slice, because an
  x86-64 -march on the arm64 slice (what a two-slice compile does) is rejected;
- MSVC: what cl's preprocessor leaves of the C code holds nothing cl lacks, at each /arch
  level setup.py uses (fast; tests/crossplat.py says how), and the check does catch the
  scalar F16C intrinsics that once sat there.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import crossplat
import pytest

SETUP = crossplat.setup_module()
# setup.py's per-variant flags for each target: the machine key it would use there.
TARGETS = {
    "aarch64-macos": "arm64",
    "x86_64-macos": "x86_64",
    "x86_64-windows-gnu": "x86_64",  # MinGW/clang flags; cl's own view: the MSVC tests below
    "aarch64-linux-gnu": "arm64",
}
COMMON = [f for f in SETUP.COMMON_GCC if f != "-pthread"]  # a link flag; this only compiles
needs_zig = pytest.mark.skipif(not crossplat.zig_available(), reason="needs ziglang (pip)")
needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc's preprocessor")


@pytest.mark.slow
@needs_zig
@pytest.mark.parametrize(
    "target,variant",
    [(t, v) for t, key in TARGETS.items() for v in SETUP.variants(key)],
)
def test_every_variant_compiles_for_every_target(tmp_path, target, variant):
    flags = SETUP.variants(TARGETS[target])[variant]
    r = crossplat.zig_compile(target, [*COMMON, *flags], tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    assert (tmp_path / "unit.o").stat().st_size > 10_000


@pytest.mark.slow
@needs_zig
def test_the_compile_generates_every_function(tmp_path):
    """The check has teeth: AVX2 code paths forced on for a baseline x86-64 CPU fail to
    compile (clang checks intrinsics only in functions it emits)."""
    forced = ["-march=x86-64", "-D__AVX__=1", "-D__AVX2__=1", "-D__FMA__=1", "-D__F16C__=1"]
    r = crossplat.zig_compile("x86_64-macos", [*COMMON, *forced], tmp_path)
    assert r.returncode != 0 and "requires target feature" in r.stderr


@needs_zig
def test_macos_builds_one_slice_with_its_own_march(tmp_path):
    """A universal2 compile hands each variant's -march to both slices: the arm64 slice
    rejects x86-64's. setup.py therefore sets ARCHFLAGS to the machine's own slice, with
    which every variant's flags match the one architecture compiled."""
    assert SETUP.archflags("darwin", "arm64") == "-arch arm64"
    assert SETUP.archflags("darwin", "x86_64") == "-arch x86_64"
    assert SETUP.archflags("linux", "x86_64") is None
    (tmp_path / "x.c").write_text("int x;\n")
    foreign = crossplat._zig(
        "clang", "--target=arm64-apple-macos11", "-march=x86-64-v3", "-c",
        str(tmp_path / "x.c"), "-o", str(tmp_path / "x.o"),
    )  # fmt: skip
    assert foreign.returncode != 0


@needs_gcc
@pytest.mark.parametrize("arch", list(crossplat.MSVC_ARCH))
def test_msvc_sees_nothing_it_lacks(arch):
    assert crossplat.msvc_problems(arch) == []


@needs_gcc
def test_msvc_view_takes_the_simd_paths_setup_py_asks_for():
    """Not a vacuous check: under /arch:AVX2 cl compiles the AVX2 and F16C kernels."""
    avx2 = crossplat.msvc_view("/arch:AVX2")
    assert "_mm256_cvtph_ps" in avx2 and "_mm256_maddubs_epi16" in avx2
    assert "_mm512_" in crossplat.msvc_view("/arch:AVX512")
    assert "_mm256_" not in crossplat.msvc_view("")


@needs_gcc
def test_msvc_check_catches_the_scalar_f16c_intrinsics(tmp_path):
    """The code as it was before: _cvtsh_ss / _cvtss_sh behind __F16C__, which
    quants_common.h defines for cl's /arch:AVX2 (they do not exist in MSVC)."""
    cython = tmp_path / "cython"
    shutil.copytree(crossplat.CYTHON, cython, ignore=shutil.ignore_patterns("generated"))
    header = cython / "quants_common.h"
    text = header.read_text()
    old_to = "    return _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h)));"
    old_from = (
        "    return (uint16_t)_mm_cvtsi128_si32(_mm_cvtps_ph(_mm_set_ss(f), "
        "_MM_FROUND_TO_NEAREST_INT));"
    )
    assert old_to in text and old_from in text
    text = text.replace(old_to, "    return _cvtsh_ss(h);")
    text = text.replace(old_from, "    return (uint16_t)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);")
    header.write_text(text)
    assert crossplat.msvc_problems("/arch:AVX2", cython) == ["_cvtsh_ss", "_cvtss_sh"]
    assert crossplat.msvc_problems("", cython) == []  # the generic build never sees them


def test_setup_py_variants_are_the_ones_runtime_cpu_knows():
    from qpack.runtime import cpu

    for key in ("x86_64", "arm64", "x86_64-msvc"):
        assert set(SETUP.variants(key)) <= set(cpu._REQUIREMENTS), key


def test_c_unit_holds_every_pxi_c_block():
    unit = crossplat.c_unit()
    # every block of C written verbatim in a .pxi lands in the unit, named after its file
    opening = 'cdef extern from *:\n    """'
    written = sum(p.read_text().count(opening) for p in crossplat.CYTHON.glob("*.pxi"))
    assert unit.count(".pxi */\n") == written > 0
    assert "qk_cpu_supports" in unit
    assert Path(crossplat.CYTHON / "forward.h").is_file()
