"""The experiment's inputs: the pretraining corpus, the fine-tuning splits and the tokenizer.

Everything is written under the output directory so that a finished experiment is
self-contained (the runs point at these files, not at the sources).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from soft.config.errors import ConfigError
from soft.data.builtin import generate_records, record_key, train_sentencepiece
from soft.data.prompts import alpaca_prompt

Record = dict[str, str]


@dataclass(frozen=True)
class FinetuneData:
    """The fine-tuning splits as written: Alpaca JSON lists."""

    train_path: Path
    test_path: Path
    num_train: int
    num_test: int


def check_corpus(path: Path | None) -> Path:
    """`path`, checked: a missing corpus is the likely first failure on a fresh clone, so the
    error says what to do."""
    what = (
        "an Alpaca-format JSON list of {instruction, input, output}; README's results used "
        "GSM8K train in Alpaca format, MIT, from the AlpacaDataCleaned project"
    )
    if path is None:
        raise ConfigError(
            f"the base model is pretrained on a corpus: pass --corpus PATH ({what}), or "
            "--no-pretrain to fine-tune every method from a random init (the report says so)"
        )
    if not path.is_file():
        raise ConfigError(
            f"pretraining corpus '{path}' not found: pass --corpus PATH ({what}), or --no-pretrain"
        )
    return path


def load_alpaca_corpus(path: Path | None) -> list[Record]:
    """The pretraining source: a JSON list (or JSON Lines) of Alpaca records."""
    text = check_corpus(path).read_text(encoding="utf-8")
    try:
        if text.lstrip().startswith("["):
            data = json.loads(text)
        else:
            data = [json.loads(line) for line in text.split("\n") if line.strip()]
    except json.JSONDecodeError as exc:
        raise ConfigError(f"pretraining corpus '{path}' is not valid JSON ({exc})") from exc
    bad = next(
        (i for i, r in enumerate(data) if not isinstance(r, dict) or "instruction" not in r), None
    )
    if bad is not None:
        raise ConfigError(
            f"pretraining corpus '{path}', row {bad}: expected an object with 'instruction' "
            "and 'output' fields (Alpaca format)"
        )
    if not data:
        raise ConfigError(f"pretraining corpus '{path}' contains no records")
    return data


def corpus_documents(records: Iterable[Record]) -> list[str]:
    """One plain-text document per record: the problem, a newline, the worked answer."""
    docs = []
    for r in records:
        question = r["instruction"]
        if r.get("input"):
            question += "\n" + r["input"]
        docs.append(question + "\n" + r.get("output", ""))
    return docs


def write_jsonl_text(documents: Sequence[str], path: Path) -> Path:
    """`{"text": doc}` per line: the launcher's `data.format=text` input."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for doc in documents:
            f.write(json.dumps({"text": doc}) + "\n")
    return path


def make_finetune_data(
    out_dir: Path, seed: int, num_train: int, num_test: int, tasks: Sequence[str] | None = None
) -> tuple[FinetuneData, list[Record], list[Record]]:
    """Built-in procedural tasks: a train split and a held-out test split (no shared question)."""
    train = generate_records(seed, num_train, tasks=tasks)
    keys = {record_key(r) for r in train}
    test = generate_records(seed, num_test, split="test", tasks=tasks, exclude=keys)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_path, test_path = out_dir / "train.json", out_dir / "test.json"
    train_path.write_text(json.dumps(train, indent=1))
    test_path.write_text(json.dumps(test, indent=1))
    return FinetuneData(train_path, test_path, len(train), len(test)), train, test


def tokenizer_lines(documents: Iterable[str], finetune_records: Iterable[Record]) -> list[str]:
    """Training sentences for SentencePiece: corpus text and the fine-tuning prompts/answers,
    split on newlines (as soft/data/builtin.py does: a newline is the byte piece <0x0A>)."""
    texts = list(documents)
    texts += [alpaca_prompt(r["instruction"], r["input"]) + r["output"] for r in finetune_records]
    return [line for text in texts for line in text.split("\n") if line.strip()]


def train_tokenizer(lines: Sequence[str], out_path: Path, vocab_size: int) -> Path:
    """A BPE SentencePiece model with the settings of the project's built-in tokenizer."""
    return train_sentencepiece(lines, out_path, vocab_size)
