"""Model FLOPs (Megatron's counting: matmuls only, full causal score matrix) plus exit heads."""

from __future__ import annotations

from soft.models.config import ModelConfig

# Dense BF16 peak per device, for MFU (FP8 runs are still reported against the BF16 peak,
# as NeMo's and Megatron's MFU figures are).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def forward_flops_per_token(
    model: ModelConfig, seq_length: int, vocab_size: int, num_heads_evaluated: int
) -> float:
    h, f, L = model.hidden_size, model.ffn_hidden_size, model.num_layers
    q = model.num_attention_heads * model.kv_channels  # = h unless head_dim is set (Qwen3)
    kv = model.query_groups * model.kv_channels
    per_layer = (
        2 * h * (q + 2 * kv)  # QKV projection (grouped-query aware)
        + 2 * 2 * seq_length * q  # scores and weighted values
        + 2 * q * h  # output projection
        + 2 * 3 * h * f  # SwiGLU: gate, up, down
    )
    return L * per_layer + num_heads_evaluated * 2 * h * vocab_size


def train_flops_per_token(
    model: ModelConfig, seq_length: int, vocab_size: int, num_exits_trained: int
) -> float:
    """Forward + backward (3x forward). Each trained exit adds 6*h*V per token."""
    return 3 * forward_flops_per_token(model, seq_length, vocab_size, num_exits_trained)


def device_peak_tflops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
