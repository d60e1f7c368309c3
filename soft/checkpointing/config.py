"""Checkpoint section of the config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from soft.config.core import option
from soft.config.errors import ConfigError


@dataclass
class CheckpointConfig:
    save_dir: str | None = option(
        None, "Where checkpoints go; null = <train.output_dir>/checkpoints."
    )
    save_interval: int = option(0, "Steps between checkpoints (0 = only at the end).")
    load_dir: str | None = option(
        None, "Checkpoint folder to start from (a run's checkpoints dir or one iter_* folder)."
    )
    finetune: bool = option(
        False,
        "With load_dir: load model weights only and start at step 0 with a fresh optimizer "
        "(e.g. from tools/convert_hf_to_megatron.py output).",
    )
    auto_resume: bool = option(
        True,
        "Resume from the latest checkpoint in save_dir when one exists (requeued jobs). false: "
        "a save_dir with checkpoints is an error (see start_over), never trained over.",
    )
    start_over: bool = option(
        False,
        "Move an earlier run's checkpoints and logs in this output_dir aside (to "
        "<output_dir>/previous/<time>/; nothing is deleted) and train from step 1. A job "
        "requeued with the same config resumes its own checkpoints.",
    )
    on_corrupt: Literal["error", "previous"] = option(
        "error",
        "A checkpoint whose files fail their checksums: error = stop with the file named; "
        "previous = move it aside (iter_N.damaged) and resume from the newest older one.",
    )
    allow_unverified: bool = option(
        False,
        "Load a checkpoint that has no manifest.json (written before checksums existed) "
        "without verifying its files. A checkpoint written with a manifest that has lost it "
        "is damaged whatever this says (see on_corrupt).",
    )
    keep_last: int = option(
        2,
        "Keep this many newest checkpoints (0 = keep all); the newest one whose validation "
        "loss was finite is kept too.",
    )
    optimizer_format: Literal["fully_reshardable", "dp_reshardable"] = option(
        "fully_reshardable",
        "Distributed-optimizer state in checkpoints: fully_reshardable loads at any TP/PP/DP "
        "layout; dp_reshardable saves with less communication but reloads only at the same "
        "TP/PP (any DP). Loading reads whichever format the checkpoint holds.",
    )

    def validate(self, prefix: str = "checkpoint") -> None:
        if self.save_interval < 0 or self.keep_last < 0:
            raise ConfigError(f"config keys '{prefix}.save_interval/keep_last': expected >= 0")
        if self.finetune and not self.load_dir:
            raise ConfigError(f"config key '{prefix}.finetune' needs '{prefix}.load_dir'")
