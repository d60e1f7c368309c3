"""LoRA on the Transformer Engine spec (GPU): adapters on TE's fused norm+linear layers read
the norm's output (return_layernorm_output), so the adapted TE model equals the adapted local
model (bf16, the TE-vs-local tolerances of tests/models/test_te_spec_gpu.py), and its adapter
gradients agree. Skipped on CPU and without TE."""

from __future__ import annotations

import torch

from tests.gpu import GPU_TE_MARKS
from tests.megatron_env import single_rank_world, tiny_config
from tests.models.test_te_spec_gpu import (
    VOCAB,
    _batch,
    _forward_backward,
    _rel,
)

pytestmark = GPU_TE_MARKS
LORA = ("peft.method=lora", "peft.rank=8", "checkpoint.load_dir=/base", "checkpoint.finetune=true")


def _build_adapted(impl: str) -> torch.nn.Module:
    from soft.models.gpt import build_stage_model, layout_invariant_init, transformer_config
    from soft.peft.lora import apply_lora

    single_rank_world()
    cfg = tiny_config("model.params_dtype=bf16", f"model.transformer_impl={impl}", *LORA)
    config = transformer_config(cfg.model, cfg.parallel)
    chunk = build_stage_model(cfg.model, config, VOCAB, pre_process=True, post_process=True).cuda()
    layout_invariant_init([chunk], seed=42, model=cfg.model)
    apply_lora([chunk], cfg.peft, seed=42)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in sorted(chunk.named_parameters()):
            if name.endswith(".lora.b"):
                p.copy_(torch.randn(p.shape, generator=gen).to(p) * 0.05)
    return chunk


def test_lora_on_te_fused_layers_matches_the_local_spec():
    local, te = _build_adapted("local"), _build_adapted("transformer_engine")
    batch = _batch()
    local_logits, local_loss = _forward_backward(local, batch)
    te_logits, te_loss = _forward_backward(te, batch)
    assert _rel(te_logits, local_logits) < 2e-2
    assert abs(te_loss.item() - local_loss.item()) < 1e-2 * local_loss.item()
    te_params = dict(te.named_parameters())
    adapters = [n for n, p in local.named_parameters() if ".lora." in n]
    assert adapters and all(te_params[n].requires_grad for n in adapters)
    for name in adapters:
        got, want = te_params[name].grad, dict(local.named_parameters())[name].grad
        assert got is not None and want is not None, name
        assert _rel(got, want) < 5e-2, f"grad of {name}"
    frozen = [n for n, p in te.named_parameters() if ".lora." not in n]
    assert all(te_params[n].grad is None for n in frozen)
