"""Fuzzes the model-file boundary under AddressSanitizer and UBSan.

Tiny models of every architecture (tests/tiny_models.py), each hyperparameter and each tensor
dimension mutated (0, -1, negative, 2^31, 2^32, 2^63, floats, strings, inconsistent pairs,
missing, transposed, extra rank), are loaded and run for a few tokens by the generic kernels
built with -fsanitize=address,undefined. The only acceptable outcomes: the model runs, or a
QpackError-family error. A sanitizer report, a crash or any other exception is a finding.

    python tests/fuzz/fuzz_model.py                 # the systematic cases, then 2000 random
    python tests/fuzz/fuzz_model.py --random 20000  # a long run
    python tests/fuzz/fuzz_model.py --quick         # the CI subset (tests/test_fuzz_model.py)

The sanitized module is built out of tree (never into runtime/, whose _native_* files the
stub packs) under ~/.cache/qpack/fuzz-asan/<hash of the C sources>/, once. Cases run in a
worker process with gcc's libasan/libubsan preloaded; a worker that dies is restarted after
the case that killed it, and that case is reported with the sanitizer's text.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import random
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
MODULE = "qpack.runtime._native_generic_asan"
ARCHS = ("llama", "qwen2", "gemma3")
WEIGHT_TYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_K")

# ---------------------------------------------------------------- the sanitized build


def sanitizer_runtime() -> list[str] | None:
    """gcc's libasan and libubsan, to preload into Python (which is not instrumented)."""
    libs = []
    for name in ("libasan.so", "libubsan.so"):
        try:
            found = subprocess.run(
                ["gcc", f"-print-file-name={name}"], capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None
        if not os.path.isabs(found) or not os.path.exists(found):
            return None
        libs.append(found)
    return libs


def build_dir() -> Path:
    digest = hashlib.sha256()
    for p in sorted((ROOT / "cython").glob("*.[hp]*")) + [ROOT / "setup.py"]:
        digest.update(p.name.encode() + p.read_bytes())
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "qpack" / "fuzz-asan" / digest.hexdigest()[:16]


def asan_module_path(build: bool = True) -> Path | None:
    """The built _native_generic_asan extension (built now if absent and `build`)."""
    out = build_dir()
    found = sorted(out.rglob("_native_generic_asan*.so"))
    if found or not build:
        return found[0] if found else None
    env = {**os.environ, "QPACK_SANITIZE": "1", "QPACK_VARIANTS": "generic_asan"}
    cmd = [sys.executable, "setup.py", "build_ext", "--build-lib", str(out),
           "--build-temp", str(out / "tmp")]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"building the sanitized module failed:\n{done.stderr[-3000:]}")
    found = sorted(out.rglob("_native_generic_asan*.so"))
    if not found:
        raise RuntimeError(f"no _native_generic_asan module under {out}")
    return found[0]


# ---------------------------------------------------------------- cases

# A hostile value with the GGUF type it is written as.
INT_VALUES = [
    ("U32", 0), ("I32", -1), ("I32", -7), ("I32", -(2**31)), ("U32", 2**31), ("U32", 2**32 - 1),
    ("U64", 2**32), ("U64", 2**32 + 4), ("U64", 2**63), ("I64", -(2**63)), ("U32", 1),
    ("U32", 3), ("U32", 255), ("U32", 257), ("U32", 1 << 20), ("U32", 16711681),
    ("F32", 2.5), ("F32", float("nan")), ("STRING", "64"), ("BOOL", True),
]  # fmt: skip
FLOAT_VALUES = [
    ("F32", 0.0), ("F32", -1.0), ("F32", float("nan")), ("F32", float("inf")),
    ("F32", float("-inf")), ("F32", 1e38), ("F32", 1e-45), ("U32", 7), ("STRING", "x"),
]  # fmt: skip
INT_KEYS = [
    "block_count", "context_length", "embedding_length", "feed_forward_length",
    "attention.head_count", "attention.head_count_kv", "attention.key_length",
    "attention.value_length", "rope.dimension_count", "attention.sliding_window",
]  # fmt: skip
FLOAT_KEYS = ["attention.layer_norm_rms_epsilon", "rope.freq_base"]
# Consistent-looking pairs that disagree with each other or with the tensors.
PAIRS = [
    {"attention.head_count": 8, "attention.head_count_kv": 8},
    {"attention.head_count": 2, "attention.head_count_kv": 2},
    {"attention.head_count": 257, "attention.head_count_kv": 257,
     "attention.value_length": 16711681},
    {"attention.head_count": 4, "attention.head_count_kv": 3},
    {"attention.key_length": 32, "attention.value_length": 128},
    {"attention.key_length": 128, "rope.dimension_count": 130},
    {"embedding_length": 128, "attention.key_length": 64},
    {"block_count": 3},
    {"block_count": 1},
    {"attention.head_count": 2**16, "attention.head_count_kv": 2**8,
     "attention.key_length": 2**15},
]  # fmt: skip
TENSOR_MUTATIONS = ["drop", "rows+1", "rows-1", "cols*2", "transpose", "flat", "rank3", "f32->q8"]
# Straight into the compiled model: the C side must refuse these by itself.
NATIVE_INTS = [0, -1, -(2**31), 2**31 - 1, 2**31, 2**32, 2**32 + 2, 2**63, 3, 257, 1025, 16711681]
NATIVE_HP = ["n_layer", "n_embd", "n_ff", "n_head", "n_head_kv", "head_dim", "head_dim_v",
             "n_rot", "activation"]  # fmt: skip
NATIVE_FLOATS = [float("nan"), float("inf"), -1.0, 0.0]
NATIVE_MATRIX = ["wq", "wk", "wv", "wo", "gate", "up", "down"]
NATIVE_MATRIX_PARTS = ["type", "rows", "cols", "bytes"]
CANARY = ("canary", "", 0)  # an out-of-bounds write outside qpack: the sanitizer must see it


@dataclass(frozen=True)
class Case:
    arch: str
    weights: str
    metadata: tuple = ()  # (key suffix, gguf type name or None, value), value None drops
    tensors: tuple = ()  # (tensor name, mutation)
    native: tuple = ()  # (what, where, value): handed to NativeModel directly, facts bypassed

    def describe(self) -> str:
        parts = [f"{self.arch}/{self.weights}"]
        parts += [f"{k}={v!r}:{t}" for k, t, v in self.metadata]
        parts += [f"{n}:{m}" for n, m in self.tensors]
        parts += [f"native {w}[{at}]={v!r}" for w, at, v in self.native]
        return " ".join(parts)

    def as_json(self) -> list:
        return [self.arch, self.weights, self.metadata, self.tensors, self.native]

    @classmethod
    def from_json(cls, c: list) -> Case:
        return cls(c[0], c[1], *(tuple(map(tuple, part)) for part in c[2:]))


def tensor_names(arch: str, n_layers: int = 2) -> list[str]:
    names = ["token_embd.weight", "output.weight", "output_norm.weight"]
    per = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate",
           "ffn_up", "ffn_down"]  # fmt: skip
    if arch == "qwen2":
        per += ["attn_q.bias", "attn_k.bias", "attn_v.bias"]
    if arch == "gemma3":
        per += ["attn_q_norm", "attn_k_norm", "post_attention_norm", "post_ffw_norm"]
    for i in range(n_layers):
        names += [f"blk.{i}.{p}" if p.endswith(".bias") else f"blk.{i}.{p}.weight" for p in per]
    return names


def systematic_cases() -> list[Case]:
    """Every key x every hostile value, every pair, every tensor x every mutation, for every
    architecture; weight types cycled so each appears."""
    cases = []
    k = 0
    for arch in ARCHS:

        def wt() -> str:
            nonlocal k
            k += 1
            return WEIGHT_TYPES[k % len(WEIGHT_TYPES)]

        cases.append(Case(arch, "F32"))
        for key in INT_KEYS:
            cases.append(Case(arch, wt(), ((key, None, None),)))
            for t, v in INT_VALUES:
                cases.append(Case(arch, wt(), ((key, t, v),)))
        for key in FLOAT_KEYS:
            for t, v in FLOAT_VALUES:
                cases.append(Case(arch, wt(), ((key, t, v),)))
        for pair in PAIRS:
            cases.append(Case(arch, wt(), tuple((key, "U32", v) for key, v in pair.items())))
        for name in tensor_names(arch):
            for m in TENSOR_MUTATIONS:
                cases.append(Case(arch, wt(), (), ((name, m),)))
        cases += [Case(arch, wt(), native=(m,)) for m in native_mutations()]
    return cases


def native_mutations() -> list[tuple]:
    out = [("hp", key, v) for key in NATIVE_HP for v in NATIVE_INTS]
    out += [
        ("hp", key, v) for key in ("norm_eps", "embd_scale", "attn_scale") for v in NATIVE_FLOATS
    ]
    out += [("window", 0, v) for v in NATIVE_INTS] + [("rope_base", 1, v) for v in NATIVE_FLOATS]
    out += [("matrix", f"{layer}.{f}.{part}", v) for layer in (0, 1) for f in NATIVE_MATRIX
            for part in NATIVE_MATRIX_PARTS for v in (0, -1, 2**31, 2**32 + 1)]  # fmt: skip
    out += [("matrix", f"g.{f}.{part}", v) for f in ("tok_embd", "output")
            for part in NATIVE_MATRIX_PARTS for v in (0, -1, 2**31, 2**32 + 1)]  # fmt: skip
    out += [("state", key, v) for key in ("n_ctx", "n_seq", "n_batch", "threads")
            for v in (0, -1, 2**31, 2**40)]  # fmt: skip
    return out


def random_cases(n: int, seed: int) -> list[Case]:
    """Random combinations of one to three mutations of either kind."""
    rng = random.Random(seed)
    pool = native_mutations()
    cases = []
    for _ in range(n):
        arch = rng.choice(ARCHS)
        md, ts = [], []
        for _ in range(rng.randint(1, 3)):
            if rng.random() < 0.6:
                if rng.random() < 0.8:
                    t, v = rng.choice(INT_VALUES + [("U32", rng.randint(0, 600))])
                    md.append((rng.choice(INT_KEYS), t, v))
                else:
                    t, v = rng.choice(FLOAT_VALUES)
                    md.append((rng.choice(FLOAT_KEYS), t, v))
            else:
                ts.append((rng.choice(tensor_names(arch)), rng.choice(TENSOR_MUTATIONS)))
        if rng.random() < 0.25:  # the C side alone: one to three direct mutations
            nat = tuple(rng.sample(pool, rng.randint(1, 3)))
            cases.append(Case(arch, rng.choice(WEIGHT_TYPES), native=nat))
        else:
            cases.append(Case(arch, rng.choice(WEIGHT_TYPES), tuple(md), tuple(ts)))
    return cases


# ---------------------------------------------------------------- the worker (sanitized process)


def write_case(case: Case, path: Path) -> Path:
    import numpy as np
    from gguf import GGUFValueType
    from tiny_models import tiny_model

    gtypes = {
        "U32": GGUFValueType.UINT32, "I32": GGUFValueType.INT32, "U64": GGUFValueType.UINT64,
        "I64": GGUFValueType.INT64, "F32": GGUFValueType.FLOAT32, "BOOL": GGUFValueType.BOOL,
        "STRING": GGUFValueType.STRING,
    }  # fmt: skip
    big = case.weights == "Q4_K"  # K-quant rows are 256-element blocks
    dims = {"n_embd": 256 if big else 64, "n_ff": 256 if big else 128}
    md = {
        f"{case.arch}.{key}": None if t is None else (gtypes[t], v) for key, t, v in case.metadata
    }
    # tensors are mutated after the fact: write once to learn the shapes, then rewrite
    base = tiny_model(path, case.arch, case.weights, n_layers=2, **dims, metadata=md)
    if not case.tensors:
        return base
    from gguf.quants import dequantize
    from qpack.runtime.gguf import open_gguf

    changes = {}
    with open_gguf(str(base)) as gf:
        for name, m in case.tensors:
            ti = gf.tensors.get(name)
            if ti is None:
                continue
            if m == "drop":
                changes[name] = None
                continue
            import gguf as gguf_py

            raw = np.array(ti.data)
            qtype = gguf_py.GGMLQuantizationType(ti.ggml_type)
            values = dequantize(raw, qtype).reshape(tuple(reversed(ti.shape)))
            if m == "rows+1":
                values = np.concatenate([values, values[-1:]], axis=0)
            elif m == "rows-1":
                values = values[:-1] if values.shape[0] > 1 else values[:0]
            elif m == "cols*2":
                values = np.concatenate([values, values], axis=-1)
            elif m == "transpose":
                values = values.T.copy()
            elif m == "flat":
                values = values.reshape(-1)
            elif m == "rank3":
                values = values.reshape(1, *values.shape)
            if values.size == 0:
                changes[name] = None
                continue
            kind = "Q8_0" if m == "f32->q8" and values.shape[-1] % 32 == 0 else "F32"
            changes[name] = (np.ascontiguousarray(values, dtype=np.float32), kind)
    return tiny_model(
        path, case.arch, case.weights, n_layers=2, **dims, metadata=md, tensors=changes
    )


def run_case(case: Case, kernels, workdir: Path) -> str:
    """'ran', 'refused: <error>', or 'BAD: <traceback>' (a non-QpackError exception)."""
    import traceback

    import numpy as np
    from qpack.runtime.errors import QpackError
    from qpack.runtime.gguf import open_gguf
    from qpack.runtime.model import Model
    from qpack.runtime.tokenizer import Tokenizer

    if case.native:
        return run_native_case(case, kernels, workdir)
    path = workdir / "case.gguf"
    try:
        write_case(case, path)
    except Exception as e:  # the writer refused the mutation itself: nothing to test
        return f"unwritable: {type(e).__name__}"
    try:
        with open_gguf(str(path)) as gf:
            tok = Tokenizer.from_gguf(gf)
            model = Model(gf, n_ctx=24, n_seq=2, n_batch=8, threads=2, kernels=kernels)
            ids = tok.encode("hello world", add_bos=True)[:6] or [1]
            logits = model.logits(ids, slot=1)
            pos = len(ids)
            for _ in range(3):  # decode a few tokens, two slots in one batch
                nxt = int(np.argmax(logits)) % model.n_vocab
                out = model.forward([nxt, nxt], [pos, 0], [1, 0], [0, 1])
                logits = out[0]
                pos += 1
            tok.decode([int(np.argmax(logits)) % model.n_vocab])
            model.native.copy_sequence(1, 0, pos)
        return "ran"
    except QpackError as e:
        return f"refused: {type(e).__name__}: {str(e)[:160]}"
    except Exception:
        return "BAD: " + traceback.format_exc()[-1500:]


def run_native_case(case: Case, kernels, workdir: Path) -> str:
    """A valid tiny model's arguments, mutated, straight into NativeModel, then a forward."""
    import ctypes
    import traceback

    from qpack.runtime.errors import QpackError
    from qpack.runtime.facts import read_model_facts
    from qpack.runtime.gguf import open_gguf
    from qpack.runtime.model import native_arguments

    if case.native[0] == CANARY:
        buf = ctypes.create_string_buffer(16)
        ctypes.memset(buf, 0, 64)  # heap-buffer-overflow: ASan must stop the process here
        return "ran"
    path = write_case(Case(case.arch, case.weights), workdir / "case.gguf")
    gf = open_gguf(str(path))
    c_hp, globals_, layers = native_arguments(gf, read_model_facts(gf), kernels)
    layers = [dict(spec) for spec in layers]
    globals_ = dict(globals_)
    state = {"n_ctx": 24, "n_seq": 2, "n_batch": 8, "threads": 2}
    for what, at, value in case.native:
        if what == "hp":
            c_hp = {**c_hp, at: value}
        elif what in ("window", "rope_base"):
            layers[at][what] = value
        elif what == "state":
            state[at] = value
        elif what == "matrix":
            where, field, part = at.split(".")
            table = globals_ if where == "g" else layers[int(where)]
            t, rows, cols, data = table[field]
            if part == "type":
                t = value
            elif part == "rows":
                rows = value
            elif part == "cols":
                cols = value
            else:  # bytes: the data cut short (or emptied) under an unchanged shape
                data = data[: max(value, 0) % max(len(data), 1)]
            table[field] = (t, rows, cols, data)
    try:
        m = kernels.NativeModel(c_hp, globals_, layers, state["n_ctx"], state["n_seq"],
                                state["n_batch"], state["threads"])  # fmt: skip
        m.forward([1, 5, 6], [0, 1, 2], [0, 0, 0], [2])
        m.forward([7, 7], [3, 0], [0, 1], [0, 1])
        return "ran"
    except QpackError as e:
        return f"refused: {type(e).__name__}: {str(e)[:160]}"
    except Exception:
        return "BAD: " + traceback.format_exc()[-1500:]
    finally:
        gf.close()


def worker(module_path: str, case_file: str) -> None:
    sys.path.insert(0, str(TESTS))
    spec = importlib.util.spec_from_file_location(MODULE, module_path)
    kernels = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kernels)
    cases = [Case.from_json(c) for c in json.loads(Path(case_file).read_text())]
    with tempfile.TemporaryDirectory() as d:
        for i, case in enumerate(cases):
            print(f"START {i}", flush=True)
            outcome = run_case(case, kernels, Path(d))
            print(f"END {i} {json.dumps(outcome)}", flush=True)


# ---------------------------------------------------------------- the driver


@dataclass
class Finding:
    case: Case
    what: str


def run_cases(cases: list[Case], module: Path, libs: list[str]) -> tuple[dict, list[Finding]]:
    """Runs every case in sanitized workers; returns outcome counts and the findings."""
    env = {
        **os.environ,
        "LD_PRELOAD": ":".join(libs),
        "PYTHONMALLOC": "malloc",  # every Python allocation through ASan's malloc
        "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1:abort_on_error=0:exitcode=86",
        "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1:exitcode=87",
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    counts = {"ran": 0, "refused": 0, "unwritable": 0}
    findings: list[Finding] = []
    start = 0
    with tempfile.TemporaryDirectory() as d:
        case_file = Path(d) / "cases.json"
        while start < len(cases):
            batch = cases[start:]
            case_file.write_text(json.dumps([c.as_json() for c in batch]))
            proc = subprocess.run(
                [sys.executable, __file__, "--worker", str(module), str(case_file)],
                env=env, capture_output=True, text=True, timeout=3600,
            )  # fmt: skip
            last_started = -1
            for line in proc.stdout.splitlines():
                if line.startswith("START "):
                    last_started = int(line.split()[1])
                elif line.startswith("END "):
                    _, i, outcome = line.split(" ", 2)
                    outcome = json.loads(outcome)
                    kind = outcome.split(":")[0]
                    if kind == "BAD":
                        findings.append(Finding(batch[int(i)], outcome))
                    else:
                        counts[kind] += 1
                    last_started = -1
            if proc.returncode == 0 and last_started == -1:
                break
            if last_started == -1:  # died between cases (should not happen): report it
                findings.append(Finding(batch[0], f"worker exit {proc.returncode} outside a case"))
                break
            err = proc.stderr
            at = max(err.find("ERROR: AddressSanitizer"), err.find("runtime error:"), 0)
            report = err[max(at - 200, 0) : at + 3000] or f"exit status {proc.returncode}"
            findings.append(
                Finding(batch[last_started], f"CRASH (exit {proc.returncode}):\n{report}")
            )
            start += last_started + 1
    return counts, findings


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--random", type=int, default=2000, help="random cases after the systematic")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="the CI subset")
    args = ap.parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return 0
    libs = sanitizer_runtime()
    if libs is None:
        print(
            "gcc's libasan/libubsan not found: install gcc (apt-get install gcc)", file=sys.stderr
        )
        return 2
    module = asan_module_path()
    cases = (
        quick_cases() if args.quick else systematic_cases() + random_cases(args.random, args.seed)
    )
    counts, findings = run_cases(cases, module, libs)
    for f in findings:
        print(f"FINDING {f.case.describe()}\n{f.what}\n", file=sys.stderr)
    print(
        f"{len(cases)} cases: {counts['ran']} ran, {counts['refused']} refused cleanly, "
        f"{counts['unwritable']} not writable by gguf.GGUFWriter, {len(findings)} findings"
    )
    return 1 if findings else 0


def quick_cases(n: int = 360) -> list[Case]:
    """The CI subset: a fixed sample of n systematic cases (every kind represented), plus the
    explicit attacks of issue 11."""
    every = systematic_cases()
    attacks = [
        Case("gemma3", "F32", (("attention.sliding_window", "I32", -1),)),
        Case("gemma3", "Q8_0", (("attention.sliding_window", "I32", -(2**31)),)),
        Case("llama", "F32", tuple((k, "U32", v) for k, v in PAIRS[2].items())),
        Case("llama", "F32", native=(("hp", "n_head_kv", 257), ("hp", "head_dim_v", 16711681))),
        Case("qwen2", "F32", native=(("matrix", "g.output.rows", 2**32 + 269),)),
        Case("gemma3", "F32", native=(("window", 0, -(2**31)),)),
    ]
    return attacks + random.Random(1).sample(every, min(n, len(every)))


if __name__ == "__main__":
    sys.exit(main())
