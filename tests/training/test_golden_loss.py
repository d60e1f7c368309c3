"""The default tiny job reproduces the golden loss curve (tests/training/golden.py) at one
rank; the TP2 x PP2 run is checked by the multi-rank harness (tests/parallel/test_layouts.py,
scenario golden_tp2_pp2)."""

from __future__ import annotations

from tests.megatron_env import single_rank_world
from tests.training import golden


def test_single_rank_reproduces_the_golden_loss_curve(tmp_path):
    from soft.training.cli import run_training

    single_rank_world()
    result = run_training(golden.golden_config(tmp_path / "run"))
    golden.compare(golden.curve(result.train_history), golden.SINGLE_RANK_RTOL)


def test_the_comparison_catches_a_real_numeric_change(tmp_path):
    """The tolerance is far below what a real change moves: a loss off by 1e-3 fails."""
    import pytest

    steps = golden.load_golden()["steps"]
    changed = [dict(r) for r in steps]
    changed[1]["exit_1"] *= 1 + 1e-3
    with pytest.raises(AssertionError, match="step 2 exit_1"):
        golden.compare(changed, golden.TP2_PP2_RTOL)
    assert golden.compare(steps, golden.SINGLE_RANK_RTOL) == 0.0
