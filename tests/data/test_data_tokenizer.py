"""Tokenizer wrapper: real LLaMA-2 ids, special ids, errors for bad files."""

from __future__ import annotations

from pathlib import Path

import pytest

from soft.config.errors import ConfigError
from soft.data import Tokenizer
from soft.data.builtin import BUILTIN_TOKENIZER_PATH


@pytest.fixture(scope="module")
def llama(llama2_tokenizer: Path) -> Tokenizer:
    return Tokenizer.from_file(llama2_tokenizer)


def test_llama2_ids(llama: Tokenizer) -> None:
    assert llama.encode("Hello world") == [15043, 3186]
    assert llama.encode("Hello world", bos=True, eos=True) == [1, 15043, 3186, 2]
    assert llama.decode([1, 15043, 3186, 2]) == "Hello world"
    assert (llama.vocab_size, llama.bos_id, llama.eos_id) == (32000, 1, 2)
    # No pad piece in LLaMA-2: padding reuses EOS (loss-masked anyway).
    assert llama.pad_id == llama.eos_id == 2


def test_encode_pair_has_no_dummy_prefix_space(llama: Tokenizer) -> None:
    # " Paris" on its own would encode as ['▁', '▁Paris']; after the prompt it is ['▁Paris'].
    prompt_ids, response_ids = llama.encode_pair("Answer:", " Paris")
    assert prompt_ids == llama.encode("Answer:")
    assert response_ids == [3681]
    assert llama.encode(" Paris") != response_ids


def test_builtin_tokenizer_conventions() -> None:
    tok = Tokenizer.from_file(BUILTIN_TOKENIZER_PATH)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
    assert tok.pieces[0] == "<unk>"
    assert 400 <= tok.vocab_size <= 600
    text = "Reverse the letters.\n\n### Input:\nxqz Ünïcode ✓ 123"
    assert tok.decode(tok.encode(text)) == text  # identity normalisation + byte fallback


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.model"
    with pytest.raises(ConfigError, match=r"tokenizer file '.*nope\.model' does not exist"):
        Tokenizer.from_file(missing)


def test_not_a_sentencepiece_model(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.model"
    bogus.write_text("this is not a protobuf")
    with pytest.raises(ConfigError, match=r"'.*bogus\.model' is not a SentencePiece model"):
        Tokenizer.from_file(bogus)
