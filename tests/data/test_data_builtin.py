"""Built-in synthetic tasks and the shipped tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from soft.config.errors import ConfigError
from soft.data import Tokenizer
from soft.data.builtin import (
    BUILTIN_TOKENIZER_PATH,
    TASKS,
    generate_records,
    record_key,
    train_builtin_tokenizer,
)


def test_deterministic_and_seed_dependent() -> None:
    a = generate_records(0, 50)
    assert a == generate_records(0, 50)
    assert a != generate_records(1, 50)
    assert generate_records(0, 50, split="test") != a
    assert generate_records(0, 10) == a[:10]  # a prefix of the same stream


def test_records_are_alpaca_with_checkable_answers() -> None:
    records = generate_records(3, 400)
    for rec in records:
        assert set(rec) == {"instruction", "input", "output"}
        assert all(isinstance(v, str) for v in rec.values())
        assert rec["instruction"] and rec["output"]
        assert len(rec["output"]) <= 12  # short, exact-match answers
    by_instruction = {r["instruction"]: r for r in records}
    rev = by_instruction["Reverse the letters of the word."]
    assert rev["output"] == rev["input"][::-1]
    sort = by_instruction["Sort the numbers in ascending order."]
    nums = sorted(int(n) for n in sort["input"].split(", "))
    assert sort["output"] == ", ".join(map(str, nums))
    # Both prompt templates (with and without input) are exercised.
    assert any(r["input"] for r in records) and any(not r["input"] for r in records)


def test_every_task_generates() -> None:
    for name in TASKS:
        (rec,) = generate_records(0, 1, tasks=[name])
        assert rec["output"]
    with pytest.raises(ConfigError, match="unknown built-in task"):
        generate_records(0, 1, tasks=["nope"])


def test_exclude_makes_a_held_out_split() -> None:
    train = generate_records(0, 500)
    keys = {record_key(r) for r in train}
    held_out = generate_records(0, 100, split="valid", exclude=keys)
    assert len(held_out) == 100
    assert not keys & {record_key(r) for r in held_out}
    # A small domain runs out without looping forever.
    letters = generate_records(0, 100, tasks=["next_letter"], exclude={("x", "")})
    assert len(letters) == 25


def test_shipped_tokenizer_is_reproducible(tmp_path: Path) -> None:
    """tools/make_builtin_data.py must regenerate the committed model piece for piece."""
    fresh = train_builtin_tokenizer(tmp_path / "tok.model")
    assert Tokenizer.from_file(fresh).pieces == Tokenizer.from_file(BUILTIN_TOKENIZER_PATH).pieces
