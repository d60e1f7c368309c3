"""Tokenised fixed-length samples for supervised fine-tuning.

Layout of one sample (LLaMA-2 conventions):

    full      = [BOS] + prompt_ids + response_ids + [EOS]
    tokens    = full[:-1]          (model input)
    labels    = full[1:]           (next-token targets)
    loss_mask = 1 where the label is a response token or the final EOS, else 0

padded to `seq_length` with the pad id and mask 0. The datasets are small, so everything is
tokenised eagerly into three dense tensors: `__getitem__` is then a cheap slice.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch.utils.data import Dataset

from soft.config.errors import ConfigError
from soft.data.tokenizer import Tokenizer

Overlong = Literal["truncate", "drop"]


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


@dataclass
class _Sample:
    tokens: list[int]
    labels: list[int]
    mask_start: int  # first label position in the loss
    mask_end: int  # one past the last label position in the loss (= number of labels)


def sft_sample(
    prompt_ids: Sequence[int],
    response_ids: Sequence[int],
    tokenizer: Tokenizer,
    seq_length: int,
    overlong: Overlong,
    stats: DatasetStats,
) -> _Sample | None:
    """One prompt/response sample, or None (counted in `stats`) if it cannot be used."""
    full = [tokenizer.bos_id, *prompt_ids, *response_ids, tokenizer.eos_id]
    # Label j is full[j + 1], so labels from index len(prompt_ids) on are response or EOS.
    mask_start = len(prompt_ids)
    if len(full) - 1 > seq_length:
        if overlong == "drop":
            stats.drop(f"longer than data.seq_length={seq_length} (data.overlong=drop)")
            return None
        if mask_start >= seq_length:
            stats.drop(
                f"with a prompt that alone fills data.seq_length={seq_length}, "
                "leaving no response token to train on"
            )
            return None
        full = full[: seq_length + 1]  # cut the end of the response (and the EOS)
        stats.num_truncated += 1
    return _Sample(full[:-1], full[1:], mask_start, len(full) - 1)


def text_windows(ids: Sequence[int], tokenizer: Tokenizer, seq_length: int) -> list[_Sample]:
    """Consecutive `seq_length` windows over [BOS] + document + [EOS], all tokens in the loss.

    Windows overlap by one token so that every token of the document is a label once.
    """
    full = [tokenizer.bos_id, *ids, tokenizer.eos_id]
    windows = []
    for start in range(0, len(full) - 1, seq_length):
        chunk = full[start : start + seq_length + 1]
        windows.append(_Sample(chunk[:-1], chunk[1:], 0, len(chunk) - 1))
    return windows


class SFTDataset(Dataset):
    """Fixed-length samples: dicts of `tokens`, `labels` (LongTensor[s]) and `loss_mask`
    (FloatTensor[s]). Build with `from_pairs` (prompt/response) or `from_documents` (text)."""

    def __init__(
        self,
        samples: Sequence[_Sample],
        *,
        seq_length: int,
        pad_id: int,
        stats: DatasetStats,
        source: str,
        name: str = "data",
    ):
        self.seq_length = seq_length
        self.pad_id = pad_id
        self.stats = stats
        self.source = source
        self.name = name
        n = len(samples)
        self.tokens = torch.full((n, seq_length), pad_id, dtype=torch.long)
        self.labels = torch.full((n, seq_length), pad_id, dtype=torch.long)
        self.loss_mask = torch.zeros((n, seq_length), dtype=torch.float)
        for i, s in enumerate(samples):
            self.tokens[i, : len(s.tokens)] = torch.tensor(s.tokens, dtype=torch.long)
            self.labels[i, : len(s.labels)] = torch.tensor(s.labels, dtype=torch.long)
            self.loss_mask[i, s.mask_start : s.mask_end] = 1.0
        stats.num_samples = n
        stats.num_loss_tokens = int(self.loss_mask.sum().item())

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
        stats = DatasetStats(num_records=len(pairs))
        samples = []
        for prompt, response in pairs:
            prompt_ids, response_ids = tokenizer.encode_pair(prompt, response)
            sample = sft_sample(prompt_ids, response_ids, tokenizer, seq_length, overlong, stats)
            if sample is not None:
                samples.append(sample)
        _check_not_empty(samples, stats, source)
        return cls(
            samples,
            seq_length=seq_length,
            pad_id=tokenizer.pad_id,
            stats=stats,
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
        """Language-modelling samples: each document split into `seq_length` windows.

        Blank documents are dropped: they would only teach BOS -> EOS.
        """
        stats = DatasetStats(num_records=len(documents))
        samples: list[_Sample] = []
        for doc in documents:
            if not doc.strip():
                stats.drop("with an empty document")
                continue
            samples.extend(text_windows(tokenizer.encode(doc), tokenizer, seq_length))
        _check_not_empty(samples, stats, source)
        return cls(
            samples,
            seq_length=seq_length,
            pad_id=tokenizer.pad_id,
            stats=stats,
            source=source,
            name=name,
        )

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "tokens": self.tokens[index],
            "labels": self.labels[index],
            "loss_mask": self.loss_mask[index],
        }

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Samples `indices` stacked, by one tensor gather (same result as `collate`)."""
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return {
            "tokens": self.tokens[idx],
            "labels": self.labels[idx],
            "loss_mask": self.loss_mask[idx],
        }

    def describe(self) -> str:
        """One line for the log."""
        s = self.stats
        return (
            f"{self.name}: {s.num_samples} samples of {self.seq_length} tokens from "
            f"{s.num_records} records of {self.source}; {s.num_truncated} truncated, "
            f"{s.num_dropped} dropped; {s.num_loss_tokens} tokens in the loss"
        )


def _check_not_empty(samples: Sequence[_Sample], stats: DatasetStats, source: str) -> None:
    if samples:
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
