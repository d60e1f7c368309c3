"""The SoFT exit mechanism on megatron-core (DESIGN.md, "The mechanism").

For every early exit k on a model chunk, a forward hook on transformer layer k:
1. computes CE_k from the layer's output through the exit's head (soft.models.heads), in
   sequence chunks, with its gradient computed in the same pass (soft.models.exit_loss: an
   exit's full logits are never alive, memory does not grow with the number of exits, and
   nothing is recomputed);
2. attaches `w_k * CE_k` to the hidden state that flows on with `AttachExitLoss`, identity in
   forward, injecting the loss gradient in backward. megatron-core's unmodified schedules
   (1F1B, interleaved) then backpropagate every exit, with no extra point-to-point traffic.
The last exit is the model's own output: GPTModel's loss, weighted in the loss function.
In ict mode each early exit uses its own head on a detached hidden state: the backbone is
frozen, only the heads receive gradient.

The contract with the training step (soft.training.step), per microbatch and chunk:
  hooks.set_targets(labels, loss_mask, loss_scale)  # before the chunk's forward
  chunk(...)                                         # the hooks fire on the exit layers
  hooks.clear_targets()                              # after it: later forwards compute nothing
`loss_scale` is a tensor (the optimizer's loss scale, 1 unless fp16) multiplied into every
exit's gradient in backward, as the schedule multiplies it into the main loss; it is never
read on the host, so no exit costs a device-to-host sync. Per-exit [CE sum, tokens] tallies
accumulate on the device in `ExitTallies`, read once per step by the step.

Activation recompute (`model.recompute_granularity=full`): the layers of a checkpointed
segment first run without autograd, then again during backward. In the first run a hook can
only measure its exit (tallied then) and queue the microbatch's targets; in the rerun (grad
enabled, no targets set) it takes them from its queue and attaches the loss to the recomputed
hidden state. megatron-core's schedules run a chunk's backward passes in the order of its
forward passes (1F1B and interleaved), so a FIFO queue per exit pairs them.

Losses are per-token sums: with `calculate_per_token_loss`, megatron-core's
`finalize_model_grads` divides every gradient by the global-batch response-token count, so
the trained objective is sum_k w_k * mean-token CE_k over the global batch.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch
from megatron.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from megatron.core.utils import make_viewless_tensor

from soft.models import exit_loss
from soft.models.exit_plan import ExitPlan
from soft.models.heads import HeadRef, owned_exits


class AttachExitLoss(torch.autograd.Function):
    """Identity on `hidden`; in backward also sends `scale` as the gradient of `loss`.

    The same trick as megatron-core's MoEAuxLossAutoScaler, with the scale a tensor passed per
    call (the MoE scaler's class-level scale is only set by the schedule for MoE models)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, loss: torch.Tensor, scale: torch.Tensor):
        ctx.save_for_backward(scale)
        ctx.loss_shape, ctx.loss_dtype = loss.shape, loss.dtype
        return hidden

    @staticmethod
    def backward(ctx, grad_hidden: torch.Tensor):
        (scale,) = ctx.saved_tensors
        return grad_hidden, scale.to(ctx.loss_dtype).reshape(ctx.loss_shape), None


def attach_exit_loss(hidden: torch.Tensor, loss: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    out = AttachExitLoss.apply(hidden, loss, scale)
    # The pipeline schedule frees stage outputs and refuses views of other tensors.
    return make_viewless_tensor(out, requires_grad=True, keep_graph=True)


def exit_ce_sum(
    hidden: torch.Tensor,
    head: HeadRef,
    labels_sb: torch.Tensor,
    mask_sb: torch.Tensor,
    *,
    chunk_tokens: int,
    sequence_parallel: bool,
    impl: str = "fused",
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked cross-entropy summed over tokens for one exit (soft.models.exit_loss). Shapes:
    hidden [s(/tp), b, h], labels/mask [s, b]. `scale` (the gradient the sum will receive in
    backward) is needed by the fused implementation when gradients are wanted."""
    normed = head.norm(hidden)
    if sequence_parallel:
        # Norm grads stay per-shard (megatron all-reduces SP norm grads); the gather's backward
        # reduce-scatters the partial input grads of each vocabulary shard.
        x = gather_from_sequence_parallel_region(normed, tensor_parallel_output_grad=True)
    else:
        x = copy_to_tensor_model_parallel_region(normed)
    weight = head.weight
    if not torch.is_grad_enabled():
        return exit_loss.measured_ce_sum(x, weight, labels_sb, mask_sb, chunk_tokens)
    if impl == "fused":
        if scale is None:
            raise ValueError("the fused exit loss needs the gradient scale in forward")
        return exit_loss.fused_ce_sum(
            x, weight, labels_sb, mask_sb, scale, chunk_tokens, want_dx=x.requires_grad
        )
    chunks = 0 if impl == "plain" else chunk_tokens
    return exit_loss.recompute_ce_sum(x, weight, labels_sb, mask_sb, chunks)


@dataclass
class ExitTallies:
    """Per-exit [ce_sum, num_tokens] accumulated on the device over the microbatches of a step."""

    sums: dict[int, torch.Tensor] = field(default_factory=dict)

    def add(self, layer: int, ce_sum: torch.Tensor, num_tokens: torch.Tensor) -> None:
        pair = torch.stack([ce_sum.detach().float(), num_tokens.detach().float()])
        self.sums[layer] = self.sums[layer] + pair if layer in self.sums else pair

    def clear(self) -> None:
        self.sums.clear()


@dataclass(frozen=True)
class _Targets:
    labels: torch.Tensor  # [s, b]
    mask: torch.Tensor  # [s, b] float
    loss_scale: torch.Tensor | None  # None: nothing is backpropagated (evaluation)
    measure_untrained: bool  # also measure the exits that do not train (for logging)


class ExitHooks:
    """The exit forward hooks of one model chunk and the current microbatch's targets."""

    def __init__(
        self,
        chunk: torch.nn.Module,
        plan: ExitPlan,
        heads: dict[int, HeadRef],
        tallies: ExitTallies,
        chunk_tokens: int,
        impl: str = "fused",
    ) -> None:
        self.plan = plan
        self.tallies = tallies
        self.chunk_tokens = chunk_tokens
        self.impl = impl
        self.sequence_parallel = chunk.config.sequence_parallel
        exits = owned_exits(chunk, plan)
        missing = [k for k in exits if k not in heads]
        if missing:
            raise RuntimeError(f"exits {missing} of this chunk have no head")
        self.heads = heads
        self._targets: _Targets | None = None
        self._recompute: dict[int, deque[_Targets]] = {k: deque() for k in exits}
        layers = [layer for layer in chunk.decoder.layers if layer.layer_number in exits]
        self._handles = [layer.register_forward_hook(self._hook) for layer in layers]

    @property
    def exit_layers(self) -> list[int]:
        return list(self._recompute)

    def set_targets(
        self,
        labels: torch.Tensor,
        loss_mask: torch.Tensor,
        loss_scale: torch.Tensor | None,
        measure_untrained: bool = True,
    ) -> None:
        """labels/loss_mask [b, s] for the microbatch about to run forward on this chunk;
        `loss_scale`: a 0-dim tensor multiplied into the exits' gradients (None: no backward);
        `measure_untrained`: whether exits that do not train are computed at all (they only
        feed the logs: sft's early exits cost nothing on steps that log nothing)."""
        self._targets = _Targets(
            labels.transpose(0, 1).contiguous(),
            loss_mask.transpose(0, 1).float().contiguous(),
            loss_scale,
            measure_untrained,
        )

    def clear_targets(self) -> None:
        """After the chunk's forward: a later forward (e.g. generation) computes no exit loss."""
        self._targets = None

    def pending_recomputes(self) -> int:
        """Targets queued by checkpointed forwards whose backward has not run (0 after a step)."""
        return sum(len(q) for q in self._recompute.values())

    def reset(self) -> None:
        self._targets = None
        for queue in self._recompute.values():
            queue.clear()

    def _hook(self, layer: torch.nn.Module, args, output):
        k = layer.layer_number
        targets, grad = self._targets, torch.is_grad_enabled()
        recomputing = targets is None and grad and bool(self._recompute[k])
        if recomputing:  # backward of a checkpointed segment re-runs the layer
            targets = self._recompute[k].popleft()
        if targets is None:
            return None  # a forward outside training/evaluation steps: no exit loss
        trains = (
            k in self.plan.trained_exits
            and self.plan.trains_early_exits
            and layer.training
            and targets.loss_scale is not None
        )
        if not trains and not targets.measure_untrained:
            return None
        if trains and not grad:  # first, autograd-free run of a checkpointed segment
            self._recompute[k].append(targets)
        hidden, context = output
        # ict: the backbone is frozen, so the head's loss must not send gradient into it.
        exit_input = hidden.detach() if self.plan.separate_heads else hidden
        scale = targets.loss_scale * self.plan.weight(k) if trains else None
        with torch.set_grad_enabled(trains and grad):
            ce_sum = exit_ce_sum(
                exit_input,
                self.heads[k],
                targets.labels,
                targets.mask,
                chunk_tokens=self.chunk_tokens,
                sequence_parallel=self.sequence_parallel,
                impl=self.impl,
                scale=scale,
            )
        if not recomputing:  # tallied once per microbatch, in its forward
            self.tallies.add(k, ce_sum, targets.mask.sum())
        if not (trains and grad):
            return None
        return attach_exit_loss(hidden, ce_sum, scale), context

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
