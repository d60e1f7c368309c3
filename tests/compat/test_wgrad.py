"""The fused exit loss reports weight gradients it wrote into main_grad the way megatron-core's
weight-gradient fusion does (soft.compat.wgrad), on CPU with megatron-core's own DDP.

- With overlap_grad_reduce, DDP reduces a bucket once every parameter in it reported a
  gradient; megatron-core asserts at the next step's finish_grad_sync when one never did.
  Three steps of ict (every trained matrix is an exit-only head) and of SoFT (the real head is
  also GPTModel's output layer) must run and give exactly the gradients of the same model
  without overlap (the flags only change when the reduction starts, not what it sums; one
  rank, so bit-equal).
- The exit-only matrix's autograd gradient is the one reused dummy buffer every microbatch:
  autograd took it without copying, so no V x h tensor is allocated per exit and microbatch.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.megatron_env import single_rank_world, tiny_config


def _model_and_batches(mode: str, overlap: bool):
    from soft.data import build_datasets
    from soft.parallel.setup import seed_everything
    from soft.training.model import build_soft_model

    single_rank_world()
    seed_everything(42)  # as a run's setup does (test_megatron_cpu resets the RNG tracker)
    cfg = tiny_config(f"parallel.overlap_grad_reduce={str(overlap).lower()}")
    # ict's separate heads without the SFT checkpoint a run needs (random heads do here).
    cfg = dataclasses.replace(cfg, soft=dataclasses.replace(cfg.soft, mode=mode))
    train, _, _ = build_datasets(cfg.data, cfg.train.seed)
    model = build_soft_model(
        cfg.model, cfg.parallel, cfg.soft, cfg.exit_plan(), 512, cfg.train.seed
    )
    return model, [train.batch([0, 1]), train.batch([2, 3])]


def _steps(model, microbatches, n: int) -> list[dict[str, torch.Tensor]]:
    """n forward/backward passes of two microbatches (the schedule finalises the grads: with
    overlap, finish_grad_sync waits on every bucket's reduction)."""
    from soft.training.step import _run_schedule

    grads = []
    for _ in range(n):
        for chunk in model.chunks:
            chunk.zero_grad_buffer()
        _run_schedule(model, microbatches, torch.ones(()))
        grads.append(
            {
                name: p.main_grad.detach().clone()
                for name, p in model.unwrapped[0].named_parameters()
                if p.requires_grad
            }
        )
    return grads


@pytest.mark.parametrize("mode", ["ict", "soft"])
def test_overlapped_reduction_sees_every_exit_gradient(mode):
    from soft.compat import wgrad
    from soft.models.heads import exit_only_matrices

    model, batches = _model_and_batches(mode, overlap=True)
    exit_only = exit_only_matrices(model.unwrapped)
    assert bool(exit_only) == (mode == "ict")  # one rank: SoFT's exits read the real head
    assert all(getattr(p, wgrad.FUSED_ONLY, False) for p in exit_only)
    overlapped = _steps(model, batches, 3)
    plain_model, _ = _model_and_batches(mode, overlap=False)
    plain = _steps(plain_model, batches, 3)
    for step, (got, ref) in enumerate(zip(overlapped, plain, strict=True)):
        assert got.keys() == ref.keys()
        for name in ref:
            assert torch.equal(got[name], ref[name]), (step, name)
    head = "exit_heads.1.output_layer.weight" if mode == "ict" else "output_layer.weight"
    assert overlapped[-1][head].abs().sum() > 0


def test_an_exit_only_matrix_gets_the_reused_dummy_not_a_new_tensor():
    from soft.compat import wgrad
    from soft.models.heads import exit_only_matrices

    model, batches = _model_and_batches("ict", overlap=True)
    matrices = exit_only_matrices(model.unwrapped)
    seen: list[tuple[int, bool]] = []
    for p in matrices:
        # Runs inside autograd's AccumulateGrad, before DDP's hook clears param.grad.
        p.register_post_accumulate_grad_hook(
            lambda q: seen.append((q.grad.untyped_storage().data_ptr(), q.grad_added_to_main_grad))
        )
    _steps(model, batches, 2)
    buffers = {b.untyped_storage().data_ptr() for b in wgrad._dummies.values()}
    assert len(seen) == 2 * 2 * len(matrices)  # steps x microbatches x heads
    assert all(ptr in buffers and flagged for ptr, flagged in seen)
