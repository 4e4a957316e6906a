"""Mixture-of-experts speed: qpack against llama.cpp on a synthetic GGUF of a real MoE shape.

    python bench/moe.py [--out /tmp/qpack-moe.gguf] [compare.py options, e.g. -t 2 --rounds 1]

The model is Qwen3-30B-A3B's layer shape (2048 wide, 32 query / 4 KV heads of 128, experts of
768 rows, 8 used per token, per-head q/k norms, Qwen's 151936-token vocabulary size) with 24
layers of 64 experts, so that it fits beside the other work on a small machine (about 4.8 GB):
random Q4_K blocks with sane scales (Q6_K output head, F32 norms and router), as
`llama-quantize` lays out a Q4_K model. Decode reads only the chosen experts' rows (8 of 64
per layer), prefill runs every expert over the tokens routed to it. The file is written once
(--rebuild to redo it), then bench/compare.py measures pp64, pp512 and tg128 of both engines
in one run and prints the ratios.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import gguf
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPE = {
    "n_layer": 24,
    "n_embd": 2048,
    "n_head": 32,
    "n_head_kv": 4,
    "head_dim": 128,
    "n_expert": 64,
    "n_expert_used": 8,
    "n_ff_exp": 768,
    "n_vocab": 151936,
}
# ggml block layouts (gguf-facts.md): (elements, bytes, offsets of the f16 scales, their value).
# A Q4_K weight is d*sc*q - dmin*m with 6-bit sc, m and 4-bit q; a Q6_K one d*sc*(q-32) with
# int8 sc: these scales keep the weights within about +-0.05, like a trained model's.
BLOCKS = {
    "Q4_K": (256, 144, {0: 4e-5, 2: 2e-5}),
    "Q6_K": (256, 210, {208: 4e-6}),
}


def random_blocks(rng: np.random.Generator, rows: int, cols: int, kind: str) -> np.ndarray:
    elems, nbytes, scales = BLOCKS[kind]
    blocks = rng.integers(0, 256, size=(rows * cols // elems, nbytes), dtype=np.uint8)
    for at, value in scales.items():
        blocks[:, at : at + 2] = np.frombuffer(np.float16(value).tobytes(), np.uint8)
    return blocks.reshape(rows, cols // elems * nbytes)


def write_model(path: str, s: dict) -> None:
    """Header and tensor infos first, then each tensor generated and written in turn (the file
    never sits in memory whole)."""
    rng = np.random.default_rng(0)
    E, F, X = s["n_embd"], s["n_ff_exp"], s["n_expert"]
    q_dim, kv_dim = s["n_head"] * s["head_dim"], s["n_head_kv"] * s["head_dim"]
    w = gguf.GGUFWriter(path, "qwen3moe")
    w.add_block_count(s["n_layer"])
    w.add_context_length(40960)
    w.add_embedding_length(E)
    w.add_feed_forward_length(6144)
    w.add_expert_feed_forward_length(F)
    w.add_expert_count(X)
    w.add_expert_used_count(s["n_expert_used"])
    w.add_head_count(s["n_head"])
    w.add_head_count_kv(s["n_head_kv"])
    w.add_key_length(s["head_dim"])
    w.add_value_length(s["head_dim"])
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-6)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"▁w{i}" for i in range(s["n_vocab"] - len(tokens))]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(tokens) - 259)])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (len(tokens) - 259))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    # name -> (ggml shape as numpy rows x cols (x experts), kind): generated in this order
    plan: list[tuple[str, tuple[int, ...], str]] = [
        ("token_embd.weight", (s["n_vocab"], E), "Q4_K"),
        ("output_norm.weight", (E,), "F32"),
        ("output.weight", (s["n_vocab"], E), "Q6_K"),
    ]
    for i in range(s["n_layer"]):
        p = f"blk.{i}."
        plan += [
            (p + "attn_norm.weight", (E,), "F32"),
            (p + "attn_q.weight", (q_dim, E), "Q4_K"),
            (p + "attn_k.weight", (kv_dim, E), "Q4_K"),
            (p + "attn_v.weight", (kv_dim, E), "Q4_K"),
            (p + "attn_output.weight", (E, q_dim), "Q4_K"),
            (p + "attn_q_norm.weight", (s["head_dim"],), "F32"),
            (p + "attn_k_norm.weight", (s["head_dim"],), "F32"),
            (p + "ffn_norm.weight", (E,), "F32"),
            (p + "ffn_gate_inp.weight", (X, E), "F32"),
            (p + "ffn_gate_exps.weight", (X, F, E), "Q4_K"),
            (p + "ffn_up_exps.weight", (X, F, E), "Q4_K"),
            (p + "ffn_down_exps.weight", (X, E, F), "Q4_K"),
        ]

    def make(name: str, shape: tuple[int, ...], kind: str) -> np.ndarray:
        if kind == "F32" and len(shape) == 1:
            return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        if kind == "F32":  # the router: logits of about unit spread
            return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
        rows = int(np.prod(shape[:-1]))
        return random_blocks(rng, rows, shape[-1], kind).reshape(*shape[:-1], -1)

    for name, shape, kind in plan:
        if kind == "F32":
            w.add_tensor_info(name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
            continue
        elems, nbytes, _ = BLOCKS[kind]
        byte_shape = (*shape[:-1], shape[-1] // elems * nbytes)  # as the writer takes blocks
        raw = gguf.GGMLQuantizationType[kind]
        w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, shape, kind in plan:
        w.write_tensor_data(make(name, shape, kind))
    w.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="/tmp/qpack-moe.gguf", help="where the synthetic GGUF goes")
    ap.add_argument("--rebuild", action="store_true", help="write the GGUF even if it exists")
    a, compare_args = ap.parse_known_args()
    if a.rebuild or not os.path.exists(a.out):
        t0 = time.time()
        tmp = a.out + ".part"
        write_model(tmp, SHAPE)
        os.replace(tmp, a.out)
        size = os.path.getsize(a.out) / 2**30
        print(f"wrote {a.out}: {size:.2f} GiB in {time.time() - t0:.0f} s", flush=True)
    print("shape: " + ", ".join(f"{k} {v}" for k, v in SHAPE.items()), flush=True)
    cmd = [sys.executable, os.path.join(HERE, "compare.py"), a.out, "--no-generic", *compare_args]
    sys.exit(subprocess.call(cmd))


if __name__ == "__main__":
    main()
