"""Weight gradients written straight into `main_grad`: megatron-core's convention for telling
its DDP so (the fused exit loss, soft.models.exit_loss, uses it).

megatron-core's weight-gradient fusion (`LinearWithGradAccumulationAndAsyncCommunication.
backward`, megatron-core 0.16 tensor_parallel/layers.py:581-610) adds dW into
`weight.main_grad` itself, returns a dummy gradient of the weight's shape (Transformer Engine's
`get_dummy_wgrad` reuses one buffer) and sets `weight.grad_added_to_main_grad = True`. DDP's
backward post-hook (distributed/distributed_data_parallel.py:427-446) then skips adding
`param.grad` to `main_grad` but still counts the parameter as ready for its bucket's
reduction (overlap_grad_reduce), and `zero_grad_buffer` (:548-552) clears the flag every
iteration. The dummy must reach the parameter through autograd: the hook hangs on the
parameter's AccumulateGrad node, which runs only when a gradient arrives.

The flag is one per parameter, so it is only safe on a weight whose every gradient goes to
`main_grad` directly: an exit head's own matrix (a replica on a stage without the real head,
or ict's separate head). The real head (GPTModel's output layer) and the embedding also get
autograd gradients, which DDP must add: the fused loss returns no gradient for those, and
their other consumer makes them ready.
"""

from __future__ import annotations

import torch

from soft.compat.versions import require_megatron

# Set on a parameter whose only gradient is written into main_grad by the fused exit loss.
FUSED_ONLY = "soft_wgrad_fused_only"
_DDP_FLAG = "grad_added_to_main_grad"  # megatron-core DDP's name (see the module docstring)
_dummies: dict[tuple[torch.Size, torch.dtype, torch.device], torch.Tensor] = {}


def mark_fused_only(param: torch.nn.Parameter) -> None:
    """Declare that `param` gets its gradient only through `main_grad` (before DDP wraps it)."""
    require_megatron()
    setattr(param, FUSED_ONLY, True)


def autograd_gradient(weight: torch.nn.Parameter) -> torch.Tensor | None:
    """What a backward that already added dW to `weight.main_grad` returns for `weight`:
    a reused dummy (never read) with the DDP flag set for a fused-only weight under
    megatron-core DDP, else None (the weight's other consumers report it)."""
    if not getattr(weight, FUSED_ONLY, False) or not hasattr(weight, _DDP_FLAG):
        return None
    setattr(weight, _DDP_FLAG, True)
    return _dummy(weight)


def _dummy(weight: torch.nn.Parameter) -> torch.Tensor:
    """One buffer per shape/dtype/device, handed out as a fresh detached alias: autograd's
    AccumulateGrad takes a tensor nothing else references as `param.grad` without copying it
    (a cached tensor itself would be cloned, a V x h allocation per exit and microbatch), and
    DDP's hook sets `param.grad = None` right after. Its values are never read: the flag
    tells the hook not to add it."""
    key = (weight.shape, weight.dtype, weight.device)
    buffer = _dummies.get(key)
    if buffer is None:
        buffer = _dummies[key] = torch.empty(key[0], dtype=key[1], device=key[2])
    return buffer.detach()
