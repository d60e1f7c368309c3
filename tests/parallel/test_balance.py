"""Pipeline balance: hand-checked costs, the megatron-core split constraint, never worse."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from soft.config.errors import ConfigError
from soft.config.root import load_config
from soft.models import flops
from soft.models.config import ModelConfig
from soft.models.exit_plan import ExitPlan
from soft.parallel import balance
from soft.parallel.config import ParallelConfig

# Unit costs so the expected numbers can be checked by hand: a layer costs 1, a trained
# exit head 1, an evaluated-only head 1/3 (forward of a 3x forward+backward).
UNIT = balance.CostModel(
    layer=1.0,
    trained_head=1.0,
    evaluated_head=1 / 3,
    layer_params=10,
    head_params=4,
    embedding_params=3,
)


def _parallel(pp: int, first: int | None = None, last: int | None = None) -> ParallelConfig:
    return ParallelConfig(
        pipeline_model_parallel_size=pp,
        num_layers_in_first_pipeline_stage=first,
        num_layers_in_last_pipeline_stage=last,
    )


def test_stage_costs_by_hand():
    plan = ExitPlan.build(8, [2, 6, 7, 8])
    stages = balance.stage_costs([4, 4], plan, UNIT)
    assert [s.exits for s in stages] == [(2,), (6, 7, 8)]
    assert [s.flops_per_token for s in stages] == [4 + 1, 4 + 3]
    # Embedding on the first stage; a head replica on every exit-owning stage.
    assert [s.params for s in stages] == [40 + 4 + 3, 40 + 4]


def test_sft_mode_counts_early_exits_as_forward_only():
    plan = ExitPlan.build(8, [2, 6, 7, 8], mode="sft")
    stages = balance.stage_costs([4, 4], plan, UNIT)
    assert stages[0].flops_per_token == pytest.approx(4 + 1 / 3)
    assert stages[1].flops_per_token == pytest.approx(4 + 2 / 3 + 1)


def test_proposal_by_hand_two_stages():
    # Even [4, 4]: costs 4 and 4+3 = 7. [5, 3]: 5 and 3+3 = 6 (best). [6, 2]: 6+1 = 7 and 4.
    plan = ExitPlan.build(8, [6, 7, 8])
    best = balance.propose(_parallel(2), plan, UNIT)
    assert best.counts == [5, 3]
    assert best.max_cost == 6
    assert best.override() == (
        "parallel.num_layers_in_first_pipeline_stage=5 parallel.num_layers_in_last_pipeline_stage=3"
    )


def test_proposal_by_hand_with_middle_stages():
    # L=12, PP=4, exits at 10, 11, 12. Even [3,3,3,3]: last stage 3+3 = 6. The best feasible
    # split keeps the middle stages equal: [4,3,3,2] -> 4, 3, 3+1 (exit 10), 2+2 = 4.
    plan = ExitPlan.build(12, [10, 11, 12])
    best = balance.propose(_parallel(4), plan, UNIT)
    assert best.max_cost == 4
    assert best.counts == [4, 3, 3, 2]
    assert (best.first, best.last) == (4, 2)


def test_even_split_is_kept_on_ties():
    plan = ExitPlan.build(8, [4, 8])
    best = balance.propose(_parallel(2), plan, UNIT)
    assert best.counts == [4, 4]
    assert (best.first, best.last) == (None, None)


def _middle_equal(counts: list[int]) -> bool:
    return len(set(counts[1:-1])) <= 1


@pytest.mark.parametrize("seed", range(20))
def test_proposal_respects_megatron_constraint_and_never_worsens(seed):
    rng = random.Random(seed)
    num_layers = rng.randint(4, 40)
    pp = rng.randint(2, min(8, num_layers))
    exits = sorted(
        set(rng.sample(range(1, num_layers), rng.randint(0, num_layers - 1))) | {num_layers}
    )
    plan = ExitPlan.build(num_layers, exits, mode=rng.choice(["soft", "sft"]))
    model = ModelConfig(
        num_layers=num_layers, hidden_size=256, ffn_hidden_size=704, num_attention_heads=4
    )
    cost = balance.CostModel.build(model, seq_length=512, vocab_size=32000)
    configured = _random_feasible_parallel(pp, num_layers, rng)
    current = balance.layout(configured, plan, cost)
    best = balance.propose(configured, plan, cost)
    assert best.max_cost <= current.max_cost * (1 + 1e-12)
    assert sum(best.counts) == num_layers and min(best.counts) >= 1
    assert len(best.counts) == pp and _middle_equal(best.counts)
    # Exhaustive: no feasible layout beats it.
    assert best.max_cost <= min(
        lay.max_cost for lay in balance.feasible_layouts(configured, plan, cost)
    ) * (1 + 1e-9)
    # The printed override reproduces the proposal through ParallelConfig.
    again = replace(
        configured,
        num_layers_in_first_pipeline_stage=best.first,
        num_layers_in_last_pipeline_stage=best.last,
    )
    assert again.stage_layer_counts(num_layers) == best.counts


def _random_feasible_parallel(pp: int, num_layers: int, rng: random.Random) -> ParallelConfig:
    """A random configured split megatron-core accepts (uneven ones included)."""
    options = []
    for first in [None, *range(1, num_layers)]:
        for last in [None, *range(1, num_layers)]:
            try:
                _parallel(pp, first, last).stage_layer_counts(num_layers)
            except ConfigError:
                continue
            options.append((first, last))
    return _parallel(pp, *rng.choice(options))


def test_cost_model_matches_flops_formula():
    model = ModelConfig(
        num_layers=40, hidden_size=5120, ffn_hidden_size=13824, num_attention_heads=40
    )
    cost = balance.CostModel.build(model, 2048, 32000)
    assert cost.trained_head == pytest.approx(6 * 5120 * 32000)
    assert cost.evaluated_head == pytest.approx(2 * 5120 * 32000)
    total = 40 * cost.layer + 8 * cost.trained_head
    assert total == pytest.approx(flops.train_flops_per_token(model, 2048, 32000, 8))
    recompute = balance.CostModel.build(model, 2048, 32000, head_recompute=True)
    assert recompute.trained_head == pytest.approx(8 * 5120 * 32000)


def test_llama2_13b_paper_plan_from_config():
    """The paper's plan at PP=4 through load_config: exits 12..40 step 4; the even split is
    already optimal (the middle stages must stay equal), and the proposal says so."""
    cfg = load_config(
        None,
        [
            "model.num_layers=40", "model.hidden_size=5120", "model.ffn_hidden_size=13824",
            "model.num_attention_heads=40", "model.vocab_size=32000", "data.seq_length=2048",
            "soft.exit_layers=[12,16,20,24,28,32,36,40]", "parallel.pipeline_model_parallel_size=4",
        ],
    )  # fmt: skip
    cost = balance.CostModel.build(cfg.model, cfg.data.seq_length, 32000)
    current = balance.layout(cfg.parallel, cfg.exit_plan(), cost)
    assert [s.exits for s in current.stages] == [(), (12, 16, 20), (24, 28), (32, 36, 40)]
    best = balance.propose(cfg.parallel, cfg.exit_plan(), cost)
    assert best.max_cost == pytest.approx(current.max_cost)
    assert best.counts == [10, 10, 10, 10]


def test_tool_prints_tables_and_override(capsys):
    from soft.parallel.cli_plan import main

    assert (
        main(
            [
                "parallel.pipeline_model_parallel_size=2",
                "model.num_layers=8",
                "soft.exit_layers=[6,7,8]",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "### configured split" in out and "| stage | layers |" in out
    assert "parallel.num_layers_in_first_pipeline_stage=" in out
