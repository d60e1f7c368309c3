"""The multi-seed aggregate on hand-made per-seed results: statistics, sign agreement, the tie
rule, the tables, the report and the error-bar plot."""

from __future__ import annotations

import statistics

import pytest

from soft.experiments import aggregate as agg
from soft.experiments import results as res
from soft.experiments.settings import make_settings


def _eval(layers: dict[int, tuple[float, list[int]]]) -> dict:
    return {
        "exits": [
            {"layer": k, "loss": loss, "exact_match": sum(hits) / len(hits)}
            for k, (loss, hits) in layers.items()
        ],
        "per_example": {str(k): hits for k, (_, hits) in layers.items()},
    }


def _rows(soft: dict, sft: dict, extracted: dict | None = None) -> list[dict]:
    """One seed's comparison rows (ICT = SFT here: not under test)."""
    evals = {"soft": ("soft", _eval(soft)), "sft": ("sft", _eval(sft)), "ict": ("ict", _eval(sft))}
    if extracted is not None:
        evals["extracted_1"] = ("extracted", _eval(extracted))
    return res.comparison_rows(res.merge_mode_evals(evals), [1, 2])


# Exit 1: SoFT ahead of SFT in all three seeds. Exit 2: ahead, behind, ahead -> a tie.
SEED_ROWS = [
    _rows({1: (1.0, [1, 1, 1, 0]), 2: (0.5, [1, 1, 1, 1])},
          {1: (2.0, [1, 0, 0, 0]), 2: (0.6, [1, 1, 1, 0])}, {1: (1.5, [1, 1, 0, 0])}),
    _rows({1: (1.2, [1, 1, 0, 0]), 2: (0.7, [1, 1, 0, 0])},
          {1: (2.2, [0, 0, 0, 0]), 2: (0.4, [1, 1, 1, 0])}, {1: (1.1, [1, 1, 1, 0])}),
    _rows({1: (1.1, [1, 1, 1, 1]), 2: (0.6, [1, 1, 1, 1])},
          {1: (1.9, [1, 1, 0, 0]), 2: (0.8, [1, 1, 0, 0])}, {1: (1.3, [1, 1, 0, 0])}),
]  # fmt: skip


def test_stats_mean_sample_std_min_max():
    got = agg.stats([0.5, 0.25, 0.75])
    assert got["mean"] == pytest.approx(0.5) and got["std"] == pytest.approx(0.25)
    assert (got["min"], got["max"], got["n"]) == (0.25, 0.75, 3)
    assert agg.stats([0.3])["std"] == 0.0  # one seed: no spread
    assert agg.stats([None, float("nan")]) is None and agg.stats([]) is None
    assert agg.stats([None, 2.0])["values"] == [2.0]


def test_verdict_needs_every_seed_and_a_mean_beyond_the_spread():
    assert agg.verdict([0.2, 0.3, 0.25]) == agg.BETTER
    assert agg.verdict([-0.2, -0.1]) == agg.WORSE
    assert agg.verdict([0.2, -0.05, 0.3]) == agg.TIE  # one seed flips the sign
    assert agg.verdict([0.2, 0.0]) == agg.TIE  # a seed with no difference
    assert agg.verdict([0.01, 0.01, 1.0]) == agg.TIE  # same sign, but |mean| < std
    assert agg.verdict([0.1]) == agg.BETTER  # one seed: its sign
    assert agg.verdict([]) == agg.TIE


def test_aggregate_rows_match_the_per_seed_numbers():
    rows = {r["layer"]: r for r in agg.aggregate_rows(SEED_ROWS)}
    assert sorted(rows) == [1, 2]
    em = rows[1]["metrics"]["soft"]["exact_match"]
    per_seed = [r[0]["metrics"]["soft"]["exact_match"] for r in SEED_ROWS]
    assert per_seed == [0.75, 0.5, 1.0]
    assert em["values"] == per_seed and em["mean"] == pytest.approx(0.75)
    assert em["std"] == pytest.approx(statistics.stdev(per_seed))
    assert (em["min"], em["max"]) == (0.5, 1.0)
    assert rows[1]["metrics"]["sft"]["loss"]["mean"] == pytest.approx(2.0333333)
    assert rows[2]["metrics"]["extracted"] is None  # no seed has it there

    first = rows[1]["claims"]["soft_vs_sft"]  # scores +0.5, +0.5, +0.5
    assert (first["soft_better"], first["soft_worse"], first["seeds"]) == (3, 0, 3)
    assert first["score"]["mean"] == pytest.approx(0.5) and first["verdict"] == agg.BETTER
    assert first["soft_lower_loss"] == 3 and first["loss_gap"]["min"] == pytest.approx(0.8)
    second = rows[2]["claims"]["soft_vs_sft"]  # scores +0.25, -0.25, +0.5
    assert [round(v, 6) for v in second["score"]["values"]] == [0.25, -0.25, 0.5]
    assert (second["soft_better"], second["soft_worse"]) == (2, 1)
    assert second["verdict"] == agg.TIE
    assert second["soft_lower_loss"] == 2  # 0.6-0.5 > 0, 0.4-0.7 < 0, 0.8-0.6 > 0
    ext = rows[1]["claims"]["soft_vs_extracted"]  # +0.25, -0.25, +0.5: a tie
    assert ext["verdict"] == agg.TIE and ext["soft_better"] == 2
    assert rows[2]["claims"]["soft_vs_extracted"] is None


def test_mean_rows_have_the_single_seed_shape():
    rows = agg.mean_rows(agg.aggregate_rows(SEED_ROWS))
    assert rows[0]["metrics"]["soft"]["exact_match"] == pytest.approx(0.75)
    assert rows[0]["win_rates"]["soft_vs_sft"] == {"score": pytest.approx(0.5)}
    assert rows[1]["metrics"]["extracted"] is None
    assert rows[1]["win_rates"]["soft_vs_extracted"] is None


def _report(rows: list[dict]) -> dict:
    settings = make_settings(mini=True).as_params()
    return {
        "seeds": [1, 2, 3],
        "per_seed": [
            {"seed": s, "train_seed": s, "data_seed": 9, "dir": f"seed_{s}", "reused": s == 1}
            for s in (1, 2, 3)
        ],
        "settings": settings,
        "base_description": "pretrained once",
        "base_shared": True,
        "num_train": 10,
        "num_test": 4,
        "rows": rows,
        "notes": ["a note"],
        "timing": {"total": 3.0},
    }


def test_tables_and_report_state_the_claims_and_seeds(tmp_path):
    rows = agg.aggregate_rows(SEED_ROWS)
    claims = agg.claims_table(rows).splitlines()
    assert "SoFT vs SFT SoFT better in" in claims[0] and "SoFT vs SFT+ICT verdict" in claims[0]
    assert claims[2].startswith("| 1 | +0.500 ± 0.000 [+0.500, +0.500] | 3/3 seeds | SoFT better |")
    assert "| 2/3 seeds | tie |" in claims[3] and claims[3].endswith("| — | — | — |")
    quality = agg.quality_table(rows).splitlines()
    assert "| 75.0 ± 25.0 [50.0, 100.0] |" in quality[2]
    losses = agg.loss_table(rows).splitlines()
    assert "SFT − SoFT loss" in losses[0] and "| 3/3 seeds |" in losses[2]

    text = agg.markdown_report(_report(rows))
    assert "over 3 seeds" in text and agg.claims_table(rows) in text
    assert "| 1 | 1 | 9 | seed_1/results.md (reused) |" in text  # training and data seed
    assert "shared by every seed" in text and "- a note" in text
    png = agg.plot_aggregate(rows, tmp_path / "r.png", "t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_draws_error_bars_from_min_to_max(tmp_path, monkeypatch):
    import matplotlib.axes

    calls = []
    real = matplotlib.axes.Axes.errorbar

    def spy(self, x, y, *args, **kwargs):
        calls.append((self.get_ylabel(), kwargs.get("label"), list(x), list(y), kwargs["yerr"]))
        return real(self, x, y, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", spy)
    agg.plot_aggregate(agg.aggregate_rows(SEED_ROWS), tmp_path / "r.png")
    soft_em = next(c for c in calls if c[1] == "SoFT" and c[3][0] > 10)  # the EM panel (%)
    assert soft_em[2] == pytest.approx([1, 2], abs=0.1) and soft_em[3][0] == pytest.approx(75.0)
    low, high = soft_em[4]
    assert (low[0], high[0]) == (pytest.approx(25.0), pytest.approx(25.0))
    extracted = [c for c in calls if c[1] == "Extracted"]
    assert all(c[2] == pytest.approx([1], abs=0.1) for c in extracted)  # only where evaluated
    assert extracted[0][2][0] != soft_em[2][0]  # side by side, not on top of each other
