"""The C runtime's portable paths (cython/*.h), checked on this machine as far as it can.

- The KV cache's uint16_t half path (QK_HAVE_FLOAT16=0, what MSVC builds) converts exactly as
  _Float16 does: every float -> half, every half -> float, against gcc's own _Float16 casts.
- The Windows build: the headers and native.pxi's CPU check compile with mingw-w64 for the
  three x86-64 levels, with the Win32 thread shim and with the MSVC atomics; under wine, the
  thread pool runs jobs correctly and the CPU check agrees with /proc/cpuinfo.

Each test skips when its tools (gcc, x86_64-w64-mingw32-gcc, wine) are missing.
"""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CYTHON = Path(__file__).resolve().parent.parent / "cython"
X86 = platform.machine().lower() in ("x86_64", "amd64")

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not X86, reason="x86-64 checks")]

LEVELS = {
    "generic": ["-march=x86-64"],
    "avx2": ["-march=x86-64-v3"],
    "avx512": ["-march=x86-64-v4", "-mavx512vnni"],
}
WARN = [
    "-Werror=implicit-function-declaration",
    "-Werror=incompatible-pointer-types",
    "-Werror=int-conversion",
]

HALVES_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include "quants.h"
#include "forward.h"

/* argv[1]: stride through the 2^32 float bit patterns (1 = all of them) */
int main(int argc, char **argv) {
    const uint64_t stride = argc > 1 ? strtoull(argv[1], NULL, 10) : 1;
    unsigned long long bad = 0;
    for (uint64_t i = 0; i < (1ull << 32); i += stride) {
        const uint32_t x = (uint32_t)i;
        float f;
        memcpy(&f, &x, 4);
        const _Float16 h = (_Float16)f;
        uint16_t want;
        memcpy(&want, &h, 2);
        if (qk_f32_to_f16(f) != want || qk_fp32_to_fp16_portable(f) != want) {
            if (bad++ < 5) printf("float %08x: %04x %04x, _Float16 %04x\n", (unsigned)x,
                                  qk_f32_to_f16(f), qk_fp32_to_fp16_portable(f), want);
        }
    }
    for (uint32_t b = 0; b < 65536; b++) {
        const uint16_t u = (uint16_t)b;
        _Float16 h;
        memcpy(&h, &u, 2);
        const float want = (float)h, got = qk_f16_to_f32(u);
        if (memcmp(&want, &got, 4) != 0 && bad++ < 5) printf("half %04x\n", (unsigned)b);
    }
    printf("mismatches %llu\n", bad);
    return bad != 0;
}
"""

WINDOWS_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include "quants.h"
#include "forward.h"

%(cpu_check)s

/* A job of N_OPS ops, each reading what every chunk of the previous one wrote. */
enum { N_OPS = 12, MAX_N = 257 };
static int64_t data[N_OPS][MAX_N];
static qk_pool *pool;
static int64_t job_n;

static void job(void *arg, int tid, uint32_t gen) {
    (void)arg;
    qk_ctx ctx = qk_ctx_start(pool, tid, gen), *c = &ctx;
    for (int op = 0; op < N_OPS; op++) {
        QK_CHUNKS(c, i, job_n) data[op][i] = op == 0 ? i : data[op - 1][job_n - 1 - i] + 1;
        if (!qk_op_end(c, job_n)) return;
    }
}

int main(void) {
    pool = qk_pool_new(4, N_OPS);
    if (!pool) return 2;
    printf("threads %%d\n", 1 + pool->n_started);
    for (int run = 0; run < 3000; run++) {
        job_n = 1 + (run * 37) %% MAX_N;
        qk_pool_run(pool, job, NULL);
        for (int op = 0; op < N_OPS; op++)
            for (int64_t i = 0; i < job_n; i++)
                if (data[op][i] != (op %% 2 ? job_n - 1 - i : i) + op) {
                    printf("pool: run %%d op %%d row %%d wrong\n", run, op, (int)i);
                    return 1;
                }
    }
    qk_pool_free(pool);
    printf("pool ok\n");
    /* the half conversions this build uses, on a sample (the Linux test covers all inputs) */
    for (uint64_t i = 0; i < (1ull << 32); i += 65521) {
        const uint32_t x = (uint32_t)i;
        float f;
        memcpy(&f, &x, 4);
        if (qk_f32_to_f16(f) != qk_fp32_to_fp16_portable(f)) {
            printf("half of %%08x wrong\n", (unsigned)x);
            return 1;
        }
    }
    printf("halves ok\n");
    const char *features[] = {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
                              "avx512vnni", "x86-64-v3", "x86-64-v4"};
    for (int k = 0; k < 9; k++) printf("cpu %%s %%d\n", features[k], qk_cpu_supports(features[k]));
    return 0;
}
"""


def cpu_check_source() -> str:
    """native.pxi's CPU-feature C code (its verbatim block), as a C translation unit sees it."""
    text = (CYTHON / "native.pxi").read_text()
    blocks = re.findall(r'cdef extern from \*:\n    """\n(.*?)\n    """', text, re.S)
    src = next(b for b in blocks if "qk_cpu_supports" in b)
    return "\n".join(line[4:] for line in src.splitlines())


def cpuinfo_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    return set(re.search(r"^flags\s*:(.*)$", text, re.M).group(1).split())


def expected_features(flags: set[str]) -> dict[str, bool]:
    v2 = {"pni", "ssse3", "sse4_1", "sse4_2", "popcnt", "cx16", "lahf_lm"}
    v3 = v2 | {"avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "abm", "movbe"}
    v4 = v3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
    names = {"avx512vnni": "avx512_vnni"}
    out = {f: names.get(f, f) in flags for f in ("avx2", "fma", "f16c", "avx512f", "avx512bw")}
    out.update({f: names.get(f, f) in flags for f in ("avx512vl", "avx512vnni")})
    out["x86-64-v3"] = v3 <= flags
    out["x86-64-v4"] = v4 <= flags
    return out


def compile_c(cc: str, src: str, exe: Path, flags: list[str]) -> None:
    c = exe.with_suffix(".c")
    c.write_text(src)
    cmd = [cc, "-std=c11", "-O2", f"-I{CYTHON}", *WARN, *flags, str(c), "-o", str(exe)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stderr[-4000:]}"


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
@pytest.mark.parametrize("level,stride", [("generic", 251), ("avx2", 1)])
def test_uint16_halves_convert_exactly_like_float16(tmp_path, level, stride):
    """avx2: all 2^32 floats (F16C, and the portable code against it); generic: every 251st
    (libgcc's soft-float _Float16 casts are ~40x slower), and all 65536 halves in both."""
    flags = cpuinfo_flags()
    if level == "avx2" and not expected_features(flags)["x86-64-v3"]:
        pytest.skip("this CPU cannot run x86-64-v3 code")
    exe = tmp_path / f"halves_{level}"
    compile_c("gcc", HALVES_C, exe, [*LEVELS[level], "-DQK_HAVE_FLOAT16=0", "-lm"])
    r = subprocess.run([str(exe), str(stride)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
    assert "mismatches 0" in r.stdout


MINGW = shutil.which("x86_64-w64-mingw32-gcc")
WINE = shutil.which("wine") or shutil.which("wine64")


@pytest.mark.skipif(MINGW is None, reason="needs x86_64-w64-mingw32-gcc (Debian: mingw-w64)")
@pytest.mark.parametrize("atomics", ["c11", "msvc"])
@pytest.mark.parametrize("level", list(LEVELS))
def test_windows_build_runs_the_pool(tmp_path, level, atomics):
    """Compiles for Windows (the uint16_t halves and the Win32 thread shim; the atomics of gcc
    or of MSVC's path) and, where wine is installed and this CPU has the level, runs it."""
    flags = [*LEVELS[level], "-DQK_HAVE_FLOAT16=0", "-static"]
    if atomics == "msvc":
        flags.append("-DQK_MSVC_ATOMICS=1")
    exe = tmp_path / f"check_{level}_{atomics}.exe"
    compile_c(MINGW, WINDOWS_C % {"cpu_check": cpu_check_source()}, exe, flags)
    if WINE is None:
        pytest.skip("compiled; no wine to run it")
    want = expected_features(cpuinfo_flags())
    if level != "generic" and not want[{"avx2": "x86-64-v3", "avx512": "x86-64-v4"}[level]]:
        pytest.skip("compiled; this CPU cannot run it")
    if level == "avx512" and not want["avx512vnni"]:
        pytest.skip("compiled; this CPU has no AVX-512 VNNI")
    env = {"WINEDEBUG": "-all", "WINEPREFIX": str(tmp_path / "wine"), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([WINE, str(exe)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    assert "threads 4" in r.stdout and "pool ok" in r.stdout and "halves ok" in r.stdout
    got = dict(re.findall(r"^cpu (\S+) (\d)", r.stdout, re.M))
    assert {k: v == "1" for k, v in got.items()} == want
