"""Training-loop and optimizer section of the config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from soft.config.core import option
from soft.config.errors import ConfigError

# Warmup steps when train.lr_warmup_iters is null (capped at a quarter of the run).
DEFAULT_WARMUP_ITERS = 5


@dataclass
class TrainConfig:
    train_iters: int = option(60, "Optimizer steps to run.")
    micro_batch_size: int = option(4, "Samples per forward/backward on one data-parallel rank.")
    global_batch_size: int = option(16, "Samples per optimizer step over all data-parallel ranks.")
    lr: float = option(1e-3, "Peak learning rate (the paper: 2e-5 for 13B).")
    min_lr: float = option(1e-4, "Learning rate at the end of the decay.")
    lr_warmup_iters: int | None = option(
        None,
        "Linear warmup steps. null = the default: 5, but at most a quarter of train_iters (a "
        "shortened run keeps a warmup that fits; a note says so when it is shortened).",
    )
    lr_decay_style: Literal["cosine", "linear", "constant"] = option(
        "cosine", "Decay after warmup."
    )
    weight_decay: float = option(0.0, "AdamW weight decay (not applied to norms).")
    adam_beta1: float = option(0.9, "Adam beta1.")
    adam_beta2: float = option(0.95, "Adam beta2.")
    adam_eps: float = option(1e-8, "Adam epsilon.")
    clip_grad: float = option(1.0, "Clip the global gradient norm to this (0 = off).")
    seed: int = option(42, "Seed for init, data order and dropout (the paper: 42).")
    log_interval: int = option(5, "Steps between console/MLflow training logs.")
    eval_interval: int = option(20, "Steps between validation passes (0 = only at the end).")
    eval_iters: int = option(2, "Global batches per validation pass.")
    output_dir: str = option(
        "runs/default", "Run directory: resolved config, checkpoints, MLflow store."
    )
    exit_interval: int = option(
        0,
        "Save and stop this job after this many steps (0 = off); a rerun resumes. For "
        "time-sliced jobs, like Megatron-LM's --exit-interval.",
    )
    loss_scale: float | None = option(
        None, "fp16 only: static loss scale; null = dynamic loss scaling."
    )
    initial_loss_scale: float = option(
        2.0**16,
        "fp16 dynamic loss scaling: the scale to start from (halved at each overflow; as torch's "
        "GradScaler. megatron's 2**32 overflows the first ~20 steps here, because exit losses are "
        "per-token sums).",
    )
    on_nonfinite: Literal["stop", "skip"] = option(
        "stop",
        "A NaN/inf loss (any exit) or gradient norm: stop = end the run at that step with an "
        "error, without saving anything after the last good checkpoint; skip = drop that step's "
        "update and go on (see max_consecutive_skips).",
    )
    max_consecutive_skips: int = option(
        20,
        "Stop the run with an error when this many optimizer updates in a row were skipped "
        "(fp16 loss-scale overflow, or on_nonfinite=skip); 0 = never.",
    )

    @property
    def warmup_iters(self) -> int:
        """The warmup the schedule uses: `lr_warmup_iters`, or the default when it is null."""
        if self.lr_warmup_iters is not None:
            return self.lr_warmup_iters
        return min(DEFAULT_WARMUP_ITERS, self.train_iters // 4)

    def warmup_note(self) -> str | None:
        """Why the default warmup is shorter than DEFAULT_WARMUP_ITERS, when it is."""
        if self.lr_warmup_iters is None and self.warmup_iters < DEFAULT_WARMUP_ITERS:
            return (
                f"train.lr_warmup_iters is null: {self.warmup_iters} warmup steps (the default "
                f"{DEFAULT_WARMUP_ITERS}, capped at a quarter of train.train_iters="
                f"{self.train_iters}); set it to choose another"
            )
        return None

    def validate(self, prefix: str = "train") -> None:
        for name in (
            "train_iters",
            "micro_batch_size",
            "global_batch_size",
            "log_interval",
            "eval_iters",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(
                    f"config key '{prefix}.{name}': expected >= 1, got {getattr(self, name)}"
                )
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"config key '{prefix}.global_batch_size' ({self.global_batch_size}) must be a multiple "
                f"of '{prefix}.micro_batch_size' ({self.micro_batch_size})"
            )
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(
                f"config keys '{prefix}.lr'/'{prefix}.min_lr': expected 0 <= min_lr <= lr, lr > 0"
            )
        if self.lr_warmup_iters is not None and not 0 <= self.lr_warmup_iters < self.train_iters:
            raise ConfigError(
                f"config key '{prefix}.lr_warmup_iters' ({self.lr_warmup_iters}): expected "
                f"0 <= value < train.train_iters ({self.train_iters})"
            )
        if self.exit_interval < 0 or self.max_consecutive_skips < 0:
            raise ConfigError(
                f"config keys '{prefix}.exit_interval/max_consecutive_skips': expected >= 0"
            )
        if self.initial_loss_scale <= 0:
            raise ConfigError(f"config key '{prefix}.initial_loss_scale': expected > 0")
        if self.eval_interval < 0 or self.clip_grad < 0 or self.weight_decay < 0:
            raise ConfigError(
                f"config keys '{prefix}.eval_interval/clip_grad/weight_decay': expected >= 0"
            )
