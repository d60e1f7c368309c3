"""Adapter runs end to end at one rank: checkpoints hold the adapters and name their base by
checksum; resume continues the same loss curve; a changed or missing base is refused.

The loss curves are compared at rel 1e-6 (fp32 on CPU, same seeds: resume restores the
adapters, their Adam moments, the schedule, the data position and the RNG states; the base
comes back bit-identical from its own checkpoint), as for full runs (tests/training/test_resume.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.megatron_env import single_rank_world, tiny_config

LORA = ("peft.method=lora", "peft.rank=4", "checkpoint.finetune=true")


def _run(out: Path, *overrides: str):
    from soft.training.cli import run_training

    single_rank_world()
    cfg = tiny_config(
        f"train.output_dir={out}",
        "train.train_iters=4",
        "train.eval_interval=0",
        "train.lr_warmup_iters=1",
        "train.lr=1e-3",
        "tracking.enabled=false",
        "checkpoint.keep_last=1",
        *overrides,
    )
    return run_training(cfg)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A full run's checkpoint: the weights the adapters adapt."""
    out = tmp_path_factory.mktemp("base")
    _run(out, "train.train_iters=2")
    return out / "checkpoints"


def _losses(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _stored_keys(ckpt: Path) -> list[str]:
    from megatron.core import dist_checkpointing

    return sorted(k for k in dist_checkpointing.load_tensors_metadata(str(ckpt)) if k)


def _stored_tensors(ckpt: Path) -> dict:
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_plain_tensors(str(ckpt))


def test_adapter_checkpoint_resumes_the_same_curve(tmp_path, base) -> None:
    from soft.checkpointing.directory import find_checkpoint
    from soft.checkpointing.manifest import read_manifest

    load = f"checkpoint.load_dir={base}"
    _run(tmp_path / "a", *LORA, load)
    _run(tmp_path / "b", *LORA, load, "train.exit_interval=2")
    ckpt = find_checkpoint(tmp_path / "b/checkpoints").path
    keys = _stored_keys(ckpt)
    model_keys = [k for k in keys if not k.startswith(("optimizer.", "rng_state"))]
    assert model_keys and all(".lora." in k for k in model_keys), model_keys
    manifest = read_manifest(ckpt)
    base_ckpt = find_checkpoint(base).path
    assert manifest["peft_base"]["path"] == str(base_ckpt.resolve())
    size = sum(f.stat().st_size for f in ckpt.rglob("*.distcp"))
    base_size = sum(f.stat().st_size for f in base_ckpt.rglob("*.distcp"))
    assert size < base_size / 3, (size, base_size)
    second = _run(tmp_path / "b", *LORA, load)
    assert [r["iteration"] for r in second.train_history] == [3, 4]
    a, b = _losses(tmp_path / "a/train_log.jsonl"), _losses(tmp_path / "b/train_log.jsonl")
    assert [r["iteration"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        for key in set(ra) - {"step_time_s"}:
            assert rb[key] == pytest.approx(ra[key], rel=1e-6), (ra["iteration"], key)
    # The adapters trained: B left zero (where every adapter starts).
    stored = _stored_tensors(find_checkpoint(tmp_path / "b/checkpoints").path)
    assert all(stored[k].abs().sum() > 0 for k in model_keys if k.endswith(".lora.b"))


def test_a_changed_or_missing_base_is_refused(tmp_path, base) -> None:
    from soft.checkpointing.directory import CheckpointError

    own_base = tmp_path / "base"
    shutil.copytree(base, own_base)
    load = f"checkpoint.load_dir={own_base}"
    _run(tmp_path / "r", *LORA, load, "train.exit_interval=1")
    # Another run's weights saved over the base: the checksum names the difference.
    other = tmp_path / "other"
    _run(other, "train.train_iters=2", "train.seed=7")
    shutil.rmtree(own_base)
    shutil.copytree(other / "checkpoints", own_base)
    with pytest.raises(CheckpointError, match="now holds .*other weights"):
        _run(tmp_path / "r", *LORA, load)
    shutil.rmtree(own_base)
    with pytest.raises(CheckpointError, match="which is gone"):
        _run(tmp_path / "r", *LORA, load)
    # Nothing the run had was lost: its checkpoint is still there.
    assert (tmp_path / "r/checkpoints/iter_0000001/manifest.json").is_file()


def test_an_adapter_checkpoint_is_not_a_base(tmp_path, base) -> None:
    from soft.config.errors import ConfigError

    _run(tmp_path / "s", *LORA, f"checkpoint.load_dir={base}", "train.exit_interval=1")
    with pytest.raises(ConfigError, match="holds adapters, not a base model"):
        _run(tmp_path / "t", *LORA, f"checkpoint.load_dir={tmp_path / 's/checkpoints'}")


def test_a_full_checkpoint_does_not_resume_as_an_adapter_run(tmp_path, base) -> None:
    from soft.checkpointing.directory import CheckpointError

    _run(tmp_path / "f", "train.exit_interval=1")
    with pytest.raises(CheckpointError, match="peft.method"):
        _run(tmp_path / "f", *LORA, f"checkpoint.load_dir={base}")
