"""Loading checks every tensor's stored shape (soft.checkpointing.requests): megatron-core's
loader would serve a smaller request from a larger stored tensor without a word."""

from __future__ import annotations

import pytest

from soft.checkpointing.checkpoint import TrainState, load_weights, save
from soft.checkpointing.directory import CONFIG, MANIFEST, CheckpointError, find_checkpoint
from soft.training.run import setup
from tests.megatron_env import single_rank_world, tiny_config


def test_a_different_vocabulary_is_refused_by_shape_even_without_a_config(tmp_path):
    """A 512-row checkpoint (the built-in tokenizer) loaded into a 1024-row model: before the
    shape check, rows 0-511 were loaded and the rest left random. A foreign checkpoint has no
    config.yaml or tokenizer record to compare, so the shapes are the last line of defence."""
    single_rank_world()
    small = setup(tiny_config(f"train.output_dir={tmp_path / 'small'}", "tracking.enabled=false"))
    ckpt = save(tmp_path / "weights", small.model.unwrapped, TrainState(), small.cfg)
    (ckpt / CONFIG).unlink()
    (ckpt / MANIFEST).unlink()  # now it looks like a checkpoint from another tool
    big = setup(tiny_config(f"train.output_dir={tmp_path / 'big'}", "model.vocab_size=1024"))
    with pytest.raises(CheckpointError) as err:
        load_weights(find_checkpoint(ckpt).path, big.model.unwrapped)
    message = str(err.value)
    assert "tensor 'embedding.word_embeddings.weight' has shape [512, 64] there" in message
    assert "but [1024, 64] in this model" in message
