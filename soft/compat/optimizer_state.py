"""Repairs for megatron-core 0.16's distributed optimizer with torch's Adam (no Apex/TE).

Without Apex or Transformer Engine (CPU runs, and any GPU run without them) megatron-core
builds torch.optim.Adam, which keeps `step` in every parameter's state; the distributed
optimizer's checkpoint code assumes FusedAdam, which keeps it per param group. Three places
break (1-3); each repair below is applied to one optimizer instance, so nothing global changes:

1. `materialise_state` before building a load request: `sharded_state_dict(is_loading=True)`
   first calls `state_dict()`, which asserts that every parameter has the same 'step'
   (distrib_optimizer.py:642) and fails on a fresh optimizer with no state. megatron's own
   remedy, `_init_optimizer_states_with_dummy_values` (line 1137), runs only after that
   assert; run it first. The dummy values are overwritten by the load.
2. `keep_step_on_reshardable_load` when the optimizer is built: `load_state_dict` restores the
   step from the param groups (lines 817-825); then `load_parameter_state_from_fully_reshardable`
   skips `step` in the tensors it passes on (line 2101) while
   `_set_main_param_and_optimizer_states` copies every key of the destination state, `step`
   included: KeyError. Copy only what was given.
3. `repair_adam_steps` after a load: the load assigns ONE step tensor to every parameter's
   state (lines 822-825), which torch's Adam then increments once per parameter, so bias
   correction goes wrong from the first step after loading; with dp_reshardable the pre-load
   dummy step is copied back over it (line 1804). Give every parameter its own tensor with the
   saved step.
4. `set_group_hyperparameters` after a load: this job's betas, eps and lr range, not the
   checkpoint's (the scheduler reads the groups' max_lr/min_lr first).
Checked by the resume/reshard scenarios of tests/parallel (two steps after loading equal the
unbroken run; removing any repair fails them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from soft.compat.versions import require_megatron

if TYPE_CHECKING:  # megatron is imported only when a repair runs (see require_megatron)
    from megatron.core.optimizer import MegatronOptimizer
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer


def _inner_optimizers(optimizer: MegatronOptimizer) -> list[MegatronOptimizer]:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def materialise_state(optimizer: MegatronOptimizer) -> None:
    """Repair 1 (see the module docstring)."""
    require_megatron()
    for opt in _inner_optimizers(optimizer):
        if hasattr(opt, "_init_optimizer_states_with_dummy_values") and not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()


def keep_step_on_reshardable_load(optimizer: MegatronOptimizer) -> None:
    """Repair 2 (see the module docstring), on every DistributedOptimizer inside `optimizer`."""
    require_megatron()
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in _inner_optimizers(optimizer):
        if isinstance(opt, DistributedOptimizer):
            _copy_only_given_states(opt)


def _copy_only_given_states(optimizer: DistributedOptimizer) -> None:
    original = optimizer._set_main_param_and_optimizer_states

    def set_states(model_param: torch.nn.Parameter, tensors: dict[str, torch.Tensor]) -> None:
        if "step" in tensors or optimizer.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            original(model_param, tensors)
            return
        group_index, group_order = optimizer.model_param_group_index_map[model_param]
        main_param = optimizer.optimizer.param_groups[group_index]["params"][group_order]
        destination = {"param": main_param, **optimizer.optimizer.state[main_param]}
        for key, value in tensors.items():
            destination[key].copy_(value)

    # The repair replaces this one instance's method (nothing global changes).
    optimizer._set_main_param_and_optimizer_states = set_states  # type: ignore[method-assign]


def _saved_adam_steps(tree: Any) -> set[float]:
    """Every `step` recorded in the param groups of a loaded (distributed) optimizer state."""
    if isinstance(tree, list):
        return set().union(*(_saved_adam_steps(v) for v in tree))
    if not isinstance(tree, dict):
        return set()
    groups = tree.get("param_groups")
    steps = (
        {float(g["step"]) for g in groups if isinstance(g, dict) and "step" in g}
        if isinstance(groups, list)
        else set()
    )
    return steps.union(*(_saved_adam_steps(v) for v in tree.values()))


def repair_adam_steps(optimizer: MegatronOptimizer, loaded_state: Any) -> None:
    """Repair 3 (see the module docstring)."""
    require_megatron()
    steps = _saved_adam_steps(loaded_state)
    if len(steps) != 1:
        return  # not a torch-Adam distributed-optimizer state: nothing to repair
    (step,) = steps
    for opt in _inner_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        for state in getattr(inner, "state", {}).values():
            if torch.is_tensor(state.get("step")):
                state["step"] = torch.tensor(step, dtype=state["step"].dtype)


def set_group_hyperparameters(
    optimizer: MegatronOptimizer,
    *,
    max_lr: float,
    min_lr: float,
    betas: tuple[float, float],
    eps: float,
) -> None:
    """After a load: torch's `load_state_dict` restores each param group's hyperparameters from
    the checkpoint, silently dropping the values given for this job: Adam's betas and eps, and
    the per-group `max_lr`/`min_lr` that megatron-core's scheduler reads before its own
    (optimizer_param_scheduler.py:223-224, `param_group.get('max_lr', self.max_lr)`; still so
    in 0.19.2 at lines 226-227). Set them from the config; the caller then lets the scheduler
    compute this step's lr."""
    require_megatron()
    for opt in _inner_optimizers(optimizer):
        for group in getattr(getattr(opt, "optimizer", None), "param_groups", []):
            group["betas"] = betas
            group["eps"] = eps
            group["max_lr"] = max_lr
            group["min_lr"] = min_lr
