"""Start-up and build costs of a qpack executable, as a user meets them.

    python bench/startup.py [MODEL.gguf] [--runs 5] [--big-gib 2] [--build-only]

Prints, for MODEL (default: SmolLM2-135M-Instruct Q4_1):
- build time of `qpack build` with the stub already cached, against `cp` of the model to the
  same disk, page cache warm and cold (model and stub evicted with POSIX_FADV_DONTNEED), and
  the same for a synthetic GGUF of --big-gib GiB (a real GGUF header, one large tensor of
  incompressible bytes, no holes), written once to the temporary directory. "first" builds a model qpack has not
  seen (its remembered digests are forgotten before each run: SHA-256 and CRC-32 computed),
  "again" rebuilds it (digests remembered from the first build: a copy);
- time to `--version` (start-up: the bootloader unpacks the runtime, Python starts);
- time to the first generated token of `-p` (start-up + mapping + prompt + one token);
- time until the server's `GET /health` answers 200 (listening, model loaded), and the
  server's RSS at that moment against the model's size (the model is mapped, not read);
- peak RSS of those runs (the model is mapped, so RSS grows only with the pages touched);
- bytes read at start-up (rchar of the whole process tree) against the model's size;
- bytes PyInstaller's one-file bootloader extracts to its temporary directory at every start
  (each file scanned by antivirus on Windows and macOS), and the largest files.
Times are medians (and the fastest) of --runs runs with a warm page cache (unless said cold).
Before every timed build or cp the previous output is deleted and dirty pages are written back
(`sync`), so no run pays for another's writeback; neither cp nor the build waits for its own
data to reach the disk. qpack runs from the console script beside this Python, with its
bytecode cached.
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


def sync() -> None:
    if hasattr(os, "sync"):  # not on Windows
        os.sync()


def evict(*paths: Path) -> None:
    """Drop the files' pages from the page cache (clean pages only: sync first)."""
    sync()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def synthetic_gguf(path: Path, n_bytes: int) -> Path:
    """A GGUF the builder accepts (llama metadata, a SentencePiece vocabulary) whose one F32
    tensor is `n_bytes` of incompressible bytes: a large model for timing the copy. Written
    once; reused while its size matches."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path) + ".part", "llama")
    for key, value in {
        "block_count": 1, "context_length": 64, "embedding_length": 64,
        "feed_forward_length": 128, "attention.head_count": 4,
    }.items():  # fmt: skip
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["\u2581the"]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types([2, 3, 3] + [6] * 256 + [1])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    n_bytes -= n_bytes % 4
    w.add_tensor_info("huge.weight", (n_bytes // 4,), np.dtype(np.float32), n_bytes)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    rng = np.random.default_rng(0)
    with open(str(path) + ".part", "ab") as f:
        f.write(bytes(-f.tell() % 32))
        for done in range(0, n_bytes, 64 << 20):
            f.write(rng.bytes(min(64 << 20, n_bytes - done)))
    os.replace(str(path) + ".part", path)
    return path


def build_against_cp(qpack: list[str], model: Path, tmp: Path, runs: int, cold: bool, first: bool):
    """Seconds of each `qpack build MODEL` (cached stub; with the model's digests forgotten if
    `first`) and each `cp MODEL` on the same disk, taken in turns."""
    from qpack.builder import digests, stub

    exe, copy = tmp / "build.bin", tmp / "copy.gguf"
    # As an installed qpack runs: with its bytecode cached (an environment that sets
    # PYTHONDONTWRITEBYTECODE would make every run compile qpack's sources, ~0.1 s).
    env = dict(os.environ, PYTHONPYCACHEPREFIX=str(tmp / "pycache"))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    builds, copies = [], []
    for _ in range(runs + 1):  # the first round only warms up
        for kind in ("cp", "build"):
            stub_path = stub.get_stub()  # rebuilt here, untimed, if the runtime changed
            exe.unlink(missing_ok=True)
            copy.unlink(missing_ok=True)
            if first:
                (stub.cache_dir() / digests.CACHE_FILE).unlink(missing_ok=True)
            if cold:
                evict(model, stub_path)
            else:
                sync()
            if kind == "cp":
                copies.append(timed(["cp", str(model), str(copy)]))
            else:
                builds.append(timed([*qpack, "build", str(model), "-o", str(exe)], env=env))
    exe.unlink(missing_ok=True)
    copy.unlink(missing_ok=True)
    sync()
    return builds[1:], copies[1:]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss_mib(pid: int) -> float:
    """RSS of a process and its descendants (the one-file bootloader runs Python as a child)."""
    if not os.path.isdir("/proc"):  # macOS, Windows
        return float("nan")
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, StopIteration):
            pass
    return total / 1024


def time_to_health(exe: Path) -> tuple[float, float]:
    """Seconds from exec until GET /health answers 200, and the server's RSS (MiB) then."""
    import urllib.error
    import urllib.request

    port = free_port()
    start = time.perf_counter()
    proc = subprocess.Popen(
        [str(exe), "--port", str(port), "--nobrowser"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass  # not listening yet (URLError) or still loading (503)
            if proc.poll() is not None or time.perf_counter() - start > 60:
                raise SystemExit(f"{exe} did not become ready (exit {proc.returncode})")
            time.sleep(0.005)
        ready = time.perf_counter() - start
        return ready, tree_rss_mib(proc.pid)
    finally:
        stop_tree(proc)


def stop_tree(proc: subprocess.Popen) -> None:
    """Stop the one-file executable and the Python child it runs. POSIX: SIGTERM to the
    bootloader, which forwards it to the child and removes its temporary directory. Windows:
    TerminateProcess (Popen.terminate) would end the bootloader alone, leaving the child
    running with the executable and the extracted files open: end the whole tree."""
    if sys.platform == "win32":
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(proc.pid)], capture_output=True)
    else:
        proc.terminate()
    proc.wait()


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


def compare_stubs(stubs: list[Path], model: Path | None, runs: int) -> None:
    from qpack.builder import models, pack, stub

    model = model or models.default_model_path()
    suffix = ".exe" if sys.platform == "win32" else ".bin"
    with tempfile.TemporaryDirectory(prefix="qpack-bench-", dir=os.getcwd()) as tmp:
        exes = []
        for i, s in enumerate(stubs):
            exe = Path(tmp) / f"stub{i}{suffix}"
            pack.build_executable(model, exe, s, name="m", target=stub.current_platform(),
                                  show_progress=False)  # fmt: skip
            time_to_health(exe)  # warm
            exes.append(exe)
        times: list[list[float]] = [[] for _ in exes]
        for _ in range(runs):
            for i, exe in enumerate(exes):
                times[i].append(time_to_health(exe)[0])
    print(f"{'stub':48} {'extracted':>10} {'files':>5} {'/health median':>15} {'fastest':>8}")
    for s, t in zip(stubs, times, strict=True):
        files = stub.extracted_files(s)
        print(f"{s.name[:48]:48} {sum(n for _, n in files) / 2**20:6.1f} MiB {len(files):5} "
              f"{statistics.median(t):13.2f} s {min(t):6.2f} s")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", type=Path)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--big-gib",
        type=float,
        default=2.0,
        help="size of the synthetic GGUF for the build timing (0: skip it)",
    )
    parser.add_argument(
        "--big-path", type=Path, default=Path(tempfile.gettempdir()) / "qpack-bench-big.gguf"
    )
    parser.add_argument("--build-only", action="store_true", help="time the builds only")
    parser.add_argument(
        "--compare-stubs",
        nargs="+",
        type=Path,
        metavar="STUB",
        help="only compare these runtime stubs: bytes extracted at each start and exec -> "
        "/health, the stubs' executables started in turn (same load for each)",
    )
    args = parser.parse_args()
    if args.compare_stubs:
        compare_stubs(args.compare_stubs, args.model, args.runs)
        return

    from qpack.builder import models, stub

    model = args.model or models.default_model_path()
    runtime_stub = stub.get_stub()  # cached before anything is timed
    extracted = stub.extracted_files(runtime_stub)
    size_mib = model.stat().st_size / 2**20
    # The console script beside this Python: a version manager's shim (pyenv's costs ~50 ms)
    # is not qpack's time.
    script = Path(sys.executable).with_name("qpack")
    qpack = [str(script)] if script.is_file() else [shutil.which("qpack") or ""]
    if not qpack[0]:
        sys.exit("qpack is not on PATH (pip install -e .)")

    with tempfile.TemporaryDirectory(prefix="qpack-bench-", dir=os.getcwd()) as tmp:
        tmp = Path(tmp)
        models_timed = [model]
        if args.big_gib > 0:
            big_size = int(args.big_gib * 2**30)
            big = args.big_path
            if not big.is_file() or abs(big.stat().st_size - big_size) > 1 << 20:
                print(f"writing {big} ({args.big_gib:g} GiB, once)", file=sys.stderr)
                synthetic_gguf(big, big_size)
            models_timed.append(big)
        print(f"{'build (stub cached) vs cp':28} {'model':>10} {'cache':>5} {'build':>5} "
              f"{'build':>8} {'cp':>8} {'ratio':>6}   fastest: build, cp, ratio")  # fmt: skip
        for m in models_timed:
            for first in (True, False):
                # A cold page cache needs posix_fadvise (not on macOS or Windows).
                for cold in (False, True) if hasattr(os, "posix_fadvise") else (False,):
                    builds, copies = build_against_cp(qpack, m, tmp, args.runs, cold, first)
                    build, copy = statistics.median(builds), statistics.median(copies)
                    print(f"{m.name[:28]:28} {m.stat().st_size / 2**20:6.0f} MiB "
                          f"{'cold' if cold else 'warm':>5} {'first' if first else 'again':>5} "
                          f"{build:6.2f} s {copy:6.2f} s {build / copy:5.2f}x   "
                          f"{min(builds):5.2f} s {min(copies):5.2f} s "
                          f"{min(builds) / min(copies):5.2f}x", flush=True)  # fmt: skip
        if args.build_only:
            return

        exe = tmp / ("model.exe" if sys.platform == "win32" else "model.bin")
        subprocess.run([*qpack, "build", str(model), "-o", str(exe)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
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
        time_to_health(exe)  # warm
        health_runs = [time_to_health(exe) for _ in range(args.runs)]
        health = statistics.median(t for t, _ in health_runs)
        rss_ready = statistics.median(r for _, r in health_runs)
        exe_mib = exe.stat().st_size / 2**20

    print(f"model {model.name}: {size_mib:.1f} MiB; executable {exe_mib:.1f} MiB")
    print(f"{'exec to --version':28} {version:7.2f} s   peak RSS {rss_version:6.1f} MiB")
    print(f"{'exec to first token (-p)':28} {ttft:7.2f} s   peak RSS {rss_token:6.1f} MiB")
    print(f"{'exec to /health ready':28} {health:7.2f} s   RSS then {rss_ready:6.1f} MiB "
          f"(model {size_mib:.1f} MiB)")  # fmt: skip
    print(f"{'read at start (--version)':28} {read_mib:7.1f} MiB (model {size_mib:.1f} MiB)")
    total = sum(n for _, n in extracted)
    print(f"{'extracted at each start':28} {total / 2**20:7.1f} MiB in {len(extracted)} files "
          f"(stub {runtime_stub.stat().st_size / 2**20:.1f} MiB); largest:")  # fmt: skip
    for name, n in extracted[:8]:
        print(f"{'':30}{n / 2**20:6.1f} MiB  {name}")


if __name__ == "__main__":
    main()
