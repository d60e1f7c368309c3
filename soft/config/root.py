"""The root config: one section per component, cross-section checks, load from YAML + CLI."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from soft.checkpointing.config import CheckpointConfig
from soft.config.core import apply_override, from_dict, parse_override, read_yaml, section
from soft.config.errors import ConfigError
from soft.data.config import DataConfig
from soft.models.config import ModelConfig, SoftConfig
from soft.models.exit_plan import ExitPlan
from soft.parallel.config import ParallelConfig
from soft.peft.config import PeftConfig
from soft.tracking.config import TrackingConfig
from soft.training.config import TrainConfig


@dataclass
class RootConfig:
    model: ModelConfig = section(ModelConfig, "Model shape and precision.")
    soft: SoftConfig = section(SoftConfig, "Exits and the SoFT loss.")
    parallel: ParallelConfig = section(ParallelConfig, "Tensor/pipeline/data parallel layout.")
    data: DataConfig = section(DataConfig, "Training and validation data.")
    train: TrainConfig = section(TrainConfig, "Optimizer, schedule, batch sizes, logging.")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "Saving and loading.")
    tracking: TrackingConfig = section(TrackingConfig, "MLflow tracking.")
    peft: PeftConfig = section(PeftConfig, "Low-rank adapters (LoRA) over frozen base weights.")

    def validate(self) -> None:
        """Each section checks itself; then the checks that span sections."""
        for name in (
            "model",
            "soft",
            "parallel",
            "data",
            "train",
            "checkpoint",
            "tracking",
            "peft",
        ):
            getattr(self, name).validate(name)
        self.exit_plan()  # raises on a bad plan
        self._validate_mode()
        self._validate_peft()
        self._validate_layout()
        if self.data.seq_length > self.model.max_position_embeddings:
            raise ConfigError(
                f"config key 'data.seq_length' ({self.data.seq_length}) exceeds "
                f"'model.max_position_embeddings' ({self.model.max_position_embeddings})"
            )

    def _validate_mode(self) -> None:
        """ict and extracted start from another run's weights: without them they mean nothing."""
        mode = self.soft.mode
        needs = {"ict": "the SFT checkpoint whose backbone it freezes",
                 "extracted": "the deeper base checkpoint whose first layers it takes"}  # fmt: skip
        if mode in needs and not (self.checkpoint.load_dir and self.checkpoint.finetune):
            raise ConfigError(
                f"config key 'soft.mode' is '{mode}', which needs 'checkpoint.load_dir' "
                f"({needs[mode]}) with checkpoint.finetune=true"
            )
        if mode == "ict" and self.model.recompute_granularity == "full":
            # The frozen backbone's checkpointed segments have no input that needs a gradient,
            # so megatron-core never reruns them in backward: the heads would get no gradient.
            raise ConfigError(
                "config key 'model.recompute_granularity' is 'full', which soft.mode=ict cannot "
                "use (its backbone is frozen: nothing there is backpropagated, so there is no "
                "activation memory to save); use none or selective"
            )

    def _validate_peft(self) -> None:
        """Adapters need the weights they adapt; ict and extracted are baselines of full
        fine-tuning (ict freezes the backbone already)."""
        if not self.peft.enabled:
            return
        self.peft.validate_layers(self.model.num_layers)
        if self.soft.mode not in ("soft", "sft"):
            raise ConfigError(
                f"config key 'peft.method' is '{self.peft.method}', which soft.mode="
                f"'{self.soft.mode}' cannot use: adapters train with soft.mode soft or sft"
            )
        if not (self.checkpoint.load_dir and self.checkpoint.finetune):
            raise ConfigError(
                f"config key 'peft.method' is '{self.peft.method}', which needs "
                "'checkpoint.load_dir' (the base model the adapters adapt, e.g. an HF import) "
                "with checkpoint.finetune=true"
            )

    def _validate_layout(self) -> None:
        m, p = self.model, self.parallel
        tp = p.tensor_model_parallel_size
        if m.num_attention_heads % tp or m.query_groups % tp:
            raise ConfigError(
                f"config key 'parallel.tensor_model_parallel_size' ({tp}) must divide "
                f"model.num_attention_heads ({m.num_attention_heads}) and the query groups ({m.query_groups})"
            )
        if m.ffn_hidden_size % tp:
            raise ConfigError(
                f"'model.ffn_hidden_size' ({m.ffn_hidden_size}) must be divisible by TP={tp}"
            )
        counts = p.stage_layer_counts(m.num_layers)
        vp = p.virtual_pipeline_model_parallel_size
        if vp is not None and any(c % vp for c in counts):
            raise ConfigError(
                f"config key 'parallel.virtual_pipeline_model_parallel_size' ({vp}) must divide the "
                f"layers per stage {counts}"
            )
        if p.sequence_parallel and self.data.seq_length % tp:
            raise ConfigError(
                f"'data.seq_length' must be divisible by TP={tp} with sequence_parallel"
            )

    def exit_plan(self) -> ExitPlan:
        return ExitPlan.build(
            self.model.num_layers, self.soft.exit_layers, self.soft.exit_weights, self.soft.mode
        )


def read_config(path: str | Path | None = None, overrides: list[str] | None = None) -> dict:
    """The config tree as given: the YAML file with the dotted overrides applied (defaults not
    yet filled in, so a caller can still tell which keys were set)."""
    data = read_yaml(path) if path is not None else {}
    for text in overrides or []:
        apply_override(data, *parse_override(text))
    return data


def build_config(data: dict) -> RootConfig:
    """defaults < `data`; validated before returning."""
    cfg = from_dict(RootConfig, data)
    cfg.validate()
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RootConfig:
    """defaults < YAML file < dotted overrides; validated before returning. Reads no checkpoint
    (the training command takes the model's shape from checkpoint.load_dir where it starts the
    run: soft.training.run_config)."""
    return build_config(read_config(path, overrides))
