"""Shared fixtures. Tests run against the embedded default model unless DG_EDIT_TEST_MODEL names
another local model directory (used while developing, before the embedded model is exported)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dg_edit.engine import check_model_dir, default_model_dir


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The model the end-to-end tests use: the embedded default model."""
    path = os.environ.get("DG_EDIT_TEST_MODEL") or str(default_model_dir())
    return check_model_dir(path)


@pytest.fixture(scope="session")
def engine(model_dir):
    from dg_edit import Engine

    return Engine.load(str(model_dir))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random model directory (config, safetensors, tokenizer) for fast protocol tests."""
    from dg_edit.testing import save_tiny_model_dir

    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"))
