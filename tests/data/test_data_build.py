"""build_datasets: built-in defaults, held-out splits, real files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from soft.config.errors import ConfigError
from soft.data import DataConfig, ResumableBatchSampler, SFTDataset, build_datasets, collate
from soft.data.builtin import BUILTIN_TOKENIZER_PATH
from soft.data.formats import load_pairs


def tokens(dataset: SFTDataset | None) -> torch.Tensor:
    assert dataset is not None
    return dataset.batch(range(len(dataset)))["tokens"]


def test_builtin_defaults_need_no_files() -> None:
    cfg = DataConfig(builtin_num_samples=200, valid_fraction=0.1, seq_length=80)
    train, valid, tok = build_datasets(cfg, seed=0)
    assert tok.path == str(BUILTIN_TOKENIZER_PATH)
    assert len(train) == 200 and valid is not None and len(valid) == 20
    assert train.stats.num_dropped == train.stats.num_truncated == 0
    # Deterministic from the seed; the held-out prompts never occur in training.
    again, valid_again, _ = build_datasets(cfg, seed=0)
    assert tokens(again).equal(tokens(train)) and tokens(valid_again).equal(tokens(valid))
    train_rows = {tuple(r.tolist()) for r in tokens(train)}
    assert not any(tuple(r.tolist()) in train_rows for r in tokens(valid))
    other, _, _ = build_datasets(cfg, seed=1)
    assert not tokens(other).equal(tokens(train))
    # One step of the loop the trainer will run.
    sampler = ResumableBatchSampler(len(train), 8, seed=0)
    (mb,) = sampler.indices_for_step(0, 0, 1, 8)
    batch = collate([train[i] for i in mb])
    assert batch["tokens"].shape == (8, 80)
    assert all(batch[k].equal(v) for k, v in train.batch(mb).items())


def test_no_valid_split() -> None:
    _, valid, _ = build_datasets(DataConfig(builtin_num_samples=20, valid_fraction=0.0), 0)
    assert valid is None


def test_file_hold_out_and_valid_path(tmp_path: Path) -> None:
    rows = [{"instruction": f"Echo {i}.", "input": "", "output": str(i)} for i in range(40)]
    train_path = tmp_path / "train.jsonl"
    train_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(train_path=str(train_path), valid_fraction=0.25, seq_length=64)
    train, valid, _ = build_datasets(cfg, seed=5)
    assert valid is not None and (len(train), len(valid)) == (30, 10)
    assert tokens(build_datasets(cfg, seed=5)[1]).equal(tokens(valid))
    assert not tokens(build_datasets(cfg, seed=6)[1]).equal(tokens(valid))

    valid_path = tmp_path / "valid.json"
    valid_path.write_text(json.dumps(rows[:3]))
    cfg = DataConfig(train_path=str(train_path), valid_path=str(valid_path), seq_length=64)
    train, valid, _ = build_datasets(cfg, seed=5)
    assert (len(train), len(valid)) == (40, 3)


def test_too_few_records_to_hold_out(tmp_path: Path) -> None:
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    with pytest.raises(ConfigError, match=r"one\.jsonl' has 1 record\(s\): too few"):
        build_datasets(DataConfig(train_path=str(path)), 0)


def test_bad_tokenizer_path_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        build_datasets(DataConfig(tokenizer_path=str(tmp_path / "x.model")), 0)


def test_text_format(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": "lorem ipsum " * 30}) + "\n" for _ in range(4)))
    cfg = DataConfig(format="text", train_path=str(path), valid_fraction=0.0, seq_length=16)
    train, _, _ = build_datasets(cfg, 0)
    assert len(train) > 4 and train.stats.num_records == 4


def test_real_gsm8k_with_llama2_tokenizer(
    shared_data: Path, llama2_tokenizer: Path, tmp_path: Path
) -> None:
    # A subset through build_datasets keeps this quick; formats tests validate the whole file.
    rows = json.loads((shared_data / "gsm8k-alpaca" / "gsm8k_train_alpaca.json").read_text())[:300]
    subset = tmp_path / "gsm8k_subset.json"
    subset.write_text(json.dumps(rows))
    cfg = DataConfig(train_path=str(subset), tokenizer_path=str(llama2_tokenizer), seq_length=256)
    train, valid, tok = build_datasets(cfg, seed=0)
    assert valid is not None and len(train) + len(valid) + train.stats.num_dropped == 300
    assert tok.vocab_size == 32000
    sample = train[0]
    assert sample["tokens"][0] == tok.bos_id
    response = tok.decode(sample["labels"][sample["loss_mask"].bool()].tolist())
    assert response == load_pairs(subset, "alpaca")[0][1] or train.stats.num_truncated


def test_real_triviaqa_with_llama2_tokenizer(shared_data: Path, llama2_tokenizer: Path) -> None:
    path = shared_data / "triviaqa" / "triviaqa_rc_train_0-1499.jsonl"
    cfg = DataConfig(
        format="triviaqa",
        train_path=str(path),
        tokenizer_path=str(llama2_tokenizer),
        valid_fraction=0.0,
        seq_length=64,
        answer_alias_index=4,
    )
    train, _, tok = build_datasets(cfg, seed=0)
    assert train.stats.num_records == 1500
    assert len(train) == 1500 - train.stats.num_dropped
    first = train[0]
    # Question 0's fifth alias is "Sinclair Lewis".
    assert tok.decode(first["labels"][first["loss_mask"].bool()].tolist()) == "Sinclair Lewis"
