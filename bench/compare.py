"""qpack against llama.cpp on the same GGUF, same threads, same context, in one run.

    python bench/compare.py MODEL.gguf|SHAPE|smollm2|gemma3 [...] [-t 2] [-c 4096] [--rounds 3]

A SHAPE is a name of bench/shapes.py (`1b-q4_k_m`, `3b-q4_k_m`, ...: a synthetic GGUF of a real
model's shape, written once into its cache); `smollm2` and `gemma3` name the two real models
(from their Python packages).

For each model, alternating rounds of fresh processes (so peak RSS is each engine's own):
  - llama.cpp through llama-cpp-python, run by the Python of a separate environment
    (--llama-python, default /opt/refenv/bin/python): the runtime never imports it;
  - qpack with the kernels it picks (auto), and with the baseline `generic` kernels.
Each process measures, like llama-bench: pp64 and pp512 (a prompt of random tokens in one
batch, from an empty cache, logits of the last token) and tg128 (128 single-token decode steps
from position 0, logits every step), several repetitions after a warm-up; plus, for qpack, tg128
through the engine (greedy sampling and detokenization included, what `qpack run` does).
With --long N (N + 128 <= -c): pp{N} (an N-token prompt from an empty cache, in batches of 512)
and tg128@{N} (the prompt evaluated untimed, then 128 decode steps from position N, timed;
repeated from N). --no-short leaves the short tests out. --cache-type q8_0 runs both engines
with a q8_0 KV cache (llama.cpp: type_k = type_v = q8_0 with flash attention on, which it
requires for a quantized V).
Printed: tokens/s (median over all repetitions), peak RSS, the qpack/llama.cpp ratios, the
CPU's flags, the load average before, and how many cores other processes used during the run
(from /proc/stat minus our own CPU time), and the machine's read bandwidth with the same threads
(bench/membw.py) with each model's decode as a percentage of the limit it sets. Other engineers share the machine: measure with
--wait-idle when `uptime` says the load is low.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import membw
import shapes

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = (("pp64", 64), ("pp512", 512), ("tg128", 128))
FLAGS_SHOWN = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
               "avx512vnni", "avx_vnni", "avx512_bf16", "asimddp")  # fmt: skip


def random_tokens(n_vocab: int, n: int, seed: int = 42) -> list[int]:
    """The same pseudo-random ids in both processes, without numpy's generator versions."""
    out, state = [], seed
    for _ in range(n):
        state = (state * 6364136223846793005 + 1442695040888963407) % (1 << 64)
        out.append(100 + (state >> 33) % (n_vocab - 100))
    return out


def median_rate(fn, n: int, reps: int) -> list[float]:
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(n)
        rates.append(n / (time.perf_counter() - t0))
    return rates


def peak_rss_mib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024 if sys.platform != "darwin" else kib / (1 << 20)


# ------------------------------------------------------------------ the measuring processes


def qpack_worker(a: argparse.Namespace) -> dict:
    import numpy as np
    from qpack.runtime import cpu, hugepages
    from qpack.runtime.engine import Engine
    from qpack.runtime.gguf import open_gguf
    from qpack.runtime.model import Model
    from qpack.runtime.sampler import SamplingParams
    from qpack.runtime.tokenizer import Tokenizer

    kernels = cpu.load(a.cpu)
    gf = open_gguf(a.model)
    hugepages.prefer_huge_pages_for(gf)  # as the executable does (session.load)
    model = Model(gf, n_ctx=a.ctx, n_batch=512, threads=a.threads, kernels=kernels,
                  cache_type_k=a.cache_type, cache_type_v=a.cache_type)  # fmt: skip
    toks = random_tokens(model.n_vocab, max(512, a.long + 128))

    def pp(n: int) -> None:
        for b in range(0, n, 512):  # batches of 512, as llama.cpp's n_batch
            e = min(n, b + 512)
            model.forward(
                toks[b:e], np.arange(b, e), np.zeros(e - b), [e - b - 1] if e == n else []
            )

    def tg(n: int) -> None:
        for i in range(n):
            model.forward([toks[i]], [i], [0], [0])

    tokenizer = Tokenizer.from_gguf(gf)
    engine = Engine(model, tokenizer)
    never_stop = {t: -1e9 for t in tokenizer.stop_ids}

    def tg_engine(n: int) -> None:
        params = SamplingParams(temperature=0, max_tokens=n, logit_bias=never_stop)
        req = engine.submit([toks[0]], params)
        engine.run_until_done(req)
        assert req.usage.completion_tokens == n

    def tg_at(n: int) -> None:
        for i in range(a.long, a.long + n):
            model.forward([toks[i]], [i], [0], [0])

    pp(16), tg(4), tg_engine(4)  # warm-up: pages of the mapping, threads, caches
    out = {}
    if not a.no_short:
        out = {n: median_rate(pp if n.startswith("pp") else tg, k, a.reps) for n, k in TESTS}
        out["tg128 engine"] = median_rate(tg_engine, 128, a.reps)
    if a.long:
        out[f"pp{a.long}"] = median_rate(pp, a.long, 1)  # leaves the prompt in the cache
        out[f"tg128@{a.long}"] = median_rate(tg_at, 128, a.reps)
    out["variant"] = kernels.VARIANT
    out["threads"] = model.threads
    out["rss_mib"] = peak_rss_mib()
    return out


def llama_worker(a: argparse.Namespace) -> dict:
    import llama_cpp as L

    L.llama_backend_init()
    mp = L.llama_model_default_params()
    model = L.llama_model_load_from_file(a.model.encode(), mp)
    cp = L.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch = a.ctx, 512, 512
    cp.n_threads = cp.n_threads_batch = a.threads
    if a.cache_type == "q8_0":
        cp.type_k = cp.type_v = 8  # GGML_TYPE_Q8_0
        cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED
    ctx = L.llama_init_from_model(model, cp)
    mem = L.llama_get_memory(ctx)
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    toks = random_tokens(n_vocab, max(512, a.long + 128))

    def decode(ids: list[int]) -> None:
        arr = (L.llama_token * len(ids))(*ids)
        if L.llama_decode(ctx, L.llama_batch_get_one(arr, len(ids))) != 0:
            raise RuntimeError("llama_decode failed")
        L.llama_synchronize(ctx)

    def pp(n: int) -> None:
        L.llama_memory_clear(mem, True)
        for b in range(0, n, 512):
            decode(toks[b : min(n, b + 512)])

    def tg(n: int) -> None:
        for i in range(n):
            decode([toks[i]])

    def timed_tg(n: int) -> list[float]:  # from an empty cache each repetition, like llama-bench
        rates = []
        for _ in range(a.reps):
            L.llama_memory_clear(mem, True)
            t0 = time.perf_counter()
            tg(n)
            rates.append(n / (time.perf_counter() - t0))
        return rates

    def timed_tg_at(n: int) -> list[float]:  # from position a.long each repetition
        rates = []
        for _ in range(a.reps):
            L.llama_memory_seq_rm(mem, 0, a.long, -1)
            t0 = time.perf_counter()
            for i in range(a.long, a.long + n):
                decode([toks[i]])
            rates.append(n / (time.perf_counter() - t0))
        return rates

    pp(16)
    L.llama_memory_clear(mem, True)
    tg(4)
    out = {}
    if not a.no_short:
        out = {"pp64": median_rate(pp, 64, a.reps), "pp512": median_rate(pp, 512, a.reps),
               "tg128": timed_tg(128)}  # fmt: skip
    if a.long:
        out[f"pp{a.long}"] = median_rate(pp, a.long, 1)
        out[f"tg128@{a.long}"] = timed_tg_at(128)
    out["variant"] = "llama.cpp " + L.__version__
    out["threads"] = a.threads
    out["rss_mib"] = peak_rss_mib()
    return out


# ------------------------------------------------------------------ the driver


def run_worker(
    python: str, kind: str, a: argparse.Namespace, model: str, cpu: str = "auto"
) -> dict:
    cmd = [python, os.path.abspath(__file__), "--worker", kind, "--cpu", cpu, "-t", str(a.threads),
           "-c", str(a.ctx), "--reps", str(a.reps), "--long", str(a.long),
           "--cache-type", a.cache_type, model] + ["--no-short"] * a.no_short  # fmt: skip
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS=str(a.threads))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"{kind} worker failed on {model}:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def cpu_facts() -> tuple[str, list[str]]:
    name, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name") and name in ("", platform.machine()):
                    name = line.split(":", 1)[1].strip()
                if line.startswith(("flags", "Features")) and not flags:
                    have = set(line.split(":", 1)[1].split())
                    flags = [fl for fl in FLAGS_SHOWN if fl in have]
    except OSError:
        pass
    return name, flags


def busy_cpu_seconds() -> float | None:
    """CPU time all processes of the machine have used since boot (Linux /proc/stat)."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            vals = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def our_cpu_seconds() -> float:
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def wait_idle(limit_s: float, threshold: float = 0.5) -> None:
    deadline = time.time() + limit_s
    while os.getloadavg()[0] >= threshold and time.time() < deadline:
        time.sleep(10)


def merge(runs: list[dict]) -> dict:
    out = dict(runs[0])
    for key in [k for k, v in runs[0].items() if isinstance(v, list)]:
        out[key] = statistics.median([x for r in runs for x in r[key]])
    out["rss_mib"] = max(r["rss_mib"] for r in runs)
    return out


def table(model: str, rows: dict[str, dict], cache_type: str = "f16") -> str:
    order = ["pp64", "pp512", "tg128", "tg128 engine"]
    rates = [c for c in order if any(c in r for r in rows.values())]
    rates += sorted({c for r in rows.values() for c in r if c.startswith(("pp", "tg")) and c not in order},
                    key=lambda c: (c.startswith("tg"), c))  # fmt: skip
    cols = rates + ["rss_mib"]
    names = [("tg128 via engine" if c == "tg128 engine" else f"{c} t/s") for c in rates]
    head = "| engine | kernels | threads | " + " | ".join(names) + " | peak RSS MiB |"
    title = f"**{os.path.basename(model)}**" + (
        f" (KV cache {cache_type})" if cache_type != "f16" else ""
    )
    lines = [title, "", head, "|" + "---|" * (len(cols) + 3)]
    for label, r in rows.items():
        cells = [f"{r[c]:.1f}" if c in r else "-" for c in cols]
        lines.append(f"| {label} | {r['variant']} | {r['threads']} | " + " | ".join(cells) + " |")
    if "qpack" in rows and "llama.cpp" in rows:
        q, ref = rows["qpack"], rows["llama.cpp"]
        peer = {c: "tg128" if c == "tg128 engine" else c for c in cols}  # the engine vs plain tg
        ratio = [f"{q[c] / ref[peer[c]]:.2f}" if c in q and peer[c] in ref else "-" for c in cols]
        lines.append("| **qpack / llama.cpp** | | | " + " | ".join(ratio) + " |")
    return "\n".join(lines)


def model_file(arg: str) -> str:
    """A GGUF path as given, the real models by name (`smollm2`, `gemma3`: from their Python
    packages, as the tests find them), or the cached file of a bench/shapes.py name."""
    from qpack.builder import models

    real = {"smollm2": models.default_model_path, "gemma3": models.gemma3_path}
    if os.path.exists(arg):
        return arg
    if arg in real:
        return str(real[arg]())
    return str(shapes.model_path(arg)) if arg in shapes.MODELS else arg


def limit_line(model: str, rows: dict[str, dict], bandwidth: float, threads: int) -> str:
    limit, per_token = membw.decode_limit(model, bandwidth)
    shares = [
        f"{label} {r['tg128'] / limit:.0%}" for label, r in rows.items() if label != "qpack generic"
    ]
    return (
        f"decode limit {limit:.1f} tok/s ({bandwidth:.1f} GB/s read by {threads} threads / "
        f"{per_token / 1e9:.3f} GB per token); tg128 as % of it: {', '.join(shares)}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("-t", "--threads", type=int, default=None, help="default: physical cores")
    ap.add_argument("-c", "--ctx", type=int, default=4096, help="context size of both engines")
    ap.add_argument("--reps", type=int, default=3, help="repetitions per process")
    ap.add_argument("--rounds", type=int, default=2, help="fresh processes per engine, alternating")
    ap.add_argument("--llama-python", default="/opt/refenv/bin/python")
    ap.add_argument("--no-generic", action="store_true", help="skip the baseline kernels")
    ap.add_argument(
        "--wait-idle", type=float, default=0, help="wait up to S seconds for load < 0.5"
    )
    ap.add_argument("--long", type=int, default=0, help="also pp N and tg128 after N tokens")
    ap.add_argument("--no-short", action="store_true", help="skip pp64, pp512 and tg128")
    ap.add_argument(
        "--cache-type", choices=["f16", "q8_0"], default="f16", help="KV cache, both engines"
    )
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--worker", choices=["qpack", "llama"], help=argparse.SUPPRESS)
    ap.add_argument("--cpu", default="auto", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        a.model = a.models[0]
        print(json.dumps((qpack_worker if a.worker == "qpack" else llama_worker)(a)))
        return
    if a.threads is None:
        sys.path.insert(0, os.path.dirname(HERE))
        from qpack.runtime.model import physical_cores

        a.threads = physical_cores()
    a.models = [model_file(m) for m in a.models]
    a.ctx = max(a.ctx, a.long + 128)  # room for tg128@N
    if a.wait_idle:
        wait_idle(a.wait_idle)
    bandwidth = membw.measure_in_subprocess(a.threads)
    name, flags = cpu_facts()
    load_before = os.getloadavg()
    busy0, ours0, t0 = busy_cpu_seconds(), our_cpu_seconds(), time.time()
    results = {}
    for model in a.models:
        runs: dict[str, list[dict]] = {"qpack": [], "llama.cpp": [], "qpack generic": []}
        for _ in range(a.rounds):
            runs["qpack"].append(run_worker(sys.executable, "qpack", a, model))
            if os.path.exists(a.llama_python):
                runs["llama.cpp"].append(run_worker(a.llama_python, "llama", a, model))
        if not a.no_generic:
            runs["qpack generic"].append(run_worker(sys.executable, "qpack", a, model, "generic"))
        results[model] = {k: merge(v) for k, v in runs.items() if v}
    load_after = os.getloadavg()
    busy1, ours1, elapsed = busy_cpu_seconds(), our_cpu_seconds(), time.time() - t0
    # what the benchmark's neighbours used meanwhile (the load average counts our own threads)
    others = (
        None
        if busy0 is None or busy1 is None
        else max(0.0, (busy1 - busy0) - (ours1 - ours0)) / elapsed
    )
    print(f"CPU: {name}, {os.cpu_count()} logical CPUs; flags: {' '.join(flags)}")
    print(f"threads {a.threads}, context {a.ctx}, {a.rounds} rounds x {a.reps} repetitions (median); "
          f"load average before {load_before[0]:.2f} / {load_before[1]:.2f} (1 / 5 min); "
          f"other processes used {others if others is not None else float('nan'):.2f} cores on average "
          f"during the {elapsed:.0f} s run")  # fmt: skip
    print("read bandwidth (bench/membw.py, before the run): "
          + ", ".join(f"{bw:.1f} GB/s with {n} thread{'s' * (n > 1)}" for n, bw in bandwidth.items()) + "\n")  # fmt: skip
    for model, rows in results.items():
        print(table(model, rows, a.cache_type) + "\n")
        if all("tg128" in r for r in rows.values()):
            print(limit_line(model, rows, bandwidth[a.threads], a.threads) + "\n")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"cpu": name, "flags": flags, "threads": a.threads, "ctx": a.ctx,
                       "load_before": load_before, "load_after": load_after, "other_cores": others,
                       "seconds": elapsed, "bandwidth_gbs": bandwidth, "results": results}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
