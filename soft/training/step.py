"""One optimizer step (or one evaluation pass) through megatron-core's forward/backward schedule."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func

from soft.compat.optimizer_step import Skipped, guarded_step
from soft.data import ResumableBatchSampler, SFTDataset
from soft.training.config import TrainConfig
from soft.training.model import SoftModel

Batch = dict[str, torch.Tensor]


@dataclass
class StepResult:
    exit_losses: dict[int, float]  # per-token mean CE of every exit over the global batch
    loss: float  # the trained objective: sum_k w_k * exit_losses[k]
    num_tokens: int
    grad_norm: float | None = None
    lr: float | None = None
    # Why the optimizer update was not applied: fp16 loss-scale overflow, or a NaN/inf loss or
    # gradient norm (the loop's train.on_nonfinite policy decides what happens next).
    skipped: Skipped | None = None

    @property
    def finite(self) -> bool:
        values = [self.loss, *self.exit_losses.values()]
        if self.grad_norm is not None:
            values.append(self.grad_norm)
        return all(math.isfinite(v) for v in values)


def microbatches(
    data: SFTDataset,
    sampler: ResumableBatchSampler,
    consumed: int,
    mbs: int,
    device: torch.device,
) -> list[Batch]:
    """This data-parallel rank's microbatches of the global batch that starts at sample
    `consumed` of the sampler's order."""
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    return [
        to_device(with_thd_bounds(data.batch(indices)), device)
        for indices in sampler.indices_for_step(consumed, dp_rank, dp_size, mbs)
    ]


# Batch entries that stay on the host: read as Python numbers by the step (no device sync).
HOST_KEYS = ("max_seqlen",)


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v if k in HOST_KEYS else v.to(device, non_blocking=True) for k, v in batch.items()}


_MASKS: dict[tuple[int, str], torch.Tensor] = {}


def causal_mask(seq_length: int, device: torch.device) -> torch.Tensor:
    """[1, 1, s, s] bool, True = masked. Passed explicitly: megatron's default is built on CUDA."""
    key = (seq_length, str(device))
    if key not in _MASKS:
        _MASKS[key] = torch.ones(seq_length, seq_length, dtype=torch.bool, device=device).triu(1)[
            None, None
        ]
    return _MASKS[key]


LossResult = tuple[torch.Tensor, torch.Tensor, dict[str, Any]]


def packed_mask(document: torch.Tensor) -> torch.Tensor:
    """[b, 1, s, s] bool, True = masked (megatron-core's convention: masked_fill before the
    softmax): token i sees token j only when j <= i and both belong to the same example of the
    pack. Padding (document -1) sees only padding, so no row is fully masked."""
    s = document.shape[1]
    same = document[:, :, None] == document[:, None, :]
    causal = torch.ones(s, s, dtype=torch.bool, device=document.device).tril()
    return ~(same & causal)[:, None]


def thd_bounds(document: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(cu_seqlens, max_seqlen) of a packed micro batch `document` [b, s] (example index per
    token, -1 on padding) read as one stream of b*s tokens, rows one after another: the THD
    layout megatron-core's PackedSeqParams describes. Every example is a sequence, and so is
    each row's padding tail (it then attends only to itself, as on the mask path), so the
    sequences tile the stream: cu_seqlens (int32, [n + 1]) runs from 0 to b*s. A row boundary
    always starts a sequence, even between two rows' example 0."""
    b, s = document.shape
    flat = document.reshape(-1)
    starts = torch.ones(b * s, dtype=torch.bool, device=document.device)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::s] = True
    bounds = torch.cat([starts.nonzero().flatten(), torch.tensor([b * s], device=document.device)])
    return bounds.to(torch.int32), int((bounds[1:] - bounds[:-1]).max())


def with_thd_bounds(batch: Batch) -> Batch:
    """A packed batch with its THD bounds added (`cu_seqlens`, and `max_seqlen` as a host
    tensor): computed here on the host, so the step reads max_seqlen without a device sync.
    Unpacked batches are returned as they are."""
    if "document" not in batch:
        return batch
    cu_seqlens, max_seqlen = thd_bounds(batch["document"])
    return {**batch, "cu_seqlens": cu_seqlens, "max_seqlen": torch.tensor(max_seqlen)}


def thd_params(cu_seqlens: torch.Tensor, max_seqlen: int) -> PackedSeqParams:
    """megatron-core's PackedSeqParams for a THD stream (Megatron-Bridge's get_packed_seq_params
    without its padded variant). No cu_seqlens_*_padded: they are for context parallelism,
    which needs every sequence padded to a multiple of 2 x CP and which this project does not
    have; sequence parallelism only needs the stream (b * data.seq_length tokens) divisible by
    TP, which data.seq_length's check gives. Passing padded bounds equal to the plain ones
    would only select TE's slower padded kernels."""
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or len(cu_seqlens) < 2:
        raise ValueError(
            f"cu_seqlens must be int32 [n + 1], got {cu_seqlens.dtype} {cu_seqlens.shape}"
        )
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        max_seqlen_q=max_seqlen,
        max_seqlen_kv=max_seqlen,
    )


@dataclass(frozen=True)
class ModelInputs:
    """What one chunk's forward takes, and the targets its exits and loss see, all in the
    layout of that forward: [b, s], or [1, b*s] on the THD path."""

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    packed_seq_params: PackedSeqParams | None = None


def model_inputs(batch: Batch, thd: bool = False) -> ModelInputs:
    """A batch as the model takes it. Packed batches (data.packing) carry their own positions,
    restarting at each example, and take one of two paths:

    - mask (the local spec, thd=False): the block-diagonal mask. The local spec's RoPE takes
      positions from the sequence index, not position_ids; attention scores depend only on the
      difference of two positions, which is the same inside an example wherever it sits, so
      the mask alone makes a packed example compute what it would alone
      (tests/training/test_packing.py proves it).
    - THD (Transformer Engine, thd=True): the micro batch becomes one stream [1, b*s] with
      PackedSeqParams and no mask; TE attends within each cu_seqlens sequence, and RoPE restarts
      at each (megatron-core applies it per sequence). Hidden states are then [b*s, 1, h], so
      labels and loss mask are flattened the same way (row after row) for the exits and the
      final loss.
    """
    tokens, labels, loss_mask = batch["tokens"], batch["labels"], batch["loss_mask"]
    b, s = tokens.shape
    if "document" not in batch:
        position_ids = torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s)
        return ModelInputs(tokens, labels, loss_mask, position_ids, causal_mask(s, tokens.device))
    if not thd:
        mask = packed_mask(batch["document"])
        return ModelInputs(tokens, labels, loss_mask, batch["position_ids"], mask)
    if "cu_seqlens" in batch:
        cu_seqlens, max_seqlen = batch["cu_seqlens"], int(batch["max_seqlen"])
    else:  # a batch that did not come through `microbatches` (tests): bounds on the device
        cu_seqlens, max_seqlen = thd_bounds(batch["document"])

    def flat(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(1, b * s)

    return ModelInputs(
        flat(tokens),
        flat(labels),
        flat(loss_mask),
        flat(batch["position_ids"]),
        attention_mask=None,
        packed_seq_params=thd_params(cu_seqlens, max_seqlen),
    )


def loss_func(
    model: SoftModel, loss_mask: torch.Tensor, per_token_loss: torch.Tensor
) -> LossResult:
    """Last stage: the final exit's loss, as megatron-core's schedule expects it:
    (weighted per-token sum, token count, values to report)."""
    mask = loss_mask.float()
    ce_sum = (per_token_loss.float() * mask).sum()
    num_tokens = mask.sum()
    model.tallies.add(model.plan.final, ce_sum, num_tokens)
    weighted = ce_sum * model.plan.weight(model.plan.final)
    return weighted, num_tokens.to(torch.int), {}


def forward_step(
    model: SoftModel,
    loss_scale: torch.Tensor | None,
    measure_untrained: bool,
    data_iterator: Iterator[Batch],
    chunk: torch.nn.Module,
) -> tuple[torch.Tensor, Callable[[torch.Tensor], LossResult]]:
    x = model_inputs(next(data_iterator), thd=model.thd)
    hooks = model.hooks_for(chunk)
    hooks.set_targets(x.labels, x.loss_mask, loss_scale, measure_untrained)
    try:
        output = chunk(
            x.tokens,
            x.position_ids,
            x.attention_mask,
            labels=x.labels,
            packed_seq_params=x.packed_seq_params,
        )
    finally:
        hooks.clear_targets()
    return output, partial(loss_func, model, x.loss_mask)


def _run_schedule(
    model: SoftModel,
    microbatches: list[Batch],
    loss_scale: torch.Tensor | None,
    measure_untrained: bool = True,
) -> None:
    """megatron-core's forward(/backward) schedule over the microbatches; `loss_scale` None =
    forward only."""
    mbs, seq = microbatches[0]["tokens"].shape
    if model.thd:  # one stream per micro batch: what passes between stages is [b*s, 1, h]
        mbs, seq = 1, mbs * seq
    iterators = [iter(microbatches) for _ in model.chunks]
    for hooks in model.hooks:
        hooks.reset()
    get_forward_backward_func()(
        forward_step_func=partial(forward_step, model, loss_scale, measure_untrained),
        data_iterator=iterators if len(iterators) > 1 else iterators[0],
        model=model.chunks,
        num_microbatches=len(microbatches),
        seq_length=seq,
        micro_batch_size=mbs,
        forward_only=loss_scale is None,
    )
    pending = sum(h.pending_recomputes() for h in model.hooks)
    if pending:  # a checkpointed exit whose backward never ran: its gradient would be lost
        raise RuntimeError(f"{pending} exit losses queued for recompute were never backpropagated")


def reduce_exit_losses(model: SoftModel) -> tuple[dict[int, float], int]:
    """Sum every exit's [ce_sum, tokens] over data-parallel ranks and pipeline stages (each exit
    is recorded on the stage that owns it; TP ranks hold copies, so only TP rank 0 counts).
    One all-reduce and one device-to-host transfer per step, whatever the number of exits."""
    plan = model.plan
    device = next(model.chunks[0].parameters()).device
    # [ce sum, tokens, measured] per exit; exits not measured this step are left out.
    table = torch.zeros(len(plan.layers), 3, dtype=torch.float64, device=device)
    if parallel_state.get_tensor_model_parallel_rank() == 0:
        for i, layer in enumerate(plan.layers):
            if layer in model.tallies.sums:
                table[i, :2] = model.tallies.sums[layer].to(table)
                table[i, 2] = 1.0
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(table)
    model.tallies.clear()
    rows = table.tolist()
    tokens = int(rows[-1][1])
    losses = {
        layer: ce / max(n, 1.0)
        for layer, (ce, n, measured) in zip(plan.layers, rows, strict=True)
        if measured
    }
    return losses, tokens


def _objective(model: SoftModel, exit_losses: dict[int, float]) -> float:
    return sum(model.plan.weight(k) * v for k, v in exit_losses.items())


def train_step(
    model: SoftModel,
    optimizer: MegatronOptimizer,
    scheduler: OptimizerParamScheduler,
    microbatches: list[Batch],
    measure_untrained: bool = True,
) -> StepResult:
    """One optimizer step. `measure_untrained`: also compute the exits that do not train
    (logging steps only, by default: see soft.log_untrained_exits)."""
    model.train(True)
    for chunk in model.chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    model.tallies.clear()
    # The loss scale (1 unless fp16) reaches the exits as a device tensor: no host sync.
    loss_scale = optimizer.get_loss_scale().detach().reshape(())
    _run_schedule(model, microbatches, loss_scale, measure_untrained)
    exit_losses, tokens = reduce_exit_losses(model)
    loss = _objective(model, exit_losses)
    losses_finite = all(math.isfinite(v) for v in (loss, *exit_losses.values()))
    skipped, grad_norm = guarded_step(optimizer, losses_finite)
    if skipped is None:
        scheduler.step(increment=1)
    return StepResult(
        exit_losses=exit_losses,
        loss=loss,
        num_tokens=tokens,
        grad_norm=grad_norm,
        lr=optimizer.param_groups[0]["lr"],
        skipped=skipped,
    )


@torch.no_grad()
def eval_step(model: SoftModel, microbatches: list[Batch]) -> StepResult:
    model.train(False)
    model.tallies.clear()
    _run_schedule(model, microbatches, loss_scale=None)
    model.train(True)
    exit_losses, tokens = reduce_exit_losses(model)
    return StepResult(exit_losses, _objective(model, exit_losses), tokens)


def evaluate(
    model: SoftModel, data: SFTDataset, train: TrainConfig, device: torch.device
) -> StepResult:
    """Validation: `train.eval_iters` global batches of `data` (the same ones every time),
    each exit's loss averaged per token over all of them."""
    sampler = ResumableBatchSampler(len(data), train.global_batch_size, train.seed)
    results = []
    for i in range(train.eval_iters):
        mb = microbatches(
            data, sampler, i * train.global_batch_size, train.micro_batch_size, device
        )
        results.append(eval_step(model, mb))
    tokens = sum(r.num_tokens for r in results)
    totals = {  # token-weighted mean over the eval batches
        k: sum(r.exit_losses[k] * r.num_tokens for r in results) / max(tokens, 1)
        for k in model.plan.layers
    }
    return StepResult(totals, _objective(model, totals), tokens)
