"""data.packing on Transformer Engine (the THD path) against the same examples unpacked, on a GPU.

The CPU suite proves the THD wiring with a reference attention standing in for TE's kernel
(tests/training/test_packing.py::test_thd_path_equals_unpacked_with_a_reference_attention);
this checks TE's own THD attention (cu_seqlens, padding_causal) and fused RoPE. BF16: the
packed and unpacked runs use other kernels (varlen THD vs sbhd attention), so losses agree to
~1e-2 relative, not fp32's 1e-6. Skipped on CPU and without TE (scripts/gpu/README.md installs
TE on the GPU machine). Not run yet: no GPU was lent to the session that wrote it.
"""

from __future__ import annotations

import pytest
import torch

from tests.gpu import GPU_TE_MARKS
from tests.megatron_env import single_rank_world, tiny_config

pytestmark = GPU_TE_MARKS

SEQ = 128
VOCAB = 512
TE = ("model.transformer_impl=transformer_engine", "model.params_dtype=bf16")


def _setup(*overrides: str):
    """A TE model built for packing. The batches are made here, not by soft.data: the GPU
    machine has no `datasets` (scripts/gpu/README.md)."""
    from soft.training.model import build_soft_model

    single_rank_world()
    cfg = tiny_config("data.packing=true", f"data.seq_length={SEQ}", *TE, *overrides)
    return build_soft_model(
        cfg.model, cfg.parallel, cfg.soft, cfg.exit_plan(), VOCAB, cfg.train.seed, packed=True
    )


def _examples(count: int, seed: int = 0) -> list[torch.Tensor]:
    """`count` token sequences of 20-60 ids (an example's full ids: tokens + its last label)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(20, 61, (count,), generator=gen).tolist()
    return [torch.randint(3, VOCAB, (n + 1,), generator=gen) for n in lengths]


def _batches(examples: list[torch.Tensor], packs: list[list[int]]) -> tuple[dict, dict]:
    """(packed, unpacked) batches of the same examples, laid out as soft.data.SFTDataset does:
    tokens/labels shifted per example, the second half of each example in the loss, padding
    (position 0, document -1) after the packed examples and after each unpacked one."""
    from soft.training.step import with_thd_bounds

    def empty(rows: int) -> dict[str, torch.Tensor]:
        return {
            "tokens": torch.zeros(rows, SEQ, dtype=torch.long),
            "labels": torch.zeros(rows, SEQ, dtype=torch.long),
            "loss_mask": torch.zeros(rows, SEQ),
            "position_ids": torch.zeros(rows, SEQ, dtype=torch.long),
            "document": torch.full((rows, SEQ), -1, dtype=torch.long),
        }

    def place(batch: dict, row: int, start: int, doc: int, full: torch.Tensor) -> int:
        end = start + len(full) - 1
        batch["tokens"][row, start:end] = full[:-1]
        batch["labels"][row, start:end] = full[1:]
        batch["loss_mask"][row, start + (end - start) // 2 : end] = 1.0
        batch["position_ids"][row, start:end] = torch.arange(end - start)
        batch["document"][row, start:end] = doc
        return end

    packed, unpacked = empty(len(packs)), empty(sum(map(len, packs)))
    row = 0
    for p, members in enumerate(packs):
        start = 0
        for doc, i in enumerate(members):
            start = place(packed, p, start, doc, examples[i])
            place(unpacked, row, 0, 0, examples[i])
            row += 1
    del unpacked["position_ids"], unpacked["document"]  # an unpacked batch: causal, 0..s-1
    return with_thd_bounds(packed), unpacked


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


def _losses_and_grads(model, batches):
    from soft.training.step import _run_schedule, reduce_exit_losses, to_device

    device = _device()
    for chunk in model.chunks:
        chunk.zero_grad_buffer()
    on_device = [to_device(b, device) for b in batches]
    _run_schedule(model, on_device, torch.ones((), device=device))
    losses, tokens = reduce_exit_losses(model)
    grads = {
        n: p.main_grad.detach().float().clone() for n, p in model.unwrapped[0].named_parameters()
    }
    return losses, tokens, grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-12))


@pytest.mark.parametrize("overrides", [(), ("soft.exit_layers=[1,3,4]", "soft.exit_loss=plain")])
def test_thd_packed_equals_unpacked_on_transformer_engine(overrides) -> None:
    model = _setup(*overrides)
    assert model.thd, "the TE spec must take packed batches as THD streams"
    examples = _examples(7)
    packs = [[0, 1], [2, 3], [4], [5, 6]]  # two examples of <= 60 tokens always fit in SEQ
    first, first_u = _batches(examples, packs[:2])
    second, second_u = _batches(examples, packs[2:])
    u_losses, u_tokens, u_grads = _losses_and_grads(model, [first_u, second_u])
    p_losses, p_tokens, p_grads = _losses_and_grads(model, [first, second])
    assert p_tokens == u_tokens > 0
    assert set(p_losses) == set(u_losses) == set(model.plan.layers)
    for k in model.plan.layers:
        assert p_losses[k] == pytest.approx(u_losses[k], rel=1e-2), k
    for name, g in u_grads.items():
        assert torch.isfinite(p_grads[name]).all(), name
        assert _rel(p_grads[name], g) < 5e-2, f"grad of {name}"
