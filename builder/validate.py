"""Model validation: the runtime's own reader opens the GGUF, and what the runtime cannot run
is refused before an executable is written."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class ModelSummary:
    """What the manifest records about the model (after the runtime's reader accepted it)."""

    architecture: str
    name: str | None
    n_tensors: int
    n_parameters: int
    quant_mix: dict[str, dict[str, int]]  # type name -> {"tensors": n, "bytes": n}


def check_model(
    path: str | os.PathLike, offset: int = 0, length: int | None = None, describe: str = ""
) -> ModelSummary:
    """Open the GGUF with the runtime's own reader and refuse what the runtime cannot run
    (architecture, hyperparameters, tokenizer, tensor types), so no build yields a useless
    executable."""
    from qpack.runtime.errors import GGUFError, UnsupportedModel
    from qpack.runtime.facts import read_model_facts
    from qpack.runtime.gguf import open_gguf
    from qpack.runtime.tokenizer import Tokenizer

    describe = describe or str(path)
    try:
        gf = open_gguf(path, offset, length)
    except GGUFError as e:
        where = None if e.offset is None else e.offset - offset
        raise GGUFError(describe, where, e.problem) from None
    with gf:
        arch = gf.architecture
        facts = read_model_facts(gf, describe)  # the runtime's own checks, the same object
        try:
            Tokenizer.from_metadata(gf.metadata)
        except UnsupportedModel as e:
            raise UnsupportedModel(f"{describe}: {e}") from None
        mix: dict[str, dict[str, int]] = {}
        for ti in gf.tensors.values():
            entry = mix.setdefault(ti.type.name, {"tensors": 0, "bytes": 0})
            entry["tensors"] += 1
            entry["bytes"] += ti.nbytes
        name = gf.metadata.get("general.name")
        return ModelSummary(
            arch,
            name if isinstance(name, str) else None,
            len(gf.tensors),
            facts.n_parameters,
            dict(sorted(mix.items())),
        )
