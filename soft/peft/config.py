"""The peft section of the config: low-rank adapters (LoRA) over a frozen base model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from soft.config.core import option
from soft.config.errors import ConfigError

# megatron-core's names for a LLaMA layer's linear layers (GPT layer spec), and the HF modules
# each one holds: an adapter on a fused megatron layer is one adapter per HF module with the
# same A matrix (soft.peft.export).
TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
# The submodule of a transformer layer that holds each target (its path in a layer).
OWNERS = {"linear_qkv": "self_attention", "linear_proj": "self_attention",
          "linear_fc1": "mlp", "linear_fc2": "mlp"}  # fmt: skip
COLUMN_PARALLEL = ("linear_qkv", "linear_fc1")  # split along the output: B is split too
ROW_PARALLEL = ("linear_proj", "linear_fc2")  # split along the input: A is split too


@dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning. method=lora freezes every base weight (no gradient, no
    optimizer state; kept in model.params_dtype as stored) and trains low-rank adapters
    y = W x + (alpha / rank) * B A dropout(x), with B = 0 at the start (the model is the base
    model until the first step). Every exit backpropagates into the adapters of the layers
    below it, as full SoFT does into the weights."""

    method: Literal["none", "lora"] = option("none", "none = train the weights; lora = adapters.")
    rank: int = option(16, "LoRA rank r (PEFT's `r`).")
    alpha: float = option(
        32.0, "LoRA alpha: the update is scaled by alpha / rank (PEFT's `lora_alpha`)."
    )
    dropout: float = option(0.0, "Dropout on an adapter's input (PEFT's `lora_dropout`).")
    target_modules: list[str] = option(
        list(TARGETS),
        "megatron-core linear layers that get adapters: linear_qkv (q, k, v), linear_proj (o), "
        "linear_fc1 (gate, up), linear_fc2 (down).",
    )
    layers: list[int] | None = option(
        None, "1-based layers that get adapters; null = every layer (PEFT's layers_to_transform)."
    )
    train_final_norm: bool = option(
        False, "Also train the final norm (and every exit's norm copy reading it)."
    )

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def validate(self, prefix: str = "peft") -> None:
        if self.rank < 1:
            raise ConfigError(f"config key '{prefix}.rank' must be at least 1 (got {self.rank})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(
                f"config key '{prefix}.dropout' must be in [0, 1) (got {self.dropout})"
            )
        unknown = [t for t in self.target_modules if t not in TARGETS]
        if unknown or not self.target_modules:
            raise ConfigError(
                f"config key '{prefix}.target_modules' has {unknown or 'no modules'}: expected "
                f"a non-empty list of {list(TARGETS)}"
            )
        if len(set(self.target_modules)) != len(self.target_modules):
            raise ConfigError(f"config key '{prefix}.target_modules' names a module twice")

    def validate_layers(self, num_layers: int, prefix: str = "peft") -> None:
        """The chosen layers exist in a model.num_layers-deep model."""
        if self.layers is None:
            return
        bad = [n for n in self.layers if not 1 <= n <= num_layers]
        if bad or not self.layers or len(set(self.layers)) != len(self.layers):
            raise ConfigError(
                f"config key '{prefix}.layers' ({self.layers}) must be distinct 1-based layer "
                f"numbers in 1..{num_layers} (model.num_layers), or null for every layer"
            )

    def adapted_layers(self, num_layers: int) -> list[int]:
        """The adapted layers, 1-based and sorted: the order of the adapters' layer axis in
        checkpoints (soft.peft.lora.LoraAdapter.slot)."""
        return sorted(self.layers or range(1, num_layers + 1))

    def adapts(self, layer_number: int) -> bool:
        """Whether 1-based layer `layer_number` gets adapters."""
        return self.enabled and (self.layers is None or layer_number in self.layers)
