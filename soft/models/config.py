"""Model and SoFT sections of the config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from soft.config.core import option
from soft.config.errors import ConfigError

# The HF families an export writes (soft.conversion.mapping.FAMILIES) and the parameter dtypes.
FamilyName = Literal["llama", "mistral", "qwen2", "qwen3"]
ParamsDtype = Literal["fp32", "bf16", "fp16"]

# Llama-3 RoPE scaling in megatron-core 0.16.1 (`RotaryEmbedding._apply_scaling`, the HF
# `llama3` formula): GPTModel passes only the factor, so these three are its defaults, fixed.
# The HF import refuses other values (tests/models/test_rope_scaling.py checks these against
# megatron-core's signature and the formula against transformers').
LLAMA3_ROPE_FIXED = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


@dataclass
class ModelConfig:
    """A megatron-core GPTModel in the LLaMA shape (RMSNorm, SwiGLU, RoPE, grouped-query
    attention). The model families differ only in the feature switches below (q/k/v biases,
    q/k norms, tied embeddings, RoPE scaling, head width); the model code reads the switches,
    never `family`, which names the HF architecture an export writes."""

    num_layers: int = option(4, "Transformer layers (LLaMA-2: 32 for 7B, 40 for 13B, 80 for 70B).")
    hidden_size: int = option(64, "Model width.")
    ffn_hidden_size: int = option(176, "SwiGLU inner width (LLaMA-2 13B: 13824).")
    num_attention_heads: int = option(4, "Query heads.")
    num_query_groups: int | None = option(
        None, "Key/value heads for grouped-query attention (70B: 8); null = one per query head."
    )
    head_dim: int | None = option(
        None,
        "Per-head width (megatron kv_channels); null = hidden_size / num_attention_heads. "
        "Set where HF's config.json has a head_dim that differs (Qwen3 0.6B-4B: 128).",
    )
    qkv_bias: bool = option(False, "Biases on the query, key and value projections (Qwen2/2.5).")
    qk_layernorm: bool = option(
        False, "RMSNorm on every query and key head before RoPE (Qwen3: q_norm, k_norm)."
    )
    tie_word_embeddings: bool = option(
        False,
        "The LM head is the input embedding matrix (Llama-3.2 1B/3B, small Qwen): every exit "
        "head reads it; its copies on pipeline stages are kept identical (soft.parallel.head_sync).",
    )
    rope_scaling: Literal["none", "llama3"] = option(
        "none",
        "RoPE frequency scaling: llama3 = Llama-3.1/3.2's (megatron-core's own implementation, "
        "with low/high frequency factors 1/4 and original context 8192 fixed by it).",
    )
    rope_scaling_factor: float = option(
        8.0, "rope_scaling=llama3: the factor (Llama-3.1: 8, Llama-3.2: 32)."
    )
    family: FamilyName = option(
        "llama",
        "HF model family an export writes (config.json model_type and architecture); set by "
        "the HF import. The model is built from the feature switches alone.",
    )
    vocab_size: int | None = option(None, "Vocabulary size; null = the tokenizer's.")
    make_vocab_size_divisible_by: int = option(
        128, "Pad the vocabulary to a multiple of this times the tensor-parallel size."
    )
    max_position_embeddings: int = option(4096, "Longest sequence RoPE is set up for.")
    rotary_base: int = option(10000, "RoPE base (LLaMA-2: 10000).")
    norm_epsilon: float = option(1e-5, "RMSNorm epsilon (LLaMA-2: 1e-5).")
    init_method_std: float = option(
        0.02, "Std of the random init (runs from HF weights ignore it)."
    )
    params_dtype: ParamsDtype = option(
        "fp32", "Parameter/compute dtype. fp32 on CPU; bf16 on GPUs."
    )
    transformer_impl: Literal["auto", "local", "transformer_engine"] = option(
        "auto",
        "Layer spec: auto = Transformer Engine when importable and a GPU is present, else local.",
    )
    fp8: Literal["e4m3", "hybrid"] | None = option(
        None, "FP8 format for Transformer Engine layers (needs TE and an FP8 GPU); null = off."
    )
    fp8_recipe: Literal["delayed", "tensorwise"] = option("delayed", "FP8 scaling recipe.")
    fp8_amax_history_len: int = option(1024, "FP8 delayed scaling: amax history length.")
    fp8_margin: int = option(0, "FP8 scaling margin.")
    recompute_granularity: Literal["none", "selective", "full"] = option(
        "none",
        "Activation recomputation: selective recomputes core attention; full recomputes whole "
        "layers in backward (the 70B setting), see recompute_method. Exits work with both.",
    )
    recompute_method: Literal["uniform", "block"] = option(
        "uniform",
        "full recompute: uniform = checkpoint every recompute_num_layers layers of each stage; "
        "block = recompute only the first recompute_num_layers layers of each stage.",
    )
    recompute_num_layers: int = option(
        1, "full recompute: layers per checkpoint (uniform) or layers recomputed (block)."
    )

    def validate(self, prefix: str = "model") -> None:
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads"):
            if getattr(self, name) < 1:
                raise ConfigError(
                    f"config key '{prefix}.{name}': expected >= 1, got {getattr(self, name)}"
                )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"config key '{prefix}.hidden_size' ({self.hidden_size}) must be divisible by "
                f"'{prefix}.num_attention_heads' ({self.num_attention_heads}) "
                f"(or set '{prefix}.head_dim')"
            )
        if self.kv_channels < 2 or self.kv_channels % 2:
            key = "head_dim" if self.head_dim is not None else "hidden_size"
            raise ConfigError(
                f"config key '{prefix}.{key}': the head dim ({self.kv_channels}) must be even "
                "for RoPE"
            )
        if self.rope_scaling_factor <= 0:
            raise ConfigError(
                f"config key '{prefix}.rope_scaling_factor': expected > 0, "
                f"got {self.rope_scaling_factor}"
            )
        groups = self.num_query_groups
        if groups is not None and (groups < 1 or self.num_attention_heads % groups):
            raise ConfigError(
                f"config key '{prefix}.num_query_groups' ({groups}) must divide "
                f"'{prefix}.num_attention_heads' ({self.num_attention_heads})"
            )
        if self.fp8 is not None and self.params_dtype == "fp32":
            raise ConfigError(
                f"config key '{prefix}.fp8' needs '{prefix}.params_dtype' bf16 (got fp32)"
            )
        if self.recompute_num_layers < 1:
            raise ConfigError(f"config key '{prefix}.recompute_num_layers': expected >= 1")
        if self.fp8_amax_history_len < 1:
            raise ConfigError(f"config key '{prefix}.fp8_amax_history_len': expected >= 1")

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def kv_channels(self) -> int:
        """Per-head width: head_dim, else hidden_size / num_attention_heads."""
        return (
            self.head_dim
            if self.head_dim is not None
            else self.hidden_size // self.num_attention_heads
        )


@dataclass
class SoftConfig:
    """Sorted fine-tuning: which sub-models (exits) are trained and how their losses combine."""

    mode: Literal["soft", "sft", "ict", "extracted"] = option(
        "soft",
        "soft = train every exit (loss = weighted mean of exit CEs); sft = last layer only "
        "(the paper's baseline; the other exits are still evaluated and logged); ict = the "
        "paper's SFT+ICT baseline (SFT followed by intermediate classifier tuning): freeze the model loaded from checkpoint.load_dir (an SFT "
        "run) and train one separate head (norm + output layer) per early exit, initialised "
        "from the shared head; extracted = fine-tune a model.num_layers-deep model made of the "
        "first layers of the deeper checkpoint in checkpoint.load_dir (the paper's extracted "
        "sub-model baseline).",
    )
    exit_layers: list[int] | None = option(
        None,
        "Exit depths, 1-based layer counts, sorted; must include model.num_layers. "
        "null = every layer. Paper (13B): [12, 16, 20, 24, 28, 32, 36, 40].",
    )
    exit_weights: list[float] | None = option(
        None, "Loss weight per exit (normalised to sum 1); null = equal weights."
    )
    exit_loss: Literal["fused", "recompute", "plain"] = option(
        "fused",
        "How a trained exit's cross-entropy is computed (soft.models.exit_loss): fused = loss "
        "and gradient in the forward, chunk by chunk (no logits kept, nothing recomputed); "
        "recompute = chunks whose logits are recomputed in backward (the head's matmul twice); "
        "plain = autograd keeps the exit's whole logits until backward.",
    )
    loss_chunk_tokens: int = option(
        256,
        "Sequence positions per chunk of an exit's cross-entropy (fused, recompute, and "
        "every measured loss): one chunk's logits [positions x micro batch x vocab/TP] are "
        "alive at a time; 0 = the whole sequence at once.",
    )
    log_untrained_exits: Literal["interval", "every_step", "never"] = option(
        "interval",
        "Exits that do not train (sft: the early ones; ict: the frozen full model) are measured "
        "for logging only: interval = at logging steps (train.log_interval) and in validation, "
        "so other steps cost what a plain step costs; every_step; never (validation only).",
    )

    def validate(self, prefix: str = "soft") -> None:
        if self.loss_chunk_tokens < 0:
            raise ConfigError(f"config key '{prefix}.loss_chunk_tokens': expected >= 0")
