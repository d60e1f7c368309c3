"""An exit's cross-entropy through its head: the implementations (`soft.exit_loss`).

All take the exit's normed hidden state x [s, b, h] (this TP rank's copy, the full sequence)
and the head's vocab-parallel output weight W [V/tp, h], and return the masked CE summed over
tokens (a 0-dim fp32 tensor). They differ in when the logits' gradient is computed:

- `fused` (default): chunk by chunk over the sequence, the forward computes the loss and at
  once its gradients: dL/dx (kept, hidden-sized, for backward) and dL/dW (added straight into
  W.main_grad, the fp32 gradient buffer megatron-core's DDP reduces). No logits survive the
  chunk and nothing is recomputed: an exit costs its FLOPs (6·s·h·V) and a hidden-sized
  activation. The softmax is vocab-parallel exactly as megatron-core's
  `vocab_parallel_cross_entropy` (max, target logit and sum-exp all-reduced over TP).
  The gradient needs the loss scale in forward: it is the `scale` tensor the exit hook also
  gives `AttachExitLoss` (w_k x the optimizer's loss scale); backward multiplies the stored
  dL/dx by grad_output / scale, which is exactly 1 under that contract.
- `recompute`: each chunk's logits are freed after its forward and recomputed in backward
  (torch checkpoint): memory-flat, but the head's matmul runs twice (+2·s·h·V per exit).
- `plain` (also `recompute` with loss_chunk_tokens=0): autograd keeps the exit's logits until
  backward (+s·b·V/tp fp32 per exit in memory).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
from torch.utils.checkpoint import checkpoint

from soft.compat import wgrad as wgrad_convention

IMPLEMENTATIONS = ("fused", "recompute", "plain")


def _chunks(seq: int, chunk_tokens: int) -> list[tuple[int, int]]:
    step = seq if chunk_tokens <= 0 else chunk_tokens
    return [(start, min(start + step, seq)) for start in range(0, seq, step)]


def _ce_chunk_sum(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor):
    logits = F.linear(x, weight)  # [c, b, V/tp]: this rank's vocabulary shard
    ce = vocab_parallel_cross_entropy(logits.float(), labels)  # [c, b], reduced over TP
    return (ce * mask).sum()


def recompute_ce_sum(x, weight, labels, mask, chunk_tokens: int) -> torch.Tensor:
    """`recompute` / `plain` (one chunk, kept by autograd)."""
    spans = _chunks(x.shape[0], chunk_tokens)
    if len(spans) == 1:
        return _ce_chunk_sum(x, weight, labels, mask)
    total = x.new_zeros((), dtype=torch.float32)
    for start, end in spans:
        total = total + checkpoint(
            _ce_chunk_sum,
            x[start:end],
            weight,
            labels[start:end],
            mask[start:end],
            use_reentrant=False,
        )
    return total


def _vocab_parallel_softmax_ce(logits: torch.Tensor, labels: torch.Tensor):
    """In place: `logits` [c, b, V/tp] fp32 becomes the softmax; returns (ce [c, b], local
    target index, whether the target is in this shard) for the gradient."""
    group = parallel_state.get_tensor_model_parallel_group()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    shard = logits.shape[-1]
    first = parallel_state.get_tensor_model_parallel_rank() * shard
    logits_max = logits.max(dim=-1).values
    if tp > 1:
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
    logits.sub_(logits_max.unsqueeze(-1))
    local = labels - first
    in_shard = (local >= 0) & (local < shard)
    local = local.clamp(0, shard - 1)
    target = logits.gather(-1, local.unsqueeze(-1)).squeeze(-1) * in_shard
    logits.exp_()
    sums = torch.stack([target, logits.sum(dim=-1)])
    if tp > 1:
        dist.all_reduce(sums, group=group)
    target, sum_exp = sums
    logits.div_(sum_exp.unsqueeze(-1))
    return torch.log(sum_exp) - target, local, in_shard


class FusedExitCE(torch.autograd.Function):
    """`fused` (see the module docstring). Inputs: x [s, b, h], weight [V/tp, h], labels and
    mask [s, b], scale (0-dim: the gradient ce_sum will receive), chunk_tokens, and whether
    the input gradient is wanted (ict heads read a detached hidden state)."""

    @staticmethod
    def forward(ctx, x, weight, labels, mask, scale, chunk_tokens: int, want_dx: bool):
        wgrad = getattr(weight, "main_grad", None) if weight.requires_grad else None
        local_wgrad = None
        if weight.requires_grad and wgrad is None:  # not wrapped in megatron DDP (tests)
            local_wgrad = torch.zeros_like(weight, dtype=torch.float32)
        grad_x = torch.empty_like(x) if want_dx else None
        total = x.new_zeros((), dtype=torch.float32)
        for start, end in _chunks(x.shape[0], chunk_tokens):
            xc = x[start:end]
            logits = F.linear(xc, weight).float()
            ce, local, in_shard = _vocab_parallel_softmax_ce(logits, labels[start:end])
            m = mask[start:end]
            total = total + (ce * m).sum()
            # d(scale * sum(ce * m)) / dlogits = scale * m * (softmax - onehot(target))
            logits.scatter_add_(-1, local.unsqueeze(-1), -in_shard.unsqueeze(-1).to(logits.dtype))
            logits.mul_((scale * m).unsqueeze(-1))
            dlogits = logits.to(x.dtype)
            del logits
            if grad_x is not None:
                grad_x[start:end] = dlogits @ weight
            if weight.requires_grad:
                dw = dlogits.flatten(0, 1).t() @ xc.flatten(0, 1)
                (wgrad if wgrad is not None else local_wgrad).add_(dw.float())
                del dw
            # Freed before the next chunk's logits exist (a [V/tp, h] dW and a chunk's dlogits
            # would otherwise stay bound to these names: soft.parallel.memory counts the peak).
            del dlogits
        ctx.save_for_backward(grad_x, scale, local_wgrad)
        ctx.weight_dtype = weight.dtype
        # dW went into main_grad: backward tells megatron-core's DDP so (a dummy and its flag).
        ctx.weight = weight if wgrad is not None else None
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_x, scale, local_wgrad = ctx.saved_tensors
        ratio = grad_total / scale  # exactly 1 when the hook keeps its contract
        dx = None if grad_x is None else grad_x * ratio.to(grad_x.dtype)
        if local_wgrad is not None:
            dw = (local_wgrad * ratio).to(ctx.weight_dtype)
        elif ctx.weight is not None:
            dw = wgrad_convention.autograd_gradient(ctx.weight)
        else:
            dw = None
        return dx, dw, None, None, None, None, None


def fused_ce_sum(x, weight, labels, mask, scale, chunk_tokens: int, want_dx: bool):
    return FusedExitCE.apply(x, weight, labels, mask, scale, chunk_tokens, want_dx)


@torch.no_grad()
def measured_ce_sum(x, weight, labels, mask, chunk_tokens: int) -> torch.Tensor:
    """The loss only (validation, untrained exits, the first pass of recomputed layers)."""
    total = x.new_zeros((), dtype=torch.float32)
    for start, end in _chunks(x.shape[0], chunk_tokens):
        total = total + _ce_chunk_sum(x[start:end], weight, labels[start:end], mask[start:end])
    return total
