"""The training command's config: the YAML file and overrides, plus the model's shape from the
checkpoint a run starts from, wherever the file or the command line does not set it (as
Megatron-LM's --use-checkpoint-args, applied where the run is set up: loading a config alone,
soft.config.root.load_config, reads no checkpoint). Light: no megatron import, so a bad config
fails at once."""

from __future__ import annotations

import logging
from pathlib import Path

from soft.checkpointing.compatibility import saved_model_shape
from soft.config.root import RootConfig, build_config, read_config

log = logging.getLogger(__name__)


def load_run_config(path: str | Path | None, overrides: list[str] | None) -> RootConfig:
    data = read_config(path, overrides)
    inherit_model_shape(data)
    return build_config(data)


def inherit_model_shape(data: dict) -> None:
    """Starting from checkpoint.load_dir, the model's shape is the checkpoint's unless the YAML
    or the command line sets it: a fine-tuning command needs no copy of the model section it
    loads. Each key taken is logged."""
    load_dir = (data.get("checkpoint") or {}).get("load_dir")
    if not isinstance(load_dir, str):
        return
    model = data.setdefault("model", {})
    if not isinstance(model, dict):
        return  # build_config reports the wrong type
    for key, value in saved_model_shape(load_dir).items():
        if key not in model:
            model[key] = value
            log.info("model.%s=%r: from the checkpoint in %s", key, value, load_dir)
