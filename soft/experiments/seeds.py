"""The paper reproduction over several seeds (`--seeds 42,1234,7`).

Layout under --out:
- base/: the pretrained base (runs/base, its corpus, its tokenizer), trained once with the
  first seed and shared by every seed: it stands for the pretrained model the paper starts
  from, and pretraining is the costliest run on a CPU;
- seed_<s>/: a complete single-seed result (results.md/.json/.png, runs, eval), fine-tuned
  with training seed s and data seed s (or --data-seed);
- results.md, results.json, results.png: the aggregate (soft/experiments/aggregate.py).

A rerun with the same --out reuses every seed whose results.json exists and was made with the
same settings (seeds, sizes, extra overrides, corpus, base), so an interrupted run continues.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from soft.config.errors import ConfigError
from soft.data.builtin import generate_records
from soft.experiments import aggregate as agg
from soft.experiments.plan import Layout, RunSpec, build_plan, check_extra_overrides
from soft.experiments.reproduce import (
    PARENT_RUN_ID_FILE,
    PARENT_RUN_NAME,
    Echo,
    Options,
    base_fingerprint_sha,
    check_options,
    prepare_base_inputs,
    reproduce,
    run_all,
    validate_plan,
)
from soft.experiments.settings import Settings
from soft.experiments.tracking import log_parent_run, report_params

BASE_DIR = "base"


def parse_seeds(text: str) -> list[int]:
    """'42,1234,7' -> [42, 1234, 7]; at least one, no repeats."""
    seeds = []
    for part in text.split(","):
        part = part.strip()
        try:
            seeds.append(int(part))
        except ValueError:
            raise ConfigError(
                f"--seeds '{text}': '{part}' is not an integer (expected e.g. 42,1234,7)"
            ) from None
    return check_seeds(seeds)


def check_seeds(seeds: Sequence[int]) -> list[int]:
    if not seeds:
        raise ConfigError("--seeds: expected at least one seed, e.g. --seeds 42,1234,7")
    repeated = sorted({s for s in seeds if list(seeds).count(s) > 1})
    if repeated:
        raise ConfigError(f"--seeds: {repeated} given more than once")
    return list(seeds)


def seed_dir(out: Path, seed: int) -> Path:
    return out / f"seed_{seed}"


def seed_options(opts: Options, seed: int, base_seed: int, uri: str) -> Options:
    """One seed's single-seed run: its own folder, the shared base, one MLflow store."""
    out = opts.out.resolve()
    return replace(
        opts,
        out=seed_dir(out, seed),
        seed=seed,
        seeds=None,
        reuse_base=False,  # the driver made the shared base (reused or not)
        shared_base=out / BASE_DIR if opts.pretrain else None,
        base_seed=base_seed,
        mlflow_uri=uri,
        run_name=f"{PARENT_RUN_NAME} seed_{seed}",
    )


def identity(results: dict) -> dict:
    """What must match for a finished seed to be reused."""
    corpus = results.get("corpus") or {}
    return {
        "settings": results.get("settings"),
        "extra_overrides": results.get("extra_overrides"),
        "pretrained": corpus.get("pretrained"),
        "corpus": corpus.get("corpus"),
        "base_fingerprint_sha256": results.get("base_fingerprint_sha256"),
    }


def expected_identity(opts: Options, s: Settings, extra: list[str]) -> dict:
    layout = Layout(opts.out, opts.shared_base)
    # Through JSON, as results.json stores it (tuples become lists).
    expected = {
        "settings": json.loads(json.dumps(s.as_params())),
        "extra_overrides": extra,
        "pretrained": opts.pretrain,
        "corpus": str(opts.corpus.resolve()) if opts.pretrain and opts.corpus else None,
        "base_fingerprint_sha256": base_fingerprint_sha(layout) if opts.pretrain else None,
    }
    return expected


def finished_seed(opts: Options, s: Settings, extra: list[str], echo: Echo) -> dict | None:
    """The seed's results.json when it exists and was made with these settings."""
    path = opts.out / "results.json"
    if not path.is_file():
        return None
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError:
        echo(f"seed {opts.seed}: {path} is not valid JSON: rerunning the seed")
        return None
    want, have = expected_identity(opts, s, extra), identity(results)
    if have != want:
        differ = sorted(k for k in want if want[k] != have.get(k))
        echo(f"seed {opts.seed}: {path} was made with other {', '.join(differ)}: rerunning")
        return None
    return results


def _shared_base(
    opts: Options, s: Settings, base: RunSpec, echo: Echo
) -> tuple[dict[str, object], dict[str, float], list[str]]:
    """Corpus, tokenizer and the base run, reused when it matches. The tokenizer is trained
    on the corpus and on fine-tuning records drawn with the base's seed (the first seed), as
    that seed's single-seed run would: the base then depends on the first seed only, not on
    --data-seed or the other seeds."""
    layout = Layout(opts.out.resolve() / BASE_DIR)
    layout.out.mkdir(parents=True, exist_ok=True)
    train = generate_records(s.base_seed, s.num_train, tasks=s.tasks)
    info = prepare_base_inputs(opts, s, layout, train, echo)
    timing, notes = run_all([base], layout, replace(opts, shared_base=None), 1, echo)
    return info, timing, notes


def reproduce_seeds(opts: Options, echo: Echo = print) -> dict:
    """Every seed's comparison (reusing finished ones), then the aggregate; returns the
    aggregate written to <out>/results.json."""
    started = time.perf_counter()
    seeds = check_seeds(opts.seeds or [])
    check_options(opts)
    out = opts.out.resolve()
    uri = opts.mlflow_uri or Layout(out).default_mlflow_uri
    extra = check_extra_overrides(list(opts.overrides))
    per_seed = [seed_options(opts, seed, seeds[0], uri) for seed in seeds]
    settings = [o.settings() for o in per_seed]  # bad seeds fail here, before any work
    first = build_plan(
        settings[0], Layout(per_seed[0].out, per_seed[0].shared_base), pretrain=opts.pretrain,
        mlflow_uri=uri, experiment=opts.experiment, extra=extra,
    )  # fmt: skip
    tracking = validate_plan(first)  # the seeds' plans differ only in their seeds
    out.mkdir(parents=True, exist_ok=True)
    timing: dict[str, float] = {}
    info: dict[str, object] = {"pretrained": opts.pretrain}
    notes: list[str] = []
    if opts.pretrain:
        t0 = time.perf_counter()
        base_info, _, notes = _shared_base(opts, settings[0], first[0], echo)
        info |= base_info
        timing["shared base"] = time.perf_counter() - t0
    results, reused = [], []
    for o, s in zip(per_seed, settings, strict=True):
        found = finished_seed(o, s, extra, echo)
        if found is not None:
            echo(f"seed {o.seed}: reusing the finished result in {o.out}")
            reused.append(o.seed)
        else:
            echo(f"\n=== seed {o.seed} (training seed {s.seed}, data seed {s.data_seed}) ===")
            found = reproduce(o, echo)
        timing[f"seed {o.seed}"] = found.get("timing", {}).get("total", 0.0)  # when it ran
        results.append(found)
    timing["total (this invocation)"] = time.perf_counter() - started
    report = _report(opts, seeds, results, reused, info, notes, timing)
    _write(report, out, uri, opts, tracking, per_seed, echo)
    return report


def _report(
    opts: Options, seeds: list[int], results: list[dict], reused: list[int],
    info: dict, notes: list[str], timing: dict[str, float],
) -> dict:  # fmt: skip
    first = results[0]
    common = {k: v for k, v in first["settings"].items() if k not in ("seed", "data_seed")}
    per_seed = [
        {
            "seed": seed,
            "train_seed": r["settings"]["seed"],
            "data_seed": r["settings"]["data_seed"],
            "dir": seed_dir(Path("."), seed).as_posix(),
            "reused": seed in reused,
        }
        for seed, r in zip(seeds, results, strict=True)
    ]
    if reused:
        notes = [*notes, f"seeds {reused}: finished results reused (same settings)"]
    return {
        "seeds": seeds,
        "per_seed": per_seed,
        "settings": common,
        "base_description": first["base_description"],
        "base_shared": opts.pretrain,
        "corpus": {**first["corpus"], **info},  # path and licence; records from the base
        "num_train": first["num_train"],
        "num_test": first["num_test"],
        "extra_overrides": first["extra_overrides"],
        "rows": agg.aggregate_rows([r["rows"] for r in results]),
        "notes": notes,
        "timing": {k: round(v, 1) for k, v in timing.items()},
    }


def _child_ids(per_seed: list[Options], out: Path) -> list[str]:
    """The seeds' parent runs and the shared base's run, nested under the aggregate run."""
    paths = [o.out / PARENT_RUN_ID_FILE for o in per_seed]
    paths.append(out / BASE_DIR / "runs" / "base" / "mlflow_run_id")
    return [p.read_text().strip() for p in paths if p.is_file()]


def _write(
    report: dict, out: Path, uri: str, opts: Options, tracking: bool,
    per_seed: list[Options], echo: Echo,
) -> None:  # fmt: skip
    json_path, md_path = out / "results.json", out / "results.md"
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    md_path.write_text(agg.markdown_report(report))
    n = len(report["seeds"])
    png = agg.plot_aggregate(
        report["rows"], out / "results.png", f"SoFT paper reproduction, {n} seeds"
    )
    if tracking:
        params = report_params(report, "seeds", "extra_overrides")
        run_id = log_parent_run(
            uri, opts.experiment, PARENT_RUN_NAME, params, agg.mean_rows(report["rows"]),
            [json_path, md_path, png], _child_ids(per_seed, out),
        )  # fmt: skip
        echo(f"MLflow: parent run {run_id} over the seeds in {uri}")
    echo("")
    echo(agg.claims_table(report["rows"]))
    total = report["timing"]["total (this invocation)"]
    echo(f"\nwrote {md_path}, {json_path}, {png} ({total:.0f} s in total)")
