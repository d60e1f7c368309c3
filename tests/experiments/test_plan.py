"""Settings, run plan, extra overrides, base reuse and the CLI's errors: no training."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from soft.config.errors import ConfigError
from soft.config.root import load_config
from soft.experiments import data as exp_data
from soft.experiments import runner
from soft.experiments.plan import Layout, build_plan, check_extra_overrides
from soft.experiments.settings import exit_layers_for, extracted_depths_for, make_settings
from tools import reproduce_paper


def _plan(tmp_path: Path, pretrain: bool = True, extra: list[str] = (), **kw):
    s = make_settings(**kw)
    layout = Layout(tmp_path)
    plan = build_plan(
        s, layout, pretrain=pretrain, mlflow_uri="sqlite:///x.db", experiment="e", extra=extra
    )
    return s, layout, plan


def _cfg(spec):
    return load_config(None, list(spec.overrides))


def test_default_settings_and_scaling():
    s = make_settings()
    assert (s.num_layers, s.hidden_size, s.num_attention_heads) == (8, 128, 4)
    assert s.exit_layers == list(range(1, 9)) and s.extracted_depths == [2, 4, 6]
    big = make_settings(scale=2)
    assert (big.num_layers, big.hidden_size, big.num_attention_heads) == (16, 256, 8)
    assert big.exit_layers == [2, 4, 6, 8, 10, 12, 14, 16]
    assert big.extracted_depths == [4, 8, 12]
    assert big.finetune_iters == 2 * s.finetune_iters and big.num_test == 2 * s.num_test
    assert big.finetune_lr == s.finetune_lr and big.finetune_batch_size == s.finetune_batch_size
    assert make_settings(scale=0.1).num_layers == 4
    assert exit_layers_for(20) == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
    assert exit_layers_for(9) == list(range(1, 10))
    assert extracted_depths_for(4) == [1, 2, 3]
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="--scale: expected a positive number"):
            make_settings(scale=bad)


def test_plan_runs_every_mode_on_the_same_data_steps_and_seed(tmp_path):
    s, layout, plan = _plan(tmp_path)
    assert [r.name for r in plan] == [
        "base", "sft", "soft", "ict", "extracted_6", "extracted_4", "extracted_2",
    ]  # fmt: skip
    cfgs = {r.name: _cfg(r) for r in plan}  # every run's config is valid
    base = cfgs["base"]
    assert base.data.format == "text" and base.soft.mode == "sft"
    assert base.data.train_path == str(layout.corpus) and base.checkpoint.load_dir is None
    for name, cfg in cfgs.items():
        assert cfg.data.tokenizer_path == str(layout.tokenizer)
        assert cfg.train.output_dir == str(layout.run_dir(name))
        assert cfg.tracking.run_name == name and cfg.tracking.experiment == "e"
        assert cfg.train.seed == 42 and cfg.model.hidden_size == s.hidden_size
        if name == "base":
            continue
        assert cfg.data.format == "alpaca"
        assert cfg.data.train_path == str(layout.data_dir / "train.json")
        assert cfg.checkpoint.finetune
        ft = cfgs["sft"].train
        assert (cfg.train.train_iters, cfg.train.lr, cfg.train.global_batch_size) == (
            ft.train_iters, ft.lr, ft.global_batch_size,
        )  # fmt: skip
    assert cfgs["soft"].soft.mode == "soft" and cfgs["ict"].soft.mode == "ict"
    assert cfgs["sft"].soft.exit_layers == cfgs["soft"].soft.exit_layers == s.exit_layers
    assert cfgs["ict"].soft.exit_layers == s.exit_layers
    assert cfgs["ict"].checkpoint.load_dir == str(layout.checkpoints("sft"))
    assert cfgs["soft"].checkpoint.load_dir == str(layout.checkpoints("base"))
    for k in s.extracted_depths:
        cfg = cfgs[f"extracted_{k}"]
        assert cfg.soft.mode == "extracted" and cfg.model.num_layers == k
        assert cfg.soft.exit_layers is None
        assert cfg.checkpoint.load_dir == str(layout.checkpoints("base"))
    evals = {r.name: r.eval_exits for r in plan}
    assert evals["base"] == () and evals["extracted_4"] == (4,)
    assert evals["soft"] == evals["ict"] == tuple(s.exit_layers)


def test_no_pretrain_plan_starts_from_random_init(tmp_path):
    _, layout, plan = _plan(tmp_path, pretrain=False)
    assert [r.name for r in plan][:3] == ["sft", "soft", "ict"]
    cfgs = {r.name: _cfg(r) for r in plan}
    assert cfgs["sft"].checkpoint.load_dir is None and cfgs["soft"].checkpoint.load_dir is None
    assert cfgs["ict"].checkpoint.load_dir == str(layout.checkpoints("sft"))
    # no base to cut: a k-layer model trained on its last layer is the extracted baseline
    assert cfgs["extracted_2"].soft.mode == "sft" and cfgs["extracted_2"].model.num_layers == 2


def test_extra_overrides_apply_to_every_run_but_not_to_reserved_keys(tmp_path):
    _, _, plan = _plan(tmp_path, extra=["train.lr=0.0005", "model.hidden_size=64"])
    for spec in plan:
        cfg = _cfg(spec)
        assert cfg.train.lr == 0.0005 and cfg.model.hidden_size == 64
    with pytest.raises(ConfigError, match="'soft.mode' is set by the experiment"):
        check_extra_overrides(["soft.mode=soft"])
    with pytest.raises(ConfigError, match="'model.num_layers'.*use --scale"):
        check_extra_overrides(["model.num_layers=12"])
    with pytest.raises(ConfigError, match="expected key=value"):
        check_extra_overrides(["train.lr"])


def _fake_finished_base(layout: Layout, spec) -> None:
    run_dir = layout.run_dir("base")
    ckpt = run_dir / "checkpoints" / "iter_0000001"  # what a complete save leaves
    ckpt.mkdir(parents=True)
    for name in ("metadata.json", "manifest.json"):
        (ckpt / name).write_text("{}")
    (run_dir / "checkpoints" / "latest").write_text("iter_0000001\n")
    (run_dir / "exit_status.json").write_text(json.dumps({"reason": "finished"}))
    layout.tokenizer.write_bytes(b"tok")
    layout.corpus.parent.mkdir(parents=True, exist_ok=True)
    layout.corpus.write_text('{"text": "a"}\n')
    runner.write_fingerprint(spec, layout)


def test_base_is_reused_only_with_matching_settings(tmp_path):
    _, layout, plan = _plan(tmp_path)
    base = plan[0]
    assert not runner.reusable_base(base, layout)
    _fake_finished_base(layout, base)
    assert runner.reusable_base(base, layout)
    assert runner.check_forced_reuse(base, layout) == []
    _, _, longer = _plan(tmp_path, extra=["train.clip_grad=0.5"])
    assert not runner.reusable_base(longer[0], layout)
    notes = runner.check_forced_reuse(longer[0], layout)  # --reuse-base: allowed, noted
    assert "train.clip_grad=0.5" in notes[0]
    _, _, wider = _plan(tmp_path, extra=["model.hidden_size=64"])
    with pytest.raises(ConfigError, match="different shape.*model.hidden_size: base 128, now 64"):
        runner.check_forced_reuse(wider[0], layout)
    layout.tokenizer.write_bytes(b"another")
    assert not runner.reusable_base(base, layout)
    with pytest.raises(ConfigError, match="is not the tokenizer of the base"):
        runner.check_forced_reuse(base, layout)
    (layout.run_dir("base") / "exit_status.json").write_text('{"reason": "signal"}')
    with pytest.raises(ConfigError, match="--reuse-base: no finished base run"):
        runner.check_forced_reuse(base, layout)


def test_failed_run_names_the_run_and_its_log(tmp_path, monkeypatch):
    _, layout, plan = _plan(tmp_path)
    script = (
        "import sys; print('step 1'); print('ValueError: training exploded'); "
        "print('torch.distributed.elastic.ChildFailedError:'); sys.exit(3)"
    )
    monkeypatch.setattr(runner, "launch_command", lambda spec, n: [sys.executable, "-c", script])
    with pytest.raises(runner.RunFailed) as info:
        runner.train(plan[1], layout, 1)
    message = str(info.value)
    assert "training run 'sft' failed (exit code 3)" in message
    assert str(layout.log("sft")) in message
    assert "cause: ValueError: training exploded" in message
    assert "training exploded" in layout.log("sft").read_text()


def test_corpus_conversion_and_tokenizer(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps([{"instruction": "Q?", "input": "", "output": "A.\nB."}]))
    docs = exp_data.corpus_documents(exp_data.load_alpaca_corpus(path))
    assert docs == ["Q?\nA.\nB."]
    out = exp_data.write_jsonl_text(docs, tmp_path / "c.jsonl")
    assert json.loads(out.read_text()) == {"text": "Q?\nA.\nB."}
    _, train, _ = exp_data.make_finetune_data(tmp_path / "d", 1, 50, 10)
    test = json.loads((tmp_path / "d" / "test.json").read_text())
    assert len(train) == 50 and len(test) == 10
    assert not {(r["instruction"], r["input"]) for r in train} & {
        (r["instruction"], r["input"]) for r in test
    }
    lines = exp_data.tokenizer_lines(docs * 50, train)
    tok_path = exp_data.train_tokenizer(lines, tmp_path / "t.model", 400)
    from soft.data.tokenizer import Tokenizer

    tok = Tokenizer.from_file(tok_path)
    assert tok.vocab_size == 400 and (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.decode(tok.encode("What is 12 plus 7?")) == "What is 12 plus 7?"
    (tmp_path / "bad.json").write_text('[{"text": "x"}]')
    with pytest.raises(ConfigError, match="row 0: expected an object with 'instruction'"):
        exp_data.load_alpaca_corpus(tmp_path / "bad.json")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--scale", "0"], "--scale: expected a positive number"),
        (["--nproc-per-node", "0"], "--nproc-per-node: expected >= 1"),
        (["--reuse-base", "--no-pretrain"], "contradict"),
        (["--corpus", "/nonexistent/c.json"], "pass --corpus PATH.*or --no-pretrain"),
        ([], "pass --corpus PATH.*or --no-pretrain"),  # a fresh clone has no default corpus
        (["soft.mode=sft"], "'soft.mode' is set by the experiment"),
        (["train.no_such_key=1"], "run 'base': unknown config key 'train.no_such_key'"),
        (["train.lr=fast"], "run 'base'.*train.lr"),
    ],
)
def test_cli_errors_come_before_any_work(tmp_path, capsys, argv, message):
    import re

    out = tmp_path / "out"
    if argv and "--corpus" not in argv and "--no-pretrain" not in argv:
        corpus = tmp_path / "corpus.json"  # an existing corpus: the error is about argv
        corpus.write_text('[{"instruction": "a", "input": "", "output": "b"}]')
        argv = ["--corpus", str(corpus), *argv]
    assert reproduce_paper.main(["--out", str(out), "--mini", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(message, err), err
    assert not out.exists()


def test_cli_rejects_non_numbers(capsys):
    with pytest.raises(SystemExit):
        reproduce_paper.parse_args(["--scale", "big"])
    assert "invalid float value" in capsys.readouterr().err


def test_run_plan_respects_dependencies_and_concurrency(tmp_path):
    import threading
    import time

    _, _, plan = _plan(tmp_path)
    lock, active, peak, order = threading.Lock(), [0], [0], []

    def train_one(spec):
        with lock:
            order.append(spec.name)
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        with lock:
            active[0] -= 1
        return runner.RunOutcome(spec.name, 0.05, 1.0, tmp_path / "x.log")

    outcomes = runner.run_plan(plan, set(), 2, train_one)
    assert set(outcomes) == {spec.name for spec in plan}
    assert order[0] == "base" and order.index("ict") > order.index("sft")
    assert peak[0] == 2
    order.clear()
    outcomes = runner.run_plan(plan, {"base"}, 1, train_one)  # base reused
    assert "base" not in outcomes and order[0] == "sft"


def test_run_plan_stops_starting_runs_after_a_failure(tmp_path):
    _, layout, plan = _plan(tmp_path)
    started = []

    def train_one(spec):
        started.append(spec.name)
        if spec.name == "sft":
            raise runner.RunFailed("training run 'sft' failed")
        return runner.RunOutcome(spec.name, 0.0, None, layout.log(spec.name))

    with pytest.raises(runner.RunFailed, match="'sft' failed"):
        runner.run_plan(plan, set(), 1, train_one)
    assert started == ["base", "sft"]
