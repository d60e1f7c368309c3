"""Reading data files (.json, .jsonl, .parquet) and turning records into examples
(soft.data.prompts: a prompt and response in the format's own template, or a conversation for
the tokenizer's chat template) or, for plain text, documents.

JSON and JSON Lines are parsed here with the standard library rather than with
`datasets.load_dataset("json")`: it reports the exact line of a syntax error and accepts rows
of mixed types that Arrow's schema inference would reject with an opaque message, so each
problem can be reported with the file, line or row, and field. Parquet goes through
`datasets`. Every record is then validated with its location.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from soft.config.errors import ConfigError, InputError
from soft.data.prompts import (
    ChatExample,
    Example,
    PlainExample,
    PromptTemplate,
    check_messages,
    instruction_example,
    question_example,
)
from soft.data.sources import import_datasets

SUFFIXES = (".json", ".jsonl", ".parquet")
FORMATS = ("alpaca", "triviaqa", "messages", "text")
# What a record becomes: an example, or a document (str) in the text format.
Item = Example | str


@dataclass(frozen=True)
class RawRecord:
    """One record as read, with where it came from ("line 7" or "row 3") for messages."""

    where: str
    data: dict[str, Any]


class RecordError(InputError):
    """A bad record; the message names the file, the line or row, and the field."""


def _fail(origin: str | Path, where: str, message: str) -> RecordError:
    """`origin` is a file path, or a label such as "dataset 'hf://...' (split 'train')"."""
    label = f"data file '{origin}'" if isinstance(origin, Path) else origin
    return RecordError(f"{label}, {where}: {message}")


# ----------------------------------------------------------------------------- reading


def read_records(path: str | Path) -> list[RawRecord]:
    """All records of a .json (list or JSON Lines), .jsonl or .parquet file."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise ConfigError(
            f"data file '{path}': unsupported extension '{path.suffix}'; "
            f"expected one of {', '.join(SUFFIXES)}"
        )
    if not path.is_file():
        raise ConfigError(f"data file '{path}' does not exist")
    is_parquet = path.suffix.lower() == ".parquet"
    records = _read_parquet(path) if is_parquet else _read_json(path)
    if not records:
        raise ConfigError(f"data file '{path}' contains no records")
    return records


def _read_json(path: Path) -> list[RawRecord]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(
            f"data file '{path}', line {line}, column {column}: not UTF-8 text "
            f"(byte 0x{raw[exc.start]:02x}); save the file as UTF-8"
        ) from exc
    if path.suffix.lower() == ".json":
        # A .json file is a JSON list when it starts with '['; a broken list is reported as
        # such instead of being misread as JSON Lines.
        stripped = text.lstrip()
        if stripped.startswith("["):
            return _read_json_list(path, text)
        if stripped.startswith("{") and not _is_single_line(stripped):
            try:
                json.loads(text)
            except json.JSONDecodeError:
                pass  # several objects, one per line: JSON Lines
            else:
                raise ConfigError(
                    f"data file '{path}': expected a JSON list of records or JSON Lines, "
                    "got a single JSON object"
                )
    return _read_json_lines(path, text)


def _is_single_line(text: str) -> bool:
    return "\n" not in text.strip()


def _read_json_list(path: Path, text: str) -> list[RawRecord]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"data file '{path}': invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from exc
    return [_as_record(path, f"row {i}", item) for i, item in enumerate(data)]


def _read_json_lines(path: Path, text: str) -> list[RawRecord]:
    records = []
    # split("\n"), not splitlines(): JSON strings may hold a raw U+2028, which is no line end.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"line {lineno}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _fail(path, where, f"invalid JSON at column {exc.colno}: {exc.msg}") from exc
        records.append(_as_record(path, where, item))
    return records


def _as_record(path: Path, where: str, item: Any) -> RawRecord:
    if not isinstance(item, dict):
        raise _fail(path, where, f"expected a JSON object, got {type(item).__name__}")
    return RawRecord(where, item)


def _read_parquet(path: Path) -> list[RawRecord]:
    datasets = import_datasets()
    # A throwaway cache: a local file needs no copy in the user's ~/.cache/huggingface.
    with tempfile.TemporaryDirectory(prefix="soft-parquet-") as cache_dir:
        try:
            table = datasets.Dataset.from_parquet(
                str(path), cache_dir=cache_dir, keep_in_memory=True
            )
        except Exception as exc:  # pyarrow raises several types for a corrupt file
            raise ConfigError(f"data file '{path}' is not a readable Parquet file ({exc})") from exc
        rows = table.to_list()
    return [RawRecord(f"row {i}", row) for i, row in enumerate(rows)]


# -------------------------------------------------------------------------- validation


def _field(origin: str | Path, rec: RawRecord, name: str, hint: str = "") -> Any:
    if name not in rec.data:
        raise _fail(origin, rec.where, f"missing field '{name}'{hint}{_format_hint(rec.data)}")
    if rec.data[name] is None:
        raise _fail(origin, rec.where, f"field '{name}' is null{hint}")
    return rec.data[name]


def _string(origin: str | Path, rec: RawRecord, name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _fail(
            origin,
            rec.where,
            f"field '{name}' must be a string, got {type(value).__name__} {value!r:.60}",
        )
    return value


def _format_hint(data: dict[str, Any]) -> str:
    """Point at data.format when a record's keys look like another format."""
    if "messages" in data:
        return " (the record looks like messages: set data.format=messages?)"
    if "output" in data and "instruction" in data:
        return " (the record looks like alpaca: set data.format=alpaca?)"
    if "answer" in data and ("turns" in data or "question" in data):
        return " (the record looks like triviaqa: set data.format=triviaqa?)"
    return ""


def alpaca_fields(origin: str | Path, rec: RawRecord) -> tuple[str, str, str]:
    """(instruction, input, output); `input` may be absent, null or ""."""
    need = " (alpaca records need 'instruction', 'output' and optionally 'input')"
    instruction = _string(origin, rec, "instruction", _field(origin, rec, "instruction", need))
    input_ = rec.data.get("input")
    input_ = "" if input_ is None else _string(origin, rec, "input", input_)
    output = _string(origin, rec, "output", _field(origin, rec, "output", need))
    return instruction, input_, output


def messages_example(origin: str | Path, rec: RawRecord) -> ChatExample:
    """A {"messages": [{"role", "content"}, ...]} record, checked."""
    hint = ' (messages records hold {"messages": [{"role": ..., "content": ...}, ...]})'
    messages = _field(origin, rec, "messages", hint)
    problem = check_messages(messages)
    if problem is not None:
        raise _fail(origin, rec.where, problem)
    return ChatExample(tuple({"role": m["role"], "content": m["content"]} for m in messages))


def triviaqa_question(origin: str | Path, rec: RawRecord) -> str:
    """The question: `turns`[0] (the shared export's schema) or `question`."""
    if "turns" in rec.data and rec.data["turns"] is not None:
        turns = rec.data["turns"]
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], str):
            raise _fail(origin, rec.where, "field 'turns' must be a non-empty list of strings")
        return turns[0]
    hint = " (triviaqa records need 'question' or 'turns', and 'answer')"
    return _string(origin, rec, "question", _field(origin, rec, "question", hint))


def triviaqa_aliases(origin: str | Path, rec: RawRecord) -> list[str]:
    """Answer aliases from a list, a string, or {"aliases": [...], "value": ...}.

    In the dict form (the Hugging Face trivia_qa schema) the aliases come first, so an alias
    index means the same as for the shared export's plain list; `value` is used only when
    there are no aliases.
    """
    answer = _field(origin, rec, "answer", " (triviaqa records need a question and 'answer')")
    if isinstance(answer, str):
        aliases: Any = [answer]
    elif isinstance(answer, dict):
        aliases = answer.get("aliases") or []
        if not aliases and isinstance(answer.get("value"), str):
            aliases = [answer["value"]]
    else:
        aliases = answer
    if (
        not isinstance(aliases, list)
        or not aliases
        or not all(isinstance(a, str) and a for a in aliases)
    ):
        raise _fail(
            origin,
            rec.where,
            "field 'answer' must be a string, a non-empty list of strings, or "
            f'{{"aliases": [...], "value": ...}}; got {answer!r:.80}',
        )
    return aliases


def triviaqa_target(origin: str | Path, rec: RawRecord, alias_index: int) -> tuple[str, str]:
    """(question, alias); the index is clipped to the last alias, so a record with fewer
    aliases than `data.answer_alias_index` trains on its last one."""
    question = triviaqa_question(origin, rec)
    aliases = triviaqa_aliases(origin, rec)
    return question, aliases[min(alias_index, len(aliases) - 1)]


def text_document(origin: str | Path, rec: RawRecord, field: str) -> str:
    hint = " (set data.text_field to the field holding the document)"
    return _string(origin, rec, field, _field(origin, rec, field, hint))


def to_examples(
    origin: str | Path,
    records: Iterable[RawRecord],
    fmt: str,
    *,
    template: PromptTemplate = "alpaca",
    alias_index: int = 0,
    text_field: str = "text",
) -> list[Item]:
    """An example per record in `template` (soft.data.prompts), or a document per record for
    `text` (the loss covers every token). `origin`: the file (a str is taken as a file path),
    or a `Label` naming a dataset in messages."""
    if isinstance(origin, str) and not isinstance(origin, Label):
        origin = Path(origin)
    if fmt == "alpaca":
        return [instruction_example(template, *alpaca_fields(origin, r)) for r in records]
    if fmt == "triviaqa":
        return [
            question_example(template, *triviaqa_target(origin, r, alias_index)) for r in records
        ]
    if fmt == "messages":
        return [messages_example(origin, r) for r in records]
    if fmt == "text":
        return [text_document(origin, r, text_field) for r in records]
    raise ConfigError(f"unknown data format '{fmt}'; expected one of {', '.join(FORMATS)}")


class Label(str):
    """A source named in messages as is ("dataset 'hf://...' (split 'train')"), not a path."""


def rows_to_examples(
    label: str,
    rows: dict[str, list[Any]],
    first_row: int,
    fmt: str,
    **options: Any,
) -> list[Item]:
    """A batch of dataset rows (column -> values, as `datasets.Dataset.map(batched=True)`
    passes them) as examples, errors naming `label` and the row number; `options` as
    `to_examples` takes them."""
    columns = list(rows)
    n = len(rows[columns[0]]) if columns else 0
    records = (
        RawRecord(f"row {first_row + i}", {c: rows[c][i] for c in columns}) for i in range(n)
    )
    return to_examples(Label(label), records, fmt, **options)


def load_examples(path: str | Path, fmt: str, **options: Any) -> list[tuple[str, Item]]:
    """Read and validate a data file: (where, example) per record, in file order; `options`
    as `to_examples` takes them."""
    records = read_records(path)
    items = to_examples(path, records, fmt, **options)
    return [(r.where, item) for r, item in zip(records, items, strict=True)]


def load_pairs(
    path: str | Path, fmt: str, *, alias_index: int = 0, text_field: str = "text"
) -> list[tuple[str, str]]:
    """(prompt, response) per record in the format's own (Alpaca / closed-book QA) template;
    ("", document) in the text format."""
    if fmt == "messages":
        raise ConfigError("the messages format has no (prompt, response) pairs: use load_examples")
    pairs = []
    for _, item in load_examples(path, fmt, alias_index=alias_index, text_field=text_field):
        if isinstance(item, str):
            pairs.append(("", item))
        else:
            assert isinstance(item, PlainExample) and item.response is not None
            pairs.append((item.prompt, item.response))
    return pairs


# ----------------------------------------------------------------------- storage as JSON


def item_to_json(item: Item) -> str:
    """One example (or document) as a JSON string, for an Arrow column between reading and
    tokenising."""
    if isinstance(item, str):
        return json.dumps({"text": item})
    if isinstance(item, PlainExample):
        return json.dumps({"prompt": item.prompt, "response": item.response})
    return json.dumps({"messages": list(item.messages)})


def item_from_json(text: str) -> Item:
    data = json.loads(text)
    if "text" in data:
        return data["text"]
    if "messages" in data:
        return ChatExample(tuple(data["messages"]))
    return PlainExample(data["prompt"], data["response"])
