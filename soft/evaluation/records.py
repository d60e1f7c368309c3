"""Evaluation examples from the same sources training reads (soft.data.sources): a .json,
.jsonl or .parquet file, a dataset folder or a hub dataset (`hf://OWNER/NAME?config=..&split=..`),
plus .txt files for plain text.

Every format becomes `EvalExample(example, answers)`: the example built by the same code as
training's (soft.data.formats, in the prompt template training used: `--prompt-template`) and
rendered by the same function (soft.data.prompts.render), so evaluation scores exactly what
training optimised; a bad record is reported with its file and line, or dataset and row:
- alpaca: {"instruction", "input"?, "output"}; target = output; answers = [output].
- triviaqa: {"turns": [question], "answer": [aliases...]} or the hub schema {"question",
  "answer": {"aliases": [...], "value"}}; target = the first alias; answers = aliases.
- messages (chat template only): {"messages": [...]}; targets = every assistant turn (as in
  training); generation continues before the last one; answers = [its content].
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
from soft.data.prompts import (
    PROMPT_TEMPLATES,
    Example,
    PlainExample,
    PromptTemplate,
    instruction_example,
    question_example,
)
from soft.data.sources import DataSource, load_arrow, parse_source

FORMATS = ("alpaca", "triviaqa", "messages", "text")


@dataclass
class EvalExample:
    """`example`: what soft.data.prompts.render turns into ids (its last target is generated);
    `answers`: TriviaQA aliases / the Alpaca output / the last assistant turn, for EM."""

    example: Example
    answers: list[str] = field(default_factory=list)

    @property
    def prompt(self) -> str:
        """The prompt text of a plain (Alpaca-template) example."""
        assert isinstance(self.example, PlainExample)
        return self.example.prompt

    @property
    def target(self) -> str | None:
        assert isinstance(self.example, PlainExample)
        return self.example.response


def _example(
    origin: str | Path, record: formats.RawRecord, fmt: str, template: PromptTemplate
) -> EvalExample:
    if fmt == "alpaca":
        instruction, input_, output = formats.alpaca_fields(origin, record)
        # The reference output is also the exact-match answer: right for tasks with a short,
        # checkable answer (the built-in tasks; GSM8K's final line is not); a generated text
        # rarely matches a long free-form response, which then reads as EM 0.
        return EvalExample(instruction_example(template, instruction, input_, output), [output])
    if fmt == "triviaqa":
        question = formats.triviaqa_question(origin, record)
        aliases = formats.triviaqa_aliases(origin, record)
        return EvalExample(question_example(template, question, aliases[0]), list(aliases))
    if fmt == "messages":
        example = formats.messages_example(origin, record)
        return EvalExample(example, [example.messages[-1]["content"]])
    return EvalExample(PlainExample("", formats.text_document(origin, record, "text")))


def _records(
    source: DataSource, limit: int | None
) -> tuple[str | Path, Iterable[formats.RawRecord]]:
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
    arrow_rows = (formats.RawRecord(f"row {i}", row) for i, row in enumerate(dataset))
    return formats.Label(source.label()), islice(arrow_rows, limit)


def load_eval_examples(
    path: str | Path, fmt: str, limit: int | None = None, template: PromptTemplate = "alpaca"
) -> list[EvalExample]:
    """Read `path` (a file, dataset folder or hf:// id) in format `fmt`; the first `limit`;
    examples in prompt template `template` (as data.prompt_template in training)."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format: expected one of {', '.join(FORMATS)}, got '{fmt}'")
    if template not in PROMPT_TEMPLATES:
        raise ConfigError(
            f"--prompt-template: expected one of {', '.join(PROMPT_TEMPLATES)}, got '{template}'"
        )
    if fmt == "messages" and template != "chat":
        raise ConfigError("--format messages needs --prompt-template chat")
    if fmt == "text" and template == "chat":
        raise ConfigError("--format text has no turns to template: use --prompt-template alpaca")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit: expected a positive integer, got {limit}")
    text = str(path)
    if text.endswith(".txt") and "?" not in text:
        source = DataSource(text, "file", text)
    else:
        source = parse_source(text, "--data")
    origin, records = _records(source, limit)
    examples = [_example(origin, r, fmt, template) for r in records]
    if not examples:
        raise ConfigError(f"--data '{text}' holds no records")
    return examples
