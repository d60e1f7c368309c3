"""LoRA at one rank on CPU, checked against the same model without adapters.

References: (1) B = 0 at the start: every exit's loss equals the base model's, bitwise (the
update adds exact zeros); (2) with B != 0 the adapted model equals the base model whose
weights are merged, W' = W + (alpha/r) B A, for every exit's loss (fp32, rel 1e-5: the two
differ by the order of a sum) and (3) the adapters' gradients follow from the merged model's
weight gradient G (full fine-tuning's): dL/dB = s G A^T, dL/dA = s B^T G (rtol 1e-4: G comes
from a differently ordered product). Frozen weights get no gradient and no optimizer state.
"""

from __future__ import annotations

import pytest
import torch

from tests.megatron_env import single_rank_world, tiny_config

LORA = ("peft.method=lora", "checkpoint.load_dir=/base", "checkpoint.finetune=true")
TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


def _build(*overrides: str):
    from soft.data import build_datasets
    from soft.training.model import build_soft_model

    single_rank_world()
    cfg = tiny_config(*LORA, *overrides)
    data, _, _ = build_datasets(cfg.data, cfg.train.seed)
    plan = cfg.exit_plan()
    base = build_soft_model(cfg.model, cfg.parallel, cfg.soft, plan, 512, cfg.train.seed)
    lora = build_soft_model(
        cfg.model, cfg.parallel, cfg.soft, plan, 512, cfg.train.seed, peft=cfg.peft
    )
    return cfg, data, base, lora


def _losses_and_grads(model, batch):
    from soft.training.step import _run_schedule, reduce_exit_losses

    for chunk in model.chunks:
        chunk.zero_grad_buffer()
    _run_schedule(model, [batch], torch.ones(()))
    losses, _ = reduce_exit_losses(model)
    grads = {
        n: p.main_grad.detach().clone()
        for n, p in model.unwrapped[0].named_parameters()
        if p.requires_grad
    }
    return losses, grads


def _adapters(model) -> dict[str, torch.nn.Module]:
    return {
        n.removesuffix(".lora"): m
        for n, m in model.unwrapped[0].named_modules()
        if n.endswith(".lora")
    }


def test_only_adapters_train_and_start_as_the_base_model() -> None:
    cfg, data, base, lora = _build()
    trainable = [n for n, p in lora.unwrapped[0].named_parameters() if p.requires_grad]
    assert trainable and all(".lora." in n for n in trainable)
    assert len(trainable) == 2 * len(TARGETS) * cfg.model.num_layers
    # The optimizer sees only what trains (megatron-core's param groups skip frozen params).
    from soft.training.optim import build_optimizer

    optimizer = build_optimizer(lora, cfg.train, cfg.model, cfg.parallel)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in lora.unwrapped[0].parameters() if p.requires_grad}
    batch = data.batch([0, 1])
    base_losses, _ = _losses_and_grads(base, batch)
    lora_losses, grads = _losses_and_grads(lora, batch)
    assert lora_losses == base_losses  # B = 0: exact zeros added
    # Frozen weights, the heads read by the fused exit loss included, get no gradient at all
    # (no main_grad buffer from DDP, nothing accumulated in .grad).
    for name, p in lora.unwrapped[0].named_parameters():
        if not p.requires_grad:
            assert p.grad is None and getattr(p, "main_grad", None) is None, name
    # B = 0 gives A no gradient yet; B's is nonzero for every adapter (every exit reaches it).
    for name in trainable:
        nonzero = grads[name].abs().sum() > 0
        assert nonzero == name.endswith(".b"), name


@pytest.mark.parametrize(
    "overrides",
    [
        (),
        (
            "soft.exit_layers=[1,3,4]",
            "peft.layers=[1,3]",
            "peft.target_modules=[linear_qkv,linear_fc2]",
        ),
    ],
)
def test_adapted_model_equals_merged_weights(overrides) -> None:
    cfg, data, base, lora = _build(*overrides)
    adapters = _adapters(lora)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for adapter in adapters.values():
            adapter.b.copy_(torch.randn(adapter.b.shape, generator=gen) * 0.05)
        # The base model with merged weights: W' = W + s B A.
        base_params = dict(base.unwrapped[0].named_parameters())
        for name, adapter in adapters.items():
            weight = base_params[f"{name}.weight"]
            weight.add_(adapter.scale * adapter.b @ adapter.a)
    batch = data.batch([0, 1])
    merged_losses, merged_grads = _losses_and_grads(base, batch)
    lora_losses, lora_grads = _losses_and_grads(lora, batch)
    assert set(lora_losses) == set(lora.plan.layers)
    for k, loss in merged_losses.items():
        assert lora_losses[k] == pytest.approx(loss, rel=1e-5), k
    assert len(adapters) == (len(TARGETS) * 4 if not overrides else 2 * 2)
    for name, adapter in adapters.items():
        g = merged_grads[f"{name}.weight"]
        torch.testing.assert_close(
            lora_grads[f"{name}.lora.b"], adapter.scale * g @ adapter.a.T, rtol=1e-4, atol=1e-7
        )
        torch.testing.assert_close(
            lora_grads[f"{name}.lora.a"], adapter.scale * adapter.b.T @ g, rtol=1e-4, atol=1e-7
        )
        assert lora_grads[f"{name}.lora.a"].abs().sum() > 0


def test_train_final_norm_trains_the_norm_and_its_exit_copies() -> None:
    from soft.models.heads import head_copies

    cfg, _, _, lora = _build("peft.train_final_norm=true")
    names = [n for n, p in lora.unwrapped[0].named_parameters() if p.requires_grad]
    assert "decoder.final_layernorm.weight" in names
    assert not any("output_layer" in n or "embedding" in n for n in names)
    copies = head_copies(lora.unwrapped)
    assert copies.norm and not copies.matrix


def test_initial_adapters_follow_peft_and_do_not_depend_on_the_layout() -> None:
    """A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming_uniform(a=sqrt(5))), B = 0; values drawn
    per checkpoint key and layer (the TP2xPP2 comparison is in the multirank layout tests)."""
    cfg, _, _, lora = _build()
    _, _, _, again = _build()
    for (name, a), (_, b) in zip(_adapters(lora).items(), _adapters(again).items(), strict=True):
        assert torch.equal(a.a, b.a), name
        assert torch.count_nonzero(a.b) == 0
        bound = 1 / a.a.shape[1] ** 0.5
        assert a.a.abs().max() <= bound and a.a.abs().max() > 0.8 * bound
    layers = [n.split(".")[2] for n in _adapters(lora)]
    firsts = [a.a for n, a in _adapters(lora).items() if n.endswith("linear_qkv")]
    assert not torch.equal(firsts[0], firsts[1]) and len(set(layers)) == cfg.model.num_layers


def test_full_recompute_keeps_every_adapters_gradient() -> None:
    """The frozen embedding's output gets requires_grad: without it megatron-core's checkpointed
    first segment has no input needing a gradient and its adapters would get none (checked:
    with the hook removed, layer 1's adapters get zero gradient)."""
    recompute = (
        "model.recompute_granularity=full",
        "model.recompute_method=uniform",
        "model.recompute_num_layers=1",
    )
    _, data, _, plain = _build()
    _, _, _, checkpointed = _build(*recompute)
    for model in (plain, checkpointed):
        for adapter in _adapters(model).values():
            with torch.no_grad():
                adapter.b.fill_(0.01)
    batch = data.batch([0, 1])
    want_losses, want = _losses_and_grads(plain, batch)
    got_losses, got = _losses_and_grads(checkpointed, batch)
    assert got_losses == pytest.approx(want_losses, rel=1e-6)
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-8, msg=name)
    assert got["decoder.layers.0.self_attention.linear_qkv.lora.a"].abs().sum() > 0


def test_bf16_base_stays_as_stored_and_only_adapters_get_fp32_copies() -> None:
    """model.params_dtype=bf16: every weight (adapters too) is bf16 in the model; the mixed
    precision optimizer keeps fp32 main copies and Adam state of the adapters only."""
    from soft.training.optim import build_optimizer

    cfg, _, _, lora = _build("model.params_dtype=bf16")
    params = list(lora.unwrapped[0].parameters())
    assert {p.dtype for p in params} == {torch.bfloat16}
    optimizer = build_optimizer(lora, cfg.train, cfg.model, cfg.parallel)
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    mains = [p for opt in inner for group in opt.fp32_from_float16_groups for p in group]
    trainable = [p for p in params if p.requires_grad]
    assert len(mains) == len(trainable) and all(m.dtype == torch.float32 for m in mains)
    assert sum(m.numel() for m in mains) == sum(p.numel() for p in trainable)
    assert sum(p.numel() for p in trainable) < sum(p.numel() for p in params) / 4
