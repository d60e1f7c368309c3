"""Shared fixtures. The real data beside the checkout (../shared/data) is reached only here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SOFT_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data: real tokenizer and datasets (present in CI; a user's clone may lack it)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} not found (set SOFT_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def llama2_tokenizer(shared_data: Path) -> Path:
    """Meta's LLaMA-2 SentencePiece model (32000 pieces, bos=1, eos=2)."""
    return shared_data / "llama2-tokenizer" / "tokenizer.model"
