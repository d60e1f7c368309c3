"""The family presets are the released models: each one's model section, written out as the
transformers config of its family by the export code, builds a model with exactly the
parameter count on the model's Hugging Face page (the safetensors total), and the HF import
reads that config back to the same model section. (Every YAML also loads and validates:
tests/config/test_config.py.) `tools/plan_pipeline.py` plans each one at PP4."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from soft.config.core import to_dict
from soft.config.root import load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# preset: (HF model, architecture, parameters as published)
RELEASED = {
    "llama3_8b": ("meta-llama/Llama-3.1-8B", "LlamaForCausalLM", 8_030_261_248),
    "llama3.2_1b": ("meta-llama/Llama-3.2-1B", "LlamaForCausalLM", 1_235_814_400),
    "llama3.2_3b": ("meta-llama/Llama-3.2-3B", "LlamaForCausalLM", 3_212_749_824),
    "mistral_7b": ("mistralai/Mistral-7B-v0.3", "MistralForCausalLM", 7_248_023_552),
    "qwen2.5_7b": ("Qwen/Qwen2.5-7B", "Qwen2ForCausalLM", 7_615_616_512),
    "qwen2.5_0.5b": ("Qwen/Qwen2.5-0.5B", "Qwen2ForCausalLM", 494_032_768),
    "qwen3_8b": ("Qwen/Qwen3-8B", "Qwen3ForCausalLM", 8_190_735_360),
}


@pytest.mark.parametrize("name", RELEASED)
def test_preset_builds_the_released_model(name):
    from transformers import AutoModelForCausalLM

    from soft.conversion.hf_io import hf_config_from_model

    model = load_config(CONFIGS / f"{name}.yaml").model
    hf_config = hf_config_from_model(model, model.vocab_size, model.num_layers, "bf16", {})
    with torch.device("meta"):  # shapes only
        hf = AutoModelForCausalLM.from_config(hf_config)
    _, architecture, params = RELEASED[name]
    assert type(hf).__name__ == architecture
    assert sum(p.numel() for p in hf.parameters()) == params


@pytest.mark.parametrize("name", RELEASED)
def test_import_reads_the_preset_back(name):
    from soft.conversion.hf_io import check_supported, hf_config_from_model, model_config_from_hf

    model = load_config(CONFIGS / f"{name}.yaml").model
    config = hf_config_from_model(model, model.vocab_size, model.num_layers, "bf16", {}).to_dict()
    check_supported(config, Path(f"{name}/config.json"))
    back = model_config_from_hf(config, "bf16", model.make_vocab_size_divisible_by)
    want = to_dict(model)
    if want["head_dim"] == model.hidden_size // model.num_attention_heads:
        want["head_dim"] = None  # the import leaves the default unsaid
    assert to_dict(back) == want


@pytest.mark.parametrize("name", RELEASED)
def test_plan_pipeline_plans_the_preset(name, capsys):
    from soft.parallel.cli_plan import main

    assert (
        main(["--config", str(CONFIGS / f"{name}.yaml"), "parallel.pipeline_model_parallel_size=4"])
        == 0
    )
    from soft.models.gpt import padded_vocab_size

    out = capsys.readouterr().out
    cfg = load_config(CONFIGS / f"{name}.yaml")
    tp = cfg.parallel.tensor_model_parallel_size
    assert f"vocab {padded_vocab_size(cfg.model.vocab_size, cfg.model, tp)} (padded)" in out
    assert "| stage | layers |" in out and "parallel.num_layers_in_first_pipeline_stage=" in out
