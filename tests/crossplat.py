"""The C runtime as other platforms' compilers see it, checked from this machine.

- `c_unit()`: one C translation unit holding every C part of the extension: cython/*.h (the
  kernels, the forward pass, the thread pool) and the C blocks written verbatim in the .pxi
  files (the CPU-feature check). The Cython-generated .c is left out on purpose: it needs the
  target's own Python headers (pyconfig.h differs per OS: `long` is 32 bits on Windows), and it
  is Cython's portable code, not ours.
- `zig_compile()`: ziglang's clang (PyPI `ziglang`, which carries the macOS and Windows headers)
  compiles that unit for another target with setup.py's own flags, warnings as errors.
- `msvc_view()` / `msvc_problems()`: MSVC cannot be run here, so its view is computed: the unit
  preprocessed with exactly the macros cl defines for x64 and each setup.py /arch level (no
  __GNUC__, no __clang__, system headers empty), then searched for what cl lacks (gcc/clang
  builtins, attributes, inline asm, _Float16, the scalar F16C intrinsics). Anything left after
  the guards would not compile (or not link) under MSVC.

`python tests/crossplat.py` prints the MSVC problems (exit status 1 when there are any).
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CYTHON = REPO / "cython"

# What cl defines for x64 at each of setup.py's MSVC levels (/arch:AVX2 defines __AVX__ and
# __AVX2__ only; /arch:AVX512 adds the five AVX-512 subsets; nothing for FMA, F16C or VNNI).
MSVC_BASE = {"_MSC_VER": "1940", "_MSC_FULL_VER": "194033811", "_M_X64": "100", "_M_AMD64": "100",
             "_WIN32": "1", "_WIN64": "1", "__STDC_VERSION__": "201710L"}  # fmt: skip
MSVC_ARCH = {
    "": [],
    "/arch:AVX2": ["__AVX__", "__AVX2__"],
    "/arch:AVX512": ["__AVX__", "__AVX2__"]
    + ["__AVX512F__", "__AVX512CD__", "__AVX512BW__", "__AVX512DQ__", "__AVX512VL__"],
}
# Identifiers (or prefixes, ending in "*") that cl does not know.
MSVC_LACKS = [
    "_cvtsh_ss", "_cvtss_sh",  # scalar F16C: gcc and clang only (MSVC: _mm_cvtph_ps/_mm_cvtps_ph)
    "__builtin_*", "__sync_*", "__atomic_*", "__attribute__", "__asm__", "__asm", "asm",
    "_Float16", "__fp16", "__int128", "typeof", "__typeof__", "__auto_type", "__extension__",
    "__thread", "__cpuid_count", "__get_cpuid", "__builtin_cpu_supports",
]  # fmt: skip


def setup_module():
    """setup.py, imported (its setup() call only runs as __main__): the flag tables."""
    spec = importlib.util.spec_from_file_location("qpack_setup", REPO / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SYSTEM_HEADERS = {  # what cython/*.h include, per target family, included first
    "all": ["stdint.h", "stddef.h", "stdlib.h", "string.h", "math.h", "stdatomic.h", "float.h"],
    "x86": ["immintrin.h"],
    "arm": ["arm_neon.h"],
    "posix": ["pthread.h", "sched.h"],
    "x86-posix": ["cpuid.h"],
    "windows": ["windows.h", "process.h", "malloc.h", "intrin.h"],
}


def c_unit(families: tuple[str, ...] = ()) -> str:
    """Every C part of the extension in one translation unit. With the target's header
    `families` (SYSTEM_HEADERS), the system headers come first and then `static` and `inline`
    are defined away, so that every function is emitted: clang checks an intrinsic against
    the enabled target features only in functions it generates code for."""
    blocks = []
    for pxi in sorted(CYTHON.glob("*.pxi")):
        text = pxi.read_text()
        for block in re.findall(r'cdef extern from \*:\n    """\n(.*?)\n    """', text, re.S):
            blocks.append(
                f"/* {pxi.name} */\n" + "\n".join(line[4:] for line in block.splitlines())
            )
    head = ""
    if families:
        headers = [h for f in ("all", *families) for h in SYSTEM_HEADERS[f]]
        head = "".join(f"#include <{h}>\n" for h in headers)
        head += "#define static\n#define inline\n"
    return (
        head
        + '#include "quants.h"\n#include "forward.h"\n#include "workers.h"\n'
        + '#include "quantize/k_quantize.h"\n'  # the builder's quantize module
        + "\n".join(blocks)
        + "\n"
    )


def zig_available() -> bool:
    return importlib.util.find_spec("ziglang") is not None


# zig target (whose libc headers zig carries) -> clang triple
ZIG_TARGETS = {
    "aarch64-macos": "arm64-apple-macos11",
    "x86_64-macos": "x86_64-apple-macos11",
    "x86_64-windows-gnu": "x86_64-w64-windows-gnu",
    "aarch64-linux-gnu": "aarch64-unknown-linux-gnu",
}


ZIG_FAMILIES = {
    "aarch64-macos": ("arm", "posix"),
    "x86_64-macos": ("x86", "posix", "x86-posix"),
    "x86_64-windows-gnu": ("x86", "windows"),
    "aarch64-linux-gnu": ("arm", "posix"),
}


def _zig(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ziglang", *args], capture_output=True,
                          text=True, **kw)  # fmt: skip


def zig_libc_flags(zig_target: str, scratch: Path) -> list[str]:
    """The -isystem and -D flags `zig cc` gives clang for a target's libc headers. `zig cc`
    itself cannot take setup.py's flags: it parses -march/-mtune against its own CPU names."""
    probe = scratch / "probe.c"
    probe.write_text("int x;\n")
    r = _zig("cc", "-target", zig_target, "-###", "-c", str(probe), "-o", str(scratch / "p.o"))
    words = re.findall(r'"((?:\\.|[^"\\])*)"', r.stderr)
    flags = []
    for key, value in zip(words, words[1:], strict=False):
        if key in ("-isystem", "-D"):
            flags += [key, value]
    assert any(f == "-isystem" for f in flags), r.stderr[-2000:]
    return flags


def zig_compile(zig_target: str, flags: list[str], out_dir: Path) -> subprocess.CompletedProcess:
    """Compile c_unit(), every function emitted, to an object file with zig's clang, for a target of ZIG_TARGETS, with
    `flags` exactly as given (setup.py's), warnings as errors."""
    src = out_dir / "unit.c"
    src.write_text(c_unit(ZIG_FAMILIES[zig_target]))
    cmd = ["clang", f"--target={ZIG_TARGETS[zig_target]}", "-nostdinc",
           *zig_libc_flags(zig_target, out_dir), f"-I{CYTHON}", "-Wall", "-Werror", *flags,
           # a function-local `static const` table left without `static` is uninitialized
           "-Wno-default-const-init-var-unsafe",
           "-c", str(src), "-o", str(out_dir / "unit.o")]  # fmt: skip
    return _zig(*cmd)


def msvc_view(arch: str, cython_dir: Path = CYTHON) -> str:
    """The unit as cl's preprocessor sees it at an /arch level (gcc's cpp with no predefined
    macro but cl's, and empty system headers: only our code is left)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sources = [p for p in cython_dir.rglob("*") if p.suffix in (".h", ".pxi", ".def")]
        text = "".join(p.read_text() for p in sources)
        for header in re.findall(r"#\s*include\s*<([^>]+)>", text):
            (tmp / header).parent.mkdir(parents=True, exist_ok=True)
            (tmp / header).write_text("")
        (tmp / "unit.c").write_text(c_unit())
        macros = [f"-D{k}={v}" for k, v in MSVC_BASE.items()] + [
            f"-D{m}=1" for m in MSVC_ARCH[arch]
        ]
        cmd = ["gcc", "-E", "-P", "-undef", "-nostdinc", f"-I{cython_dir}", f"-I{tmp}",
               *macros, str(tmp / "unit.c")]  # fmt: skip
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def msvc_problems(arch: str, cython_dir: Path = CYTHON) -> list[str]:
    """Identifiers cl lacks that remain in the unit after cl's preprocessing."""
    code = msvc_view(arch, cython_dir)
    code = re.sub(r'"(?:\\.|[^"\\])*"', '""', code)  # string literals are not code
    words = set(re.findall(r"[A-Za-z_]\w*", code))
    found = []
    for banned in MSVC_LACKS:
        if banned.endswith("*"):
            found += sorted(w for w in words if w.startswith(banned[:-1]))
        elif banned in words:
            found.append(banned)
    if "({" in code.replace(" ", ""):
        found.append("statement expression ({ ... })")
    return sorted(set(found))


if __name__ == "__main__":
    bad = {arch or "(default)": msvc_problems(arch) for arch in MSVC_ARCH}
    for arch, problems in bad.items():
        print(f"cl {arch}: {', '.join(problems) or 'nothing MSVC lacks'}")
    sys.exit(1 if any(bad.values()) else 0)
