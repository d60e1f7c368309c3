"""Packed batches (data.packing) against the same examples unpacked, at one rank on CPU.

Tolerances (fp32): the two runs differ only in where an example sits in its sequence (RoPE's
cos/sin evaluated at other absolute positions, equal relative ones) and in summation order,
so every exit's loss agrees to rel 1e-6 and every main_grad to rtol 1e-5 / atol 1e-7
(observed: losses 9e-8 relative, gradients 2.3e-7 relative in norm); masked attention gives exact zeros, so the other examples of a
pack are bitwise unmoved by a perturbed one.
"""

from __future__ import annotations

import pytest
import torch

from tests.megatron_env import single_rank_world, tiny_config
from tests.training.thd_reference import thd_calls, use_reference_thd

SEQ = 128  # the built-in examples are 30-60 tokens: two or three per pack


def _setup(*overrides: str):
    from soft.data import build_datasets
    from soft.training.model import build_soft_model

    single_rank_world()
    cfg = tiny_config("data.packing=true", f"data.seq_length={SEQ}", *overrides)
    packed, _, _ = build_datasets(cfg.data, cfg.train.seed)
    unpacked_cfg = tiny_config(f"data.seq_length={SEQ}", *overrides)
    unpacked, _, _ = build_datasets(unpacked_cfg.data, cfg.train.seed)
    model = build_soft_model(
        cfg.model, cfg.parallel, cfg.soft, cfg.exit_plan(), 512, cfg.train.seed, packed=True
    )
    return model, packed, unpacked


def _multi_packs(packed, count: int) -> list[int]:
    """The first `count` packs holding two examples or more."""
    assert packed.packs is not None
    chosen = [p for p in range(len(packed)) if len(packed.packs.pack(p)) >= 2][:count]
    assert len(chosen) == count
    return chosen


def _losses_and_grads(model, microbatches):
    from soft.training.step import _run_schedule, reduce_exit_losses

    for chunk in model.chunks:
        chunk.zero_grad_buffer()
    _run_schedule(model, microbatches, torch.ones(()))
    losses, tokens = reduce_exit_losses(model)
    grads = {n: p.main_grad.detach().clone() for n, p in model.unwrapped[0].named_parameters()}
    return losses, tokens, grads


def test_packed_mask_is_block_diagonal_causal() -> None:
    from soft.training.step import model_inputs, packed_mask

    doc = torch.tensor([[0, 0, 1, 1, 1, -1]])
    allowed = ~packed_mask(doc)[0, 0]
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [0, 0, 1, 0, 0, 0],
            [0, 0, 1, 1, 0, 0],
            [0, 0, 1, 1, 1, 0],
            [0, 0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert allowed.equal(expected)
    # Unpacked batches keep the plain causal mask and positions 0..s-1.
    tokens = torch.zeros(2, 4, dtype=torch.long)
    x = model_inputs({"tokens": tokens, "labels": tokens, "loss_mask": tokens.float()})
    assert x.position_ids.tolist() == [[0, 1, 2, 3]] * 2 and x.attention_mask.shape == (1, 1, 4, 4)
    assert x.attention_mask[0, 0].equal(torch.ones(4, 4, dtype=torch.bool).triu(1))
    assert x.packed_seq_params is None


@pytest.mark.parametrize(
    "overrides", [(), ("soft.exit_layers=[1,3,4]", "soft.loss_chunk_tokens=7")]
)
def test_packed_equals_unpacked_losses_and_gradients(overrides) -> None:
    model, packed, unpacked = _setup(*overrides)
    packs = _multi_packs(packed, 4)
    examples = [int(i) for p in packs for i in packed.packs.pack(p)]
    assert len(examples) > len(packs)  # there is something packed
    p_losses, p_tokens, p_grads = _losses_and_grads(
        model, [packed.batch(packs[:2]), packed.batch(packs[2:])]
    )
    u_losses, u_tokens, u_grads = _losses_and_grads(model, [unpacked.batch(examples)])
    assert p_tokens == u_tokens > 0
    assert set(p_losses) == set(u_losses) == set(model.plan.layers)
    for k in model.plan.layers:
        assert p_losses[k] == pytest.approx(u_losses[k], rel=1e-6), k
    worst = 0.0
    for name, g in u_grads.items():
        torch.testing.assert_close(p_grads[name], g, rtol=1e-5, atol=1e-7, msg=name)
        worst = max(worst, ((p_grads[name] - g).norm() / g.norm().clamp_min(1e-30)).item())
    assert worst < 1e-5
    assert u_grads["decoder.layers.0.mlp.linear_fc2.weight"].abs().sum() > 0


def _layer_outputs(model, batch, mask):
    """Every decoder layer's output [s, b, h] and the logits [b, s, v] (exit hooks off)."""
    gpt = model.unwrapped[0]
    captured: list[torch.Tensor] = []
    handles = [
        layer.register_forward_hook(lambda m, a, out: captured.append(out[0].detach()))
        for layer in gpt.decoder.layers
    ]
    for hooks in model.hooks:
        hooks.clear_targets()
    try:
        with torch.no_grad():
            logits = gpt(batch["tokens"], batch["position_ids"], mask)
    finally:
        for h in handles:
            h.remove()
    return [*captured, logits.transpose(0, 1)]  # logits as [s, b, v] like the layers


def test_a_token_never_sees_another_example() -> None:
    from soft.training.step import causal_mask, packed_mask

    model, packed, _ = _setup()
    model.train(False)
    (pack,) = _multi_packs(packed, 1)
    batch = packed.batch([pack])
    changed = {k: v.clone() for k, v in batch.items()}
    first = batch["document"][0] == 0
    changed["tokens"][0, first] = (batch["tokens"][0, first] + 17) % 300 + 3
    others = (batch["document"][0] > 0).nonzero().flatten()

    def moved(mask_of) -> list[float]:
        before = _layer_outputs(model, batch, mask_of(batch))
        after = _layer_outputs(model, changed, mask_of(changed))
        return [
            (a[others] - b[others]).abs().max().item() for a, b in zip(after, before, strict=True)
        ]

    assert moved(lambda b: packed_mask(b["document"])) == [0.0] * 5  # 4 layers + logits
    # The same perturbation does move the others under a plain causal mask: the test can fail.
    assert min(moved(lambda b: causal_mask(SEQ, b["tokens"].device))) > 1e-4
    # ... and it moves the perturbed example itself.
    own = _layer_outputs(model, changed, packed_mask(changed["document"]))[-1][
        first.nonzero().flatten()
    ]
    ref = _layer_outputs(model, batch, packed_mask(batch["document"]))[-1][
        first.nonzero().flatten()
    ]
    assert (own - ref).abs().max() > 1e-4


# ----------------------------------------------------------------------------- THD (TE's path)


def test_thd_bounds_of_a_micro_batch_of_packs() -> None:
    """Three packs of 6 tokens read as one stream of 18: every example a sequence, every
    padding tail one more; a full row ending in example 0 and the next row starting with its
    own example 0 are two sequences."""
    from soft.training.step import thd_bounds

    document = torch.tensor(
        [
            [0, 0, 1, 1, 1, -1],  # two examples, one padding token
            [0, 0, 0, 0, 0, 0],  # one example filling the row
            [0, 1, 1, 2, -1, -1],  # three examples, two padding tokens
        ]
    )
    cu_seqlens, max_seqlen = thd_bounds(document)
    assert cu_seqlens.dtype == torch.int32
    assert cu_seqlens.tolist() == [0, 2, 5, 6, 12, 13, 15, 16, 18]
    assert max_seqlen == 6
    # One pack without padding: its examples only.
    cu_one, max_one = thd_bounds(torch.tensor([[0, 0, 0, 1, 1, 1, 1]]))
    assert cu_one.tolist() == [0, 3, 7] and max_one == 4


def test_thd_bounds_agree_with_the_block_diagonal_mask() -> None:
    """The sequences THD attends within are exactly the mask path's blocks, on real packs."""
    from soft.training.step import packed_mask, thd_bounds

    _, packed, _ = _setup()
    batch = packed.batch(list(range(4)))
    b, s = batch["document"].shape
    cu_seqlens, max_seqlen = thd_bounds(batch["document"])
    stream = torch.zeros(b * s, b * s, dtype=torch.bool)  # allowed[i, j] over the stream
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True):
        stream[start:end, start:end] = torch.ones(end - start, end - start).tril().bool()
    allowed = ~packed_mask(batch["document"])[:, 0]  # [b, s, s]
    assert torch.equal(torch.block_diag(*allowed.unbind(0)), stream)
    assert max_seqlen == int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    # Positions restart exactly at the sequences' starts (padding tails included: 0).
    starts = cu_seqlens[:-1].long()
    assert (batch["position_ids"].reshape(-1)[starts] == 0).all()


def test_model_inputs_on_the_thd_path() -> None:
    """One stream [1, b*s] per micro batch, row after row, no mask, PackedSeqParams as
    megatron-core reads them; bounds precomputed on the host by `microbatches` are used."""
    from soft.training.step import model_inputs, thd_bounds, thd_params, with_thd_bounds

    _, packed, _ = _setup()
    batch = packed.batch([0, 1])
    x = model_inputs(batch, thd=True)
    for name in ("tokens", "labels", "loss_mask", "position_ids"):
        assert torch.equal(getattr(x, name), batch[name].reshape(1, -1)), name
    assert x.attention_mask is None
    params = x.packed_seq_params
    cu_seqlens, max_seqlen = thd_bounds(batch["document"])
    assert params.qkv_format == "thd"
    assert torch.equal(params.cu_seqlens_q, cu_seqlens)
    assert torch.equal(params.cu_seqlens_kv, cu_seqlens)
    assert params.max_seqlen_q == params.max_seqlen_kv == max_seqlen
    assert params.cu_seqlens_q_padded is None  # no context parallelism: nothing padded
    host = with_thd_bounds(batch)
    assert host["max_seqlen"].device.type == "cpu" and int(host["max_seqlen"]) == max_seqlen
    assert model_inputs(host, thd=True).packed_seq_params.max_seqlen_q == max_seqlen
    # The local spec's path of the same batch: the mask, and no PackedSeqParams.
    local = model_inputs(batch, thd=False)
    assert local.packed_seq_params is None and local.tokens.shape == batch["tokens"].shape
    with pytest.raises(ValueError, match="int32"):
        thd_params(cu_seqlens.long(), max_seqlen)


def test_exit_targets_follow_the_thd_stream() -> None:
    """megatron-core's THD hidden states are [b*s, 1, h] (the embedding of tokens [1, b*s],
    transposed to [s, b, h]); an exit's CE over them with the flattened targets equals its CE
    over the same hidden states laid out [s, b, h] with the [b, s] targets."""
    from soft.models.exits import exit_ce_sum
    from soft.models.heads import HeadRef
    from soft.training.step import model_inputs

    _, packed, _ = _setup()
    batch = packed.batch([0, 1, 2])
    b, s = batch["tokens"].shape
    gen = torch.Generator().manual_seed(0)
    hidden_sbh = torch.randn(s, b, 16, generator=gen)
    head = HeadRef(torch.nn.Identity(), torch.randn(512, 16, generator=gen))
    x = model_inputs(batch, thd=True)
    hidden_thd = hidden_sbh.transpose(0, 1).reshape(b * s, 1, 16)  # token of row r, pos p: r*s+p

    def ce(hidden, labels, mask):
        return exit_ce_sum(
            hidden, head, labels.t().contiguous(), mask.t().float().contiguous(),
            chunk_tokens=7, sequence_parallel=False, impl="plain",
        )  # fmt: skip

    with torch.no_grad():
        unpacked = ce(hidden_sbh, batch["labels"], batch["loss_mask"])
        thd = ce(hidden_thd, x.labels, x.loss_mask)
        shuffled = ce(hidden_sbh.reshape(b * s, 1, 16), x.labels, x.loss_mask)  # wrong order
    assert thd.item() == pytest.approx(unpacked.item(), rel=1e-6)
    assert abs(shuffled.item() - unpacked.item()) > 1e-3 * unpacked.item()


@pytest.mark.parametrize(
    "overrides", [(), ("soft.exit_layers=[1,3,4]", "soft.loss_chunk_tokens=7")]
)
def test_thd_path_equals_unpacked_with_a_reference_attention(overrides) -> None:
    """The whole THD path on CPU, with TE's kernel replaced by the local attention run per
    sequence (ReferenceThdAttention): streams [1, b*s], PackedSeqParams through GPTModel,
    megatron-core's per-sequence RoPE, the exits' flattened targets, the final loss, the
    schedule's [b*s, 1] shapes. Every exit's loss and every gradient equals the unpacked
    run's within the mask path's tolerances (module docstring)."""
    from soft.training.step import with_thd_bounds

    model, packed, unpacked = _setup(*overrides)
    packs = _multi_packs(packed, 4)
    examples = [int(i) for p in packs for i in packed.packs.pack(p)]
    u_losses, u_tokens, u_grads = _losses_and_grads(model, [unpacked.batch(examples)])
    use_reference_thd(model)
    batches = [with_thd_bounds(packed.batch(packs[:2])), with_thd_bounds(packed.batch(packs[2:]))]
    p_losses, p_tokens, p_grads = _losses_and_grads(model, batches)
    assert thd_calls(model) == 2 * 4  # two micro batches through four layers
    assert p_tokens == u_tokens > 0
    assert set(p_losses) == set(u_losses) == set(model.plan.layers)
    for k in model.plan.layers:
        assert p_losses[k] == pytest.approx(u_losses[k], rel=1e-6), k
    for name, g in u_grads.items():
        torch.testing.assert_close(p_grads[name], g, rtol=1e-5, atol=1e-7, msg=name)
    # RoPE restarts per sequence: without the bounds (one sequence per row) the losses move.
    for b in batches:
        b["cu_seqlens"] = torch.arange(0, b["tokens"].numel() + 1, b["tokens"].shape[1]).int()
        b["max_seqlen"] = torch.tensor(b["tokens"].shape[1])
    wrong, _, _ = _losses_and_grads(model, batches)
    assert abs(wrong[model.plan.final] - u_losses[model.plan.final]) > 1e-4


def test_packed_attention_follows_the_built_spec() -> None:
    """Packing picks its path from the attention modules built: the local spec's
    DotProductAttention gets the mask (never PackedSeqParams, which it asserts against), and
    an attention that is neither it nor TE's is refused at setup with the key named."""
    from soft.config.errors import ConfigError
    from soft.training.model import packed_attention

    model, _, _ = _setup()
    assert packed_attention(model.unwrapped) == "mask" and not model.thd
    use_reference_thd(model)
    with pytest.raises(ConfigError, match=r"data\.packing.*ReferenceThdAttention"):
        packed_attention(model.unwrapped)


def test_setup_no_longer_refuses_packing_on_transformer_engine(monkeypatch) -> None:
    """data.packing with the TE spec goes on to set up the run (the THD path); TE is absent
    here, so its resolution is stubbed and setup stopped right after the config checks."""
    from soft.training import run

    monkeypatch.setattr(run, "check_runtime_support", lambda model: True)
    called = []
    monkeypatch.setattr(run, "init_distributed", lambda *a: called.append(a) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        run.setup(tiny_config("data.packing=true"))
    assert called
