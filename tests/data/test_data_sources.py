"""Data sources by name (files, dataset folders, hub ids) and the tokenised-data cache.

The hub itself cannot be reached here: a local folder in the hub's layout (README.md listing
configs and their data files, as mandarjoshi/trivia_qa has) goes through the same
`datasets.load_dataset(target, name=config, split=split)` call that `hf://OWNER/NAME` makes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from soft.config.errors import InputError
from soft.data import DataConfig, SFTDataset, build_datasets, parse_source
from soft.data import cache as data_cache
from soft.data.sources import import_datasets

# --------------------------------------------------------------------------- parsing


def test_parse_source_kinds(tmp_path: Path) -> None:
    hub = parse_source("hf://mandarjoshi/trivia_qa?config=rc.nocontext&split=validation")
    assert (hub.kind, hub.target, hub.split) == ("hub", "mandarjoshi/trivia_qa", "validation")
    assert hub.options["config"] == "rc.nocontext"
    assert parse_source("hf://datasets/tatsu-lab/alpaca").target == "tatsu-lab/alpaca"
    assert parse_source("hf://tatsu-lab/alpaca?split=train[:100]").split == "train[:100]"
    assert parse_source("hf://tatsu-lab/alpaca").split == "train"  # the default
    assert parse_source(str(tmp_path / "a.jsonl")).kind == "file"
    folder = tmp_path / "data"
    folder.mkdir()
    assert parse_source(f"{folder}?split=test").kind == "folder"
    import_datasets().Dataset.from_dict({"text": ["x"]}).save_to_disk(str(tmp_path / "saved"))
    assert parse_source(str(tmp_path / "saved")).kind == "disk"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("hf://tatsu-lab/alpaca?splt=train", r"unknown option 'splt'; expected config, split"),
        ("hf://tatsu-lab/alpaca?split=", r"option 'split' is empty"),
        ("hf://not a repo", r"'not a repo' is not a hub dataset id"),
        ("tatsu-lab/alpaca", r"for a hub dataset write hf://tatsu-lab/alpaca"),
        ("train.csv", r"expected a \.json, \.jsonl or \.parquet file"),
        ("missing.jsonl?split=train", r"options after '\?' apply to dataset folders"),
    ],
)
def test_bad_source_strings_name_the_key(text: str, message: str) -> None:
    with pytest.raises(InputError, match=r"data\.train_path '[^']*': .*" + message):
        parse_source(text, "data.train_path")


# --------------------------------------------------------------------------- folders


def _hub_layout_triviaqa(shared_data: Path, folder: Path) -> tuple[Path, Path]:
    """The shared TriviaQA export rewritten in the hub's schema and layout (configs in
    README.md, parquet per split), and the same records as two JSONL files."""
    lines = (shared_data / "triviaqa" / "triviaqa_rc_train_0-1499.jsonl").read_text().split("\n")
    records = [json.loads(line) for line in lines if line.strip()][:300]
    hub_rows = [
        {
            "question": r["turns"][0],
            "question_id": r["question_id"],
            "answer": {"aliases": r["answer"], "value": r["answer"][0]},
        }
        for r in records
    ]
    datasets = import_datasets()
    (folder / "rc.nocontext").mkdir(parents=True)
    for split, part in (("train", hub_rows[:250]), ("validation", hub_rows[250:])):
        datasets.Dataset.from_list(part).to_parquet(
            str(folder / "rc.nocontext" / f"{split}-00000-of-00001.parquet")
        )
    (folder / "README.md").write_text(
        "---\nconfigs:\n- config_name: rc.nocontext\n  data_files:\n"
        "  - split: train\n    path: rc.nocontext/train-*.parquet\n"
        "  - split: validation\n    path: rc.nocontext/validation-*.parquet\n---\n"
    )
    files = folder.parent / "files"
    files.mkdir()
    train, valid = files / "train.jsonl", files / "valid.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in records[:250]))
    valid.write_text("".join(json.dumps(r) + "\n" for r in records[250:]))
    return train, valid


def _all(dataset: SFTDataset | None) -> dict[str, torch.Tensor]:
    assert dataset is not None
    return dataset.batch(range(len(dataset)))


def _same(a: SFTDataset | None, b: SFTDataset | None) -> None:
    assert a is not None and b is not None
    assert all(_all(a)[k].equal(_all(b)[k]) for k in ("tokens", "labels", "loss_mask"))
    assert (a.stats.num_records, a.stats.num_dropped) == (b.stats.num_records, b.stats.num_dropped)


def test_hub_layout_folder_with_config_and_splits_equals_the_files(
    shared_data: Path, llama2_tokenizer: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "trivia_qa"
    train_file, valid_file = _hub_layout_triviaqa(shared_data, folder)
    common = dict(format="triviaqa", tokenizer_path=str(llama2_tokenizer), seq_length=64)
    common["answer_alias_index"] = 2
    by_name = DataConfig(
        train_path=f"{folder}?config=rc.nocontext&split=train",
        valid_path=f"{folder}?config=rc.nocontext&split=validation",
        **common,
    )
    by_file = DataConfig(train_path=str(train_file), valid_path=str(valid_file), **common)
    train, valid, _ = build_datasets(by_name, seed=0)
    train_f, valid_f, _ = build_datasets(by_file, seed=0)
    assert (train.stats.num_records, valid.stats.num_records) == (250, 50)
    _same(train, train_f)
    _same(valid, valid_f)
    assert "Unknown split \"test\". Should be one of ['train', 'validation']" in _message(
        DataConfig(train_path=f"{folder}?config=rc.nocontext&split=test", **common)
    )
    assert "rc.nocontext" in _message(DataConfig(train_path=f"{folder}?config=rc", **common))


def _message(cfg: DataConfig) -> str:
    with pytest.raises(InputError) as info:
        build_datasets(cfg, seed=0)
    return str(info.value)


def test_save_to_disk_folder_with_hold_out_equals_the_file(
    shared_data: Path, llama2_tokenizer: Path, tmp_path: Path
) -> None:
    rows = json.loads((shared_data / "gsm8k-alpaca" / "gsm8k_train_alpaca.json").read_text())
    rows = rows[:240]
    datasets = import_datasets()
    saved = tmp_path / "gsm8k_saved"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(rows[:200]),
            "test": datasets.Dataset.from_list(rows[200:]),
        }
    ).save_to_disk(str(saved))
    (tmp_path / "train.json").write_text(json.dumps(rows[:200]))
    common = dict(tokenizer_path=str(llama2_tokenizer), seq_length=256, valid_fraction=0.1)
    train, valid, _ = build_datasets(DataConfig(train_path=str(saved), **common), seed=3)
    train_f, valid_f, _ = build_datasets(
        DataConfig(train_path=str(tmp_path / "train.json"), **common), seed=3
    )
    _same(train, train_f)  # the same hold-out of the same records
    _same(valid, valid_f)
    test, _, _ = build_datasets(
        DataConfig(train_path=f"{saved}?split=test", **{**common, "valid_fraction": 0.0}), 0
    )
    assert test.stats.num_records == 40
    assert "no split 'validation'; the folder has test, train" in _message(
        DataConfig(train_path=f"{saved}?split=validation", **common)
    )


def test_a_bad_row_names_dataset_split_row_and_field(tmp_path: Path) -> None:
    rows = [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(6)]
    rows[4] = {"instruction": "Say 4.", "input": "", "output": None}
    folder = tmp_path / "alpaca_saved"
    import_datasets().Dataset.from_list(rows).save_to_disk(str(folder))
    message = _message(DataConfig(train_path=str(folder), valid_fraction=0.0))
    assert message == (
        f"dataset '{folder}' (split 'train'), row 4: field 'output' is null (alpaca records "
        "need 'instruction', 'output' and optionally 'input')"
    )


# --------------------------------------------------------------------------- the cache


def _jsonl(path: Path, n: int, offset: int = 0) -> Path:
    rows = [{"instruction": f"Echo {i + offset}.", "output": str(i + offset)} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cache_tokenises_once_per_content_tokenizer_and_length(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _jsonl(tmp_path / "train.jsonl", 40)
    cache = tmp_path / "cache"
    cfg = DataConfig(train_path=str(data), cache_dir=str(cache), seq_length=48)
    first, valid, _ = build_datasets(cfg, seed=1)
    (entry,) = [p for p in cache.iterdir()]
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["num_records"] == 40 and meta["inputs"]["seq_length"] == 48
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temp folder left

    def no_tokenising(*args, **kwargs):
        raise AssertionError("tokenised again despite a cache entry")

    monkeypatch.setattr(data_cache, "tokenize_rows", no_tokenising)
    again, valid_again, _ = build_datasets(cfg, seed=1)
    _same(first, again)
    _same(valid, valid_again)
    moved = shutil.copy(data, tmp_path / "copy.jsonl")  # same content elsewhere: same entry
    build_datasets(DataConfig(train_path=str(moved), cache_dir=str(cache), seq_length=48), 1)
    monkeypatch.undo()
    build_datasets(DataConfig(train_path=str(data), cache_dir=str(cache), seq_length=40), 1)
    _jsonl(data, 40, offset=1)  # edited in place
    build_datasets(cfg, seed=1)
    assert len(list(cache.iterdir())) == 3


def test_the_tokenizer_is_part_of_the_key(tmp_path: Path, llama2_tokenizer: Path) -> None:
    data = _jsonl(tmp_path / "train.jsonl", 20)
    cache = tmp_path / "cache"
    build_datasets(DataConfig(train_path=str(data), cache_dir=str(cache)), 0)
    build_datasets(
        DataConfig(
            train_path=str(data), cache_dir=str(cache), tokenizer_path=str(llama2_tokenizer)
        ),
        0,
    )
    assert len(list(cache.iterdir())) == 2


def _two_ranks(rank: int, init: str, cfg: DataConfig, out: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    calls = []
    original = data_cache.find_or_build
    data_cache.find_or_build = lambda *a: calls.append(1) or original(*a)  # type: ignore[assignment]
    try:
        train, _, _ = build_datasets(cfg, seed=0)
        result = {"builds": len(calls), "tokens": _all(train)["tokens"].sum().item()}
    except InputError as exc:
        result = {"builds": len(calls), "error": str(exc)}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def test_rank_zero_builds_and_every_rank_reads_or_fails_alike(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    data = _jsonl(tmp_path / "train.jsonl", 30)
    cfg = DataConfig(train_path=str(data), cache_dir=str(tmp_path / "cache"), valid_fraction=0.0)
    mp.spawn(_two_ranks, args=(f"file://{tmp_path / 'init'}", cfg, tmp_path), nprocs=2)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (r0["builds"], r1["builds"]) == (1, 0) and r0["tokens"] == r1["tokens"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    cfg = DataConfig(train_path=str(bad), cache_dir=str(tmp_path / "cache"), valid_fraction=0.0)
    mp.spawn(_two_ranks, args=(f"file://{tmp_path / 'init2'}", cfg, tmp_path), nprocs=2)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["error"] == r1["error"] and f"data file '{bad}', line 2" in r0["error"]
