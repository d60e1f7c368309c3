"""The paper's baselines as training modes: ict (frozen SFT model + separate exit heads) and
extracted (the first k layers of a deeper model, fine-tuned alone). fp32 on CPU, one rank."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.megatron_env import single_rank_world, tiny_config

STEPS = (
    "train.eval_interval=0",
    "train.lr=3e-3",
    "train.lr_warmup_iters=1",
    "tracking.enabled=false",
)


def _train(out, *overrides):
    from soft.training.cli import run_training

    single_rank_world()
    return run_training(tiny_config(f"train.output_dir={out}", *STEPS, *overrides))


def _load(*overrides):
    """A model set up from a checkpoint (fine-tune load), not trained."""
    from soft.training.run import setup

    single_rank_world()
    return setup(tiny_config(*STEPS, *overrides))


def _params(run) -> dict[str, torch.Tensor]:
    (chunk,) = run.model.unwrapped
    return {k: v.detach().clone() for k, v in chunk.state_dict().items() if torch.is_tensor(v)}


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    return out, _train(out, "soft.mode=sft", "train.train_iters=4")


def _ict(sft, out, *overrides):
    return (
        f"train.output_dir={out}",
        "soft.mode=ict",
        f"checkpoint.load_dir={sft / 'checkpoints'}",
        "checkpoint.finetune=true",
        *overrides,
    )


def test_ict_heads_start_as_the_shared_head(sft_run, tmp_path):
    sft_dir = sft_run[0]
    run = _load(*_ict(sft_dir, tmp_path / "ict"))
    p = _params(run)
    assert sorted({k.split(".")[1] for k in p if k.startswith("exit_heads.")}) == ["1", "2", "3"]
    for k in (1, 2, 3):
        assert torch.equal(
            p[f"exit_heads.{k}.final_layernorm.weight"], p["decoder.final_layernorm.weight"]
        )
        assert torch.equal(p[f"exit_heads.{k}.output_layer.weight"], p["output_layer.weight"])
    trainable = [n for n, q in run.model.unwrapped[0].named_parameters() if q.requires_grad]
    assert trainable and all(n.startswith("exit_heads.") for n in trainable)


def test_ict_trains_only_the_heads(sft_run, tmp_path):
    sft_dir = sft_run[0]
    before = _params(
        _load(f"checkpoint.load_dir={sft_dir / 'checkpoints'}", "checkpoint.finetune=true")
    )
    result = _train(tmp_path / "ict", *_ict(sft_dir, tmp_path / "ict"), "train.train_iters=6")
    after = _params(_load(*_ict(tmp_path / "ict", tmp_path / "reload")))
    for name, value in before.items():
        assert torch.equal(after[name], value), f"backbone parameter {name} changed"
    for k in (1, 2, 3):
        assert not torch.equal(
            after[f"exit_heads.{k}.output_layer.weight"], before["output_layer.weight"]
        )
    # Same validation set: the early exits improve on the SFT model's, the full model is it.
    sft_valid, ict_valid = sft_run[1].valid_history[-1], result.valid_history[-1]
    for k in (1, 2, 3):
        assert ict_valid[f"exit_{k}"] < sft_valid[f"exit_{k}"] - 0.05, k
    assert ict_valid["exit_4"] == pytest.approx(sft_valid["exit_4"], rel=1e-6)
    first = result.train_history[0]
    # The final exit is the frozen SFT model: its loss is logged but has no weight.
    assert first["loss"] == pytest.approx(sum(first[f"exit_{k}"] for k in (1, 2, 3)) / 3, rel=1e-6)


def test_ict_resumes_its_own_heads(sft_run, tmp_path):
    sft_dir = sft_run[0]
    """A restarted ict run loads its trained heads, not the shared head again."""
    out = tmp_path / "ict"
    _train(out, *_ict(sft_dir, out), "train.train_iters=4", "train.exit_interval=2")
    mid = _params(_load(*_ict(out, tmp_path / "a")))
    resumed = _load(*_ict(sft_dir, out), "train.train_iters=4")
    assert resumed.state.iteration == 2
    assert torch.equal(
        _params(resumed)["exit_heads.1.output_layer.weight"],
        mid["exit_heads.1.output_layer.weight"],
    )


def test_ict_needs_early_exits_and_a_checkpoint():
    from soft.config.errors import InputError

    with pytest.raises(InputError, match="checkpoint.load_dir"):
        tiny_config("soft.mode=ict")
    with pytest.raises(InputError, match="early exits"):
        tiny_config(
            "soft.mode=ict",
            "soft.exit_layers=[4]",
            "checkpoint.load_dir=x",
            "checkpoint.finetune=true",
        )


def _exit_logits(chunk, tokens, layer: int) -> torch.Tensor:
    """Exit `layer` of a model: hidden state after that layer -> final norm -> output layer."""
    from soft.training.step import causal_mask

    captured = {}

    def keep(module, args, out):
        captured["h"] = out[0]

    handle = chunk.decoder.layers[layer - 1].register_forward_hook(keep)
    b, s = tokens.shape
    pos = torch.arange(s).unsqueeze(0).expand(b, s)
    try:
        full = chunk(tokens, pos, causal_mask(s, tokens.device))
    finally:
        handle.remove()
    if layer == len(chunk.decoder.layers):
        return full
    logits, _ = chunk.output_layer(chunk.decoder.final_layernorm(captured["h"]))
    return logits.transpose(0, 1)


def test_extracted_model_starts_as_exit_k_of_the_base(tmp_path):
    _train(tmp_path / "base", "soft.mode=sft", "train.train_iters=2")
    base_ckpt = f"checkpoint.load_dir={tmp_path / 'base/checkpoints'}"
    base = _load(base_ckpt, "checkpoint.finetune=true")
    small = _load(
        base_ckpt, "checkpoint.finetune=true", "soft.mode=extracted", "model.num_layers=2"
    )
    tokens = small.train_data.batch([0, 1])["tokens"]
    (base_chunk,), (small_chunk,) = base.model.unwrapped, small.model.unwrapped
    base_chunk.eval()
    small_chunk.eval()
    assert len(small_chunk.decoder.layers) == 2
    with torch.no_grad():
        expected = _exit_logits(base_chunk, tokens, 2)
        got = _exit_logits(small_chunk, tokens, 2)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)  # same weights, same ops


def test_layer_count_mismatch_needs_extracted_mode(tmp_path):
    from soft.config.errors import InputError

    _train(tmp_path / "base", "soft.mode=sft", "train.train_iters=2")
    with pytest.raises(InputError, match="soft.mode=extracted"):
        _load(
            f"checkpoint.load_dir={tmp_path / 'base/checkpoints'}",
            "checkpoint.finetune=true",
            "model.num_layers=2",
        )


def test_test_runs_never_default_to_the_users_run_folder():
    """runs/default (relative to the working directory) is where a user's default job lives;
    a test config without an explicit train.output_dir gets a fresh temporary folder."""
    from tests.conftest import REPO_ROOT

    out = Path(tiny_config().train.output_dir).resolve()
    assert out.is_dir() and REPO_ROOT not in out.parents and not any(out.iterdir())


@pytest.mark.parametrize("policy, measured_steps", [("interval", [3, 6]), ("never", [])])
def test_sft_computes_untrained_exits_only_at_logging_steps(
    tmp_path, monkeypatch, policy, measured_steps
):
    """An SFT step that logs nothing runs no exit cross-entropy (it costs what a plain step
    costs); at logging steps the early exits are measured, with the values an every-step run
    logs (the early exits do not train, so both runs are the same run)."""
    from soft.models import exits

    calls = []
    original = exits.exit_ce_sum
    monkeypatch.setattr(exits, "exit_ce_sum", lambda *a, **k: calls.append(1) or original(*a, **k))
    common = (
        "soft.mode=sft",
        "train.train_iters=6",
        "train.log_interval=3",
        "data.valid_fraction=0",
    )
    every = _train(tmp_path / "every", *common, "soft.log_untrained_exits=every_step")
    assert len(calls) == 6 * 2 * 3  # steps x microbatches x early exits
    calls.clear()
    sampled = _train(tmp_path / policy, *common, f"soft.log_untrained_exits={policy}")
    assert len(calls) == len(measured_steps) * 2 * 3
    for full, part in zip(every.train_history, sampled.train_history, strict=True):
        assert part["exit_4"] == full["exit_4"] and part["loss"] == full["loss"]
        has_early = "exit_1" in part
        assert has_early == (part["iteration"] in measured_steps), part
        if has_early:
            for k in (1, 2, 3):
                assert part[f"exit_{k}"] == full[f"exit_{k}"]
