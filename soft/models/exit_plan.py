"""The exit plan: which sub-models are trained, with which loss weights. Pure data."""

from __future__ import annotations

from dataclasses import dataclass

from soft.config.errors import ConfigError


@dataclass(frozen=True)
class ExitPlan:
    """Sorted exit depths (1-based layer counts, the last layer included) and their weights.

    Every exit is evaluated and logged; which ones contribute gradient depends on the mode:
    - soft: all of them (weights normalised over all exits);
    - sft, extracted: the last only (weight 1; the early exits get weight 0);
    - ict ("intermediate classifier tuning", the paper's SFT+ICT baseline): the early exits
      only, each through its own head (weights normalised over the early exits; the frozen
      full model's loss gets weight 0).
    """

    layers: tuple[int, ...]
    weights: tuple[float, ...]
    num_layers: int
    mode: str = "soft"

    @classmethod
    def build(
        cls,
        num_layers: int,
        layers: list[int] | None,
        weights: list[float] | None = None,
        mode: str = "soft",
        prefix: str = "soft",
    ) -> ExitPlan:
        layers = list(range(1, num_layers + 1)) if layers is None else list(layers)
        key = f"config key '{prefix}.exit_layers'"
        if not layers:
            raise ConfigError(f"{key}: expected at least one exit")
        bad = [k for k in layers if not 1 <= k <= num_layers]
        if bad:
            raise ConfigError(f"{key}: exit {bad[0]} is outside 1..model.num_layers={num_layers}")
        if len(set(layers)) != len(layers):
            raise ConfigError(f"{key}: duplicate exits in {layers}")
        if layers != sorted(layers):
            raise ConfigError(f"{key}: exits must be sorted ascending, got {layers}")
        if layers[-1] != num_layers:
            raise ConfigError(
                f"{key}: the last layer ({num_layers}) must be an exit (the full model), got {layers}"
            )
        weights_key = f"config key '{prefix}.exit_weights'"
        if mode in ("sft", "extracted"):
            norm = [0.0] * (len(layers) - 1) + [1.0]
        elif mode == "ict":
            if len(layers) < 2:
                raise ConfigError(
                    f"{key}: soft.mode=ict trains a head per early exit, but the only exit is "
                    f"the last layer ({layers}); list the early exits too"
                )
            if weights is not None and len(weights) != len(layers):
                raise ConfigError(
                    f"{weights_key}: expected {len(layers)} weights (one per exit), got {len(weights)}"
                )
            early = cls._normalise(
                None if weights is None else weights[:-1], len(layers) - 1, weights_key
            )
            norm = [*early, 0.0]
        else:
            norm = cls._normalise(weights, len(layers), weights_key)
        return cls(tuple(layers), tuple(norm), num_layers, mode=mode)

    @staticmethod
    def _normalise(weights: list[float] | None, n: int, key: str) -> list[float]:
        if weights is None:
            return [1.0 / n] * n
        if len(weights) != n:
            raise ConfigError(f"{key}: expected {n} weights (one per exit), got {len(weights)}")
        if any(w < 0 for w in weights):
            raise ConfigError(f"{key}: weights must be >= 0, got {weights}")
        total = float(sum(weights))
        if total <= 0:
            raise ConfigError(f"{key}: weights must not all be zero")
        return [w / total for w in weights]

    @property
    def trains_early_exits(self) -> bool:
        """Whether the early exits' losses are backpropagated (soft, ict)."""
        return self.mode in ("soft", "ict")

    @property
    def separate_heads(self) -> bool:
        """ict: every early exit has its own head instead of sharing the final one."""
        return self.mode == "ict"

    @property
    def extracts_layers(self) -> bool:
        """extracted: the model's weights are the first layers of a deeper checkpoint."""
        return self.mode == "extracted"

    @property
    def trained_exits(self) -> tuple[int, ...]:
        return tuple(k for k, w in zip(self.layers, self.weights, strict=True) if w > 0)

    @property
    def final(self) -> int:
        return self.layers[-1]

    @property
    def early(self) -> tuple[int, ...]:
        """Exits before the last layer: computed by the exit mechanism, not by GPTModel's head."""
        return self.layers[:-1]

    def weight(self, layer: int) -> float:
        return self.weights[self.layers.index(layer)]
