"""A small local reader for evaluation files (to be unified with soft/data/formats.py later).

Every format becomes `EvalExample(prompt, target, answers)`, built with the training prompt
templates so evaluation scores exactly what training optimised:
- alpaca: JSON list or JSONL of {"instruction", "input"?, "output"}; target = output; answers = [output].
- triviaqa: JSONL/JSON of {"turns": [question], "answer": [aliases...]} (also accepted:
  "question" and "answer": {"aliases": [...]}); target = " " + first alias; answers = aliases.
- text: JSON/JSONL records with a "text" field, or a .txt file (one document per non-empty
  line); the prompt is empty (BOS only) and the whole document is the target.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from soft.config.errors import ConfigError
from soft.data.prompts import alpaca_prompt, triviaqa_prompt

FORMATS = ("alpaca", "triviaqa", "text")


@dataclass
class EvalExample:
    prompt: str
    target: str
    answers: list[str] = field(default_factory=list)  # TriviaQA aliases / Alpaca output, for EM


def _read_records(path: Path) -> list:
    if not path.is_file():
        raise ConfigError(f"--data '{path}' does not exist or is not a file")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".txt":
        return [line for line in text.splitlines() if line.strip()]
    if path.suffix == ".json":
        try:
            data = json.loads(text) if text.strip() else []
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--data '{path}' is not valid JSON ({exc})") from exc
        return data if isinstance(data, list) else [data]
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--data '{path}' line {number} is not valid JSON ({exc})") from exc
    return records


def _field(record, name: str, where: str):
    if not isinstance(record, dict) or name not in record:
        raise ConfigError(
            f"{where}: expected an object with a '{name}' field, got {str(record)[:120]!r}"
        )
    return record[name]


def _alpaca(record, where: str) -> EvalExample:
    instruction = _field(record, "instruction", where)
    output = _field(record, "output", where)
    # The reference output is also the exact-match answer: right for tasks with a short,
    # checkable answer (the built-in tasks, GSM8K's final line is not); a generated text
    # rarely matches a long free-form response, which then reads as EM 0.
    return EvalExample(alpaca_prompt(instruction, record.get("input", "") or ""), output, [output])


def _triviaqa(record, where: str) -> EvalExample:
    if isinstance(record, dict) and "turns" in record:
        turns = record["turns"]
        question = turns[0] if isinstance(turns, list) and turns else None
    else:
        question = _field(record, "question", where)
    answers = _field(record, "answer", where)
    if isinstance(answers, dict):
        answers = answers.get("aliases") or ([answers["value"]] if "value" in answers else [])
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(question, str) or not answers:
        raise ConfigError(f"{where}: expected a question and a non-empty answer alias list")
    return EvalExample(triviaqa_prompt(question), " " + answers[0], [str(a) for a in answers])


def _text(record, where: str) -> EvalExample:
    text = record if isinstance(record, str) else _field(record, "text", where)
    return EvalExample("", str(text))


def load_eval_examples(path: str | Path, fmt: str, limit: int | None = None) -> list[EvalExample]:
    """Read `path` in format `fmt`; the first `limit` records when given."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format: expected one of {', '.join(FORMATS)}, got '{fmt}'")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit: expected a positive integer, got {limit}")
    path = Path(path)
    records = _read_records(path)
    if limit is not None:
        records = records[:limit]
    if not records:
        raise ConfigError(f"--data '{path}' holds no records")
    parse = {"alpaca": _alpaca, "triviaqa": _triviaqa, "text": _text}[fmt]
    return [parse(r, f"--data '{path}' record {i}") for i, r in enumerate(records)]
