"""The HF model classes an export loads as: one per family of `soft.conversion.mapping`
(LLaMA, Mistral, Qwen2, Qwen3). They share the decoder layout the layer driver and the
sub-model views use (`model.embed_tokens/layers/norm/rotary_emb`, `lm_head`), but not a
class: MistralForCausalLM is no LlamaForCausalLM, so the type is their union."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

from soft.config.errors import ConfigError

if TYPE_CHECKING:
    from transformers import (
        LlamaForCausalLM,
        MistralForCausalLM,
        PreTrainedModel,
        Qwen2ForCausalLM,
        Qwen3ForCausalLM,
    )

    CausalLM: TypeAlias = (
        LlamaForCausalLM | MistralForCausalLM | Qwen2ForCausalLM | Qwen3ForCausalLM
    )


def as_causal_lm(model: PreTrainedModel, path: Path) -> CausalLM:
    """`model`, checked to be one of the families' classes (a folder whose config.json names
    another architecture would otherwise fail later, inside the layer driver)."""
    from transformers import (
        LlamaForCausalLM,
        MistralForCausalLM,
        Qwen2ForCausalLM,
        Qwen3ForCausalLM,
    )

    if not isinstance(
        model, LlamaForCausalLM | MistralForCausalLM | Qwen2ForCausalLM | Qwen3ForCausalLM
    ):
        raise ConfigError(
            f"'{path}' loads as {type(model).__name__}; evaluation runs LlamaForCausalLM, "
            "MistralForCausalLM, Qwen2ForCausalLM and Qwen3ForCausalLM models"
        )
    return model
