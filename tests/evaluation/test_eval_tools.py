"""soft-eval and soft-generate (tools/eval_exits.py, tools/generate.py), run in-process through
run(argv), which raises on bad input (main prints it and returns 2: the subprocess test)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from eval_helpers import hf_greedy
from transformers import LlamaForCausalLM

from soft.config.errors import ConfigError
from soft.data.tokenizer import Tokenizer
from soft.evaluation import cli_eval as eval_exits
from soft.evaluation import cli_generate as generate
from soft.evaluation import exit_nll, load_eval_examples, tokenize_example

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trivia_file(shared_data) -> Path:
    return shared_data / "triviaqa" / "triviaqa_rc_train_0-1499.jsonl"


def test_eval_exits_triviaqa_with_mlflow(export_dir, trivia_file, tmp_path, capsys):
    out = tmp_path / "res" / "results.json"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    argv = [
        "--model-dir", str(export_dir), "--data", str(trivia_file), "--format", "triviaqa",
        "--limit", "3", "--max-new-tokens", "4", "--out", str(out), "--mlflow-uri", uri,
        "--no-progress",
    ]  # fmt: skip
    assert eval_exits.run(argv) == 0
    printed = capsys.readouterr().out
    assert "| layer | loss | perplexity | exact_match |" in printed

    records = json.loads(out.read_text())["exits"]
    assert [r["layer"] for r in records] == [2, 4, 6]  # soft_exit_layers from config.json
    for r in records:
        assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))
        assert 0.0 <= r["exact_match"] <= r["exact_match_normalized"] <= 1.0
        assert r["ms_per_token"] > 0 and r["tokens_per_s"] > 0 and r["speedup"] > 0
    assert records[-1]["speedup"] == 1.0
    assert out.with_suffix(".png").stat().st_size > 1000
    assert out.with_suffix(".md").is_file()

    # Losses equal an independent per-example computation (token-weighted mean over examples).
    model = LlamaForCausalLM.from_pretrained(export_dir).eval()
    tokenizer = Tokenizer.from_file(export_dir / "tokenizer.model")
    examples = [
        tokenize_example(tokenizer, e) for e in load_eval_examples(trivia_file, "triviaqa", 3)
    ]
    for r in records:
        sums = [
            exit_nll(model, e.loss_ids, e.num_target, [r["layer"]])[r["layer"]] for e in examples
        ]
        assert r["loss"] == pytest.approx(
            sum(s for s, _ in sums) / sum(n for _, n in sums), rel=1e-5
        )

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.search_runs([client.get_experiment_by_name("soft-eval-exits").experiment_id])[0]
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == [2, 4, 6]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"results.json", "results.png", "results.md"} <= artifacts
    # Artifacts of a local backend go beside the results, not into the current directory.
    assert str((tmp_path / "res" / "mlartifacts").resolve()) in run.info.artifact_uri


def test_eval_exits_alpaca_every_layer_by_default(export_dir_no_exits, tmp_path):
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": "Hi there!"}]))
    out = tmp_path / "alpaca.json.results.json"
    argv = ["--model-dir", str(export_dir_no_exits), "--data", str(data), "--format", "alpaca",
            "--max-new-tokens", "0", "--out", str(out), "--no-progress"]  # fmt: skip
    assert eval_exits.run(argv) == 0
    records = json.loads(out.read_text())["exits"]
    assert [r["layer"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(r["exact_match"] is None and r["ms_per_token"] is None for r in records)


def test_eval_exits_text_explicit_exits(export_dir, tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text(json.dumps({"text": "Hello world, this is a test."}) + "\n")
    out = tmp_path / "text.json"
    argv = ["--model-dir", str(export_dir), "--data", str(data), "--format", "text",
            "--exits", "3,1", "--max-new-tokens", "2", "--out", str(out), "--no-progress"]  # fmt: skip
    assert eval_exits.run(argv) == 0
    assert [r["layer"] for r in json.loads(out.read_text())["exits"]] == [
        1,
        3,
        6,
    ]  # + full reference


def test_eval_exits_bad_input(export_dir, tmp_path, trivia_file):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    base = ["--data", str(trivia_file), "--format", "triviaqa", "--out", str(tmp_path / "x.json")]
    with pytest.raises(ConfigError, match="is not a megatron checkpoint"):
        eval_exits.run(["--model-dir", str(tmp_path), *base])
    with pytest.raises(ConfigError, match=r"--exits.*outside the model's depth.*1\.\.6"):
        eval_exits.run(["--model-dir", str(export_dir), *base, "--exits", "2,7"])
    with pytest.raises(ConfigError, match="--exits: expected comma-separated integers"):
        eval_exits.run(["--model-dir", str(export_dir), *base, "--exits", "two"])
    with pytest.raises(ConfigError, match="no records"):
        eval_exits.run(
            ["--model-dir", str(export_dir), "--data", str(empty), "--format", "triviaqa"]
        )
    bad_config = tmp_path / "bad_exits"
    bad_config.mkdir()
    config = json.loads((export_dir / "config.json").read_text())
    (bad_config / "config.json").write_text(json.dumps({**config, "soft_exit_layers": [2, 9]}))
    with pytest.raises(ConfigError, match="soft_exit_layers.*outside"):
        eval_exits.run(["--model-dir", str(bad_config), *base])


def _generate_json(capsys, argv: list[str]) -> dict:
    assert generate.run([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_generate_modes(export_dir, capsys):
    prompt = "The capital of France is"
    base = ["--model-dir", str(export_dir), "--prompt", prompt, "--max-new-tokens", "8"]
    full = _generate_json(capsys, base)
    tokenizer = Tokenizer.from_file(export_dir / "tokenizer.model")
    prompt_ids = tokenizer.encode(prompt, bos=True)
    assert full["prompt_ids"][0] == tokenizer.bos_id and full["prompt_ids"] == prompt_ids
    model = LlamaForCausalLM.from_pretrained(export_dir).eval()
    model.generation_config.eos_token_id = None
    reference = hf_greedy(model, prompt_ids, 8)
    n = len(full["token_ids"])  # may stop early at EOS
    assert full["token_ids"] == reference[:n] and isinstance(full["text"], str)

    spec = _generate_json(capsys, [*base, "--mode", "speculative", "--draft-exit", "2",
                                   "--num-draft", "3", "--compare-full"])  # fmt: skip
    assert spec["token_ids"] == full["token_ids"] and spec["identical_to_full"]
    assert 0.0 <= spec["acceptance_rate"] <= 1.0 and spec["speedup"] > 0

    dyn = _generate_json(capsys, [*base, "--mode", "dynamic", "--thresholds", "1.0"])
    assert dyn["token_ids"] == full["token_ids"] and dyn["average_exit_depth"] == 6.0
    dyn0 = _generate_json(capsys, [*base, "--mode", "dynamic", "--thresholds", "0,0"])
    exit2 = _generate_json(capsys, [*base, "--mode", "exit", "--exit-layer", "2"])
    assert dyn0["token_ids"] == exit2["token_ids"] and dyn0["average_exit_depth"] == 2.0
    assert exit2["tokens_per_s"] > 0


def test_generate_bad_input(export_dir, export_dir_no_exits):
    base = ["--prompt", "hi", "--max-new-tokens", "2"]
    with pytest.raises(ConfigError, match="records no soft_exit_layers"):
        generate.run(["--model-dir", str(export_dir_no_exits), *base, "--mode", "dynamic",
                       "--thresholds", "0.5"])  # fmt: skip
    with pytest.raises(ConfigError, match="needs --thresholds"):
        generate.run(["--model-dir", str(export_dir), *base, "--mode", "dynamic"])
    with pytest.raises(ConfigError, match="--thresholds: expected 2 thresholds"):
        generate.run(
            [
                "--model-dir",
                str(export_dir),
                *base,
                "--mode",
                "dynamic",
                "--thresholds",
                "0.1,0.2,0.3",
            ]
        )
    with pytest.raises(ConfigError, match="--exit-layer.*outside the model's depth"):
        generate.run(["--model-dir", str(export_dir), *base, "--mode", "exit", "--exit-layer", "7"])
    with pytest.raises(ConfigError, match="--exit-layer is required"):
        generate.run(["--model-dir", str(export_dir), *base, "--mode", "exit"])
    with pytest.raises(ConfigError, match="--draft-exit is required"):
        generate.run(["--model-dir", str(export_dir_no_exits), *base, "--mode", "speculative"])
    with pytest.raises(ConfigError, match="--draft-exit.*outside"):
        generate.run(
            ["--model-dir", str(export_dir), *base, "--mode", "speculative", "--draft-exit", "0"]
        )


def test_eval_exits_subprocess_smoke(export_dir, trivia_file, tmp_path):
    out = tmp_path / "smoke.json"
    cmd = [sys.executable, str(REPO / "tools" / "eval_exits.py"), "--model-dir", str(export_dir),
           "--data", str(trivia_file), "--format", "triviaqa", "--limit", "1",
           "--max-new-tokens", "2", "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "| 6 |" in done.stdout and out.is_file()
    bad = subprocess.run(
        [*cmd[:3], str(tmp_path), *cmd[4:]], capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2 and "error: --model-dir" in bad.stderr


def test_a_model_of_another_architecture_is_refused(tmp_path):
    """The layer driver needs a family's decoder layout: GPT-2 (transformer.h, no rotary) is
    refused by name at load, not inside the driver."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig

    from soft.evaluation.causal_lm import as_causal_lm

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16))
    with pytest.raises(ConfigError, match=r"'.*gpt2' loads as GPT2LMHeadModel"):
        as_causal_lm(gpt2, tmp_path / "gpt2")
    llama = LlamaForCausalLM(
        LlamaConfig(
            num_hidden_layers=1, hidden_size=8, intermediate_size=16, num_attention_heads=2,
            vocab_size=16,
        )
    )  # fmt: skip
    assert as_causal_lm(llama, tmp_path / "llama") is llama
