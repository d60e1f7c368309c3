"""A resumed run continues the same loss curve.

Run A trains 2N steps. Run B trains the same config with `train.exit_interval=N` (it saves and
stops after N steps), then is started again and resumes from its checkpoint. Both are fp32 on
CPU with the same seeds; resume restores weights, Adam moments, the LR schedule, the data
position and RNG states, so the per-step losses are equal to the last bit (checked with a
1e-6 relative tolerance to allow for a different BLAS thread split).
"""

from __future__ import annotations

import json

import pytest

from tests.megatron_env import single_rank_world, tiny_config


def _run(out, *overrides):
    from soft.training.cli import run_training

    single_rank_world()
    cfg = tiny_config(
        f"train.output_dir={out}",
        "train.train_iters=6",
        "train.eval_interval=0",
        "train.lr_warmup_iters=2",
        "tracking.enabled=false",
        "checkpoint.keep_last=1",
        *overrides,
    )
    return run_training(cfg)


def _losses(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_resume_continues_the_loss_curve(tmp_path, dtype):
    """bf16 runs through megatron-core's Float16Module and mixed-precision optimizer (fp32
    master weights): its checkpoint must carry those too."""
    _run(tmp_path / "a", f"model.params_dtype={dtype}")
    first = _run(tmp_path / "b", "train.exit_interval=3", f"model.params_dtype={dtype}")
    assert json.loads((tmp_path / "b/exit_status.json").read_text()) == {
        "reason": "exit_interval",
        "iteration": 3,
    }
    assert len(first.train_history) == 3
    second = _run(tmp_path / "b", f"model.params_dtype={dtype}")
    assert [r["iteration"] for r in second.train_history] == [4, 5, 6]
    a, b = _losses(tmp_path / "a/train_log.jsonl"), _losses(tmp_path / "b/train_log.jsonl")
    assert [r["iteration"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b, strict=True):
        for key in set(ra) - {"step_time_s"}:
            assert rb[key] == pytest.approx(ra[key], rel=1e-6), (ra["iteration"], key)
    va, vb = _losses(tmp_path / "a/valid_log.jsonl"), _losses(tmp_path / "b/valid_log.jsonl")
    assert vb[-1] == pytest.approx(va[-1], rel=1e-6)


def test_interrupted_save_leaves_last_checkpoint_loadable(tmp_path):
    """A save killed mid-write leaves iter_N.tmp; `latest` still names the good checkpoint."""
    from soft.checkpointing.directory import find_checkpoint

    _run(tmp_path / "c", "train.train_iters=3")
    ckpts = tmp_path / "c/checkpoints"
    good = find_checkpoint(ckpts)
    (ckpts / "iter_0000004.tmp").mkdir()  # what a kill during the next save leaves behind
    (ckpts / "iter_0000004.tmp" / "partial.distcp").write_bytes(b"\0" * 10)
    assert find_checkpoint(ckpts) == good
    resumed = _run(tmp_path / "c", "train.train_iters=4")
    assert [r["iteration"] for r in resumed.train_history] == [4]


def test_bad_load_dir_is_a_clear_error(tmp_path):
    from soft.config.errors import ConfigError

    with pytest.raises(ConfigError, match="is not a checkpoint"):
        _run(tmp_path / "d", f"checkpoint.load_dir={tmp_path}", "checkpoint.auto_resume=false")


def test_weights_only_checkpoint_needs_finetune_flag(tmp_path):
    """A model-only checkpoint (like a converted HF model) cannot be resumed, only fine-tuned."""
    from soft.checkpointing.checkpoint import TrainState, save
    from soft.config.errors import ConfigError
    from soft.training.run import setup

    single_rank_world()
    run = setup(tiny_config(f"train.output_dir={tmp_path / 'src'}", "tracking.enabled=false"))
    save(tmp_path / "weights", run.model.unwrapped, TrainState(), run.cfg)
    with pytest.raises(ConfigError, match="checkpoint.finetune=true"):
        _run(tmp_path / "e", f"checkpoint.load_dir={tmp_path / 'weights'}")
    tuned = _run(
        tmp_path / "f",
        f"checkpoint.load_dir={tmp_path / 'weights'}",
        "checkpoint.finetune=true",
        "train.train_iters=3",
    )
    assert [r["iteration"] for r in tuned.train_history] == [1, 2, 3]


def test_bf16_exit_losses_track_fp32(tmp_path):
    """Same init and data: bf16's first-step exit losses within 1% of fp32's (bf16 has an
    8-bit mantissa, ~0.4% per rounding; the CE itself is computed in fp32)."""
    fp32 = _run(tmp_path / "fp32", "train.train_iters=2", "train.lr_warmup_iters=1")
    bf16 = _run(
        tmp_path / "bf16",
        "train.train_iters=2",
        "train.lr_warmup_iters=1",
        "model.params_dtype=bf16",
    )
    losses = [k for k in fp32.train_history[0] if k == "loss" or k.startswith("exit_")]
    assert len(losses) == 5
    for key in losses:
        assert bf16.train_history[0][key] == pytest.approx(fp32.train_history[0][key], rel=1e-2)
