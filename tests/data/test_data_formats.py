"""Reading and validating data files; errors name the file, line/row and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from soft.config.errors import InputError
from soft.data.formats import import_datasets, load_pairs, read_records
from soft.data.prompts import alpaca_prompt, triviaqa_prompt

ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 3", "output": "5"},
    {"instruction": "Say hi.", "output": "hi"},  # input may be absent
    {"instruction": "Say bye.", "input": "", "output": "bye"},
]


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_alpaca_json_list_and_jsonl_agree(tmp_path: Path) -> None:
    as_list = tmp_path / "a.json"
    as_list.write_text(json.dumps(ALPACA, indent=2))
    as_lines = write_jsonl(tmp_path / "a.jsonl", ALPACA)
    lines_in_json = write_jsonl(tmp_path / "lines.json", ALPACA)  # .json holding JSON Lines
    expected = [
        (alpaca_prompt("Add the numbers.", "2 3"), "5"),
        (alpaca_prompt("Say hi."), "hi"),
        (alpaca_prompt("Say bye."), "bye"),
    ]
    for path in (as_list, as_lines, lines_in_json):
        assert load_pairs(path, "alpaca") == expected


def test_parquet_round_trip(tmp_path: Path) -> None:
    datasets = import_datasets()
    path = tmp_path / "a.parquet"
    rows = [
        {"instruction": r["instruction"], "input": r.get("input", ""), "output": r["output"]}
        for r in ALPACA
    ]
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    assert load_pairs(path, "alpaca") == load_pairs(
        write_jsonl(tmp_path / "a.jsonl", rows), "alpaca"
    )


def test_parquet_wrong_type_names_row(tmp_path: Path) -> None:
    datasets = import_datasets()
    path = tmp_path / "bad.parquet"
    datasets.Dataset.from_list(
        [{"instruction": "a", "output": 1}, {"instruction": "b", "output": 2}]
    ).to_parquet(str(path))
    with pytest.raises(
        InputError, match=r"bad\.parquet', row 0: field 'output' must be a string, got int"
    ):
        load_pairs(path, "alpaca")


def test_bad_json_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(ALPACA[0]) + "\n\n" + '{"instruction": "x", "output": \n')
    with pytest.raises(InputError, match=r"broken\.jsonl', line 3: invalid JSON"):
        read_records(path)


def test_bad_json_list_names_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"instruction": "x", "output": "y"},\n  {"instruction": }\n]\n')
    with pytest.raises(InputError, match=r"broken\.json': invalid JSON at line 3"):
        read_records(path)


def test_missing_output_names_row_and_field(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text(json.dumps([ALPACA[0], {"instruction": "no answer"}]))
    with pytest.raises(InputError, match=r"data\.json', row 1: missing field 'output'"):
        load_pairs(path, "alpaca")


def test_missing_field_suggests_the_right_format(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", [{"turns": ["Q?"], "answer": ["A"]}])
    with pytest.raises(InputError, match=r"line 1: missing field 'instruction'.*format=triviaqa"):
        load_pairs(path, "alpaca")


def test_wrong_type_names_line_and_field(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "d.jsonl", [ALPACA[0], {"instruction": "x", "output": ["not", "str"]}]
    )
    with pytest.raises(
        InputError, match=r"d\.jsonl', line 2: field 'output' must be a string, got list"
    ):
        load_pairs(path, "alpaca")


def test_non_object_record(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [ALPACA[0], [1, 2]])
    with pytest.raises(InputError, match=r"line 2: expected a JSON object, got list"):
        read_records(path)


def test_unknown_extension_and_missing_and_empty(tmp_path: Path) -> None:
    csv = tmp_path / "data.csv"
    csv.write_text("a,b\n")
    with pytest.raises(InputError, match=r"data\.csv': unsupported extension '\.csv'.*\.jsonl"):
        read_records(csv)
    with pytest.raises(InputError, match=r"gone\.jsonl' does not exist"):
        read_records(tmp_path / "gone.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(InputError, match=r"empty\.jsonl' contains no records"):
        read_records(empty)


def test_triviaqa_schemas_and_alias_index(tmp_path: Path) -> None:
    rows = [
        {"question_id": 0, "turns": ["Q0?"], "answer": ["first", "second", "third"]},
        {"question": "Q1?", "answer": "only"},
        {"question": "Q2?", "answer": {"aliases": ["x", "y"], "value": "Y"}},
        {"question": "Q3?", "answer": {"aliases": [], "value": "V"}},
    ]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    assert load_pairs(path, "triviaqa") == [
        (triviaqa_prompt("Q0?"), " first"),
        (triviaqa_prompt("Q1?"), " only"),
        (triviaqa_prompt("Q2?"), " x"),
        (triviaqa_prompt("Q3?"), " V"),
    ]
    # The index is clipped to each record's last alias.
    targets = [r for _, r in load_pairs(path, "triviaqa", alias_index=1)]
    assert targets == [" second", " only", " y", " V"]


@pytest.mark.parametrize("answer", [[], [1, 2], 5, {"aliases": "x"}])
def test_triviaqa_bad_answer(tmp_path: Path, answer: object) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Q?", "answer": answer}])
    with pytest.raises(InputError, match=r"qa\.jsonl', line 1: field 'answer' must be"):
        load_pairs(path, "triviaqa")


def test_triviaqa_missing_question(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", [{"answer": ["a"]}])
    with pytest.raises(InputError, match=r"line 1: missing field 'question'"):
        load_pairs(path, "triviaqa")


def test_text_format_uses_text_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"body": "doc one"}, {"body": "doc two"}])
    assert load_pairs(path, "text", text_field="body") == [("", "doc one"), ("", "doc two")]
    with pytest.raises(InputError, match=r"line 1: missing field 'text'.*data\.text_field"):
        load_pairs(path, "text")


def test_real_gsm8k_and_triviaqa_files_validate(shared_data: Path) -> None:
    gsm = load_pairs(shared_data / "gsm8k-alpaca" / "gsm8k_train_alpaca.json", "alpaca")
    assert len(gsm) == 7473
    assert gsm[0][0].endswith("### Response:\n") and "72" in gsm[0][1]
    qa = load_pairs(shared_data / "triviaqa" / "triviaqa_rc_train_0-1499.jsonl", "triviaqa")
    assert len(qa) == 1500
    assert qa[0] == (
        triviaqa_prompt("Which American-born Sinclair won the Nobel Prize for Literature in 1930?"),
        " (Harry) Sinclair Lewis",
    )


def test_corrupt_parquet(tmp_path: Path) -> None:
    path = tmp_path / "junk.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match=r"junk\.parquet' is not a readable Parquet file"):
        read_records(path)


def test_single_json_object_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "one.json"
    path.write_text(json.dumps({"data": ALPACA}, indent=2))
    with pytest.raises(InputError, match=r"one\.json': expected a JSON list of records"):
        read_records(path)


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_file_that_is_not_utf8_names_the_line(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    good = b'{"instruction": "a", "input": "", "output": "b"}\n'
    path.write_bytes(good * 2 + b'{"instruction": "caf\xe9", "input": "", "output": "c"}\n')
    with pytest.raises(InputError, match=r"line 3, column 21: not UTF-8 text \(byte 0xe9\)"):
        read_records(path)
