"""Where records come from: a local file, a local dataset folder, or a Hugging Face hub dataset.

The one string that names a source (`data.train_path`, `data.valid_path`, eval_exits' `--data`):

    train.jsonl | data.json | part.parquet      a local file, read by soft.data.formats (errors
                                                name file, line/row and field)
    path/to/folder[?split=...&config=...]       a local dataset folder: one written by
                                                `Dataset.save_to_disk` / `DatasetDict.save_to_disk`
                                                (read with `datasets.load_from_disk`), or any
                                                folder `datasets.load_dataset` reads (data files,
                                                or the hub layout with a README.md listing configs)
    hf://OWNER/NAME[?config=...&split=...&revision=...]
                                                a hub dataset, `datasets.load_dataset(OWNER/NAME,
                                                name=config, split=split, revision=revision)`;
                                                `hf://datasets/OWNER/NAME` is the same

`split` defaults to `train`; `config` is what `load_dataset` calls `name` (the hub's "subset"),
e.g. `hf://mandarjoshi/trivia_qa?config=rc.nocontext&split=validation`. `split` takes the
`datasets` slicing syntax too (`train[:1000]`). Folders and hub ids go through the same
`load_dataset` call, so a local folder in hub layout tests the hub code path offline.

Hub access follows the `datasets` environment: on nodes without network, load the dataset once
where there is (it lands in `HF_DATASETS_CACHE`) and set `HF_HUB_OFFLINE=1` on the nodes.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from soft.config.errors import ConfigError

HUB_PREFIX = "hf://"
OPTIONS = ("config", "split", "revision")
DEFAULT_SPLIT = "train"
FILE_SUFFIXES = (".json", ".jsonl", ".parquet")
# A hub repo id: "name" or "owner/name" (letters, digits, '-', '_', '.').
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class DataSource:
    """A parsed source string. `kind` is "file", "disk" (save_to_disk folder), "folder"
    (`load_dataset` on a local folder) or "hub"."""

    text: str  # as the user wrote it (for messages and the run's config)
    kind: str
    target: str  # the file or folder path, or the hub repo id
    options: dict[str, str] = field(default_factory=dict)

    @property
    def split(self) -> str:
        return self.options.get("split", DEFAULT_SPLIT)

    @property
    def is_file(self) -> bool:
        return self.kind == "file"

    def label(self) -> str:
        """How messages name this source: "data file 'x.jsonl'" or "dataset 'hf://...'"."""
        if self.is_file:
            return f"data file '{self.target}'"
        return f"dataset '{self.text}' (split '{self.split}')"


def parse_source(text: str, what: str = "data.train_path") -> DataSource:
    """Classify `text` (see the module docstring); a malformed one is a ConfigError naming `what`."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{what}: expected a file, a dataset folder or hf://OWNER/NAME")
    if text.startswith(HUB_PREFIX):
        repo, options = _split_options(text[len(HUB_PREFIX) :], text, what)
        repo = repo.removeprefix("datasets/").strip("/")
        if not _REPO_ID.match(repo):
            raise ConfigError(
                f"{what} '{text}': '{repo}' is not a hub dataset id; expected hf://OWNER/NAME "
                "(e.g. hf://tatsu-lab/alpaca)"
            )
        return DataSource(text, "hub", repo, options)
    base, query = text.split("?", 1) if "?" in text else (text, None)
    path = Path(base)
    if path.is_dir():
        _, options = _split_options(text, text, what)
        kind = "disk" if _is_saved_to_disk(path) else "folder"
        if kind == "disk" and "config" in options:
            raise ConfigError(
                f"{what} '{text}': a folder written by save_to_disk has no configs; drop 'config='"
            )
        return DataSource(text, kind, str(path), options)
    if query is not None and not Path(text).exists():
        raise ConfigError(
            f"{what} '{text}': options after '?' apply to dataset folders and hf:// ids, and "
            f"'{base}' is not a folder"
        )
    path = Path(text)
    if path.suffix.lower() not in FILE_SUFFIXES:
        hint = ""
        if _REPO_ID.match(text) and "/" in text and not path.exists():
            hint = f"; for a hub dataset write hf://{text}"
        raise ConfigError(
            f"{what} '{text}': expected a .json, .jsonl or .parquet file, a dataset folder or "
            f"hf://OWNER/NAME{hint}"
        )
    return DataSource(text, "file", text)


def _split_options(rest: str, text: str, what: str) -> tuple[str, dict[str, str]]:
    if "?" not in rest:
        return rest, {}
    base, query = rest.split("?", 1)
    options: dict[str, str] = {}
    for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=False):
        if key not in OPTIONS:
            raise ConfigError(
                f"{what} '{text}': unknown option '{key}'; expected {', '.join(OPTIONS)} "
                "(e.g. ?config=rc.nocontext&split=validation)"
            )
        if not value:
            raise ConfigError(f"{what} '{text}': option '{key}' is empty")
        options[key] = value
    if not options:
        raise ConfigError(f"{what} '{text}': nothing after '?'; expected e.g. ?split=validation")
    return base, options


def _is_saved_to_disk(path: Path) -> bool:
    """`Dataset.save_to_disk` writes state.json + dataset_info.json; a DatasetDict writes
    dataset_dict.json."""
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def import_datasets() -> Any:
    """`datasets`, quiet. Hub access follows the environment (HF_HUB_OFFLINE etc.): a local
    file or folder never touches the hub."""
    import datasets

    datasets.disable_progress_bars()
    return datasets


def load_arrow(source: DataSource) -> Any:
    """The split of a folder or hub source as a memory-mapped `datasets.Dataset`."""
    datasets = import_datasets()
    if source.kind == "disk":
        try:
            loaded = datasets.load_from_disk(source.target)
        except Exception as exc:  # FileNotFoundError, pyarrow errors on damaged files
            raise ConfigError(f"{source.label()}: cannot load the saved dataset ({exc})") from exc
        if isinstance(loaded, datasets.DatasetDict):
            return _pick_split(loaded, source)
        if "split" in source.options:  # a single Dataset: a requested split must be its own
            have = str(loaded.split) if loaded.split is not None else None
            if have is not None and have != source.split:
                raise ConfigError(
                    f"{source.label()}: the folder holds split '{have}', not '{source.split}'"
                )
        return loaded
    kwargs: dict[str, Any] = {"split": source.split}
    if "config" in source.options:
        kwargs["name"] = source.options["config"]
    if "revision" in source.options:
        kwargs["revision"] = source.options["revision"]
    try:
        loaded = datasets.load_dataset(source.target, **kwargs)
    except ValueError as exc:  # unknown split / config: datasets lists the valid ones
        raise ConfigError(f"{source.label()}: {exc}") from exc
    except Exception as exc:  # network, missing repo, unreadable files
        hint = ""
        if source.kind == "hub" and os.environ.get("HF_HUB_OFFLINE") == "1":
            hint = " (HF_HUB_OFFLINE=1: only datasets already in the local cache load)"
        raise ConfigError(
            f"{source.label()}: datasets.load_dataset failed: {type(exc).__name__}: {exc}{hint}"
        ) from exc
    return loaded


def _pick_split(loaded: Any, source: DataSource) -> Any:
    split = source.split
    if split not in loaded:
        raise ConfigError(
            f"{source.label()}: no split '{split}'; the folder has {', '.join(sorted(loaded))} "
            "(choose one with ?split=NAME)"
        )
    return loaded[split]


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(dataset: Any) -> str:
    """`datasets`' own identity of a loaded dataset: derived from the builder, its config and
    data files (or the saved state), the same value its `map` cache is keyed by. It has no
    public accessor."""
    return str(dataset._fingerprint)
