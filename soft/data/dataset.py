"""Tokenised fixed-length samples for supervised fine-tuning, kept in Arrow.

Layout of one sample:

    full      = the example's ids as soft.data.prompts.render gives them (cut to
                seq_length + 1 ids): [BOS] + prompt + response + [EOS] with the Alpaca
                template (no BOS for a tokenizer without one), the chat template's rendering
                of the conversation with the chat template
    tokens    = full[:-1]          (model input)
    labels    = full[1:]           (next-token targets)
    loss_mask = 1 where the label is a target (a response token and the final EOS; every
                assistant turn with its end-of-turn token), else 0

padded to `seq_length` with the pad id (the tokenizer's, else EOS) and mask 0.

With packing (`data.packing`), a sample is a pack: several examples side by side, each laid
out as above (its own tokens/labels shift, so the last token of one example predicts its own
EOS, never the next example's first token), then padding. A packed batch also carries

    position_ids = 0, 1, ... restarting at each example (0 on padding)
    document     = which example of the pack the token belongs to (0..n-1; -1 on padding)

from which the training step builds the block-diagonal causal mask. Packs come from
`pack_first_fit_decreasing` over the examples' lengths, computed once per selection and kept
beside the cached rows (`packs-<key>.npz`), so every rank and every resume sees the same packs.

The tokenised rows of a whole source live in one Arrow table (`datasets.Dataset`), one row per
sample, and one row per dropped record saying why:

    record      int64        the record the row came from (a text document gives several rows)
    ids         list<int32>  `full` of the sample, unpadded (empty for a dropped record)
    targets     list<int32>  label positions in the loss, as flat [start, end) pairs
                             (s0, e0, s1, e1, ...): one pair per response or assistant turn
    truncated   bool         the response was cut to fit
    drop        string       why the record was dropped; "" for a sample

The table comes from the tokenisation cache (`soft.data.cache`: memory-mapped, so ranks on one
node share the page cache and no rank holds the set in Python lists), or is built in memory for
small in-process data (built-in tasks, tests). A dataset is a selection of its records (the
train/valid hold-out); padding happens per batch.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from soft.config.errors import ConfigError
from soft.data.prompts import Example, PlainExample, Rendered, RenderError, render_many
from soft.data.tokenizer import Tokenizer

Overlong = Literal["truncate", "drop"]
ROW_COLUMNS = ("record", "ids", "targets", "truncated", "drop")
# Bump when the packing algorithm changes: cached packs of the old one are then never read.
PACKING_VERSION = 1

log = logging.getLogger(__name__)


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


def _row(record: int, ids: list[int], targets: list[int], truncated: bool, drop: str) -> tuple:
    return record, ids, targets, truncated, drop


def _flat(pairs: Sequence[tuple[int, int]]) -> list[int]:
    return [bound for pair in pairs for bound in pair]


def sft_row(record: int, rendered: Rendered, seq_length: int, overlong: Overlong) -> tuple:
    """One rendered record -> its row: a sample, or a drop with the reason."""
    full = rendered.ids
    # Label j is full[j + 1]: token targets [s, e) are label positions [s - 1, e - 1).
    labels = [(max(s, 1) - 1, e - 1) for s, e in rendered.targets if e > max(s, 1)]
    if len(full) - 1 <= seq_length:
        return _row(record, full, _flat(labels), False, "")
    if overlong == "drop":
        return _row(
            record, [], [], False, f"longer than data.seq_length={seq_length} (data.overlong=drop)"
        )
    kept = [(s, min(e, seq_length)) for s, e in labels if s < seq_length]
    if not kept:
        reason = (
            f"with a prompt that alone fills data.seq_length={seq_length}, "
            "leaving no response token to train on"
        )
        return _row(record, [], [], False, reason)
    return _row(record, full[: seq_length + 1], _flat(kept), True, "")  # cut the end


def text_rows(record: int, ids: Sequence[int], tokenizer: Tokenizer, seq_length: int) -> list:
    """Consecutive `seq_length` windows over [BOS] + document + [EOS], all tokens in the loss
    (no BOS for a tokenizer without one).

    Windows overlap by one token so that every token of the document is a label once.
    """
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    full = [*bos, *ids, tokenizer.eos_id]
    rows = []
    for start in range(0, len(full) - 1, seq_length):
        window = full[start : start + seq_length + 1]
        rows.append(_row(record, window, [0, len(window) - 1], False, ""))
    return rows


def tokenize_rows(
    records: Sequence[int],
    items: Sequence[Example | str],
    tokenizer: Tokenizer,
    seq_length: int,
    overlong: Overlong,
    text: bool,
    where: Callable[[int], str] | None = None,
) -> dict[str, list[Any]]:
    """Rows (column -> values) for a batch of records. `items`: the records' examples, or with
    `text` their documents (language-modelling windows; blank documents are dropped: they
    would only teach BOS -> EOS). `where(i)` names item i in an error (default "record N")."""
    rows: list[tuple[Any, ...]] = []
    if text:
        docs = _documents(items)
        kept = [i for i, doc in enumerate(docs) if doc.strip()]
        encoded = dict(zip(kept, tokenizer.encode_many([docs[i] for i in kept]), strict=True))
        for i, record in enumerate(records):
            if i in encoded:
                rows.extend(text_rows(record, encoded[i], tokenizer, seq_length))
            else:
                rows.append(_row(record, [], [], False, "with an empty document"))
    else:
        try:
            rendered = render_many(tokenizer, _examples(items))
        except RenderError as exc:
            name = where(exc.index) if where else f"record {records[exc.index]}"
            raise ConfigError(f"{name}: {exc}") from exc
        for record, one in zip(records, rendered, strict=True):
            rows.append(sft_row(record, one, seq_length, overlong))
    columns: list[Sequence[Any]] = (
        list(zip(*rows, strict=True)) if rows else [[] for _ in ROW_COLUMNS]
    )
    return {name: list(values) for name, values in zip(ROW_COLUMNS, columns, strict=True)}


def _documents(items: Sequence[Example | str]) -> list[str]:
    docs = [x for x in items if isinstance(x, str)]
    if len(docs) != len(items):  # a caller's bug (`text` says which), not user input
        raise TypeError("tokenize_rows(text=True) takes documents (str), got examples")
    return docs


def _examples(items: Sequence[Example | str]) -> list[Example]:
    examples = [x for x in items if not isinstance(x, str)]
    if len(examples) != len(items):
        raise TypeError("tokenize_rows(text=False) takes examples, got documents (str)")
    return examples


def row_features() -> Any:
    """Arrow types of the rows (int32 ids: half the bytes of int64, any vocabulary < 2^31)."""
    from datasets import Features, List, Value

    return Features(
        {
            "record": Value("int64"),
            "ids": List(Value("int32")),
            "targets": List(Value("int32")),
            "truncated": Value("bool"),
            "drop": Value("string"),
        }
    )


# ----------------------------------------------------------------------------- packing


@dataclass(frozen=True)
class Packs:
    """Samples grouped into packs: pack p holds samples members[offsets[p]:offsets[p + 1]]
    (in ascending sample order), whose lengths sum to at most the capacity."""

    members: np.ndarray  # int64, every sample exactly once
    offsets: np.ndarray  # int64, len = number of packs + 1

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def pack(self, p: int) -> np.ndarray:
        return self.members[self.offsets[p] : self.offsets[p + 1]]


def pack_first_fit_decreasing(lengths: np.ndarray, capacity: int) -> Packs:
    """First-fit-decreasing bin packing: samples by decreasing length (ties: lower index
    first), each into the first pack (in creation order) with room. Deterministic: a pure
    function of the lengths. A length above `capacity` is a bug upstream (overlong samples
    are truncated or dropped when tokenised), so it raises."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and (lengths.max() > capacity or lengths.min() < 1):
        raise ValueError(f"sample lengths must be in [1, {capacity}]")
    order = np.lexsort((np.arange(len(lengths)), -lengths))
    first_fit = _first_fit(lengths[order].tolist(), capacity)
    owner = np.asarray(first_fit, dtype=np.int64)[np.argsort(order)]  # back to sample order
    num_packs = int(owner.max()) + 1 if len(owner) else 0
    members = np.lexsort((np.arange(len(lengths)), owner))  # by pack, then sample order
    counts = np.bincount(owner, minlength=num_packs)
    return Packs(members.astype(np.int64), np.concatenate([[0], np.cumsum(counts)]))


def _first_fit(lengths: list[int], capacity: int) -> list[int]:
    """The pack of each length, in order: the lowest-numbered pack with room (numbered as
    opened). A max-tree of free room over n packs, unopened ones all free, finds it in
    O(log n): the leftmost leaf with room >= length is an open pack or the next new one.
    2-4 s per 10^5 samples on a busy 2-core CPU, whatever the number of packs."""
    size = 1 << max(0, len(lengths) - 1).bit_length()  # leaves >= samples >= packs
    tree = [capacity] * (2 * size)
    owner = []
    for length in lengths:
        node = 1
        while node < size:  # descend to the leftmost leaf with room
            node = 2 * node if tree[2 * node] >= length else 2 * node + 1
        owner.append(node - size)
        tree[node] -= length
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    return owner


def cached_packs(lengths: np.ndarray, capacity: int, entry: Path | None) -> tuple[Packs, bool]:
    """`pack_first_fit_decreasing`, read from / written to the cache entry `entry` when given
    (keyed by the lengths, the capacity and PACKING_VERSION). Returns (packs, cache hit).

    Collective with torch.distributed initialised (every rank builds its datasets, in the same
    order): rank 0 finds or computes and writes the packs while the others wait, then every
    rank reads rank 0's file, so a job packs once, not once per rank. A rank that cannot see
    the file (a cache on node-local disk) packs for itself and says so; a read-only cache
    still trains (the packs are recomputed next time)."""
    if entry is None:
        return pack_first_fit_decreasing(lengths, capacity), False
    from soft.data.cache import _on_rank_zero  # cache.py imports this module

    lengths = np.ascontiguousarray(lengths, dtype=np.int64)
    key = hashlib.sha256(f"{PACKING_VERSION}:{capacity}:".encode() + lengths.tobytes()).hexdigest()[
        :32
    ]
    path = entry / f"packs-{key}.npz"
    built: list[Packs] = []  # rank 0's packs when it computed them (no need to read them back)

    def find_or_write() -> str:
        if path.is_file():
            return "hit"
        built.append(pack_first_fit_decreasing(lengths, capacity))
        _write_packs(built[0], path)
        return "built"

    found = _on_rank_zero(find_or_write) == "hit"
    if built:
        return built[0], False
    if path.is_file():
        with np.load(path) as saved:
            return Packs(saved["members"], saved["offsets"]), found
    log.warning(
        "packs %s (written by rank 0) are not visible here: packing on this rank too; set "
        "data.cache_dir to a folder every node shares",
        path,
    )
    return pack_first_fit_decreasing(lengths, capacity), False


def _write_packs(packs: Packs, path: Path) -> None:
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}.npz"
    try:  # written beside and renamed: a reader sees a whole file or none
        np.savez(tmp, members=packs.members, offsets=packs.offsets)
        tmp.rename(path)
    except OSError:  # a read-only cache still trains: the packs are recomputed next time
        tmp.unlink(missing_ok=True)


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
        packing: bool = False,
        cache_entry: Path | None = None,
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
        self._rows = rows.with_format("numpy", columns=["ids", "targets"])
        self.stats = _stats(table, record, chosen, dropped, self._index, num_records, records)
        _check_not_empty(self.stats, source)
        self.packs: Packs | None = None
        self.packs_cached = False
        # Tokens of each sample (its ids less the last, a label only): the packing's sizes.
        self._lengths = _list_lengths(table.column("ids").combine_chunks())[self._index] - 1
        if packing:
            self.packs, self.packs_cached = cached_packs(self._lengths, seq_length, cache_entry)

    @classmethod
    def from_rows(
        cls, columns: dict[str, list[Any]], num_records: int, **kwargs: Any
    ) -> SFTDataset:
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
        examples = [PlainExample(prompt, response) for prompt, response in pairs]
        return cls.from_examples(
            examples, tokenizer, seq_length, overlong, source=source, name=name
        )

    @classmethod
    def from_examples(
        cls,
        examples: Sequence[Example],
        tokenizer: Tokenizer,
        seq_length: int,
        overlong: Overlong = "truncate",
        *,
        source: str = "<memory>",
        name: str = "data",
        packing: bool = False,
    ) -> SFTDataset:
        """Samples from examples (soft.data.prompts); raises ConfigError if none survive."""
        columns = tokenize_rows(
            range(len(examples)), examples, tokenizer, seq_length, overlong, text=False
        )
        return cls.from_rows(
            columns,
            len(examples),
            seq_length=seq_length,
            pad_id=tokenizer.pad_id,
            source=source,
            name=name,
            packing=packing,
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
            range(len(documents)), documents, tokenizer, seq_length, "truncate", text=True,
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
        """Samples: packs when packing, else examples."""
        return len(self._index) if self.packs is None else len(self.packs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: value[0] for key, value in self.batch([index]).items()}

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Samples `indices` stacked and padded (the same result as `collate` of the items)."""
        if self.packs is not None:
            return self._packed_batch(indices)
        rows = self._rows[self._index[np.asarray(list(indices), dtype=np.int64)].tolist()]
        n = len(rows["targets"])
        tokens = torch.full((n, self.seq_length), self.pad_id, dtype=torch.long)
        labels = torch.full((n, self.seq_length), self.pad_id, dtype=torch.long)
        loss_mask = torch.zeros((n, self.seq_length), dtype=torch.float)
        for i, (ids, targets) in enumerate(zip(rows["ids"], rows["targets"], strict=True)):
            full = torch.from_numpy(np.asarray(ids, dtype=np.int64))
            length = len(full) - 1
            tokens[i, :length] = full[:-1]
            labels[i, :length] = full[1:]
            for start, end in zip(targets[0::2], targets[1::2], strict=True):
                loss_mask[i, int(start) : int(end)] = 1.0
        return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask}

    def _packed_batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Packs `indices`: each example laid out as in `batch`, one after another."""
        assert self.packs is not None
        n, s = len(indices), self.seq_length
        out = self._padding_batch(n)
        for i, p in enumerate(indices):
            members = self.packs.pack(int(p))
            rows = self._rows[self._index[members].tolist()]
            start = 0
            for doc, (ids, targets) in enumerate(zip(rows["ids"], rows["targets"], strict=True)):
                full = torch.from_numpy(np.asarray(ids, dtype=np.int64))
                end = start + len(full) - 1
                out["tokens"][i, start:end] = full[:-1]
                out["labels"][i, start:end] = full[1:]
                out["position_ids"][i, start:end] = torch.arange(end - start)
                out["document"][i, start:end] = doc
                for a, b in zip(targets[0::2], targets[1::2], strict=True):
                    out["loss_mask"][i, start + int(a) : start + int(b)] = 1.0
                start = end
            if start > s:  # packing guarantees it; a corrupt cache must not go unnoticed
                raise RuntimeError(f"{self.name}: pack {p} holds {start} > {s} tokens")
        return out

    def _padding_batch(self, n: int) -> dict[str, torch.Tensor]:
        """An all-padding packed batch of `n` rows (padding: position 0, document -1)."""
        s = self.seq_length
        return {
            "tokens": torch.full((n, s), self.pad_id, dtype=torch.long),
            "labels": torch.full((n, s), self.pad_id, dtype=torch.long),
            "loss_mask": torch.zeros((n, s), dtype=torch.float),
            "position_ids": torch.zeros((n, s), dtype=torch.long),
            "document": torch.full((n, s), -1, dtype=torch.long),
        }

    def fill_ratio(self) -> float:
        """Real tokens / token slots over all samples (1.0 = no padding)."""
        return float(self._lengths.sum()) / max(1, len(self) * self.seq_length)

    def describe(self) -> str:
        """One line for the log."""
        s = self.stats
        line = (
            f"{self.name}: {s.num_samples} samples of {self.seq_length} tokens from "
            f"{s.num_records} records of {self.source}; {s.num_truncated} truncated, "
            f"{s.num_dropped} dropped; {s.num_loss_tokens} tokens in the loss"
        )
        if self.packs is None:
            return line
        per_pack = np.diff(self.packs.offsets)
        return (
            f"{line}; packed into {len(self.packs)} sequences "
            f"({'from the cache' if self.packs_cached else 'packed now'}): "
            f"fill {100 * self.fill_ratio():.1f}% of token slots, {per_pack.mean():.2f} examples "
            f"per pack (max {per_pack.max()})"
        )


def _list_lengths(column: Any) -> np.ndarray:
    import pyarrow.compute as pc

    return pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)


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
    truncated = table.column("truncated").to_numpy(zero_copy_only=False)
    reasons = Counter(table.column("drop").take(np.flatnonzero(chosen & dropped)).to_pylist())
    loss_tokens = _loss_tokens_per_row(table.column("targets"), len(record))[index]
    return DatasetStats(
        num_records=num_records if records is None else len(records),
        num_samples=len(index),
        num_truncated=int(truncated[index].sum()),
        num_dropped=sum(reasons.values()),
        num_loss_tokens=int(loss_tokens.sum()),
        drop_reasons=reasons,
    )


def _loss_tokens_per_row(column: Any, num_rows: int) -> np.ndarray:
    """Sum of (end - start) over each row's flat [start, end) pairs."""
    import pyarrow.compute as pc

    column = column.combine_chunks()
    flat = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.int64)
    parents = pc.list_parent_indices(column).to_numpy(zero_copy_only=False)
    widths = flat[1::2] - flat[0::2]
    return np.bincount(parents[0::2], weights=widths, minlength=num_rows).astype(np.int64)


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
