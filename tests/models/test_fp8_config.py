"""FP8 settings fail early and name their key: at config load (bad values) or at model build
(no Transformer Engine / no GPU on this machine), never silently falling back to BF16."""

from __future__ import annotations

import pytest
import torch

from soft.config.errors import ConfigError
from soft.config.root import load_config
from soft.models.gpt import transformer_engine_available, use_transformer_engine
from tests.megatron_env import tiny_config

NO_TE = not (torch.cuda.is_available() and transformer_engine_available())


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "model.fp8_recipe=bogus",
            r"'model.fp8_recipe': expected 'delayed' \| 'tensorwise', got 'bogus'",
        ),
        ("model.fp8=e4m3", r"'model.fp8' needs 'model.params_dtype' bf16"),
        ("model.fp8_amax_history_len=0", r"'model.fp8_amax_history_len': expected >= 1"),
    ],
)
def test_bad_fp8_values_fail_at_config_load(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


@pytest.mark.skipif(
    not NO_TE, reason="this machine has a GPU with Transformer Engine: FP8 is allowed"
)
@pytest.mark.parametrize("impl", ["auto", "transformer_engine"])
def test_fp8_without_te_or_gpu_names_the_key(impl):
    cfg = load_config(
        None, ["model.params_dtype=bf16", "model.fp8=e4m3", f"model.transformer_impl={impl}"]
    )
    with pytest.raises(ConfigError, match=r"'model\.(fp8|transformer_impl)'"):
        use_transformer_engine(cfg.model)


@pytest.mark.skipif(
    not NO_TE, reason="this machine has a GPU with Transformer Engine: FP8 is allowed"
)
def test_fp8_on_cpu_fails_in_setup_before_any_step(tmp_path):
    """The error comes from building the model inside `setup`, before `train` runs a step."""
    from soft.training.run import setup

    cfg = tiny_config("model.params_dtype=bf16", "model.fp8=hybrid", f"train.output_dir={tmp_path}")
    with pytest.raises(
        ConfigError, match=r"config key 'model.fp8' is 'hybrid' but FP8 needs Transformer Engine"
    ):
        setup(cfg)
