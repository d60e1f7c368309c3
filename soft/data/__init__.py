"""Data pipeline: tokenizer, data files / dataset folders / hub datasets or built-in tasks ->
fixed-length SFT samples -> batches.

Public API: `build_datasets(cfg, seed)`, `Tokenizer` / `load_tokenizer` (SentencePiece or
Hugging Face), `render` (the one prompt renderer), `SFTDataset`, `ResumableBatchSampler`,
`collate`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from soft.config.errors import ConfigError
from soft.data import builtin
from soft.data.cache import tokenized_rows
from soft.data.config import DataConfig
from soft.data.dataset import DatasetStats, SFTDataset
from soft.data.prompts import Example, chat_tokenizer, instruction_example, render
from soft.data.sampler import ResumableBatchSampler, check_batch_sizes, collate
from soft.data.sources import DataSource, parse_source
from soft.data.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "DataConfig",
    "DataSource",
    "DatasetStats",
    "ResumableBatchSampler",
    "SFTDataset",
    "Tokenizer",
    "build_datasets",
    "build_tokenizer",
    "check_batch_sizes",
    "load_tokenizer",
    "parse_source",
    "collate",
    "render",
]

T = TypeVar("T")


def build_tokenizer(cfg: DataConfig) -> Tokenizer:
    """`data.tokenizer_path`, or the small tokenizer shipped with the package when null;
    with `data.prompt_template=chat` it must have a chat template (checked before any data)."""
    tokenizer = load_tokenizer(cfg.tokenizer_path or builtin.BUILTIN_TOKENIZER_PATH)
    if cfg.prompt_template == "chat":
        chat_tokenizer(tokenizer)
    return tokenizer


def build_datasets(cfg: DataConfig, seed: int) -> tuple[SFTDataset, SFTDataset | None, Tokenizer]:
    """(train, valid, tokenizer) for the data section.

    valid is read from `valid_path`, else `valid_fraction` of the training records are held
    out (chosen deterministically from `seed`), else None when valid_fraction is 0. Data from
    files, folders and the hub is tokenised once into the cache (`soft.data.cache`; rank 0
    builds it) and read memory-mapped; the built-in tasks are tokenised in memory.
    """
    cfg.validate()
    tokenizer = build_tokenizer(cfg)
    if cfg.train_path is None:
        train_examples, valid_examples = _builtin_examples(cfg, seed)
        source = f"<built-in tasks, seed {seed}>"
        train = _make_dataset(cfg, train_examples, tokenizer, source, "train")
        valid = (
            _make_dataset(cfg, valid_examples, tokenizer, source, "valid")
            if valid_examples
            else None
        )
        return train, valid, tokenizer
    train_path, valid_path = cfg.train_path, cfg.valid_path
    train_source = parse_source(train_path, "data.train_path")
    # Parsed before the training rows are tokenised: a bad valid_path fails at once.
    valid_source = None if valid_path is None else parse_source(valid_path, "data.valid_path")
    rows, num_records, entry = tokenized_rows(train_source, cfg, tokenizer)

    def dataset(
        rows: Any, num_records: int, entry: Path, source: str, name: str,
        records: list[int] | None = None,
    ) -> SFTDataset:  # fmt: skip
        # Packs are kept in the rows' cache entry (see SFTDataset): computed once per selection.
        return SFTDataset(
            rows, num_records=num_records, seq_length=cfg.seq_length, pad_id=tokenizer.pad_id,
            packing=cfg.packing, cache_entry=entry, source=source, name=name,
            records=None if records is None else np.asarray(records, dtype=np.int64),
        )  # fmt: skip

    if valid_path is not None and valid_source is not None:  # both or neither
        train = dataset(rows, num_records, entry, train_path, "train")
        v_rows, v_records, v_entry = tokenized_rows(valid_source, cfg, tokenizer)
        return train, dataset(v_rows, v_records, v_entry, valid_path, "valid"), tokenizer
    train_ids, valid_ids = _hold_out(range(num_records), cfg.valid_fraction, seed, train_path)
    train = dataset(rows, num_records, entry, train_path, "train", train_ids)
    valid = dataset(rows, num_records, entry, train_path, "valid", valid_ids) if valid_ids else None
    return train, valid, tokenizer


def _builtin_examples(cfg: DataConfig, seed: int) -> tuple[list[Example], list[Example]]:
    """Built-in tasks: training records from `seed`; the validation records come from an
    independent stream and exclude every training question, so they are truly held out."""
    train = builtin.generate_records(seed, cfg.builtin_num_samples)
    valid: list[dict[str, str]] = []
    if cfg.valid_fraction > 0:
        n_valid = max(1, round(cfg.builtin_num_samples * cfg.valid_fraction))
        exclude = {builtin.record_key(r) for r in train}
        valid = builtin.generate_records(seed, n_valid, split="valid", exclude=exclude)

    def examples(records: list[dict[str, str]]) -> list[Example]:
        return [
            instruction_example(cfg.prompt_template, r["instruction"], r["input"], r["output"])
            for r in records
        ]

    return examples(train), examples(valid)


def _hold_out(
    items: Sequence[T], fraction: float, seed: int, source: str
) -> tuple[list[T], list[T]]:
    """Split off round(fraction * n) items (at least one) chosen by `seed`; both parts keep
    the file order. Done on records, before tokenisation, so a document never straddles."""
    if fraction == 0:
        return list(items), []
    n_valid = max(1, round(len(items) * fraction))
    if n_valid >= len(items):
        raise ConfigError(
            f"data file '{source}' has {len(items)} record(s): too few to hold out "
            f"data.valid_fraction={fraction} for validation; add records, set data.valid_path "
            "or data.valid_fraction=0"
        )
    chosen = set(random.Random(seed).sample(range(len(items)), n_valid))
    train = [x for i, x in enumerate(items) if i not in chosen]
    valid = [x for i, x in enumerate(items) if i in chosen]
    return train, valid


def _make_dataset(
    cfg: DataConfig, examples: list[Example], tokenizer: Tokenizer, source: str, name: str
) -> SFTDataset:
    return SFTDataset.from_examples(
        examples, tokenizer, cfg.seq_length, cfg.overlong, source=source, name=name,
        packing=cfg.packing,
    )  # fmt: skip
