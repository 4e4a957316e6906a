"""`qpack advise`: quantize a model to the candidate types and measure each on this machine --
file size, RAM at the chosen context, prefill and decode speed, perplexity and KL divergence
against the unquantized model -- then recommend the best quality that fits the RAM budget.

Every candidate's file and measurements are cached per (model file, type, settings) in the
cache directory, so a second run (or another --ram) costs nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from qpack.builder.quantize import FILE_TYPES, quantize_file
from qpack.runtime.errors import QpackError
from qpack.runtime.gguf import open_gguf
from qpack.runtime.kl_divergence import kl_divergence
from qpack.runtime.model import Model
from qpack.runtime.perplexity import scoring_stream
from qpack.runtime.tokenizer import Tokenizer

CANDIDATES = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_K_S", "IQ4_XS", "Q4_0", "Q3_K_M", "Q2_K")
# with an importance matrix: one mix per IQ family and size class
IQ_CANDIDATES = ("IQ3_M", "IQ3_XXS", "IQ2_M", "IQ2_XXS", "IQ1_M")
RESULTS_VERSION = 1  # bump when a measurement changes meaning


@dataclass
class Measurement:
    type: str
    file_bytes: int
    ram_bytes: int  # weights (mapped) + KV cache + scratch at the context size
    prefill_tps: float
    decode_tps: float
    ppl: float
    kld: float
    same_top: float


@dataclass(frozen=True)
class Settings:
    ctx: int  # context for the RAM estimate
    eval_ctx: int  # window of the perplexity / KLD evaluation
    eval_windows: int
    threads: int
    text_digest: str

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def model_key(path: Path) -> str:
    st = path.stat()
    raw = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return f"{path.stem}-{hashlib.sha256(raw.encode()).hexdigest()[:12]}"


def parse_size(text: str) -> int:
    """'8G', '512M', '1.5GiB', '2000000000' -> bytes."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if scale > 1 else t) * scale)
    except ValueError:
        raise QpackError(f"cannot read {text!r} as a size (e.g. 8G, 512M)") from None


def physical_ram() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def _speed(model: Model, n_prompt: int = 128, n_decode: int = 32) -> tuple[float, float]:
    """Prefill tokens/s (one batch of n_prompt) and decode tokens/s (one token per step)."""
    rng = np.random.default_rng(0)
    prompt = rng.integers(10, model.n_vocab - 10, size=n_prompt).tolist()
    start = time.perf_counter()
    model.forward(prompt, np.arange(n_prompt), np.zeros(n_prompt, np.int64), [n_prompt - 1])
    prefill = n_prompt / (time.perf_counter() - start)
    start = time.perf_counter()
    tok = prompt[-1]
    for i in range(n_decode):
        out = model.forward([tok], np.array([n_prompt + i]), np.zeros(1, np.int64), [0])
        tok = int(np.argmax(out[0]))
    decode = n_decode / (time.perf_counter() - start)
    return prefill, decode


def measure(
    path: Path, type_name: str, base: Model, tokens: list[int], bos, s: Settings, kernels
) -> Measurement:
    gf = open_gguf(path)
    ram_model = Model(gf, n_ctx=s.ctx, n_batch=512, threads=s.threads, kernels=kernels)
    r = ram_model.report
    ram = path.stat().st_size + r.kv_bytes + r.scratch_bytes
    prefill, decode = _speed(ram_model)
    del ram_model
    evaluated = Model(gf, n_ctx=s.eval_ctx, n_batch=s.eval_ctx, threads=s.threads, kernels=kernels)
    *_, stats = kl_divergence(evaluated, base, tokens, s.eval_ctx, bos)
    summary = stats.summary()
    return Measurement(
        type=type_name,
        file_bytes=path.stat().st_size,
        ram_bytes=int(ram),
        prefill_tps=round(prefill, 1),
        decode_tps=round(decode, 1),
        ppl=summary["ppl"],
        kld=summary["kld_mean"],
        same_top=summary["same_top"],
    )


def advise(
    model_path: Path,
    text: str,
    cache: Path,
    types: tuple[str, ...] = CANDIDATES,
    ctx: int = 4096,
    eval_ctx: int = 256,
    eval_windows: int = 16,
    threads: int | None = None,
    kernels=None,
    note: Callable[[str], None] = lambda _s: None,
    imatrix: Path | None = None,
) -> list[Measurement]:
    """Measurements for the unquantized model (first) and each candidate type; with `imatrix`
    (an importance matrix GGUF) every candidate is quantized with it, as llama-quantize does."""
    from qpack.runtime import cpu
    from qpack.runtime.model import physical_cores

    for t in types:
        if t.upper() not in FILE_TYPES:
            raise QpackError(f"unknown candidate type {t!r} (choose from {', '.join(FILE_TYPES)})")
    kernels = kernels or cpu.current()
    threads = threads or physical_cores()
    gf = open_gguf(model_path)
    base_type = _dominant_type(gf)
    if base_type not in ("F32", "F16", "BF16"):
        raise QpackError(
            f"{model_path}: advise needs the unquantized model (F16, BF16 or F32), not {base_type}"
        )
    tok = Tokenizer.from_gguf(gf)
    tokens, bos = scoring_stream(tok, text)  # perplexity's windows, as llama-perplexity's
    tokens = tokens[: eval_ctx * eval_windows]
    if len(tokens) < eval_ctx:
        raise QpackError(f"the text has {len(tokens)} tokens: at least {eval_ctx} needed")
    s = Settings(ctx, eval_ctx, len(tokens) // eval_ctx, threads, _digest(tokens))
    folder = cache / "advise" / model_key(model_path)
    folder.mkdir(parents=True, exist_ok=True)
    weights, im_tag = None, ""
    if imatrix is not None:
        from qpack.builder.imatrix import read_imatrix

        weights = read_imatrix(imatrix)
        im_tag = ".im-" + hashlib.sha256(Path(imatrix).read_bytes()).hexdigest()[:12]
    base = Model(gf, n_ctx=eval_ctx, n_batch=eval_ctx, threads=threads, kernels=kernels)
    results = []
    for t in (base_type, *(x.upper() for x in types)):
        tag = im_tag if t != base_type else ""
        result_file = folder / f"{t}{tag}.{s.key()}.v{RESULTS_VERSION}.json"
        if result_file.exists():
            results.append(Measurement(**json.loads(result_file.read_text())))
            note(f"{t}: cached")
            continue
        path = model_path if t == base_type else folder / f"{t}{tag}.gguf"
        if not path.exists():
            note(f"{t}: quantizing")
            quantize_file(model_path, path, t, imatrix=weights, threads=threads)
        note(f"{t}: measuring")
        m = measure(path, t, base, tokens, bos, s, kernels)
        result_file.write_text(json.dumps(asdict(m)))
        results.append(m)
    return results


def imatrix_from_text(
    model_path: Path, text: str, cache: Path, kernels, chunks: int = 16, chunk_size: int = 512
) -> Path:
    """An importance matrix of the model on `text` (what `qpack imatrix` computes), cached."""
    from qpack.builder.imatrix import compute_imatrix, write_imatrix

    gf = open_gguf(model_path)
    tok = Tokenizer.from_gguf(gf)
    tokens = tok.encode(text, add_bos=False)
    n = min(chunks, len(tokens) // chunk_size)
    if n == 0:
        raise QpackError(f"the text has {len(tokens)} tokens: an imatrix needs {chunk_size}")
    tokens = tokens[: n * chunk_size]
    out = cache / "advise" / model_key(model_path) / f"imatrix.{_digest(tokens)}.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        bos = tok.bos_id if tok.add_bos else None
        sums, counts, n_chunks = compute_imatrix(
            model_path, tokens, chunk_size, bos, kernels.dequantize
        )
        write_imatrix(out, sums, counts, n_chunks, chunk_size, ["advise text"])
    return out


def _dominant_type(gf) -> str:
    sizes: dict[str, int] = {}
    for t in gf.tensors.values():
        sizes[t.type.name] = sizes.get(t.type.name, 0) + t.nbytes
    return max(sizes, key=sizes.get)


def _digest(tokens: list[int]) -> str:
    return hashlib.sha256(np.asarray(tokens, np.int64).tobytes()).hexdigest()[:12]


def recommend(results: list[Measurement], ram_budget: int) -> Measurement | None:
    """The most faithful candidate (lowest KL divergence) whose RAM fits the budget."""
    fitting = [m for m in results[1:] if m.ram_bytes <= ram_budget]
    if results and results[0].ram_bytes <= ram_budget:
        fitting.append(results[0])
    return min(fitting, key=lambda m: (m.kld, m.file_bytes), default=None)


def format_table(results: list[Measurement], ram_budget: int, ctx: int) -> str:
    mib = 1 << 20
    head = (
        f"{'type':8} {'file MiB':>9} {'RAM@' + str(ctx) + ' MiB':>13} {'prefill t/s':>11} "
        f"{'decode t/s':>10} {'PPL':>9} {'KLD':>8} {'same top':>8}"
    )
    rows = [head, "-" * len(head)]
    best = recommend(results, ram_budget)
    for m in results:
        mark = "  <- recommended" if best is m else ("" if m.ram_bytes <= ram_budget else "  (over budget)")  # fmt: skip
        rows.append(
            f"{m.type:8} {m.file_bytes / mib:9.1f} {m.ram_bytes / mib:13.1f} {m.prefill_tps:11.1f} "
            f"{m.decode_tps:10.1f} {m.ppl:9.3f} {m.kld:8.4f} {100 * m.same_top:7.1f}%{mark}"
        )
    if best is None:
        rows.append(f"nothing fits in {_size(ram_budget)} at context {ctx}")
    else:
        rows.append(
            f"recommended for {_size(ram_budget)} at context {ctx}: {best.type} "
            f"(the lowest KL divergence that fits)"
        )
    return "\n".join(rows)


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"
