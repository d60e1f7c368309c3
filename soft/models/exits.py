"""The SoFT exit mechanism on megatron-core (DESIGN.md, "The mechanism").

For every early exit k on a model chunk, a forward hook on transformer layer k:
1. computes CE_k from the layer's output through the shared final norm + output layer,
   in sequence chunks that are recomputed in backward (an exit's full logits are never
   alive at once: memory does not grow with the number of exits);
2. attaches `w_k * CE_k` to the hidden state that flows on with `AttachExitLoss`, identity in
   forward, injecting the loss gradient in backward. megatron-core's unmodified schedules
   (1F1B, interleaved) then backpropagate every exit, with no extra point-to-point traffic.
The last exit is the model's own output: GPTModel's loss, weighted in the loss function.
In ict mode each early exit uses its own head (soft.models.shared_head.SeparateExitHeads) on
a detached hidden state: the backbone is frozen, only the heads receive gradient.

Losses are per-token sums: with `calculate_per_token_loss`, megatron-core's
`finalize_model_grads` divides every gradient by the global-batch response-token count, so
the trained objective is sum_k w_k * mean-token CE_k over the global batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    vocab_parallel_cross_entropy,
)
from megatron.core.utils import make_viewless_tensor
from torch.utils.checkpoint import checkpoint

from soft.models.exit_plan import ExitPlan


class AttachExitLoss(torch.autograd.Function):
    """Identity on `hidden`; in backward also sends `scale` as the gradient of `loss`.

    Same trick as megatron-core's MoEAuxLossAutoScaler, but the scale is passed per call: the
    MoE scaler's class-level scale is only set by the schedule for MoE models in 0.16.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, loss: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(loss)
        ctx.scale = scale
        return hidden

    @staticmethod
    def backward(ctx, grad_hidden: torch.Tensor):
        (loss,) = ctx.saved_tensors
        return grad_hidden, torch.full_like(loss, ctx.scale), None


def attach_exit_loss(hidden: torch.Tensor, loss: torch.Tensor, scale: float) -> torch.Tensor:
    out = AttachExitLoss.apply(hidden, loss, scale)
    # The pipeline schedule frees stage outputs and refuses views of other tensors.
    return make_viewless_tensor(out, requires_grad=True, keep_graph=True)


def _chunk_ce_sum(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor):
    logits = F.linear(x, weight)  # [c, b, V/tp]: this rank's vocabulary shard
    ce = vocab_parallel_cross_entropy(logits.float(), labels)  # [c, b], reduced over TP
    return (ce * mask).sum()


def exit_ce_sum(
    hidden: torch.Tensor,
    norm: torch.nn.Module,
    output_weight: torch.Tensor,
    labels_sb: torch.Tensor,
    mask_sb: torch.Tensor,
    chunk_tokens: int,
    sequence_parallel: bool,
) -> torch.Tensor:
    """Masked cross-entropy summed over tokens for one exit. Shapes: hidden [s(/tp), b, h],
    labels/mask [s, b]. With chunking, each chunk's logits are freed after its forward and
    recomputed in backward (torch checkpoint), so peak memory is one chunk of logits."""
    normed = norm(hidden)
    if sequence_parallel:
        # Norm grads stay per-shard (megatron all-reduces SP norm grads); the gather's backward
        # reduce-scatters the partial input grads of each vocabulary shard.
        x = gather_from_sequence_parallel_region(normed, tensor_parallel_output_grad=True)
    else:
        x = copy_to_tensor_model_parallel_region(normed)
    seq = x.shape[0]
    if chunk_tokens <= 0 or chunk_tokens >= seq:
        return _chunk_ce_sum(x, output_weight, labels_sb, mask_sb)
    total = x.new_zeros((), dtype=torch.float32)
    for start in range(0, seq, chunk_tokens):
        end = min(start + chunk_tokens, seq)
        total = total + checkpoint(
            _chunk_ce_sum,
            x[start:end],
            output_weight,
            labels_sb[start:end],
            mask_sb[start:end],
            use_reentrant=False,
        )
    return total


@dataclass
class ExitLossRecord:
    """Per-exit [ce_sum, num_tokens] accumulated over the microbatches of one step."""

    sums: dict[int, torch.Tensor] = field(default_factory=dict)

    def add(self, layer: int, ce_sum: torch.Tensor, num_tokens: torch.Tensor) -> None:
        pair = torch.stack([ce_sum.detach().float(), num_tokens.detach().float()])
        self.sums[layer] = self.sums[layer] + pair if layer in self.sums else pair

    def clear(self) -> None:
        self.sums.clear()


class ExitHooks:
    """Installs the exit forward hooks on one model chunk and holds the current targets."""

    def __init__(
        self,
        chunk: torch.nn.Module,
        plan: ExitPlan,
        heads: dict[int, tuple[torch.nn.Module, torch.nn.Module]],  # exit -> (norm, output)
        record: ExitLossRecord,
        chunk_tokens: int,
    ) -> None:
        self.plan = plan
        self.record = record
        self.chunk_tokens = chunk_tokens
        self.config = chunk.config
        self.sequence_parallel = chunk.config.sequence_parallel
        self._labels: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self.layers = [layer for layer in chunk.decoder.layers if layer.layer_number in plan.early]
        missing = [k for k in self.exit_layers if k not in heads]
        if missing:
            raise RuntimeError(f"exits {missing} of this chunk have no head")
        self.heads = heads
        self._handles = [layer.register_forward_hook(self._hook) for layer in self.layers]

    @property
    def exit_layers(self) -> list[int]:
        return [layer.layer_number for layer in self.layers]

    def set_targets(self, labels: torch.Tensor, loss_mask: torch.Tensor) -> None:
        """labels/loss_mask [b, s] for the microbatch about to run forward on this chunk."""
        self._labels = labels.transpose(0, 1).contiguous()
        self._mask = loss_mask.transpose(0, 1).float().contiguous()

    def clear_targets(self) -> None:
        """After the chunk's forward: a later forward (e.g. generation) computes no exit loss."""
        self._labels = None
        self._mask = None

    def _hook(self, layer: torch.nn.Module, args, output):
        if self._labels is None:
            return None  # a forward outside training/eval steps (e.g. generation): no exit loss
        hidden, context = output
        k = layer.layer_number
        trains = self.plan.trains_early_exits and torch.is_grad_enabled() and layer.training
        norm, output_layer = self.heads[k]
        # ict: the backbone is frozen, so the head's loss must not send gradient into it.
        exit_input = hidden.detach() if self.plan.separate_heads else hidden
        with torch.set_grad_enabled(trains):
            ce_sum = exit_ce_sum(
                exit_input,
                norm,
                output_layer.weight,
                self._labels,
                self._mask,
                self.chunk_tokens,
                self.sequence_parallel,
            )
        self.record.add(k, ce_sum, self._mask.sum())
        if not trains:
            return None
        scale = self.plan.weight(k)
        if self.config.grad_scale_func is not None:  # fp16 loss scale, as for the main loss
            scale *= float(self.config.grad_scale_func(torch.ones(1, device=hidden.device)).item())
        return attach_exit_loss(hidden, ce_sum, scale), context

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
