"""Build one pipeline stage (or virtual chunk) of the LLaMA-shaped megatron-core GPTModel.

Parallelism and precision are TransformerConfig fields; the model itself is never patched.
The model families (LLaMA-2/3, Mistral, Qwen2/2.5, Qwen3) are feature switches of ModelConfig
mapped to megatron-core's own fields (`family_features`, `gpt_model_features`).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)

from soft.config.errors import ConfigError
from soft.models.config import ModelConfig

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def transformer_engine_available() -> bool:
    try:
        from megatron.core.extensions.transformer_engine import HAVE_TE  # noqa: F401
        from megatron.core.models.gpt.gpt_layer_specs import HAVE_TE as SPEC_HAS_TE
    except (ImportError, RuntimeError):
        return False
    return bool(SPEC_HAS_TE)


def use_transformer_engine(model: ModelConfig) -> bool:
    """Resolve `model.transformer_impl`; FP8 without TE or a GPU is an error, never silent."""
    te_ok = transformer_engine_available() and torch.cuda.is_available()
    if model.transformer_impl == "transformer_engine" and not te_ok:
        raise ConfigError(
            "config key 'model.transformer_impl' is 'transformer_engine' but Transformer Engine "
            "is not importable or no CUDA GPU is present (install the 'gpu' extra on a GPU machine)"
        )
    if model.fp8 is not None and not te_ok:
        raise ConfigError(
            f"config key 'model.fp8' is '{model.fp8}' but FP8 needs Transformer Engine and a CUDA "
            "GPU; set model.fp8=null on this machine"
        )
    if model.fp8 is not None and model.transformer_impl == "local":
        raise ConfigError(
            "config key 'model.fp8' needs model.transformer_impl auto or transformer_engine"
        )
    return model.transformer_impl == "transformer_engine" or (
        model.transformer_impl == "auto" and te_ok
    )


def check_runtime_support(model: ModelConfig) -> bool:
    """Choices the config alone cannot validate (they depend on TE and the GPU). Returns
    whether the Transformer Engine spec is used."""
    return use_transformer_engine(model)


def padded_vocab_size(vocab_size: int, model: ModelConfig, tp: int) -> int:
    multiple = model.make_vocab_size_divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def family_features(model: ModelConfig) -> dict[str, Any]:
    """The TransformerConfig fields that tell the model families apart (Megatron-Bridge's
    per-family provider settings): biases on q/k/v only (Qwen2), RMSNorm on q and k heads
    (Qwen3). The head width is `kv_channels`; tied embeddings and RoPE scaling are GPTModel
    arguments (`gpt_model_features`)."""
    return dict(add_qkv_bias=model.qkv_bias, qk_layernorm=model.qk_layernorm)


def gpt_model_features(model: ModelConfig) -> dict[str, Any]:
    """GPTModel's family arguments: the tied LM head and Llama-3's RoPE scaling (megatron-core's
    own: `RotaryEmbedding._apply_scaling`, the HF `llama3` formula with low/high frequency
    factors 1 and 4 and original context 8192 fixed, only the factor passed; the conversion
    refuses other values, tests/models/test_rope_scaling.py proves the match)."""
    return dict(
        share_embeddings_and_output_weights=model.tie_word_embeddings,
        rope_scaling=model.rope_scaling == "llama3",
        rope_scaling_factor=model.rope_scaling_factor,
    )


def model_fields(model: ModelConfig) -> dict[str, Any]:
    """The model's TransformerConfig fields: shape, family switches, precision, recompute, FP8
    and the kernels this device can run (the parallel layout's are ParallelConfig's; the two
    are composed by soft.training.model.transformer_config)."""
    on_gpu = torch.cuda.is_available()
    dtype = _DTYPES[model.params_dtype]
    kwargs: dict[str, Any] = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=model.params_dtype == "bf16",
        fp16=model.params_dtype == "fp16",
        # Exit losses are summed per token; finalize_model_grads divides by the global count.
        calculate_per_token_loss=True,
        use_cpu_initialization=not on_gpu,
        # Fused kernels are CUDA-only; on GPUs megatron-core's defaults stay.
        gradient_accumulation_fusion=False,
        bias_activation_fusion=on_gpu,
        masked_softmax_fusion=on_gpu,
        persist_layer_norm=on_gpu,
        bias_dropout_fusion=on_gpu,
        apply_rope_fusion=False,
        **family_features(model),
    )
    if model.recompute_granularity == "selective":
        kwargs["recompute_granularity"] = "selective"
    elif model.recompute_granularity == "full":
        kwargs.update(
            recompute_granularity="full",
            recompute_method=model.recompute_method,
            recompute_num_layers=model.recompute_num_layers,
        )
    if model.fp8 is not None:
        kwargs.update(
            fp8=model.fp8,
            fp8_recipe=model.fp8_recipe,
            fp8_amax_history_len=model.fp8_amax_history_len,
            fp8_margin=model.fp8_margin,
        )
    return kwargs


class LocalRMSNorm(torch.nn.RMSNorm):
    """The local spec's norm (megatron-core's WrappedTorchNorm builds a plain torch.nn.RMSNorm),
    made usable with sequence parallelism. Each TP rank then normalises its own sequence shard,
    so the weight's gradient is partial per rank; marking the weight `sequence_parallel` makes
    megatron-core's finalize_model_grads sum it over TP (finalize_model_grads.py:354), exactly
    as Transformer Engine's norms are marked. WrappedTorchNorm asserts instead."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__(hidden_size, eps=eps)
        if config.sequence_parallel:
            self.weight.sequence_parallel = True


def stage_spec(model: ModelConfig, config: TransformerConfig, vp_stage: int | None):
    """Transformer Engine's layer spec, or megatron-core's local spec with LocalRMSNorm for
    every norm (the layers' and the block's final one; shared-head replicas reuse the latter)."""
    if use_transformer_engine(model):
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=model.qk_layernorm)
    layer = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=model.qk_layernorm)
    layer.submodules.input_layernorm = LocalRMSNorm
    layer.submodules.pre_mlp_layernorm = LocalRMSNorm
    if model.qk_layernorm:  # per head: megatron-core sums their gradients over TP by name
        attention = layer.submodules.self_attention.submodules
        attention.q_layernorm = attention.k_layernorm = LocalRMSNorm
    return TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(config, vp_stage=vp_stage),
        layer_norm=LocalRMSNorm,
    )


def build_stage_model(
    model: ModelConfig,
    config: TransformerConfig,
    vocab_size: int,
    pre_process: bool,
    post_process: bool,
    vp_stage: int | None = None,
) -> GPTModel:
    """One pipeline stage (or virtual chunk): Megatron-Bridge's `provide(pre, post)`."""
    return GPTModel(
        config=config,
        transformer_layer_spec=stage_spec(model, config, vp_stage),
        vocab_size=vocab_size,
        max_sequence_length=model.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        position_embedding_type="rope",
        rotary_base=model.rotary_base,
        vp_stage=vp_stage,
        **gpt_model_features(model),
    )


# ---------------------------------------------------------------------------------------------
# Layout-invariant random init.
#
# megatron-core's CPU init draws each stage's weights from one RNG stream, so a layer's weights
# depend on the pipeline layout. Parallel runs are checked against a single-rank run, so we
# re-draw every tensor from a generator keyed by its checkpoint key (which names the global
# layer) and copy out this rank's shard. Runs that start from HF weights overwrite all of it.


def _init_std(key: str, model: ModelConfig) -> float | None:
    """None = ones (norm weights); else the normal std megatron-core uses for this tensor (0:
    biases start at zero, as megatron-core's)."""
    if "layernorm" in key or "layer_norm" in key:
        return None
    if key.endswith(".bias"):
        return 0.0
    if key.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return model.init_method_std / (2.0 * model.num_layers) ** 0.5
    return model.init_method_std


def _fill_shard(sh: ShardedTensor, seed: int, model: ModelConfig) -> None:
    std = _init_std(sh.key, model)
    if std is None:
        fill_shard(sh, seed, lambda shape, gen: torch.ones(shape))
    else:
        fill_shard(sh, seed, lambda shape, gen: torch.randn(shape, generator=gen) * std)


def fill_shard(
    sh: ShardedTensor, seed: int, draw: Callable[[tuple[int, ...], torch.Generator], torch.Tensor]
) -> None:
    """Copy this rank's shard of the full tensor `draw` makes from a generator keyed by the
    checkpoint key and global layer: the same values at any layout."""
    n_pre = sh.prepend_axis_num
    tag = f"{sh.key}@{tuple(sh.global_offset[:n_pre])}"
    shape = tuple(sh.global_shape[n_pre:])
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(tag.encode()))
    full = draw(shape, gen)
    index = tuple(
        slice(off, off + size)
        for off, size in zip(sh.global_offset[n_pre:], sh.data.shape, strict=True)
    )
    with torch.no_grad():
        sh.data.copy_(full[index].to(sh.data.dtype))


def walk_leaves(tree: Any):
    """The leaves of a nested (sharded) state dict: dict values and list/tuple items."""
    if isinstance(tree, dict):
        for v in tree.values():
            yield from walk_leaves(v)
    elif isinstance(tree, list | tuple):
        for v in tree:
            yield from walk_leaves(v)
    else:
        yield tree


def layout_invariant_init(chunks: list[torch.nn.Module], seed: int, model: ModelConfig) -> None:
    for chunk in chunks:
        for item in walk_leaves(chunk.sharded_state_dict()):
            if isinstance(item, ShardedTensorFactory):
                for sub in walk_leaves(item.build()):
                    _fill_shard(sub, seed, model)
            elif isinstance(item, ShardedTensor) and item.data.is_floating_point():
                _fill_shard(item, seed, model)
