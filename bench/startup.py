"""Start-up and build costs of a qpack executable, as a user meets them.

    python bench/startup.py [MODEL.gguf] [--runs 5]

Prints, for MODEL (default: SmolLM2-135M-Instruct Q4_1):
- build time of `qpack build` with the stub already cached, against `cp` of the model;
- time to `--version` (start-up: the bootloader unpacks the runtime, Python starts);
- time to the first generated token of `-p` (start-up + mapping + prompt + one token);
- peak RSS of those runs (the model is mapped, so RSS grows only with the pages touched);
- bytes read at start-up (rchar of the whole process tree) against the model's size.
Times are medians of --runs runs with a warm page cache.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "The capital of France is"


def rchar() -> int:
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("rchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def timed(cmd: list[str], **kw) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
    return time.perf_counter() - start


def median_time(cmd: list[str], runs: int, **kw) -> float:
    timed(cmd, **kw)  # warm the page cache
    return statistics.median(timed(cmd, **kw) for _ in range(runs))


def time_to_first_token(exe: Path) -> float:
    """From exec until the first byte after the echoed prompt reaches stdout."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [str(exe), "-p", PROMPT, "-n", "1", "--temp", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    seen = b""
    first = None
    while chunk := proc.stdout.read1(4096):
        seen += chunk
        if first is None and len(seen) > len(PROMPT.encode()):
            first = time.perf_counter() - start
    proc.wait()
    if proc.returncode != 0:
        raise SystemExit(f"{exe} -p failed (exit {proc.returncode})")
    return first if first is not None else time.perf_counter() - start


def peak_rss_mib(cmd: list[str]) -> float:
    """Peak RSS of the largest process the command starts (the one-file bootloader's child)."""
    script = (
        "import resource, subprocess, sys;"
        "subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL);"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", script, *cmd], capture_output=True, text=True)
    if out.returncode != 0:  # no `resource` module (Windows)
        return float("nan")
    kib = int(out.stdout.strip())
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20  # macOS reports bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", type=Path)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    from qpack.builder import models, stub

    model = args.model or models.default_model_path()
    stub.get_stub()  # cached before anything is timed
    size_mib = model.stat().st_size / 2**20
    qpack = shutil.which("qpack") or sys.exit("qpack is not on PATH (pip install -e .)")

    with tempfile.TemporaryDirectory(prefix="qpack-bench-", dir=os.getcwd()) as tmp:
        tmp = Path(tmp)
        exe = tmp / "model.bin"
        build = median_time([qpack, "build", str(model), "-o", str(exe)], args.runs)
        copy = median_time(["cp", str(model), str(tmp / "copy.gguf")], args.runs)
        version = median_time([str(exe), "--version"], args.runs)
        before = rchar()
        subprocess.run([str(exe), "--version"], stdout=subprocess.DEVNULL, check=True)
        read_mib = (rchar() - before) / 2**20 if before >= 0 else float("nan")  # Linux only
        try:
            time_to_first_token(exe)  # warm
            ttft = statistics.median(time_to_first_token(exe) for _ in range(args.runs))
            rss_token = peak_rss_mib([str(exe), "-p", PROMPT, "-n", "1", "--temp", "0"])
        except SystemExit as e:
            print(f"(first token not measured: {e})")
            ttft = rss_token = float("nan")
        rss_version = peak_rss_mib([str(exe), "--version"])
        exe_mib = exe.stat().st_size / 2**20

    print(f"model {model.name}: {size_mib:.1f} MiB; executable {exe_mib:.1f} MiB")
    print(f"{'build (stub cached)':28} {build:7.2f} s   cp of the model {copy:6.2f} s   "
          f"ratio {build / copy:5.1f}x")  # fmt: skip
    print(f"{'exec to --version':28} {version:7.2f} s   peak RSS {rss_version:6.1f} MiB")
    print(f"{'exec to first token (-p)':28} {ttft:7.2f} s   peak RSS {rss_token:6.1f} MiB")
    print(f"{'read at start (--version)':28} {read_mib:7.1f} MiB (model {size_mib:.1f} MiB)")


if __name__ == "__main__":
    main()
