"""One optimizer step (or one evaluation pass) through megatron-core's forward/backward schedule."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from soft.models.build import SoftModel

Batch = dict[str, torch.Tensor]


@dataclass
class StepResult:
    exit_losses: dict[int, float]  # per-token mean CE of every exit over the global batch
    loss: float  # the trained objective: sum_k w_k * exit_losses[k]
    num_tokens: int
    grad_norm: float | None = None
    lr: float | None = None
    skipped: bool = False


_MASKS: dict[tuple[int, str], torch.Tensor] = {}


def causal_mask(seq_length: int, device: torch.device) -> torch.Tensor:
    """[1, 1, s, s] bool, True = masked. Passed explicitly: megatron's default is built on CUDA."""
    key = (seq_length, str(device))
    if key not in _MASKS:
        _MASKS[key] = torch.ones(seq_length, seq_length, dtype=torch.bool, device=device).triu(1)[
            None, None
        ]
    return _MASKS[key]


def loss_func(model: SoftModel, loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Last stage: the final exit's loss, as megatron-core's schedule expects it:
    (weighted per-token sum, token count, values to report)."""
    mask = loss_mask.float()
    ce_sum = (per_token_loss.float() * mask).sum()
    num_tokens = mask.sum()
    model.record.add(model.plan.final, ce_sum, num_tokens)
    weighted = ce_sum * model.plan.weight(model.plan.final)
    return weighted, num_tokens.to(torch.int), {}


def forward_step(model: SoftModel, data_iterator: Iterator[Batch], chunk: torch.nn.Module):
    batch = next(data_iterator)
    tokens, labels, loss_mask = batch["tokens"], batch["labels"], batch["loss_mask"]
    b, s = tokens.shape
    position_ids = torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s)
    hooks = model.hooks_for(chunk)
    hooks.set_targets(labels, loss_mask)
    try:
        output = chunk(tokens, position_ids, causal_mask(s, tokens.device), labels=labels)
    finally:
        hooks.clear_targets()
    return output, partial(loss_func, model, loss_mask)


def _run_schedule(model: SoftModel, microbatches: list[Batch], forward_only: bool) -> None:
    mbs, seq = microbatches[0]["tokens"].shape
    iterators = [iter(microbatches) for _ in model.chunks]
    get_forward_backward_func()(
        forward_step_func=partial(forward_step, model),
        data_iterator=iterators if len(iterators) > 1 else iterators[0],
        model=model.chunks,
        num_microbatches=len(microbatches),
        seq_length=seq,
        micro_batch_size=mbs,
        forward_only=forward_only,
    )


def reduce_exit_losses(model: SoftModel) -> tuple[dict[int, float], int]:
    """Sum every exit's [ce_sum, tokens] over data-parallel ranks and pipeline stages (each exit
    is recorded on the stage that owns it; TP ranks hold copies, so only TP rank 0 counts)."""
    plan = model.plan
    device = next(model.chunks[0].parameters()).device
    table = torch.zeros(len(plan.layers), 2, dtype=torch.float64, device=device)
    if parallel_state.get_tensor_model_parallel_rank() == 0:
        for i, layer in enumerate(plan.layers):
            if layer in model.record.sums:
                table[i] = model.record.sums[layer].to(table)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(table)
    model.record.clear()
    tokens = int(table[-1, 1].item())
    return {
        layer: (table[i, 0] / table[i, 1].clamp(min=1)).item()
        for i, layer in enumerate(plan.layers)
    }, tokens


def _objective(model: SoftModel, exit_losses: dict[int, float]) -> float:
    return sum(model.plan.weight(k) * v for k, v in exit_losses.items())


def train_step(model: SoftModel, optimizer, scheduler, microbatches: list[Batch]) -> StepResult:
    model.train(True)
    for chunk in model.chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    model.record.clear()
    _run_schedule(model, microbatches, forward_only=False)
    update_ok, grad_norm, _ = optimizer.step()
    if update_ok:
        scheduler.step(increment=1)
    exit_losses, tokens = reduce_exit_losses(model)
    return StepResult(
        exit_losses=exit_losses,
        loss=_objective(model, exit_losses),
        num_tokens=tokens,
        grad_norm=float(grad_norm) if grad_norm is not None else None,
        lr=optimizer.param_groups[0]["lr"],
        skipped=not update_ok,
    )


@torch.no_grad()
def eval_step(model: SoftModel, microbatches: list[Batch]) -> StepResult:
    model.train(False)
    model.record.clear()
    _run_schedule(model, microbatches, forward_only=True)
    model.train(True)
    exit_losses, tokens = reduce_exit_losses(model)
    return StepResult(exit_losses, _objective(model, exit_losses), tokens)
