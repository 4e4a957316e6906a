"""Full-width inputs for the quantizer, written with gguf-py only (independent of qpack):
a quantized GGUF dequantized back to F16, and tiny random F16 models of chosen shapes.

Shared by tests/test_quantize.py and tests/reference/make_quant_refs.py (which runs under
/opt/refenv, so this module needs nothing but gguf and numpy).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from gguf.quants import dequantize

LLAMA_FTYPE_MOSTLY_F16 = 1


def dequantized_copy(src: str | Path, dst: str | Path) -> Path:
    """`src` with every matrix dequantized to F16 (1-D tensors to F32), metadata kept, and
    general.file_type set to F16: the "original" model a quantizer starts from."""
    dst = Path(dst)
    r = gguf.GGUFReader(str(src))
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    w = gguf.GGUFWriter(str(dst), arch)
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        vtype = f.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(name, f.contents(), vtype, sub_type=f.types[-1])
        else:
            w.add_key_value(name, f.contents(), vtype)
    w.add_file_type(LLAMA_FTYPE_MOSTLY_F16)
    for t in r.tensors:
        shape = tuple(int(x) for x in reversed(t.shape))
        values = dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)
        dtype = np.float32 if len(shape) == 1 else np.float16
        w.add_tensor(t.name, values.astype(dtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def tiny_f16(
    path: str | Path,
    n_embd: int = 256,
    n_ff: int = 512,
    n_layers: int = 8,
    n_heads: int = 4,
    n_kv_heads: int = 1,
    tied: bool = False,
    seed: int = 0,
) -> Path:
    """A random llama model in F16 (norms F32), sized to exercise the mixes' layer choices
    (8 layers) and, with n_embd not a multiple of 256, the fallback types."""
    from tiny_models import tiny_model  # tests/ is on sys.path for both users

    return tiny_model(
        path,
        weight_type="F16",
        n_layers=n_layers,
        n_embd=n_embd,
        n_ff=n_ff,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        tied=tied,
        seed=seed,
    )


def tiny_imatrix(model: str | Path, dst: str | Path, seed: int = 0, count: int = 64) -> Path:
    """A synthetic importance matrix for `model` in llama-imatrix's GGUF layout (per 2-D weight
    but the output and token embedding: `<name>.in_sum2` [n_in, 1] and `<name>.counts` [1, 1]),
    column weights spread over two decades so that they steer the quantizers."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(dst), "imatrix")
    w.add_type("imatrix")
    for t in gguf.GGUFReader(str(model)).tensors:
        if len(t.shape) < 2 or t.name in ("output.weight", "token_embd.weight"):
            continue
        n_in = int(t.shape[0])
        sums = (10 ** rng.uniform(-1, 1, n_in) * count).astype(np.float32)
        w.add_tensor(f"{t.name}.in_sum2", sums.reshape(1, n_in))
        w.add_tensor(f"{t.name}.counts", np.array([[count]], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(dst)


def read_imatrix_values(path: str | Path) -> dict[str, np.ndarray]:
    """name -> in_sum2 / counts, the per-column weights llama-quantize derives from the file."""
    r = gguf.GGUFReader(str(path))
    tensors = {t.name: np.asarray(t.data, dtype=np.float32).reshape(-1) for t in r.tensors}
    out = {}
    for name, sums in tensors.items():
        if name.endswith(".in_sum2"):
            base = name[: -len(".in_sum2")]
            count = float(tensors[base + ".counts"][0])
            out[base] = sums / count if count > 0 else np.ones_like(sums)
    return out
