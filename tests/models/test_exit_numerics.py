"""Exit losses and SoFT gradients against an independent computation.

Reference: capture every layer's output with plain forward hooks, apply the final RMSNorm and
the output layer by hand, masked cross-entropy with torch.nn.functional, weighted sum, torch
autograd. Tolerances: fp32 on CPU; the two paths differ only in summation order (chunked
vocab-parallel CE vs F.cross_entropy, per-token sums vs mean), so losses agree to ~1e-6
relative and gradients to ~1e-5.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from tests.megatron_env import single_rank_world, tiny_config


def _build(*overrides):
    from soft.data import build_datasets
    from soft.training.model import build_soft_model

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
    for hooks in model.hooks:
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


def _soft_grads(model, microbatches, loss_scale=None):
    """One SoFT forward/backward; `loss_scale` as the training step passes it (default 1)."""
    from soft.training.step import _run_schedule, reduce_exit_losses

    for chunk in model.chunks:
        chunk.zero_grad_buffer()
    _run_schedule(model, microbatches, torch.ones(()) if loss_scale is None else loss_scale)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_exit_loss_implementation_gives_the_same_loss_and_gradients(dtype):
    """fused (gradients in forward, chunked), recompute (chunked, recomputed in backward) and
    plain (whole logits) on one exit: same loss and gradients of the hidden state, the norm and
    the head weight, with an uneven last chunk and a gradient scale of 3 (as w_k x the loss
    scale). fp32: rel 1e-5 (summation order); bf16: the matmuls round to 8 bits, rel 2e-2."""
    from soft.models.exits import exit_ce_sum
    from soft.models.heads import HeadRef

    single_rank_world()
    torch.manual_seed(0)
    s, b, h, v = 37, 3, 16, 50
    hidden = torch.randn(s, b, h, dtype=dtype, requires_grad=True)
    norm = torch.nn.RMSNorm(h, dtype=dtype)
    output = torch.nn.Linear(h, v, bias=False, dtype=dtype)
    with torch.no_grad():
        output.weight.mul_(3.0)
    labels = torch.randint(0, v, (s, b))
    mask = (torch.rand(s, b) > 0.3).float()
    scale = torch.tensor(3.0)
    results = {}
    for impl, chunk in (("plain", 0), ("recompute", 8), ("fused", 8), ("fused", 0)):
        for t in (hidden, output.weight, norm.weight):
            t.grad = None
        loss = exit_ce_sum(
            hidden, HeadRef(norm, output.weight), labels, mask,
            chunk_tokens=chunk, sequence_parallel=False, impl=impl, scale=scale,
        )  # fmt: skip
        (loss * scale).backward() if impl != "fused" else loss.backward(scale)
        results[(impl, chunk)] = [
            loss.detach().float(),
            *(t.grad.float().clone() for t in (hidden, output.weight, norm.weight)),
        ]
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    reference = results[("plain", 0)]
    for key, got in results.items():
        for name, a, b_ in zip(("loss", "hidden", "weight", "norm"), got, reference, strict=True):
            scale_ = float(b_.abs().max())
            torch.testing.assert_close(
                a, b_, rtol=tol["rtol"], atol=tol["atol"] * max(scale_, 1.0), msg=f"{key} {name}"
            )


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
    # The optimizer scales the main loss (config.grad_scale_func); train_step passes its loss
    # scale to the exits.
    optimizer = build_optimizer(m16, cfg16.train, cfg16.model, cfg16.parallel)
    losses16, g16 = _soft_grads(m16, mbs, optimizer.get_loss_scale().reshape(()))
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
    model.tallies.clear()
    gpt = model.unwrapped[0]
    tokens = mbs[0]["tokens"][:, :10]
    pos = torch.arange(10).unsqueeze(0).expand(tokens.shape[0], 10)
    with torch.no_grad():
        logits = gpt(tokens, pos, causal_mask(10, tokens.device))
    assert logits.shape[:2] == tokens.shape
    assert model.tallies.sums == {}


@pytest.mark.parametrize(
    "recompute",
    [
        ["model.recompute_granularity=selective"],
        ["model.recompute_granularity=full", "model.recompute_method=uniform"],
        [
            "model.recompute_granularity=full",
            "model.recompute_method=uniform",
            "model.recompute_num_layers=2",
        ],
        [
            "model.recompute_granularity=full",
            "model.recompute_method=block",
            "model.recompute_num_layers=3",
        ],
    ],
    ids=["selective", "full-uniform-1", "full-uniform-2", "full-block-3"],
)
def test_activation_recompute_keeps_every_exit_loss_and_gradient(recompute):
    """With full recompute the exit layers first run without autograd; their losses must still
    be tallied once and backpropagated in the rerun. Same losses and gradients as without
    recompute (fp32: rel 1e-6 / atol 1e-7, the reruns are the same arithmetic)."""
    _, plain, mbs = _build("soft.exit_weights=[1,2,3,4]")
    ref_losses, ref_grads = _soft_grads(plain, mbs)
    _, model, _ = _build("soft.exit_weights=[1,2,3,4]", *recompute)
    losses, grads = _soft_grads(model, mbs)
    assert losses == pytest.approx(ref_losses, rel=1e-6)
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-6, atol=1e-7, msg=name)
    assert any(float(g.abs().max()) > 0 for n, g in grads.items() if "layers" in n)


def test_exits_cost_no_host_sync():
    """The exits add no device-to-host transfer. Counted on CPU as the calls that would sync on
    a GPU (Tensor.item / tolist / float() / int() / bool()): a training step makes the same
    number whatever the number of exits and microbatches, and the project's own code makes
    exactly one (the step's loss table); the rest is megatron-core and torch's Adam."""
    from soft.data import build_datasets
    from soft.training.optim import build_optimizer, build_scheduler
    from soft.training.step import train_step

    totals, ours = [], []
    for exits, n_micro in (("[4]", 1), ("[1,2,3,4]", 1), ("[1,2,3,4]", 4)):
        cfg, model, _ = _build(f"soft.exit_layers={exits}")
        optimizer = build_optimizer(model, cfg.train, cfg.model, cfg.parallel)
        scheduler = build_scheduler(optimizer, cfg.train)
        train, _, _ = build_datasets(cfg.data, cfg.train.seed)
        mbs = [train.batch([2 * i, 2 * i + 1]) for i in range(n_micro)]
        train_step(model, optimizer, scheduler, mbs)  # warm-up (lazy inits)
        with _CountHostReads() as callers:
            train_step(model, optimizer, scheduler, mbs)
        totals.append(len(callers))
        ours.append(sorted(c for c in callers if _is_ours(c)))
    assert totals[0] == totals[1] == totals[2], totals
    assert all(o == ours[0] for o in ours) and len(ours[0]) == 1, ours
    assert ours[0][0].endswith("soft/training/step.py: reduce_exit_losses")


def _is_ours(caller: str) -> bool:
    """The project's package, not soft/compat (by path: a checkout folder may be named soft
    too, with megatron-core under its .venv)."""
    import soft

    package = os.path.dirname(soft.__file__) + os.sep
    return caller.startswith(package) and not caller.startswith(package + "compat" + os.sep)


class _CountHostReads:
    """Records the calling function of every host read (the CPU compat layer's torch-function
    mode sees each call a second time: those are not counted)."""

    NAMES = ("item", "tolist", "__float__", "__int__", "__bool__")

    def __enter__(self) -> list[str]:
        import sys

        self.callers: list[str] = []
        self.saved = {n: getattr(torch.Tensor, n) for n in self.NAMES}
        callers = self.callers

        def counting(original):
            def wrapper(*args, **kwargs):
                frame = sys._getframe(1)
                if not frame.f_code.co_filename.endswith("megatron_cpu.py"):
                    callers.append(f"{frame.f_code.co_filename}: {frame.f_code.co_name}")
                return original(*args, **kwargs)

            return wrapper

        for name, original in self.saved.items():
            setattr(torch.Tensor, name, counting(original))
        return self.callers

    def __exit__(self, *exc):
        for name, original in self.saved.items():
            setattr(torch.Tensor, name, original)
        return False
