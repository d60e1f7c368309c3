"""Evaluation examples from the same sources training reads (soft.data.sources): a .json,
.jsonl or .parquet file, a dataset folder or a hub dataset (`hf://OWNER/NAME?config=..&split=..`),
plus .txt files for plain text.

Every format becomes `EvalExample(prompt, target, answers)`, built with the training prompt
templates and record validation (soft.data.formats), so evaluation scores exactly what training
optimised, and a bad record is reported with its file and line, or dataset and row:
- alpaca: {"instruction", "input"?, "output"}; target = output; answers = [output].
- triviaqa: {"turns": [question], "answer": [aliases...]} or the hub schema {"question",
  "answer": {"aliases": [...], "value"}}; target = " " + first alias; answers = aliases.
- text: records with a "text" field, or a .txt file (one document per non-empty line); the
  prompt is empty (BOS only) and the whole document is the target.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

from soft.config.errors import ConfigError
from soft.data import formats
from soft.data.prompts import triviaqa_prompt
from soft.data.sources import DataSource, load_arrow, parse_source

FORMATS = ("alpaca", "triviaqa", "text")


@dataclass
class EvalExample:
    prompt: str
    target: str
    answers: list[str] = field(default_factory=list)  # TriviaQA aliases / Alpaca output, for EM


def _example(origin, record: formats.RawRecord, fmt: str) -> EvalExample:
    if fmt == "alpaca":
        prompt, output = formats.alpaca_pair(origin, record)
        # The reference output is also the exact-match answer: right for tasks with a short,
        # checkable answer (the built-in tasks; GSM8K's final line is not); a generated text
        # rarely matches a long free-form response, which then reads as EM 0.
        return EvalExample(prompt, output, [output])
    if fmt == "triviaqa":
        question = formats.triviaqa_question(origin, record)
        aliases = formats.triviaqa_aliases(origin, record)
        return EvalExample(triviaqa_prompt(question), " " + aliases[0], list(aliases))
    return EvalExample("", formats.text_document(origin, record, "text"))


def _records(source: DataSource, limit: int | None) -> tuple[object, Iterable[formats.RawRecord]]:
    """(origin for messages, the first `limit` records) of any source."""
    if source.is_file:
        path = Path(source.target)
        if path.suffix == ".txt":
            if not path.is_file():
                raise ConfigError(f"--data '{path}' does not exist or is not a file")
            lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            rows = [formats.RawRecord(f"line {i}", {"text": t}) for i, t in enumerate(lines, 1)]
            return path, rows[:limit]
        return path, formats.read_records(path)[:limit]
    dataset = load_arrow(source)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    rows = (formats.RawRecord(f"row {i}", row) for i, row in enumerate(dataset))
    return formats.Label(source.label()), islice(rows, limit)


def load_eval_examples(path: str | Path, fmt: str, limit: int | None = None) -> list[EvalExample]:
    """Read `path` (a file, dataset folder or hf:// id) in format `fmt`; the first `limit`."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format: expected one of {', '.join(FORMATS)}, got '{fmt}'")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit: expected a positive integer, got {limit}")
    text = str(path)
    if text.endswith(".txt") and "?" not in text:
        source = DataSource(text, "file", text)
    else:
        source = parse_source(text, "--data")
    origin, records = _records(source, limit)
    examples = [_example(origin, r, fmt) for r in records]
    if not examples:
        raise ConfigError(f"--data '{text}' holds no records")
    return examples
