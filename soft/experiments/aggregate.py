"""The paper reproduction over several seeds: mean and spread of every number, and how many
seeds agree on each SoFT-vs-X claim.

Pure functions of the per-seed results (`reproduce()`'s results.json, `rows` as written by
`results.comparison_rows`), so they are tested on hand-made inputs.

Spread: min, max and the sample standard deviation (n - 1 in the denominator; 0 for one
seed). A claim "SoFT better than X at exit k" is the sign of SoFT's win score against X (win
score = (W - L) / n = SoFT's EM minus X's EM on the same prompts). It holds only when every seed
has that sign and |mean| >= std; otherwise it is a tie: a difference that flips with the seed is
not a finding.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TypedDict

from soft.experiments import results
from soft.experiments.plan import MODE_LABELS, MODES
from soft.experiments.results import COMPARISONS, DASH, grid_table

METRICS = ("loss", "exact_match")
BETTER, WORSE, TIE = "SoFT better", "SoFT worse", "tie"


class Stats(TypedDict):
    """One number over the seeds (a plain dict: it goes into results JSON as is)."""

    mean: float
    std: float
    min: float
    max: float
    n: int
    values: list[float]


def stats(values: Sequence[float | None]) -> Stats | None:
    """Mean, sample std, min, max and the values themselves (None when there are none;
    missing and non-finite values are left out)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return None
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return Stats(
        mean=statistics.fmean(vals),
        std=std,
        min=min(vals),
        max=max(vals),
        n=len(vals),
        values=vals,
    )


def verdict(values: Sequence[float]) -> str:
    """SoFT better / worse when every seed's difference has that sign and |mean| >= std."""
    got = stats(values)
    if got is None:
        return TIE
    if abs(got["mean"]) < got["std"]:
        return TIE
    if all(v > 0 for v in got["values"]):
        return BETTER
    if all(v < 0 for v in got["values"]):
        return WORSE
    return TIE


def _metric(row: Mapping, mode: str, name: str) -> float | None:
    got = (row.get("metrics") or {}).get(mode) or {}
    return got.get(name)


def _score(row: Mapping, comparison: str) -> float | None:
    wr = (row.get("win_rates") or {}).get(comparison)
    return None if wr is None else wr["score"]


def _loss_gap(row: Mapping, ours: str, theirs: str) -> float | None:
    """Their loss minus ours: > 0 = SoFT's loss is lower."""
    a, b = _metric(row, ours, "loss"), _metric(row, theirs, "loss")
    return None if a is None or b is None else b - a


def _claim(rows: Sequence[Mapping], ours: str, theirs: str) -> dict[str, object] | None:
    comparison = f"{ours}_vs_{theirs}"
    scores = [s for s in (_score(r, comparison) for r in rows) if s is not None]
    gaps = [g for g in (_loss_gap(r, ours, theirs) for r in rows) if g is not None]
    if not scores and not gaps:
        return None
    return {
        "score": stats(scores),
        "seeds": len(scores),
        "soft_better": sum(1 for s in scores if s > 0),
        "soft_worse": sum(1 for s in scores if s < 0),
        "verdict": verdict(scores) if scores else None,
        "loss_gap": stats(gaps),  # their loss - SoFT's
        "loss_seeds": len(gaps),
        "soft_lower_loss": sum(1 for g in gaps if g > 0),
    }


def aggregate_rows(per_seed_rows: Sequence[Sequence[Mapping]]) -> list[dict]:
    """Per exit layer (the union over seeds): every method's loss/EM statistics and every
    SoFT-vs-X claim's score statistics, sign counts and verdict."""
    layers = sorted({int(r["layer"]) for rows in per_seed_rows for r in rows})
    out = []
    for k in layers:
        at_k = [r for rows in per_seed_rows for r in rows if int(r["layer"]) == k]
        metrics: dict[str, dict | None] = {}
        for mode in MODES:
            got = {name: stats([_metric(r, mode, name) for r in at_k]) for name in METRICS}
            metrics[mode] = got if any(got.values()) else None
        claims = {f"{a}_vs_{b}": _claim(at_k, a, b) for a, b in COMPARISONS}
        out.append({"layer": k, "metrics": metrics, "claims": claims})
    return out


def mean_rows(rows: Sequence[Mapping]) -> list[dict]:
    """The aggregate rows in the single-seed shape, means only (MLflow metrics per exit)."""
    out = []
    for row in rows:
        metrics = {
            mode: None if got is None else {n: (got[n] or {}).get("mean") for n in METRICS}
            for mode, got in row["metrics"].items()
        }
        wins = {
            name: None if c is None or c["score"] is None else {"score": c["score"]["mean"]}
            for name, c in row["claims"].items()
        }
        out.append({"layer": row["layer"], "metrics": metrics, "win_rates": wins})
    return out


# ----------------------------------------------------------------------------- presentation


def _spread(got: Mapping | None, scale: float = 1.0, digits: int = 3, sign: str = "") -> str:
    """'mean ± std [min, max]'."""
    if got is None:
        return DASH
    f = lambda v: f"{scale * v:{sign}.{digits}f}"  # noqa: E731
    return f"{f(got['mean'])} ± {scale * got['std']:.{digits}f} [{f(got['min'])}, {f(got['max'])}]"


def quality_table(rows: Sequence[Mapping]) -> str:
    """Loss and EM (%) per exit and method: mean ± std [min, max] over the seeds."""
    return results.quality_table(rows, _spread, lambda got: _spread(got, 100, 1), em_label="EM %")


def claims_table(rows: Sequence[Mapping]) -> str:
    """Per exit and baseline: SoFT's win score over the seeds, in how many seeds SoFT is
    better, and the verdict."""
    header = ["exit k"]
    for ours, theirs in COMPARISONS:
        label = f"{MODE_LABELS[ours]} vs {MODE_LABELS[theirs]}"
        header += [f"{label} score", f"{label} SoFT better in", f"{label} verdict"]
    body = []
    for row in rows:
        cells = [str(row["layer"])]
        for ours, theirs in COMPARISONS:
            claim = row["claims"].get(f"{ours}_vs_{theirs}")
            if claim is None or claim["score"] is None:
                cells += [DASH, DASH, DASH]
                continue
            cells += [
                _spread(claim["score"], sign="+"),
                f"{claim['soft_better']}/{claim['seeds']} seeds",
                claim["verdict"],
            ]
        body.append(cells)
    return grid_table(header, body)


def loss_table(rows: Sequence[Mapping]) -> str:
    """Per exit and baseline: their loss minus SoFT's, and in how many seeds SoFT's is lower."""
    header = ["exit k"]
    for ours, theirs in COMPARISONS:
        label = f"{MODE_LABELS[theirs]} − {MODE_LABELS[ours]} loss"
        header += [label, "SoFT lower in"]
    body = []
    for row in rows:
        cells = [str(row["layer"])]
        for ours, theirs in COMPARISONS:
            claim = row["claims"].get(f"{ours}_vs_{theirs}")
            if claim is None or claim["loss_gap"] is None:
                cells += [DASH, DASH]
                continue
            gap = _spread(claim["loss_gap"], sign="+")
            cells += [gap, f"{claim['soft_lower_loss']}/{claim['loss_seeds']} seeds"]
        body.append(cells)
    return grid_table(header, body)


def markdown_report(report: Mapping) -> str:
    """The aggregate results.md: seeds, what is shared, the three tables, notes, timing."""
    s, seeds = report["settings"], report["seeds"]
    n = len(seeds)
    lines = [
        f"# SoFT vs SFT vs SFT+ICT vs extracted sub-models over {n} seeds",
        "",
        f"Model: {s['num_layers']} layers, hidden {s['hidden_size']}, ffn {s['ffn_hidden_size']}, "
        f"{s['num_attention_heads']} heads, vocab {s['vocab_size']} (scale {s['scale']}"
        f"{', mini' if s['mini'] else ''}). Fine-tuning: {report['num_train']} records of the "
        f"built-in tasks {', '.join(s['tasks'])}, {s['finetune_iters']} steps, batch "
        f"{s['finetune_batch_size']}, lr {s['finetune_lr']}; test: {report['num_test']} "
        "held-out prompts, greedy decoding, exact match (EM).",
        "",
        "## Seeds",
        "",
        grid_table(
            ["seed", "training seed", "data seed", "result"],
            [
                [
                    str(e["seed"]),
                    str(e["train_seed"]),
                    str(e["data_seed"]),
                    f"{e['dir']}/results.md" + (" (reused)" if e["reused"] else ""),
                ]
                for e in report["per_seed"]
            ],
        ),  # fmt: skip
        "",
        "Training seed = `train.seed` of every fine-tuning run (data order, dropout, new heads); "
        "data seed = the draw of the fine-tuning records and held-out prompts.",
        f"Base: {report['base_description']}.",
    ]
    if report.get("base_shared"):
        lines += [
            "The base stands for the pretrained model the paper starts from: it is trained once "
            f"(seed {s['base_seed']}) and shared by every seed; the seeds vary the fine-tuning "
            "data and runs, not the pretraining.",
        ]
    lines += [
        "",
        f"## Loss and EM per exit: mean ± std [min, max] over {n} seeds",
        "",
        quality_table(report["rows"]),
        "",
        "## Claims: SoFT's win score per exit (judge: exact match)",
        "",
        claims_table(report["rows"]),
        "",
        "Score = (W - L) / n per seed = SoFT's EM minus the other's on the same prompts. "
        f"'{BETTER}' / '{WORSE}': every seed has that sign and |mean| >= std; "
        f"'{TIE}': the seeds disagree (or a seed has no difference) or |mean| < std.",
        "",
        "## Loss gaps per exit",
        "",
        loss_table(report["rows"]),
    ]
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {note}" for note in report["notes"]]
    if report.get("timing"):
        lines += ["", "## Wall time", ""]
        lines += [f"- {name}: {sec:.0f} s" for name, sec in report["timing"].items()]
    return "\n".join(lines) + "\n"


def plot_aggregate(rows: Sequence[Mapping], path: Path, title: str = "") -> Path:
    """EM and loss against exit depth, one line per method at the mean, error bars from the
    lowest to the highest seed."""
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"soft": "o-", "sft": "s--", "ict": "^-.", "extracted": "D"}
    # Methods side by side at each exit: bars at the same x would hide one another.
    dodge = {mode: (i - (len(MODES) - 1) / 2) * 0.06 for i, mode in enumerate(MODES)}
    for ax, name, scale in ((axes[0], "exact_match", 100.0), (axes[1], "loss", 1.0)):
        for mode in MODES:
            points = [
                (r["layer"], r["metrics"][mode][name])
                for r in rows
                if r["metrics"].get(mode) and r["metrics"][mode].get(name)
            ]
            if not points:
                continue
            layers = [k + dodge[mode] for k, _ in points]
            mean = [scale * g["mean"] for _, g in points]
            low = [scale * (g["mean"] - g["min"]) for _, g in points]
            high = [scale * (g["max"] - g["mean"]) for _, g in points]
            ax.errorbar(
                layers, mean, yerr=[low, high], fmt=styles[mode], capsize=3,
                label=MODE_LABELS[mode], markersize=6,
            )  # fmt: skip
        ax.set_xlabel("exit layer k")
        ax.set_xticks([r["layer"] for r in rows])
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("exact match (%)")
    axes[1].set_ylabel("loss (response tokens)")
    axes[0].set_title("exact match vs depth (mean, bars: min-max over seeds)")
    axes[1].set_title("loss vs depth (mean, bars: min-max over seeds)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
