"""Transformer Engine layer spec on a GPU: same numbers as the local spec (BF16), and FP8 close.

Both specs are built with the same layout-invariant init, which keys every tensor by its
checkpoint key. The keys are the same for the two specs except the norms, which TE fuses
into the following linear layer (`input_layernorm.weight` is `linear_qkv.layer_norm_weight`);
norms start at ones either way, so the two models start with identical weights.
Skipped on CPU and without TE (scripts/gpu/README.md installs TE on the GPU machine).
"""

from __future__ import annotations

import pytest
import torch

from tests.gpu import GPU_TE_MARKS, HAVE_GPU_TE
from tests.megatron_env import single_rank_world, tiny_config

pytestmark = GPU_TE_MARKS

VOCAB = 512
# Local-spec parameter name -> TE-spec name; every other parameter has the same name in both.
TE_NAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


def _fp8_capable() -> bool:
    return HAVE_GPU_TE and torch.cuda.get_device_capability() >= (8, 9)


def _build(impl: str, *overrides: str) -> torch.nn.Module:
    from soft.models.gpt import build_stage_model, layout_invariant_init, transformer_config

    single_rank_world()
    cfg = tiny_config("model.params_dtype=bf16", f"model.transformer_impl={impl}", *overrides)
    config = transformer_config(cfg.model, cfg.parallel)
    chunk = build_stage_model(cfg.model, config, VOCAB, pre_process=True, post_process=True).cuda()
    layout_invariant_init([chunk], seed=42, model=cfg.model)
    return chunk


def _batch(seed: int = 0, b: int = 2, s: int = 64):
    from soft.training.step import causal_mask

    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (b, s), generator=gen).cuda()
    labels = torch.randint(0, VOCAB, (b, s), generator=gen).cuda()
    positions = torch.arange(s, device="cuda").unsqueeze(0).expand(b, s)
    return tokens, labels, positions, causal_mask(s, tokens.device)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def _te_name(local: str) -> str:
    for old, new in TE_NAMES.items():
        if local.endswith(old):
            return local[: -len(old)] + new
    return local


def _forward_backward(chunk: torch.nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    tokens, labels, positions, mask = batch
    chunk.zero_grad(set_to_none=True)
    logits = chunk(tokens, positions, mask)  # no labels: [b, s, V]
    loss = chunk(tokens, positions, mask, labels=labels).float().mean()  # per-token CE
    loss.backward()
    return logits.detach().float(), loss.detach()


# The family switches in both specs: LLaMA-2 (none), Qwen2-like (q/k/v biases, tied head),
# Qwen3-like (q/k norms, head_dim that is not hidden/heads, llama3 RoPE scaling).
FAMILY_SWITCHES = {
    "llama2": (),
    "qwen2_tied": ("model.qkv_bias=true", "model.tie_word_embeddings=true"),
    "qwen3_like": (
        "model.qk_layernorm=true", "model.head_dim=24", "model.rope_scaling=llama3",
        "model.num_query_groups=2",
    ),
}  # fmt: skip


@pytest.mark.parametrize("family", FAMILY_SWITCHES)
def test_te_spec_matches_local_spec_in_bf16(family):
    switches = FAMILY_SWITCHES[family]
    local, te = _build("local", *switches), _build("transformer_engine", *switches)
    local_params = dict(local.named_parameters())
    te_params = dict(te.named_parameters())
    assert {_te_name(n) for n in local_params} == set(te_params), "parameter sets differ"
    for name, p in local_params.items():
        assert torch.equal(p, te_params[_te_name(name)]), f"init differs for {name}"

    batch = _batch()
    local_logits, local_loss = _forward_backward(local, batch)
    te_logits, te_loss = _forward_backward(te, batch)
    # BF16 with different kernels (fused attention, fused norm+linear): ~1e-2 relative.
    assert _rel(te_logits, local_logits) < 2e-2
    assert abs(te_loss.item() - local_loss.item()) < 1e-2 * local_loss.item()
    for name, p in local_params.items():
        other = te_params[_te_name(name)]
        assert other.grad is not None and torch.isfinite(other.grad).all(), name
        assert _rel(other.grad, p.grad) < 5e-2, f"grad of {name}"


@pytest.mark.skipif(not _fp8_capable(), reason="FP8 needs compute capability >= 8.9 (Ada/Hopper)")
@pytest.mark.parametrize("recipe", ["tensorwise", "delayed"])
def test_fp8_forward_runs_and_is_close_to_bf16(recipe):
    bf16 = _build("transformer_engine")
    fp8 = _build("transformer_engine", "model.fp8=hybrid", f"model.fp8_recipe={recipe}")
    batch = _batch()
    # Delayed scaling starts from scale 1 and learns amax from earlier steps: warm it up
    # (forward + backward, no optimizer step, so the weights stay equal to the BF16 model's).
    for _ in range(3):
        _forward_backward(fp8, batch)
    ref_logits, ref_loss = _forward_backward(bf16, batch)
    logits, loss = _forward_backward(fp8, batch)
    assert torch.isfinite(logits).all() and torch.isfinite(loss)
    # E4M3 keeps ~3 mantissa bits: per-element error ~6%, averaged down over the GEMMs.
    assert _rel(logits, ref_logits) < 0.1
    assert abs(loss.item() - ref_loss.item()) < 0.05 * ref_loss.item()
