"""Shared fixtures: the real models (from their Python packages) and a scratch directory."""

from __future__ import annotations

import pytest
from qpack.builder import models


@pytest.fixture(scope="session")
def smollm2_path():
    return models.default_model_path()


@pytest.fixture(scope="session")
def gemma3_path():
    return models.gemma3_path()
