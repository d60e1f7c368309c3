"""megatron-core optimizer (Adam + clipping, optionally distributed) and LR schedule."""

from __future__ import annotations

from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from soft.models.build import SoftModel
from soft.models.config import ModelConfig
from soft.parallel.config import ParallelConfig
from soft.training.config import TrainConfig


def build_optimizer(
    model: SoftModel, train: TrainConfig, model_cfg: ModelConfig, parallel: ParallelConfig
):
    config = OptimizerConfig(
        optimizer="adam",
        lr=train.lr,
        min_lr=train.min_lr,
        weight_decay=train.weight_decay,
        adam_beta1=train.adam_beta1,
        adam_beta2=train.adam_beta2,
        adam_eps=train.adam_eps,
        clip_grad=train.clip_grad,
        bf16=model_cfg.params_dtype == "bf16",
        fp16=model_cfg.params_dtype == "fp16",
        params_dtype=model.config.params_dtype,
        loss_scale=train.loss_scale,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
        overlap_param_gather=parallel.overlap_param_gather,
    )
    optimizer = get_megatron_optimizer(config, model.chunks)
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer):
            _keep_torch_adam_step_on_reshardable_load(opt)
    # The schedule multiplies the main loss by this before backward; exits use the same scale.
    model.config.grad_scale_func = optimizer.scale_loss
    return optimizer


def _keep_torch_adam_step_on_reshardable_load(optimizer: DistributedOptimizer) -> None:
    """Let megatron-core 0.16.1 load `fully_reshardable` optimizer state into torch's Adam.

    Without Apex/TE (FusedAdam keeps `step` per param group), torch's Adam holds `step` in
    every parameter's state. `load_state_dict` restores it from the param groups
    (distrib_optimizer.py:817-825), then `load_parameter_state_from_fully_reshardable` skips
    `step` in the tensors it passes on (line 2101, "handle step separately") while
    `_set_main_param_and_optimizer_states` copies every key of the destination state,
    `step` included: KeyError. Copy only what was given (this instance only)."""
    original = optimizer._set_main_param_and_optimizer_states

    def set_states(model_param, tensors):
        if "step" in tensors or optimizer.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(model_param, tensors)
        group_index, group_order = optimizer.model_param_group_index_map[model_param]
        main_param = optimizer.optimizer.param_groups[group_index]["params"][group_order]
        destination = {"param": main_param, **optimizer.optimizer.state[main_param]}
        for key, value in tensors.items():
            destination[key].copy_(value)
        return None

    optimizer._set_main_param_and_optimizer_states = set_states


def build_scheduler(optimizer, train: TrainConfig) -> OptimizerParamScheduler:
    """LR in optimizer steps: linear warmup, then decay to min_lr at train_iters."""
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=train.lr,
        min_lr=train.min_lr,
        lr_warmup_steps=train.lr_warmup_iters,
        lr_decay_steps=train.train_iters,
        lr_decay_style=train.lr_decay_style,
        start_wd=train.weight_decay,
        end_wd=train.weight_decay,
        wd_incr_steps=train.train_iters,
        wd_incr_style="constant",
    )
