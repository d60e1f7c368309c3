"""Exit losses and SoFT gradients against an independent computation.

Reference: capture every layer's output with plain forward hooks, apply the final RMSNorm and
the output layer by hand, masked cross-entropy with torch.nn.functional, weighted sum, torch
autograd. Tolerances: fp32 on CPU; the two paths differ only in summation order (chunked
vocab-parallel CE vs F.cross_entropy, per-token sums vs mean), so losses agree to ~1e-6
relative and gradients to ~1e-5.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.megatron_env import single_rank_world, tiny_config


def _build(*overrides):
    from soft.data import build_datasets
    from soft.models.build import build_soft_model

    single_rank_world()
    cfg = tiny_config(*overrides)
    train, _, tok = build_datasets(cfg.data, cfg.train.seed)
    model = build_soft_model(
        cfg.model, cfg.parallel, cfg.soft, cfg.exit_plan(), 512, cfg.train.seed
    )
    microbatches = [train.batch([0, 1]), train.batch([2, 3])]
    return cfg, model, microbatches


def _reference_losses(model, microbatches):
    """{layer: mean CE} by hand, with the graph kept for autograd."""
    from soft.training.step import causal_mask

    gpt = model.unwrapped[0]
    captured: dict[int, torch.Tensor] = {}
    handles = [
        layer.register_forward_hook(lambda m, a, out: captured.__setitem__(m.layer_number, out[0]))
        for layer in gpt.decoder.layers
    ]
    for hooks in model.hooks.values():
        hooks.clear_targets()  # the SoFT exit hooks stay out of the reference
    sums = {k: 0.0 for k in model.plan.layers}
    tokens = 0.0
    try:
        for mb in microbatches:
            b, s = mb["tokens"].shape
            pos = torch.arange(s).unsqueeze(0).expand(b, s)
            gpt(mb["tokens"], pos, causal_mask(s, mb["tokens"].device))
            mask = mb["loss_mask"].float()
            for k in model.plan.layers:
                h = gpt.decoder.final_layernorm(captured[k])  # [s, b, h]
                logits = h @ gpt.output_layer.weight.t()
                ce = F.cross_entropy(
                    logits.transpose(0, 1).reshape(b * s, -1),
                    mb["labels"].reshape(-1),
                    reduction="none",
                ).view(b, s)
                sums[k] = sums[k] + (ce * mask).sum()
            tokens += mask.sum().item()
    finally:
        for h in handles:
            h.remove()
    return {k: v / tokens for k, v in sums.items()}


def _grads(model):
    return {n: p.main_grad.detach().clone() for n, p in model.unwrapped[0].named_parameters()}


def _soft_grads(model, microbatches):
    from soft.training.step import _run_schedule, reduce_exit_losses

    for chunk in model.chunks:
        chunk.zero_grad_buffer()
    _run_schedule(model, microbatches, forward_only=False)
    losses, _ = reduce_exit_losses(model)
    return losses, _grads(model)


def _reference_grads(model, microbatches, weights):
    for chunk in model.chunks:
        chunk.zero_grad_buffer()
    ref = _reference_losses(model, microbatches)
    total = sum(w * ref[k] for k, w in weights.items())
    total.backward()
    return {k: v.item() for k, v in ref.items()}, _grads(model)


@pytest.mark.parametrize(
    "overrides",
    [
        ["soft.exit_weights=[1,2,3,4]", "soft.loss_chunk_tokens=0"],
        ["soft.exit_layers=[1,3,4]", "soft.loss_chunk_tokens=7"],  # chunked, uneven last chunk
    ],
)
def test_soft_losses_and_gradients_match_hand_computation(overrides):
    cfg, model, mbs = _build(*overrides)
    plan = model.plan
    losses, grads = _soft_grads(model, mbs)
    ref_losses, ref_grads = _reference_grads(
        model, mbs, dict(zip(plan.layers, plan.weights, strict=True))
    )
    assert set(losses) == set(plan.layers)
    for k in plan.layers:
        assert losses[k] == pytest.approx(ref_losses[k], rel=1e-6), k
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7, msg=name)
    # Every exit contributes: the layer-1 weights get gradient from all exits at or above.
    assert grads["decoder.layers.0.mlp.linear_fc2.weight"].abs().sum() > 0


def test_sft_mode_trains_only_the_last_exit_but_reports_all():
    cfg, model, mbs = _build("soft.mode=sft", "soft.exit_layers=[2,4]")
    losses, grads = _soft_grads(model, mbs)
    ref_losses, ref_grads = _reference_grads(model, mbs, {4: 1.0})
    assert set(losses) == {2, 4}
    assert losses[2] == pytest.approx(ref_losses[2], rel=1e-6)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_chunked_exit_loss_equals_plain_loss_and_gradients():
    """The memory-flat (chunked + recomputed) exit CE equals the one-chunk computation."""
    from soft.models.exits import exit_ce_sum

    single_rank_world()
    torch.manual_seed(0)
    s, b, h, v = 37, 3, 16, 50
    hidden = torch.randn(s, b, h, requires_grad=True)
    norm = torch.nn.RMSNorm(h)
    weight = torch.nn.Parameter(torch.randn(v, h) * 0.1)
    labels = torch.randint(0, v, (s, b))
    mask = (torch.rand(s, b) > 0.3).float()
    results = []
    for chunk in (0, 8):
        for t in (hidden, weight, norm.weight):
            t.grad = None
        loss = exit_ce_sum(hidden, norm, weight, labels, mask, chunk, sequence_parallel=False)
        loss.backward()
        results.append(
            (loss.detach(), hidden.grad.clone(), weight.grad.clone(), norm.weight.grad.clone())
        )
    for a, b_ in zip(*results, strict=True):
        torch.testing.assert_close(a, b_, rtol=1e-6, atol=1e-6)


def test_fp16_loss_scale_applies_to_exit_losses():
    """fp16 with a static loss scale S: the schedule multiplies the main loss by S before
    backward, and every exit's attached loss must be scaled the same way, or early exits would
    be under-weighted by S after the optimizer unscales. main_grad / S equals the fp32 SoFT
    gradients within fp16 precision (10-bit mantissa: rtol 5e-2, atol 2% of the largest)."""
    from soft.training.optim import build_optimizer

    scale = 1024.0
    _, m32, mbs = _build("soft.exit_weights=[1,2,3,4]")
    _, g32 = _soft_grads(m32, mbs)
    cfg16, m16, _ = _build(
        "soft.exit_weights=[1,2,3,4]", "model.params_dtype=fp16", f"train.loss_scale={scale}"
    )
    build_optimizer(m16, cfg16.train, cfg16.model, cfg16.parallel)  # sets config.grad_scale_func
    losses16, g16 = _soft_grads(m16, mbs)
    assert set(losses16) == {1, 2, 3, 4}
    for name, ref in g32.items():
        atol = 2e-2 * float(ref.abs().max())
        torch.testing.assert_close(g16[name].float() / scale, ref, rtol=5e-2, atol=atol, msg=name)


def test_forward_outside_a_step_computes_no_exit_loss():
    """After a training step the hooks hold no targets: a plain forward (generation, a user's
    own evaluation) records nothing and returns the same logits as without hooks."""
    from soft.training.step import causal_mask

    _, model, mbs = _build()
    _soft_grads(model, mbs)
    model.record.clear()
    gpt = model.unwrapped[0]
    tokens = mbs[0]["tokens"][:, :10]
    pos = torch.arange(10).unsqueeze(0).expand(tokens.shape[0], 10)
    with torch.no_grad():
        logits = gpt(tokens, pos, causal_mask(10, tokens.device))
    assert logits.shape[:2] == tokens.shape
    assert model.record.sums == {}
