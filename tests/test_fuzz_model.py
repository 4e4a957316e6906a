"""The model-file fuzz harness (tests/fuzz/fuzz_model.py), its CI part: a few hundred hostile
models loaded and run under AddressSanitizer + UBSan with only clean errors as outcomes, after
a canary proves the sanitizer is live. The long run is the script itself."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fuzz"))
import fuzz_model  # noqa: E402


@pytest.fixture(scope="module")
def sanitized():
    libs = fuzz_model.sanitizer_runtime()
    if libs is None:
        pytest.skip("gcc's libasan/libubsan are not installed (apt-get install gcc)")
    return fuzz_model.asan_module_path(), libs  # builds it once (~1-2 min) if absent


@pytest.mark.slow
def test_the_sanitizer_catches_an_overflow(sanitized):
    """Without this, a harness whose sanitizer silently failed to load would pass anything."""
    canary = fuzz_model.Case("llama", "F32", native=(fuzz_model.CANARY,))
    clean = fuzz_model.Case("llama", "F32")
    counts, findings = fuzz_model.run_cases([clean, canary, clean], *sanitized)
    assert counts["ran"] == 2  # the worker restarted after the crash and ran the last case
    assert len(findings) == 1 and findings[0].case == canary
    assert "AddressSanitizer: heap-buffer-overflow" in findings[0].what


@pytest.mark.slow
def test_hostile_models_give_clean_errors_under_sanitizers(sanitized):
    cases = fuzz_model.quick_cases()
    counts, findings = fuzz_model.run_cases(cases, *sanitized)
    assert not findings, "\n\n".join(f"{f.case.describe()}\n{f.what}" for f in findings)
    assert sum(counts.values()) == len(cases) > 300
    assert counts["refused"] > counts["ran"] > 10  # mostly refused, and some still run
