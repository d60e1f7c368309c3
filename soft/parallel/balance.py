"""Pipeline balance: per-stage training cost with SoFT exit heads, and the best uneven split.

Exit heads cost compute on the stage that owns their layer (DESIGN.md, "Balance"): with
LLaMA-2 13B at seq 2048 one head is ~0.5 of a decoder layer, so a stage holding three exits
runs ~15% longer than one holding none and the whole pipeline waits for it. megatron-core
lets only the first and the last stage differ (the middle stages split the rest evenly), so
the search space is every feasible (first, last) pair: small enough to evaluate exhaustively.

Pure arithmetic on the config: importing this module builds no model and starts no process.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from soft.config.errors import ConfigError
from soft.models import flops
from soft.models.config import ModelConfig
from soft.models.exit_plan import ExitPlan
from soft.parallel.config import ParallelConfig

# Relative tolerance when comparing stage costs: float noise must not pick a layout that
# differs from the even split only in rounding.
_REL_TOL = 1e-9


@dataclass(frozen=True)
class CostModel:
    """Per-token training FLOPs of the pieces a stage can hold (all from models/flops.py)."""

    layer: float  # one decoder layer, forward + backward
    trained_head: float  # one exit head (final norm + LM head + CE) that is trained: 6*h*V
    evaluated_head: float  # an exit only evaluated (SFT mode's early exits): forward only, 2*h*V
    layer_params: int
    head_params: int  # LM head (h*V) + final norm (h)
    embedding_params: int  # first stage only: V*h
    tied: bool = False  # the LM head is the embedding: beside it, a head replica is a norm

    @classmethod
    def build(
        cls, model: ModelConfig, seq_length: int, vocab_size: int, head_recompute: bool = False
    ) -> CostModel:
        """`head_recompute`: exit heads whose CE is chunked recompute their forward in backward
        (soft.loss_chunk_tokens), so they cost 8*h*V hardware FLOPs instead of 6*h*V model FLOPs."""
        no_heads = flops.train_flops_per_token(model, seq_length, vocab_size, 0)
        head = flops.train_flops_per_token(model, seq_length, vocab_size, 1) - no_heads
        forward_head = head / 3  # train = 3 x forward (flops.py)
        h, f, d = model.hidden_size, model.ffn_hidden_size, model.kv_channels
        q, kv = model.num_attention_heads * d, model.query_groups * d
        attention = h * (q + 2 * kv) + q * h  # QKV and output projections
        if model.qkv_bias:
            attention += q + 2 * kv
        if model.qk_layernorm:
            attention += 2 * d
        return cls(
            layer=no_heads / model.num_layers,
            trained_head=head + (forward_head if head_recompute else 0.0),
            evaluated_head=forward_head,
            # attention + SwiGLU (gate, up, down) + two RMSNorm weights.
            layer_params=attention + 3 * h * f + 2 * h,
            head_params=h * vocab_size + h,
            embedding_params=vocab_size * h,
            tied=model.tie_word_embeddings,
        )


@dataclass(frozen=True)
class StageCost:
    index: int  # 0-based pipeline rank
    first_layer: int  # 1-based, inclusive
    last_layer: int
    exits: tuple[int, ...]  # exits whose loss this stage computes (the final one included)
    flops_per_token: float
    params: int

    @property
    def num_layers(self) -> int:
        return self.last_layer - self.first_layer + 1


@dataclass(frozen=True)
class Layout:
    """One pipeline split: the config values that produce it and the cost of each stage."""

    first: int | None  # parallel.num_layers_in_first_pipeline_stage
    last: int | None  # parallel.num_layers_in_last_pipeline_stage
    stages: tuple[StageCost, ...]

    @property
    def counts(self) -> list[int]:
        return [s.num_layers for s in self.stages]

    @property
    def max_cost(self) -> float:
        return max(s.flops_per_token for s in self.stages)

    @property
    def total_cost(self) -> float:
        return sum(s.flops_per_token for s in self.stages)

    @property
    def efficiency(self) -> float:
        """Mean stage cost / max stage cost: the fraction of pipeline time doing useful work
        (ignoring the fill/drain bubble, which the split does not change)."""
        return self.total_cost / (len(self.stages) * self.max_cost)

    def override(self) -> str:
        def value(v: int | None) -> str:
            return "null" if v is None else str(v)

        return (
            f"parallel.num_layers_in_first_pipeline_stage={value(self.first)} "
            f"parallel.num_layers_in_last_pipeline_stage={value(self.last)}"
        )


def stage_costs(counts: list[int], plan: ExitPlan, cost: CostModel) -> tuple[StageCost, ...]:
    """Cost of each stage for the given layer counts. An exit at depth k is computed right
    after layer k, so it lives on the stage owning layer k; the final exit is the last stage's
    own LM head. Every exit-owning stage holds a head replica (params), the first stage the
    embedding (tied: also the head's matrix)."""
    stages, start = [], 1
    for index, n in enumerate(counts):
        end = start + n - 1
        exits = tuple(k for k in plan.layers if start <= k <= end)
        trained = sum(1 for k in exits if plan.trains_early_exits or k == plan.final)
        evaluated = len(exits) - trained
        flops_per_token = (
            n * cost.layer + trained * cost.trained_head + evaluated * cost.evaluated_head
        )
        params = n * cost.layer_params + _head_params(cost, index == 0, bool(exits))
        if index == 0:
            params += cost.embedding_params
        stages.append(StageCost(index, start, end, exits, flops_per_token, params))
        start = end + 1
    return tuple(stages)


def _head_params(cost: CostModel, first_stage: bool, has_exits: bool) -> int:
    """A stage with exits holds the head (norm + matrix); when tied, the first stage's matrix
    is its embedding (counted once, as the embedding), so its head adds only the norm."""
    if not has_exits:
        return 0
    if cost.tied and first_stage:
        return cost.head_params - cost.embedding_params
    return cost.head_params


def layout(parallel: ParallelConfig, plan: ExitPlan, cost: CostModel) -> Layout:
    """The layout the given parallel config produces (raises ConfigError when infeasible)."""
    counts = parallel.stage_layer_counts(plan.num_layers)
    return Layout(
        parallel.num_layers_in_first_pipeline_stage,
        parallel.num_layers_in_last_pipeline_stage,
        stage_costs(counts, plan, cost),
    )


def feasible_layouts(parallel: ParallelConfig, plan: ExitPlan, cost: CostModel) -> list[Layout]:
    """Every distinct split megatron-core accepts: first/last each unset or 1..L, middle
    stages equal and non-empty. Each is written in one canonical form: no override for an even
    split, else both first and last set (unambiguous to paste, valid for any PP)."""
    pp, num_layers = parallel.pipeline_model_parallel_size, plan.num_layers
    if pp == 1:
        return [layout(parallel, plan, cost)]
    options: list[int | None] = [None, *range(1, num_layers + 1)]
    seen: dict[tuple[int, ...], Layout] = {}
    for first in options:
        for last in options:
            try:
                counts = _with_split(parallel, first, last).stage_layer_counts(num_layers)
            except ConfigError:
                continue
            key = tuple(counts)
            if key not in seen:
                even = len(set(counts)) == 1
                first_n, last_n = (None, None) if even else (counts[0], counts[-1])
                seen[key] = Layout(first_n, last_n, stage_costs(counts, plan, cost))
    return list(seen.values())


def _with_split(parallel: ParallelConfig, first: int | None, last: int | None) -> ParallelConfig:
    return replace(
        parallel, num_layers_in_first_pipeline_stage=first, num_layers_in_last_pipeline_stage=last
    )


def _num_overrides(lay: Layout) -> int:
    return (lay.first is not None) + (lay.last is not None)


def _sort_key(lay: Layout, scale: float) -> tuple:
    # Max stage cost first (rounded so float noise is a tie); then the even split; then the
    # smallest spread (a lower second-slowest stage leaves headroom); then the counts, so the
    # choice is deterministic.
    rounded = round(lay.max_cost / scale / _REL_TOL)
    spread = sorted((s.flops_per_token for s in lay.stages), reverse=True)
    return (rounded, _num_overrides(lay), [round(c / scale / _REL_TOL) for c in spread], lay.counts)


def propose(parallel: ParallelConfig, plan: ExitPlan, cost: CostModel) -> Layout:
    """The feasible split with the smallest max stage cost. Virtual pipelining keeps its
    layout: megatron-core does not combine it with uneven first/last stages."""
    if parallel.virtual_pipeline_model_parallel_size is not None:
        return layout(parallel, plan, cost)
    candidates = feasible_layouts(parallel, plan, cost)
    scale = max(c.max_cost for c in candidates)
    return min(candidates, key=lambda lay: _sort_key(lay, scale))


def even_layout(parallel: ParallelConfig, plan: ExitPlan, cost: CostModel) -> Layout | None:
    """The split with no first/last override; None when L is not divisible by PP."""
    try:
        return layout(_with_split(parallel, None, None), plan, cost)
    except ConfigError:
        return None


def format_table(lay: Layout, tokens_per_step: int, reference_max: float | None = None) -> str:
    """Markdown table, one row per stage. `% of max` is against `reference_max` (flops per
    token) when given, so two tables printed with the same reference compare directly.
    TFLOP/step counts the whole global batch; params are the whole stage's (memory per rank
    is soft.parallel.memory's table)."""
    top = reference_max or lay.max_cost
    rows = [
        "| stage | layers | range | exits | TFLOP/step | share | % of max | params (B) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in lay.stages:
        exits = ",".join(str(k) for k in s.exits) or "-"
        rows.append(
            f"| {s.index} | {s.num_layers} | {s.first_layer}-{s.last_layer} | {exits} | "
            f"{s.flops_per_token * tokens_per_step / 1e12:,.4g} | "
            f"{s.flops_per_token / lay.total_cost:.1%} | {s.flops_per_token / top:.1%} | "
            f"{s.params / 1e9:.2f} |"
        )
    return "\n".join(rows)
