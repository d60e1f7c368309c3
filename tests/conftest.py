"""Shared fixtures. The real data beside the checkout (../shared/data) is reached only here."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SOFT_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))

# Caches that code under test writes (the tokenised-data cache, `datasets`' Arrow cache for
# local folders) go to one folder per session, never the user's ~/.cache; set here, at import,
# because `datasets` reads its cache path when first imported, and launched jobs inherit it.
_SESSION_CACHE = Path(tempfile.mkdtemp(prefix="soft-test-cache-"))
os.environ["SOFT_CACHE_DIR"] = str(_SESSION_CACHE / "tokenized")
os.environ["HF_DATASETS_CACHE"] = str(_SESSION_CACHE / "hf-datasets")


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


@pytest.fixture(scope="session")
def hf_tokenizers(tmp_path_factory) -> dict[str, Path]:
    """Hugging Face tokenizer folders built here (never downloaded): byte-level BPEs trained on
    the built-in tasks, with a LLaMA-3-style chat template (BOS, <|eot_id|>, no pad), a
    Qwen-style ChatML one (no BOS, <|im_end|>, pad <|endoftext|>), and that ChatML template with
    {% generation %} blocks."""
    from soft.data.builtin import train_hf_tokenizer

    root = tmp_path_factory.mktemp("hf_tokenizers")
    return {
        "llama3": train_hf_tokenizer(root / "llama3", "llama3"),
        "chatml": train_hf_tokenizer(root / "chatml", "chatml"),
        "chatml_generation": train_hf_tokenizer(
            root / "chatml_generation", "chatml", generation_blocks=True
        ),
    }


# ----------------------------------------------------------------------------- hermetic tests
# Tests write only under their own temporary folders. A test that wrote into the checkout
# (runs/default is where a user's default job lives) would fail, or overwrite, the user's run;
# the session fails when the checkout's untracked or ignored files (outside caches and the
# virtual environment) changed while the tests ran.

_EPHEMERAL = (".venv/", ".pytest_cache/", ".ruff_cache/", "__pycache__/", ".egg-info/")


def checkout_files() -> set[str]:
    """Untracked and ignored files of the checkout, caches and .venv left out."""
    proc = subprocess.run(
        ["git", "status", "--porcelain", "--ignored", "--untracked-files=all"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        return set()  # not a git checkout: nothing to compare
    out = set()
    for line in proc.stdout.splitlines():
        path = line[3:]
        if line[:2] in ("??", "!!") and not any(part in path for part in _EPHEMERAL):
            full = REPO_ROOT / path
            out.add(f"{path} {full.stat().st_mtime_ns if full.exists() else 0}")
    return out


def pytest_sessionstart(session):
    session.config.stash[_BEFORE] = checkout_files()


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)
    before = session.config.stash.get(_BEFORE, None)
    if before is None:
        return
    changed = sorted(checkout_files() ^ before)
    if changed:
        print("\nerror: tests wrote into the checkout (use tmp_path):\n  " + "\n  ".join(changed))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


_BEFORE = pytest.StashKey[set]()
