"""Loading checks every tensor's stored shape (soft.checkpointing.requests): megatron-core's
loader would serve a smaller request from a larger stored tensor without a word."""

from __future__ import annotations

import pytest
from megatron.core import dist_checkpointing

from soft.checkpointing.checkpoint import load_weights
from soft.checkpointing.directory import CheckpointError, find_checkpoint
from soft.checkpointing.requests import model_state
from soft.training.run import setup
from tests.megatron_env import single_rank_world, tiny_config


def test_a_different_vocabulary_is_refused_by_shape_even_without_a_config(tmp_path):
    """A 512-row checkpoint (the built-in tokenizer) loaded into a 1024-row model: before the
    shape check, rows 0-511 were loaded and the rest left random. A foreign checkpoint has no
    config.yaml or tokenizer record to compare, so the shapes are the last line of defence."""
    single_rank_world()
    small = setup(tiny_config(f"train.output_dir={tmp_path / 'small'}", "tracking.enabled=false"))
    # Written by megatron-core alone, as another tool would: no config, manifest or format.
    ckpt = tmp_path / "weights"
    ckpt.mkdir()
    dist_checkpointing.save(model_state(small.model.unwrapped), str(ckpt))
    big = setup(tiny_config(f"train.output_dir={tmp_path / 'big'}", "model.vocab_size=1024"))
    with pytest.raises(CheckpointError) as err:
        load_weights(find_checkpoint(ckpt).path, big.model.unwrapped, allow_unverified=True)
    message = str(err.value)
    assert "tensor 'embedding.word_embeddings.weight' has shape [512, 64] there" in message
    assert "but [1024, 64] in this model" in message


def test_a_checkpoint_without_its_manifest_is_damaged_and_an_old_one_needs_consent(tmp_path):
    """The fault matrix deleted manifest.json and flipped a bit: the resume said 'written before
    checksums existed: not verified' (untrue) and trained on the altered weights. A checkpoint
    this project wrote always has a manifest, so one without it is damaged; one that really
    predates checksums loads only with checkpoint.allow_unverified."""
    from soft.checkpointing.checkpoint import TrainState, save, verify
    from soft.checkpointing.directory import CONFIG, MANIFEST, CheckpointDamaged

    single_rank_world()
    run = setup(tiny_config(f"train.output_dir={tmp_path / 'run'}", "tracking.enabled=false"))
    ours = save(tmp_path / "ours", run.model.unwrapped, TrainState(), run.cfg)
    (ours / MANIFEST).unlink()
    with pytest.raises(CheckpointDamaged, match="its config.yaml has 'checkpoint.on_corrupt'"):
        verify(ours, allow_unverified=True)
    (ours / CONFIG).unlink()
    with pytest.raises(CheckpointDamaged, match="it is format 3, which always has one"):
        verify(ours, allow_unverified=True)
    old = tmp_path / "old"  # megatron-core's files alone: what a pre-manifest save looks like
    old.mkdir()
    dist_checkpointing.save({**model_state(run.model.unwrapped), "format_version": 2}, str(old))
    with pytest.raises(CheckpointError, match="checkpoint.allow_unverified=true") as err:
        verify(old)
    assert not isinstance(err.value, CheckpointDamaged)
    verify(old, allow_unverified=True)
