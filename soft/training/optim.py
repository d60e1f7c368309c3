"""megatron-core optimizer (Adam + clipping, optionally distributed) and LR schedule."""

from __future__ import annotations

import logging

import torch.distributed as dist
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import MegatronModule

from soft.compat import optimizer_state
from soft.models.config import ModelConfig
from soft.parallel.config import ParallelConfig
from soft.training.config import TrainConfig
from soft.training.model import SoftModel

log = logging.getLogger(__name__)


def build_optimizer(
    model: SoftModel, train: TrainConfig, model_cfg: ModelConfig, parallel: ParallelConfig
) -> MegatronOptimizer:
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
        initial_loss_scale=train.initial_loss_scale,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
        overlap_param_gather=parallel.overlap_param_gather,
    )
    chunks: list[MegatronModule] = list(model.chunks)  # a list of the base type (invariance)
    optimizer = get_megatron_optimizer(config, chunks)
    optimizer_state.keep_step_on_reshardable_load(optimizer)
    # The schedule multiplies the main loss by this before backward; exits use the same scale.
    model.config.grad_scale_func = optimizer.scale_loss
    return optimizer


def apply_optimizer_hyperparameters(
    optimizer: MegatronOptimizer, train: TrainConfig, scheduler: OptimizerParamScheduler
) -> None:
    """After a resume: this job's Adam betas/eps and lr range (torch's load_state_dict brought
    the checkpoint's back: soft.compat.optimizer_state.set_group_hyperparameters), then the
    scheduler sets this step's lr and weight decay."""
    optimizer_state.set_group_hyperparameters(
        optimizer,
        max_lr=train.lr,
        min_lr=train.min_lr,
        betas=(train.adam_beta1, train.adam_beta2),
        eps=train.adam_eps,
    )
    scheduler.step(increment=0)


def build_scheduler(optimizer: MegatronOptimizer, train: TrainConfig) -> OptimizerParamScheduler:
    """LR in optimizer steps: linear warmup, then decay to min_lr at train_iters.

    A null train.lr_warmup_iters is the default warmup (TrainConfig.warmup_iters); when it had
    to be shortened to fit a short run, rank 0 says so.

    On resume only the step count comes from the checkpoint: the schedule's settings are this
    job's config (megatron's default would keep the checkpoint's and drop a new train.lr)."""
    note = train.warmup_note()
    if note and (not dist.is_initialized() or dist.get_rank() == 0):
        log.warning(note)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=train.lr,
        min_lr=train.min_lr,
        lr_warmup_steps=train.warmup_iters,
        lr_decay_steps=train.train_iters,
        lr_decay_style=train.lr_decay_style,
        start_wd=train.weight_decay,
        end_wd=train.weight_decay,
        wd_incr_steps=train.train_iters,
        wd_incr_style="constant",
        override_opt_param_scheduler=True,
        use_checkpoint_opt_param_scheduler=False,
    )
