"""Tokenised fixed-length samples for supervised fine-tuning, kept in Arrow.

Layout of one sample (LLaMA-2 conventions):

    full      = [BOS] + prompt_ids + response_ids + [EOS]     (cut to seq_length + 1 ids)
    tokens    = full[:-1]          (model input)
    labels    = full[1:]           (next-token targets)
    loss_mask = 1 where the label is a response token or the final EOS, else 0

padded to `seq_length` with the pad id and mask 0.

The tokenised rows of a whole source live in one Arrow table (`datasets.Dataset`), one row per
sample, and one row per dropped record saying why:

    record      int64        the record the row came from (a text document gives several rows)
    ids         list<int32>  `full` of the sample, unpadded (empty for a dropped record)
    mask_start  int32        first label position in the loss (the loss runs to the end)
    truncated   bool         the response was cut to fit
    drop        string       why the record was dropped; "" for a sample

The table comes from the tokenisation cache (`soft.data.cache`: memory-mapped, so ranks on one
node share the page cache and no rank holds the set in Python lists), or is built in memory for
small in-process data (built-in tasks, tests). A dataset is a selection of its records (the
train/valid hold-out); padding happens per batch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from soft.config.errors import ConfigError
from soft.data.tokenizer import Tokenizer

Overlong = Literal["truncate", "drop"]
ROW_COLUMNS = ("record", "ids", "mask_start", "truncated", "drop")


@dataclass
class DatasetStats:
    num_records: int = 0
    num_samples: int = 0
    num_truncated: int = 0
    num_dropped: int = 0
    num_loss_tokens: int = 0
    # Why records were dropped, reason -> count (shown when nothing is left).
    drop_reasons: Counter[str] = field(default_factory=Counter)

    def drop(self, reason: str) -> None:
        self.num_dropped += 1
        self.drop_reasons[reason] += 1


# ----------------------------------------------------------------------------- tokenising


def _row(record: int, ids: list[int], mask_start: int, truncated: bool, drop: str) -> tuple:
    return record, ids, mask_start, truncated, drop


def sft_rows(
    record: int,
    prompt_ids: Sequence[int],
    response_ids: Sequence[int],
    tokenizer: Tokenizer,
    seq_length: int,
    overlong: Overlong,
) -> tuple:
    """One prompt/response record -> its row: a sample, or a drop with the reason."""
    full = [tokenizer.bos_id, *prompt_ids, *response_ids, tokenizer.eos_id]
    # Label j is full[j + 1], so labels from index len(prompt_ids) on are response or EOS.
    mask_start = len(prompt_ids)
    if len(full) - 1 <= seq_length:
        return _row(record, full, mask_start, False, "")
    if overlong == "drop":
        return _row(
            record, [], 0, False, f"longer than data.seq_length={seq_length} (data.overlong=drop)"
        )
    if mask_start >= seq_length:
        reason = (
            f"with a prompt that alone fills data.seq_length={seq_length}, "
            "leaving no response token to train on"
        )
        return _row(record, [], 0, False, reason)
    return _row(record, full[: seq_length + 1], mask_start, True, "")  # cut the response end


def text_rows(record: int, ids: Sequence[int], tokenizer: Tokenizer, seq_length: int) -> list:
    """Consecutive `seq_length` windows over [BOS] + document + [EOS], all tokens in the loss.

    Windows overlap by one token so that every token of the document is a label once.
    """
    full = [tokenizer.bos_id, *ids, tokenizer.eos_id]
    return [
        _row(record, full[start : start + seq_length + 1], 0, False, "")
        for start in range(0, len(full) - 1, seq_length)
    ]


def tokenize_rows(
    records: Sequence[int],
    prompts: Sequence[str],
    responses: Sequence[str],
    tokenizer: Tokenizer,
    seq_length: int,
    overlong: Overlong,
    text: bool,
) -> dict[str, list[Any]]:
    """Rows (column -> values) for a batch of records; `text`: language-modelling windows of
    the responses (blank documents are dropped: they would only teach BOS -> EOS)."""
    rows: list[tuple] = []
    if text:
        kept = [i for i, doc in enumerate(responses) if doc.strip()]
        encoded = dict(zip(kept, tokenizer.encode_many([responses[i] for i in kept]), strict=True))
        for i, record in enumerate(records):
            if i in encoded:
                rows.extend(text_rows(record, encoded[i], tokenizer, seq_length))
            else:
                rows.append(_row(record, [], 0, False, "with an empty document"))
    else:
        for record, (p_ids, r_ids) in zip(
            records, tokenizer.encode_pairs(prompts, responses), strict=True
        ):
            rows.append(sft_rows(record, p_ids, r_ids, tokenizer, seq_length, overlong))
    columns = list(zip(*rows, strict=True)) if rows else [[] for _ in ROW_COLUMNS]
    return {name: list(values) for name, values in zip(ROW_COLUMNS, columns, strict=True)}


def row_features() -> Any:
    """Arrow types of the rows (int32 ids: half the bytes of int64, any vocabulary < 2^31)."""
    from datasets import Features, List, Value

    return Features(
        {
            "record": Value("int64"),
            "ids": List(Value("int32")),
            "mask_start": Value("int32"),
            "truncated": Value("bool"),
            "drop": Value("string"),
        }
    )


# ----------------------------------------------------------------------------- the dataset


class SFTDataset(Dataset):
    """Fixed-length samples: dicts of `tokens`, `labels` (LongTensor[s]) and `loss_mask`
    (FloatTensor[s]). `rows` is the Arrow table described in the module docstring; `records`
    the record indices this dataset uses (None = all `num_records`). Build small in-memory
    ones with `from_pairs` (prompt/response) or `from_documents` (text)."""

    def __init__(
        self,
        rows: Any,
        *,
        num_records: int,
        seq_length: int,
        pad_id: int,
        source: str,
        name: str = "data",
        records: np.ndarray | None = None,
    ):
        self.seq_length = seq_length
        self.pad_id = pad_id
        self.source = source
        self.name = name
        table = rows.data
        record = table.column("record").to_numpy()
        dropped = _dropped_mask(table.column("drop"))
        chosen = np.ones(len(record), dtype=bool) if records is None else np.isin(record, records)
        self._index = np.flatnonzero(chosen & ~dropped)  # sample i -> row
        self._rows = rows.with_format("numpy", columns=["ids", "mask_start"])
        self.stats = _stats(table, record, chosen, dropped, self._index, num_records, records)
        _check_not_empty(self.stats, source)

    @classmethod
    def from_rows(cls, columns: dict[str, list[Any]], num_records: int, **kwargs) -> SFTDataset:
        """A dataset over rows held in memory (see `tokenize_rows`)."""
        from datasets import Dataset as ArrowDataset

        return cls(
            ArrowDataset.from_dict(columns, features=row_features()),
            num_records=num_records,
            **kwargs,
        )

    @classmethod
    def from_pairs(
        cls,
        pairs: Sequence[tuple[str, str]],
        tokenizer: Tokenizer,
        seq_length: int,
        overlong: Overlong = "truncate",
        *,
        source: str = "<memory>",
        name: str = "data",
    ) -> SFTDataset:
        """Samples from (prompt, response) texts; raises ConfigError if none survive."""
        prompts, responses = [p for p, _ in pairs], [r for _, r in pairs]
        columns = tokenize_rows(
            range(len(pairs)), prompts, responses, tokenizer, seq_length, overlong, text=False
        )
        return cls.from_rows(
            columns,
            len(pairs),
            seq_length=seq_length,
            pad_id=tokenizer.pad_id,
            source=source,
            name=name,
        )

    @classmethod
    def from_documents(
        cls,
        documents: Sequence[str],
        tokenizer: Tokenizer,
        seq_length: int,
        *,
        source: str = "<memory>",
        name: str = "data",
    ) -> SFTDataset:
        """Language-modelling samples: each document split into `seq_length` windows."""
        columns = tokenize_rows(
            range(len(documents)), [""] * len(documents), documents, tokenizer, seq_length,
            "truncate", text=True,
        )  # fmt: skip
        return cls.from_rows(
            columns,
            len(documents),
            seq_length=seq_length,
            pad_id=tokenizer.pad_id,
            source=source,
            name=name,
        )

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: value[0] for key, value in self.batch([index]).items()}

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Samples `indices` stacked and padded (the same result as `collate` of the items)."""
        rows = self._rows[self._index[np.asarray(list(indices), dtype=np.int64)].tolist()]
        n = len(rows["mask_start"])
        tokens = torch.full((n, self.seq_length), self.pad_id, dtype=torch.long)
        labels = torch.full((n, self.seq_length), self.pad_id, dtype=torch.long)
        loss_mask = torch.zeros((n, self.seq_length), dtype=torch.float)
        for i, (ids, start) in enumerate(zip(rows["ids"], rows["mask_start"], strict=True)):
            full = torch.from_numpy(np.asarray(ids, dtype=np.int64))
            length = len(full) - 1
            tokens[i, :length] = full[:-1]
            labels[i, :length] = full[1:]
            loss_mask[i, int(start) : length] = 1.0
        return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask}

    def describe(self) -> str:
        """One line for the log."""
        s = self.stats
        return (
            f"{self.name}: {s.num_samples} samples of {self.seq_length} tokens from "
            f"{s.num_records} records of {self.source}; {s.num_truncated} truncated, "
            f"{s.num_dropped} dropped; {s.num_loss_tokens} tokens in the loss"
        )


def _dropped_mask(column: Any) -> np.ndarray:
    import pyarrow.compute as pc

    return pc.not_equal(column, "").to_numpy(zero_copy_only=False)


def _stats(
    table: Any,
    record: np.ndarray,
    chosen: np.ndarray,
    dropped: np.ndarray,
    index: np.ndarray,
    num_records: int,
    records: np.ndarray | None,
) -> DatasetStats:
    import pyarrow.compute as pc

    lengths = pc.list_value_length(table.column("ids")).to_numpy(zero_copy_only=False)
    mask_start = table.column("mask_start").to_numpy()
    truncated = table.column("truncated").to_numpy(zero_copy_only=False)
    reasons = Counter(table.column("drop").take(np.flatnonzero(chosen & dropped)).to_pylist())
    loss_tokens = lengths[index].astype(np.int64) - 1 - mask_start[index]
    return DatasetStats(
        num_records=num_records if records is None else len(records),
        num_samples=len(index),
        num_truncated=int(truncated[index].sum()),
        num_dropped=sum(reasons.values()),
        num_loss_tokens=int(loss_tokens.sum()),
        drop_reasons=reasons,
    )


def _check_not_empty(stats: DatasetStats, source: str) -> None:
    if stats.num_samples:
        return
    if stats.num_records == 0:
        raise ConfigError(f"data file '{source}': no records")
    if len(stats.drop_reasons) == 1:
        ((reason, _),) = stats.drop_reasons.items()
        detail = f"all {stats.num_records} records {reason} were dropped"
    else:
        parts = ", ".join(f"{n} records {reason}" for reason, n in stats.drop_reasons.items())
        detail = f"all {stats.num_records} records were dropped: {parts}"
    raise ConfigError(f"data file '{source}': no samples left: {detail}")
