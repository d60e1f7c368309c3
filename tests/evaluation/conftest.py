"""Fixtures for the evaluation tests: tiny exported models beside the real LLaMA-2 tokenizer."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_helpers import save_export, tiny_llama  # noqa: E402


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory, llama2_tokenizer: Path) -> Path:
    """Exported 6-layer model with soft_exit_layers [2, 4, 6]."""
    path = tmp_path_factory.mktemp("export") / "model"
    return save_export(tiny_llama(seed=1), path, llama2_tokenizer, [2, 4, 6])


@pytest.fixture(scope="session")
def export_dir_no_exits(tmp_path_factory, llama2_tokenizer: Path) -> Path:
    """Exported model whose config.json records no exits."""
    path = tmp_path_factory.mktemp("export_plain") / "model"
    return save_export(tiny_llama(seed=2), path, llama2_tokenizer, None)
