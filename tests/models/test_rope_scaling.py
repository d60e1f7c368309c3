"""Llama-3 RoPE scaling: megatron-core's own implementation equals transformers' `llama3`.

megatron-core 0.16.1 scales RoPE frequencies in `RotaryEmbedding._apply_scaling` (adapted from
transformers) with only the factor passed through GPTModel; the low/high frequency factors and
the original context are its defaults. The import accepts exactly those
(`soft.models.config.LLAMA3_ROPE_FIXED`) and refuses others. Here both frequency tables and
the cos/sin they produce, up to beyond the original context (where scaling matters), are
compared with transformers' `ROPE_INIT_FUNCTIONS["llama3"]` and `LlamaRotaryEmbedding`, for
Llama-3.1-8B's and Llama-3.2's real values and for odd ones. Both compute in fp32 with the
same operations in the same order, so they are required to be bit-identical (they are).
"""

from __future__ import annotations

import inspect

import pytest
import torch

from soft.models.config import LLAMA3_ROPE_FIXED

CASES = {
    # head dim, rope_theta, factor
    "llama3.1-8b": (128, 500000, 8.0),
    "llama3.2-1b": (64, 500000, 32.0),
    "llama3.2-3b": (128, 500000, 32.0),
    "odd": (18, 123457, 3.7),
    "odd-small-factor": (10, 10000, 1.5),
}


def _megatron_rope(head_dim: int, theta: int, factor: float):
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    return RotaryEmbedding(
        kv_channels=head_dim,
        rotary_percent=1.0,
        rotary_base=theta,
        rope_scaling=True,
        rope_scaling_factor=factor,
        use_cpu_initialization=True,
    )


def _hf_config(head_dim: int, theta: int, factor: float):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=head_dim * 4,
        num_attention_heads=4,
        head_dim=head_dim,
        max_position_embeddings=131072,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": float(theta),
            "factor": factor,
            **LLAMA3_ROPE_FIXED,
        },
    )


def test_the_fixed_values_are_megatron_cores_defaults():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    params = inspect.signature(RotaryEmbedding._apply_scaling).parameters
    assert {name: params[name].default for name in LLAMA3_ROPE_FIXED} == LLAMA3_ROPE_FIXED
    # GPTModel hands RotaryEmbedding the factor only (so the others cannot be passed through)
    assert "low_freq_factor" not in inspect.signature(RotaryEmbedding.__init__).parameters


@pytest.mark.parametrize("case", CASES)
def test_inverse_frequencies_equal_transformers(case):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    head_dim, theta, factor = CASES[case]
    hf_inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS["llama3"](
        _hf_config(head_dim, theta, factor), torch.device("cpu")
    )
    megatron = _megatron_rope(head_dim, theta, factor).inv_freq
    assert attention_scaling == 1.0  # llama3 scales frequencies only
    assert megatron.dtype == hf_inv_freq.dtype == torch.float32
    torch.testing.assert_close(megatron, hf_inv_freq, rtol=0, atol=0)
    unscaled = _megatron_rope(head_dim, theta, 1.0).inv_freq
    assert not torch.equal(megatron, unscaled) or factor == 1.0  # the scaling did something


@pytest.mark.parametrize("case", CASES)
def test_cos_sin_equal_transformers_beyond_the_original_context(case):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    head_dim, theta, factor = CASES[case]
    positions = torch.cat([torch.arange(0, 64), torch.arange(8100, 8300), torch.tensor([65535])])
    hf = LlamaRotaryEmbedding(_hf_config(head_dim, theta, factor))
    x = torch.zeros(1, len(positions), head_dim)
    hf_cos, hf_sin = hf(x, positions[None])
    table = _megatron_rope(head_dim, theta, factor).get_freqs_non_repeated(int(positions[-1]) + 1)
    freqs = table[positions]
    # megatron-core's rotate-half layout (rotary_interleaved=False, its get_emb) repeats the
    # frequencies as HF does: emb = cat(freqs, freqs); apply_rotary_pos_emb takes cos/sin of it
    emb = torch.cat([freqs, freqs], dim=-1)
    torch.testing.assert_close(torch.cos(emb), hf_cos[0], rtol=0, atol=0)
    torch.testing.assert_close(torch.sin(emb), hf_sin[0], rtol=0, atol=0)
