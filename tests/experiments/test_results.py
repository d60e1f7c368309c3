"""Win rates, comparison rows, tables and plot of the paper reproduction, on hand-made inputs."""

from __future__ import annotations

import pytest

from soft.experiments import results as res


def _eval(layers: dict[int, tuple[float, list[int]]]) -> dict:
    """An evaluation JSON as run_eval_exits writes it: layer -> (loss, per-prompt hits)."""
    return {
        "exits": [
            {"layer": k, "loss": loss, "exact_match": sum(hits) / len(hits)}
            for k, (loss, hits) in layers.items()
        ],
        "per_example": {str(k): hits for k, (_, hits) in layers.items()},
    }


SOFT = _eval({1: (2.0, [1, 1, 0, 0]), 2: (1.0, [1, 1, 1, 0])})
SFT = _eval({1: (3.0, [0, 1, 1, 0]), 2: (1.1, [1, 1, 1, 1])})
ICT = _eval({1: (2.5, [0, 0, 0, 0]), 2: (1.1, [1, 1, 1, 1])})
EXTRACTED_1 = _eval({1: (2.2, [1, 0, 0, 1])})
EVALS = {
    "soft": ("soft", SOFT),
    "sft": ("sft", SFT),
    "ict": ("ict", ICT),
    "extracted_1": ("extracted", EXTRACTED_1),
}


def test_win_rate_counts_and_score():
    wr = res.win_rate([1, 1, 0, 0, 1], [0, 1, 1, 0, 0])
    assert (wr.wins, wr.ties, wr.losses, wr.n) == (2, 2, 1, 5)
    assert wr.score == pytest.approx(0.2)
    assert res.win_rate([True, False], [True, False]).score == 0.0
    assert res.win_rate([], []).score == 0.0
    assert res.win_rate([0, 0], [1, 1]).as_dict() == {
        "wins": 0, "ties": 0, "losses": 2, "n": 2, "score": -1.0,
    }  # fmt: skip


def test_win_rate_needs_the_same_prompts():
    with pytest.raises(ValueError, match="same prompts.*3 and 2"):
        res.win_rate([1, 0, 1], [1, 0])


def test_rows_have_every_mode_and_win_rates_where_both_sides_exist():
    rows = res.comparison_rows(res.merge_mode_evals(EVALS), [1, 2])
    assert [r["layer"] for r in rows] == [1, 2]
    first, last = rows
    assert first["metrics"]["soft"] == {"loss": 2.0, "exact_match": 0.5}
    assert first["metrics"]["extracted"] == {"loss": 2.2, "exact_match": 0.5}
    assert last["metrics"]["extracted"] is None  # extracted only at its own depth
    assert first["win_rates"]["soft_vs_sft"] == {
        "wins": 1, "ties": 2, "losses": 1, "n": 4, "score": 0.0,
    }  # fmt: skip
    assert first["win_rates"]["soft_vs_ict"]["wins"] == 2
    assert first["win_rates"]["soft_vs_extracted"]["score"] == 0.0
    assert last["win_rates"]["soft_vs_sft"]["losses"] == 1
    assert last["win_rates"]["soft_vs_extracted"] is None
    for row in rows:
        for wr in filter(None, row["win_rates"].values()):
            assert wr["wins"] + wr["ties"] + wr["losses"] == 4


def test_missing_per_example_gives_no_win_rate_but_keeps_metrics():
    bare = {name: (mode, {"exits": ev["exits"]}) for name, (mode, ev) in EVALS.items()}
    rows = res.comparison_rows(res.merge_mode_evals(bare), [1, 2])
    assert all(v is None for r in rows for v in r["win_rates"].values())
    assert rows[1]["metrics"]["sft"]["loss"] == 1.1


def test_tables_show_dashes_where_a_method_has_no_exit():
    rows = res.comparison_rows(res.merge_mode_evals(EVALS), [1, 2])
    quality = res.quality_table(rows).splitlines()
    assert quality[0].startswith("| exit k | SoFT loss | SoFT EM | SFT loss")
    assert quality[2] == ("| 1 | 2.000 | 50.0% | 3.000 | 50.0% | 2.500 | 0.0% | 2.200 | 50.0% |")
    assert quality[3].endswith("| — | — |")
    wins = res.win_table(rows).splitlines()
    assert "SoFT vs SFT+ICT W/T/L" in wins[0]
    assert wins[2] == "| 1 | 1/2/1 | +0.000 | 2/2/0 | +0.500 | 1/2/1 | +0.000 |"
    assert wins[3] == "| 2 | 0/3/1 | -0.250 | 0/3/1 | -0.250 | — | — |"


def test_markdown_report_and_plot(tmp_path):
    from soft.experiments.settings import make_settings

    rows = res.comparison_rows(res.merge_mode_evals(EVALS), [1, 2])
    results = {
        "settings": make_settings(mini=True).as_params(),
        "base_description": "none",
        "num_train": 10,
        "num_test": 4,
        "rows": rows,
        "notes": ["a note"],
        "timing": {"total": 12.0},
    }
    text = res.markdown_report(results)
    assert res.quality_table(rows) in text and res.win_table(rows) in text
    assert "- a note" in text and "- total: 12 s" in text
    png = res.plot_results(rows, tmp_path / "r.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
