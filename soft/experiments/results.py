"""Turning the per-run evaluation files into the paper's comparison: tables, win rates, plot.

Pure functions of the evaluation JSON (`soft.evaluation.runner.run_eval_exits` output:
`{"exits": [{"layer", "loss", "exact_match", ...}], "per_example": {"<layer>": [1/0, ...]}}`),
so they are tested on hand-made inputs.

Win rate (the paper judges pairs of answers per prompt; here the judge is exact match):
SoFT wins a prompt when its answer is right and the other model's is wrong, loses on the
reverse, ties otherwise; score = (wins - losses) / n, in [-1, 1], 0 = no difference.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from soft.experiments.plan import MODE_LABELS, MODES

# (ours, theirs): every comparison is SoFT against a baseline at the same depth.
COMPARISONS = (("soft", "sft"), ("soft", "ict"), ("soft", "extracted"))
DASH = "—"


@dataclass(frozen=True)
class WinRate:
    wins: int
    ties: int
    losses: int

    @property
    def n(self) -> int:
        return self.wins + self.ties + self.losses

    @property
    def score(self) -> float:
        return (self.wins - self.losses) / self.n if self.n else 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {**asdict(self), "n": self.n, "score": self.score}


def win_rate(ours: Sequence[int | bool], theirs: Sequence[int | bool]) -> WinRate:
    """Per-prompt exact-match outcomes of two models on the same prompts, in the same order."""
    if len(ours) != len(theirs):
        raise ValueError(
            f"win rate needs the same prompts on both sides, got {len(ours)} and {len(theirs)}"
        )
    wins = sum(1 for a, b in zip(ours, theirs, strict=True) if a and not b)
    losses = sum(1 for a, b in zip(ours, theirs, strict=True) if b and not a)
    return WinRate(wins, len(ours) - wins - losses, losses)


@dataclass
class ModeEval:
    """One method's results: per exit layer, the metrics and the per-prompt outcomes."""

    metrics: dict[int, dict[str, float | None]]
    per_example: dict[int, list[int]]


def parse_eval(report: Mapping) -> ModeEval:
    """Metrics and per-prompt exact-match outcomes by layer from one evaluation JSON."""
    metrics = {
        int(row["layer"]): {"loss": row.get("loss"), "exact_match": row.get("exact_match")}
        for row in report.get("exits", [])
    }
    per_example = {int(k): [int(bool(v)) for v in vals]
                   for k, vals in (report.get("per_example") or {}).items()}  # fmt: skip
    return ModeEval(metrics, per_example)


def merge_mode_evals(evals: Mapping[str, tuple[str, Mapping]]) -> dict[str, ModeEval]:
    """{run name: (mode, eval JSON)} -> {mode: ModeEval}; the extracted runs (one depth each)
    are merged into one 'extracted' entry."""
    merged: dict[str, ModeEval] = {}
    for _name, (mode, report) in evals.items():
        parsed = parse_eval(report)
        into = merged.setdefault(mode, ModeEval({}, {}))
        into.metrics.update(parsed.metrics)
        into.per_example.update(parsed.per_example)
    return merged


def comparison_rows(modes: Mapping[str, ModeEval], layers: Sequence[int]) -> list[dict]:
    """One row per exit layer: every mode's loss/EM there (None where it has no such exit)
    and SoFT's win rates against each baseline evaluated at that layer."""
    rows = []
    for k in sorted(set(layers)):
        metrics = {m: modes[m].metrics.get(k) if m in modes else None for m in MODES}
        wins: dict[str, dict | None] = {}
        for ours, theirs in COMPARISONS:
            a = modes.get(ours, ModeEval({}, {})).per_example.get(k)
            b = modes.get(theirs, ModeEval({}, {})).per_example.get(k)
            wins[f"{ours}_vs_{theirs}"] = win_rate(a, b).as_dict() if a and b else None
        rows.append({"layer": k, "metrics": metrics, "win_rates": wins})
    return rows


# ----------------------------------------------------------------------------- presentation


def _num(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return DASH
    return f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return DASH if value is None else f"{100 * value:.1f}%"


def grid_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def quality_table(
    rows: Sequence[Mapping],
    loss_cell: Callable[[Any], str] = _num,
    em_cell: Callable[[Any], str] = _pct,
    em_label: str = "EM",
) -> str:
    """Loss and exact match per exit layer and method; the cell formatters let the multi-seed
    report (soft.experiments.aggregate) write its spreads in the same table."""
    header = ["exit k"]
    for m in MODES:
        header += [f"{MODE_LABELS[m]} loss", f"{MODE_LABELS[m]} {em_label}"]
    body = []
    for row in rows:
        cells = [str(row["layer"])]
        for m in MODES:
            got = row["metrics"].get(m) or {}
            cells += [loss_cell(got.get("loss")), em_cell(got.get("exact_match"))]
        body.append(cells)
    return grid_table(header, body)


def win_table(rows: Sequence[Mapping]) -> str:
    """SoFT's per-prompt win/tie/loss counts and score against each baseline."""
    header = ["exit k"]
    for ours, theirs in COMPARISONS:
        label = f"{MODE_LABELS[ours]} vs {MODE_LABELS[theirs]}"
        header += [f"{label} W/T/L", f"{label} score"]
    body = []
    for row in rows:
        cells = [str(row["layer"])]
        for ours, theirs in COMPARISONS:
            wr = row["win_rates"].get(f"{ours}_vs_{theirs}")
            if wr is None:
                cells += [DASH, DASH]
            else:
                cells += [f"{wr['wins']}/{wr['ties']}/{wr['losses']}", f"{wr['score']:+.3f}"]
        body.append(cells)
    return grid_table(header, body)


def markdown_report(results: Mapping) -> str:
    """results.md: what was run, the two tables, notes and timings."""
    s = results["settings"]
    lines = [
        "# SoFT vs SFT vs SFT+ICT vs extracted sub-models (small-scale reproduction)",
        "",
        f"Model: {s['num_layers']} layers, hidden {s['hidden_size']}, ffn {s['ffn_hidden_size']}, "
        f"{s['num_attention_heads']} heads, vocab {s['vocab_size']} (scale {s['scale']}"
        f"{', mini' if s['mini'] else ''}). Base: {results['base_description']}.",
        f"Fine-tuning: {results['num_train']} records of the built-in tasks "
        f"{', '.join(s['tasks'])}, {s['finetune_iters']} steps, "
        f"batch {s['finetune_batch_size']}, lr {s['finetune_lr']}, "
        f"training seed {s['seed']} (`train.seed`); the same for every method. Data seed "
        f"{s['data_seed']} (the fine-tuning records and held-out prompts). Test: "
        f"{results['num_test']} held-out prompts, greedy decoding, exact match (EM).",
        "",
        "## Loss and exact match per exit",
        "",
        quality_table(results["rows"]),
        "",
        f"Extracted = a {', '.join(map(str, s['extracted_depths']))}-layer model cut from the "
        f"base and fine-tuned alone ({DASH} at other depths).",
        "",
        "## Win rates of SoFT per prompt (judge: exact match)",
        "",
        win_table(results["rows"]),
        "",
        "W = SoFT right and the other wrong, L = the reverse, T = both right or both wrong; "
        "score = (W - L) / n.",
    ]
    if results.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {note}" for note in results["notes"]]
    if results.get("timing"):
        lines += ["", "## Wall time", ""]
        lines += [f"- {name}: {sec:.0f} s" for name, sec in results["timing"].items()]
    return "\n".join(lines) + "\n"


def plot_results(rows: Sequence[Mapping], path: Path, title: str = "") -> Path:
    """Two panels against exit depth: EM and loss, one line per method (extracted: points)."""
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    fig, (em_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"soft": "o-", "sft": "s--", "ict": "^-.", "extracted": "D"}
    for mode in MODES:
        points = [(r["layer"], r["metrics"][mode]) for r in rows if r["metrics"].get(mode)]
        if not points:
            continue
        layers = [k for k, _ in points]
        label = MODE_LABELS[mode]
        ems = [m["exact_match"] for _, m in points]
        if all(v is not None for v in ems):
            em_ax.plot(layers, [100 * v for v in ems], styles[mode], label=label, markersize=7)
        loss_ax.plot(layers, [m["loss"] for _, m in points], styles[mode], label=label)
    for ax, ylabel in ((em_ax, "exact match (%)"), (loss_ax, "loss (response tokens)")):
        ax.set_xlabel("exit layer k")
        ax.set_ylabel(ylabel)
        ax.set_xticks([r["layer"] for r in rows])
        ax.grid(alpha=0.3)
        ax.legend()
    em_ax.set_title("exact match vs depth")
    loss_ax.set_title("loss vs depth")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
