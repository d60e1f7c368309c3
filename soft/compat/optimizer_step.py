"""megatron-core's optimizer step, split so that an update is applied only when the step is
sound (soft.training.step.train_step decides with the losses and the gradient norm).

megatron-core 0.16's `step()` (optimizer/optimizer.py) runs, in this order: `prepare_grads()`
(fp16: unscale and find an overflow over the model-parallel group; returns whether one was
found), the gradient norm and the clip (`MixedPrecisionOptimizer.step`, lines 593-624, and
`FP32Optimizer.step`, lines 961-993: `clip_grad_norm`, lines 203-221 = `get_grad_norm_fp32` +
`clip_grad_by_total_norm_fp32`, only when `clip_grad > 0`; `ChainedOptimizer.step`, lines
1308-1338: one norm over every chained optimizer, then each one's clip), and
`step_with_ready_grads()`. `guarded_step` runs the same operations in the same order, so the
numerics are unchanged, with two differences: the norm is always computed (also with
clip_grad=0: it is what shows a gradient went bad), and nothing is applied when the losses or
the norm are not finite.

An upgrade has to re-check this sequence: 0.19.2 adds `grad_norm_skip_threshold` (default
off) and separate norm groups for multi-token prediction (docs/DESIGN.md, "Upgrading
megatron-core").
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

from soft.compat.versions import require_megatron

Skipped = Literal["overflow", "nonfinite"]


@torch.no_grad()
def guarded_step(
    optimizer: MegatronOptimizer, losses_finite: bool
) -> tuple[Skipped | None, float | None]:
    """(why the update was not applied, or None; the gradient norm). Every rank decides alike:
    the losses were all-reduced over the world and the norm over every rank that holds
    distinct gradients."""
    require_megatron()
    if optimizer.prepare_grads():  # fp16: overflow found (over the model-parallel group)
        return "overflow", None
    grad_norm = float(optimizer.get_grad_norm())
    if not (losses_finite and math.isfinite(grad_norm)):
        return "nonfinite", grad_norm
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        params = opt.get_parameters()
        if opt.config.clip_grad > 0.0 and params:
            clip_grad_by_total_norm_fp32(
                params,
                max_norm=opt.config.clip_grad,
                total_norm=grad_norm,
                use_decoupled_grad=opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8,
            )
    optimizer.step_with_ready_grads()
    return None, grad_norm
