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
