"""Exported tokenizer files: AutoTokenizer puts BOS first and matches SentencePiece exactly."""

from __future__ import annotations

import random

import pytest
import sentencepiece as spm

from soft.conversion.hf_io import write_tokenizer
from tests.conversion.helpers import BUILTIN_TOKENIZER

TEXTS = [
    "Hello world", " Hello  world\n\nfoo", "  lead", "x\n y", "The capital of France is Paris.",
    "élan 123 ", " ", "a\tb  ", "日本語 テキスト 😀", "def f(x):\n    return x**2  # sq", "Add 17 and 25.",
]  # fmt: skip


def _texts() -> list[str]:
    rng = random.Random(0)
    alphabet = "abcdefghij klmnopqrstuvwxyzABC  \n\t0123456789.,!?é日😀"
    return TEXTS + [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))) for _ in range(300)
    ]


def _check(sp_model, out_dir) -> None:
    from transformers import AutoTokenizer

    write_tokenizer(sp_model, out_dir, max_length=4096)
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    tok = AutoTokenizer.from_pretrained(out_dir)
    assert (tok.bos_token_id, tok.eos_token_id) == (sp.bos_id(), sp.eos_id())
    for text in _texts():
        assert tok(text)["input_ids"] == [sp.bos_id(), *sp.encode(text)], repr(text)
    ids = tok("Hello world")["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == sp.decode(ids[1:])


def test_builtin_tokenizer(tmp_path):
    _check(BUILTIN_TOKENIZER, tmp_path)


def test_llama2_tokenizer(tmp_path, llama2_tokenizer):
    if not llama2_tokenizer.is_file():
        pytest.skip(f"{llama2_tokenizer} not found")
    _check(llama2_tokenizer, tmp_path)
