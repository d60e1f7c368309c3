"""Seeds of the paper reproduction: one source for the training seed, a settable data seed,
the --seeds driver (shared base, per-seed folders, reuse of finished seeds): no training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from soft.config.errors import ConfigError
from soft.config.root import load_config
from soft.experiments import data as exp_data
from soft.experiments import results as res
from soft.experiments import runner, seeds
from soft.experiments.plan import Layout, build_plan
from soft.experiments.reproduce import Options
from soft.experiments.settings import make_settings
from tests.experiments.test_aggregate import SEED_ROWS
from tools import reproduce_paper


def _seed_of(spec) -> int:
    return load_config(None, list(spec.overrides)).train.seed


def test_one_training_seed_reaches_every_run_and_the_report(tmp_path):
    opts = reproduce_paper.parse_args(["--seed", "1234", "--data-seed", "5"])
    assert (opts.seed, opts.data_seed, opts.seeds) == (1234, 5, None)
    s = opts.settings()
    assert (s.seed, s.data_seed, s.base_seed) == (1234, 5, 1234)
    plan = build_plan(s, Layout(tmp_path), pretrain=True, mlflow_uri="sqlite:///x.db",
                      experiment="e")  # fmt: skip
    assert {spec.name: _seed_of(spec) for spec in plan} == {spec.name: 1234 for spec in plan}
    text = res.markdown_report(
        {"settings": s.as_params(), "base_description": "b", "num_train": 1, "num_test": 1,
         "rows": []}
    )  # fmt: skip
    assert "training seed 1234 (`train.seed`)" in text and "Data seed 5 " in text
    default = reproduce_paper.parse_args([]).settings()
    assert (default.seed, default.data_seed, default.base_seed) == (42, 42, 42)
    assert reproduce_paper.parse_args(["--seed", "7"]).settings().data_seed == 7


def test_a_shared_base_keeps_its_own_seed(tmp_path):
    s = make_settings(mini=True, seed=2, base_seed=1)
    layout = Layout(tmp_path / "seed_2", tmp_path / "base")
    plan = build_plan(s, layout, pretrain=True, mlflow_uri="sqlite:///x.db", experiment="e")
    seeds_by_run = {spec.name: _seed_of(spec) for spec in plan}
    assert seeds_by_run.pop("base") == 1 and set(seeds_by_run.values()) == {2}
    cfgs = {spec.name: load_config(None, list(spec.overrides)) for spec in plan}
    assert cfgs["base"].train.output_dir == str(tmp_path / "base" / "runs" / "base")
    assert cfgs["sft"].checkpoint.load_dir == str(tmp_path / "base" / "runs/base/checkpoints")
    assert cfgs["sft"].data.tokenizer_path == str(tmp_path / "base" / "tokenizer.model")
    assert cfgs["sft"].train.output_dir == str(tmp_path / "seed_2" / "runs" / "sft")


def test_data_seed_changes_the_fine_tuning_records(tmp_path):
    _, a, _ = exp_data.make_finetune_data(tmp_path / "a", 1, 30, 5)
    _, b, _ = exp_data.make_finetune_data(tmp_path / "b", 2, 30, 5)
    _, again, _ = exp_data.make_finetune_data(tmp_path / "c", 1, 30, 5)
    assert a == again and a != b


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("42,x", "'x' is not an integer"),
        ("1,2,1", r"\[1\] given more than once"),
        ("", "'' is not an integer"),
    ],
)
def test_bad_seed_lists_are_refused(text, message):
    with pytest.raises(ConfigError, match=message):
        seeds.parse_seeds(text)


def test_seed_lists_parse():
    assert seeds.parse_seeds("42, 1234,7") == [42, 1234, 7]
    with pytest.raises(ConfigError, match=r"--seed: expected an integer in \[0, 2\*\*32\)"):
        make_settings(seed=-1)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train.seed=1234"], "'train.seed' is set by the experiment.*use --seed"),
        (["--seeds", "1,x"], "--seeds '1,x': 'x' is not an integer"),
        (["--seed", "-3"], "--seed: expected an integer"),
        (["--seeds", "1,2", "--data-seed", "-1"], "--data-seed: expected an integer"),
    ],
)
def test_cli_seed_errors_come_before_any_work(tmp_path, capsys, argv, message):
    import re

    out, corpus = tmp_path / "out", tmp_path / "corpus.json"
    corpus.write_text('[{"instruction": "a", "input": "", "output": "b"}]')
    argv = ["--out", str(out), "--mini", "--corpus", str(corpus), *argv]
    assert reproduce_paper.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(message, err), err
    assert not out.exists()


def test_seed_and_seeds_are_exclusive(capsys):
    with pytest.raises(SystemExit):
        reproduce_paper.parse_args(["--seed", "1", "--seeds", "1,2"])
    assert "not allowed with argument" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the driver


class FakeWork:
    """Stands in for training and the per-seed comparison; records what ran."""

    def __init__(self, monkeypatch):
        self.trained: list[str] = []
        self.seeds: list[Options] = []
        monkeypatch.setattr(runner, "train", self.train)
        monkeypatch.setattr(seeds, "reproduce", self.reproduce)
        monkeypatch.setattr(exp_data, "train_tokenizer", self.tokenizer)

    @staticmethod
    def tokenizer(lines, path: Path, vocab_size: int) -> Path:
        path.write_text(f"{vocab_size}\n{len(lines)}\n")  # deterministic, like the real one
        return path

    def train(self, spec, layout, nproc):
        self.trained.append(spec.name)
        run_dir = layout.run_dir(spec.name)
        shutil.rmtree(run_dir, ignore_errors=True)  # as the real one: a run starts afresh
        ckpt = run_dir / "checkpoints" / "iter_0000001"
        ckpt.mkdir(parents=True)
        for name in ("metadata.json", "manifest.json"):
            (ckpt / name).write_text("{}")
        (run_dir / "checkpoints" / "latest").write_text("iter_0000001\n")
        (run_dir / "exit_status.json").write_text(json.dumps({"reason": "finished"}))
        return runner.RunOutcome(spec.name, 1.0, 2.0, layout.log(spec.name))

    def reproduce(self, opts: Options, echo) -> dict:
        """What reproduce() writes, with hand-made rows (one of SEED_ROWS per seed)."""
        self.seeds.append(opts)
        s = opts.settings()
        fingerprint = opts.shared_base / "runs" / "base" / runner.FINGERPRINT
        results = {
            "settings": s.as_params(),
            "base_description": "pretrained once and shared by every seed",
            "corpus": {"pretrained": True, "corpus": str(opts.corpus.resolve())},
            "num_train": s.num_train,
            "num_test": s.num_test,
            "extra_overrides": list(opts.overrides),
            "base_fingerprint_sha256": runner.sha256(fingerprint),
            "rows": SEED_ROWS[opts.seed % len(SEED_ROWS)],
            "timing": {"total": 100.0 + opts.seed},
        }
        opts.out.mkdir(parents=True, exist_ok=True)
        (opts.out / "results.json").write_text(json.dumps(results))
        return json.loads(json.dumps(results))


def _driver_opts(tmp_path: Path, seed_list: list[int], **kw) -> Options:
    corpus = tmp_path / "corpus.json"
    corpus.write_text('[{"instruction": "a", "input": "", "output": "b"}]')
    return Options(
        out=tmp_path / "out", mini=True, corpus=corpus, seeds=seed_list,
        overrides=["tracking.enabled=false"], **kw,
    )  # fmt: skip


def test_seeds_share_one_base_and_aggregate(tmp_path, monkeypatch):
    work = FakeWork(monkeypatch)
    report = seeds.reproduce_seeds(_driver_opts(tmp_path, [3, 1]), echo=lambda _: None)
    out = (tmp_path / "out").resolve()
    assert work.trained == ["base"]  # once, for both seeds
    assert [(o.seed, o.out, o.shared_base, o.base_seed) for o in work.seeds] == [
        (3, out / "seed_3", out / "base", 3),
        (1, out / "seed_1", out / "base", 3),
    ]
    assert [o.settings().data_seed for o in work.seeds] == [3, 1]  # data seed = the seed
    assert (out / "base" / "runs" / "base" / runner.FINGERPRINT).is_file()
    assert (out / "base" / "tokenizer.model").is_file()
    written = json.loads((out / "results.json").read_text())
    assert written["seeds"] == [3, 1] == report["seeds"]
    assert [(e["train_seed"], e["data_seed"]) for e in written["per_seed"]] == [(3, 3), (1, 1)]
    assert written["settings"]["base_seed"] == 3 and "seed" not in written["settings"]
    corpus = written["corpus"]  # the corpus named, as the seeds' reports name it
    assert corpus["corpus"] == str((tmp_path / "corpus.json").resolve())
    assert corpus["corpus_records"] == 1
    ems = [SEED_ROWS[0][0], SEED_ROWS[1][0]]  # seeds 3 and 1
    mean = sum(r["metrics"]["soft"]["exact_match"] for r in ems) / 2
    assert written["rows"][0]["metrics"]["soft"]["exact_match"]["mean"] == pytest.approx(mean)
    md = (out / "results.md").read_text()
    assert "over 2 seeds" in md and "| 3 | 3 | 3 | seed_3/results.md |" in md
    assert "trained once (seed 3) and shared by every seed" in md
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert (written["timing"]["seed 3"], written["timing"]["seed 1"]) == (103.0, 101.0)


def test_a_rerun_reuses_finished_seeds_and_reruns_changed_ones(tmp_path, monkeypatch):
    work = FakeWork(monkeypatch)
    seeds.reproduce_seeds(_driver_opts(tmp_path, [1, 2]), echo=lambda _: None)
    work.trained.clear(), work.seeds.clear()
    lines: list[str] = []
    report = seeds.reproduce_seeds(_driver_opts(tmp_path, [1, 2, 3]), echo=lines.append)
    assert work.trained == [] and [o.seed for o in work.seeds] == [3]  # only the new seed
    assert [e["reused"] for e in report["per_seed"]] == [True, True, False]
    assert sum("reusing the finished result" in line for line in lines) == 2
    assert "seeds [1, 2]: finished results reused (same settings)" in report["notes"]
    assert report["timing"]["seed 1"] == 101.0  # the wall time of the run that made it

    # Another data seed changes every seed's settings: each is run again, the base is kept.
    work.seeds.clear()
    lines.clear()
    seeds.reproduce_seeds(_driver_opts(tmp_path, [1, 2], data_seed=9), echo=lines.append)
    assert work.trained == [] and [o.seed for o in work.seeds] == [1, 2]
    assert [o.settings().data_seed for o in work.seeds] == [9, 9]
    assert any("was made with other settings: rerunning" in line for line in lines)

    # A seed whose results.json is damaged is run again too.
    (tmp_path / "out" / "seed_1" / "results.json").write_text("{")
    work.seeds.clear()
    seeds.reproduce_seeds(_driver_opts(tmp_path, [1, 2], data_seed=9), echo=lines.append)
    assert [o.seed for o in work.seeds] == [1]

    # Another corpus in the same file: the base is trained again, and every seed with it.
    work.trained.clear(), work.seeds.clear()
    lines.clear()
    opts = _driver_opts(tmp_path, [1, 2], data_seed=9)
    opts.corpus.write_text('[{"instruction": "another", "input": "", "output": "text"}]')
    seeds.reproduce_seeds(opts, echo=lines.append)
    assert work.trained == ["base"] and [o.seed for o in work.seeds] == [1, 2]
    assert any("other base_fingerprint_sha256: rerunning" in line for line in lines)
