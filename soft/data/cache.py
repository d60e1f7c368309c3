"""Tokenisation once: a source's tokenised rows (soft.data.dataset) cached on disk.

An entry is keyed by everything its rows depend on: the source's identity (a file's sha256, so
a copied or moved file still hits; a folder's or hub dataset's `datasets` fingerprint with its
split and config), the format options and prompt template, the tokenizer's kind and sha256
(for a Hugging Face tokenizer that covers its chat template), `seq_length` and `overlong`.
A changed file, tokenizer, template or length is a new entry; nothing stale is ever read.

    <cache_dir>/<key>/rows.arrow   the rows (`datasets.Dataset.map` output, memory-mapped)
    <cache_dir>/<key>/meta.json    source, key inputs, record/row counts, build time
    <cache_dir>/<key>/packs-<k>.npz with data.packing: the packs of one selection of the rows
                                   (train or valid), keyed by its examples' lengths, seq_length
                                   and the packing version (soft.data.dataset.cached_packs);
                                   packing changes no row, so the rows' key does not include it;
                                   rank 0 packs and writes, the other ranks read its file

An entry is built in a temporary folder beside it and renamed into place, so a reader sees a
complete entry or none, and two builders (two jobs, or ranks on node-local disks) cannot mix
their files. With torch.distributed initialised, rank 0 builds or finds the entry while the
others wait, then every rank opens it; a bad record fails every rank with rank 0's message.
`data.cache_dir` should be visible to every node (like `train.output_dir`); a rank that cannot
see rank 0's entry builds its own and says so.

Default location: `$SOFT_CACHE_DIR`, else `$XDG_CACHE_HOME/soft/tokenized`, else
`~/.cache/soft/tokenized`. Entries are never deleted by the project: remove the folder to
reclaim the space.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from soft.config.errors import ConfigError, InputError
from soft.data.config import DataConfig
from soft.data.dataset import row_features, tokenize_rows
from soft.data.formats import item_from_json, item_to_json, load_examples, rows_to_examples
from soft.data.sources import DataSource, file_sha256, fingerprint, import_datasets, load_arrow
from soft.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# Bump when the rows' layout or the tokenisation changes: old entries are then never read.
# 2: loss targets as [start, end) pairs (multi-turn chat) instead of one mask start.
CACHE_VERSION = 2
ROWS_FILE = "rows.arrow"
META_FILE = "meta.json"
BATCH = 1000  # records per tokenisation batch (SentencePiece encodes each batch in threads)


def default_cache_dir() -> Path:
    if os.environ.get("SOFT_CACHE_DIR"):
        return Path(os.environ["SOFT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "soft" / "tokenized"


def cache_root(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()


def key_inputs(identity: dict[str, Any], cfg: DataConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    """What the rows depend on (and nothing else: paths, the seed and the hold-out do not)."""
    options: dict[str, Any] = {"format": cfg.format, "seq_length": cfg.seq_length}
    if cfg.format == "text":
        options["text_field"] = cfg.text_field
    else:
        options["overlong"] = cfg.overlong
        options["prompt_template"] = cfg.prompt_template
    if cfg.format == "triviaqa":
        options["answer_alias_index"] = cfg.answer_alias_index
    return {
        "version": CACHE_VERSION,
        "source": identity,
        "tokenizer_kind": tokenizer.kind,
        "tokenizer_sha256": tokenizer.sha256(),
        **options,
    }


def entry_key(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32]


# ----------------------------------------------------------------------------- public entry


def tokenized_rows(
    source: DataSource, cfg: DataConfig, tokenizer: Tokenizer
) -> tuple[Any, int, Path]:
    """(rows as a memory-mapped `datasets.Dataset`, number of records, entry folder)."""

    def build() -> str:
        return str(find_or_build(source, cfg, tokenizer))

    entry = Path(_on_rank_zero(build))
    if not (entry / META_FILE).is_file():
        log.warning(
            "tokenised data cache %s (written by rank 0) is not visible here: building a copy "
            "on this node; set data.cache_dir to a folder every node shares",
            entry,
        )
        entry = Path(build())
    return open_entry(entry)


def open_entry(entry: Path) -> tuple[Any, int, Path]:
    datasets = import_datasets()
    meta = json.loads((entry / META_FILE).read_text())
    rows = datasets.Dataset.from_file(str(entry / ROWS_FILE))
    return rows, int(meta["num_records"]), entry


def find_or_build(source: DataSource, cfg: DataConfig, tokenizer: Tokenizer) -> Path:
    """The entry for `source` (built now when missing)."""
    start = time.perf_counter()
    raw = None if source.is_file else load_arrow(source)
    identity = _identity(source, raw)
    inputs = key_inputs(identity, cfg, tokenizer)
    root = cache_root(cfg)
    entry = root / entry_key(inputs)
    if (entry / META_FILE).is_file():
        log.info("%s: tokenised rows from the cache %s", source.text, entry)
        return entry
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"data.cache_dir '{root}' cannot be created ({exc})") from exc
    tmp = root / f".{entry.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        rows = _tokenize(source, raw, cfg, tokenizer, tmp / ROWS_FILE, entry.name)
        num_records = len(raw) if raw is not None else rows.pop("num_records")
        meta = {
            "source": source.text,
            "inputs": inputs,
            "num_records": num_records,
            "num_rows": rows["num_rows"],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "seconds": round(time.perf_counter() - start, 3),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        try:
            tmp.rename(entry)
        except OSError:
            if not (entry / META_FILE).is_file():  # not a concurrent builder's entry
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info(
        "%s: tokenised %d records in %.1f s into the cache %s",
        source.text,
        meta["num_records"],
        time.perf_counter() - start,
        entry,
    )
    return entry


def _identity(source: DataSource, raw: Any) -> dict[str, Any]:
    if source.is_file:
        path = Path(source.target)
        if not path.is_file():
            raise ConfigError(f"data file '{path}' does not exist")
        return {"kind": "file", "sha256": file_sha256(path), "suffix": path.suffix.lower()}
    return {
        "kind": "dataset",
        "fingerprint": fingerprint(raw),
        "split": source.split,
        "config": source.options.get("config"),
    }


def _tokenize(
    source: DataSource,
    raw: Any,
    cfg: DataConfig,
    tokenizer: Tokenizer,
    out_file: Path,
    fingerprint_: str,
) -> dict[str, Any]:
    """Write the rows of every record of `source` to `out_file`; returns counts."""
    datasets = import_datasets()
    text = cfg.format == "text"
    options = dict(
        template=cfg.prompt_template, alias_index=cfg.answer_alias_index, text_field=cfg.text_field
    )
    num_records = None
    if raw is None:  # a file: read and validated with file/line errors, on this rank only
        path = source.target
        examples = load_examples(path, cfg.format, **options)
        num_records = len(examples)
        raw = datasets.Dataset.from_dict(
            {"where": [w for w, _ in examples], "item": [item_to_json(e) for _, e in examples]}
        )
        del examples

        def convert(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
            items = [item_from_json(item) for item in batch["item"]]
            return tokenize_rows(
                indices, items, tokenizer, cfg.seq_length, cfg.overlong, text,
                where=lambda i: f"data file '{path}', {batch['where'][i]}",
            )  # fmt: skip
    else:
        if len(raw) == 0:
            raise ConfigError(f"{source.label()} contains no records")
        label = source.label()

        def convert(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
            items = rows_to_examples(label, batch, indices[0], cfg.format, **options)
            return tokenize_rows(
                indices, items, tokenizer, cfg.seq_length, cfg.overlong, text,
                where=lambda i: f"{label}, row {indices[i]}",
            )  # fmt: skip

    rows = raw.map(
        convert,
        with_indices=True,
        batched=True,
        batch_size=BATCH,
        remove_columns=raw.column_names,
        features=row_features(),
        cache_file_name=str(out_file),
        new_fingerprint=fingerprint_,
        load_from_cache_file=False,
    )
    out = {"num_rows": len(rows)}
    if num_records is not None:
        out["num_records"] = num_records
    del rows
    return out


# ----------------------------------------------------------------------------- ranks


def _on_rank_zero(fn: Callable[[], str]) -> str:
    """Run `fn` on rank 0 only and give its result to every rank; an InputError there is
    raised on every rank with the same message (the others do not wait forever)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return fn()
    result, error, failure = None, None, None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except Exception as exc:  # the other ranks must not hang in the broadcast below
            failure = exc
            error = (
                str(exc)
                if isinstance(exc, InputError)
                else (f"building the tokenised data failed on rank 0: {type(exc).__name__}: {exc}")
            )
    box = [result, error]
    dist.broadcast_object_list(box, src=0)
    if failure is not None:
        raise failure
    result, error = box
    if error is not None:  # the same kind of error as rank 0's: bad input, exit code 2
        raise InputError(error)
    return str(result)
