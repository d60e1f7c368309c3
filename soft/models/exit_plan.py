"""The exit plan: which sub-models are trained, with which loss weights. Pure data."""

from __future__ import annotations

from dataclasses import dataclass

from soft.config.errors import ConfigError


@dataclass(frozen=True)
class ExitPlan:
    """Sorted exit depths (1-based layer counts, the last layer included) and their weights.

    `trained` is False for every exit but the last in SFT mode: those are evaluated (their
    loss is logged) but contribute no gradient.
    """

    layers: tuple[int, ...]
    weights: tuple[float, ...]
    num_layers: int
    train_all: bool = True

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
        if mode == "sft":
            norm = [0.0] * (len(layers) - 1) + [1.0]
        else:
            norm = cls._normalise(weights, len(layers), f"config key '{prefix}.exit_weights'")
        return cls(tuple(layers), tuple(norm), num_layers, train_all=(mode != "sft"))

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
    def final(self) -> int:
        return self.layers[-1]

    @property
    def early(self) -> tuple[int, ...]:
        """Exits before the last layer: computed by the exit mechanism, not by GPTModel's head."""
        return self.layers[:-1]

    def weight(self, layer: int) -> float:
        return self.weights[self.layers.index(layer)]

    def metric_name(self, layer: int) -> str:
        return f"loss/exit_{layer}"
