"""The whole paper reproduction: data -> tokenizer -> runs -> per-exit evaluation -> report.

`reproduce(Options(...))` is what `tools/reproduce_paper.py` calls; see that file for the CLI.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from soft.config.errors import ConfigError
from soft.experiments import data as exp_data
from soft.experiments import results as res
from soft.experiments import runner
from soft.experiments.plan import Layout, RunSpec, build_plan, check_extra_overrides
from soft.experiments.settings import Settings, make_settings
from soft.experiments.tracking import log_parent_run, report_params

# Shown in the report and MLflow; a corpus the project does not know is marked as such.
KNOWN_LICENCES = {
    "gsm8k_train_alpaca.json": "MIT (GSM8K train, Alpaca format by AlpacaDataCleaned)",
}
PARENT_RUN_NAME = "paper_repro"
PARENT_RUN_ID_FILE = "mlflow_parent_run_id"  # beside results.json: lets a --seeds run nest it

Echo = Callable[[str], None]


@dataclass
class Options:
    out: Path = Path("runs/paper_repro")
    scale: float = 1.0
    nproc_per_node: int = 1
    jobs: int | None = None  # training runs at a time; None = runner.default_jobs
    reuse_base: bool = False
    mini: bool = False
    corpus: Path | None = None  # required unless pretrain is off
    pretrain: bool = True
    mlflow_uri: str | None = None
    experiment: str = "paper_repro"
    tasks: list[str] | None = None  # built-in fine-tuning tasks; None = settings.DEFAULT_TASKS
    overrides: list[str] = field(default_factory=list)
    seed: int = 42  # train.seed of every fine-tuning run
    data_seed: int | None = None  # fine-tuning records and test prompts; None = seed (--seeds too)
    seeds: list[int] | None = None  # several seeds: soft/experiments/seeds.py runs one per seed
    # Set by the --seeds driver, not the CLI: the pretrained base shared by every seed (its
    # folder holds runs/base, the corpus and the tokenizer) and the seed's MLflow parent name.
    shared_base: Path | None = None
    base_seed: int | None = None  # train.seed of the shared base
    run_name: str = PARENT_RUN_NAME

    def settings(self) -> Settings:
        return make_settings(
            self.scale, self.mini, self.tasks, self.seed, self.data_seed, self.base_seed
        )


def check_options(opts: Options) -> None:
    if opts.nproc_per_node < 1:
        raise ConfigError(f"--nproc-per-node: expected >= 1, got {opts.nproc_per_node}")
    if opts.jobs is not None and opts.jobs < 1:
        raise ConfigError(f"--jobs: expected >= 1, got {opts.jobs}")
    if opts.reuse_base and not opts.pretrain:
        raise ConfigError("--reuse-base and --no-pretrain contradict each other: pick one")
    if not opts.experiment.strip():
        raise ConfigError("--experiment: expected a non-empty name")
    if opts.mlflow_uri is not None and not opts.mlflow_uri.strip():
        raise ConfigError("--mlflow-uri: expected a URI (e.g. sqlite:////abs/path/mlflow.db)")
    if opts.out.exists() and not opts.out.is_dir():
        raise ConfigError(f"--out '{opts.out}' exists and is not a directory")
    if opts.pretrain and not opts.reuse_base and opts.shared_base is None:
        exp_data.check_corpus(opts.corpus)
    if opts.shared_base is not None and (not opts.pretrain or opts.reuse_base):
        raise ConfigError("a shared base needs pretraining on and is reused by construction")


def validate_plan(plan: list[RunSpec]) -> bool:
    """Every run's config, checked before any work (a bad key fails now, not after an hour).
    Returns whether MLflow tracking is on."""
    from soft.config.root import load_config

    enabled = True
    for spec in plan:
        try:
            cfg = load_config(None, list(spec.overrides))
        except ConfigError as exc:
            raise ConfigError(f"run '{spec.name}': {exc}") from exc
        enabled = cfg.tracking.enabled
    return enabled


def _prepare_data(
    opts: Options, s: Settings, layout: Layout, echo: Echo
) -> tuple[dict[str, object], int, int]:
    """Fine-tuning splits, pretraining corpus and tokenizer (those two not when the base is
    shared: the --seeds driver made them). Returns (corpus info, train, test sizes)."""
    ft, train, _ = exp_data.make_finetune_data(
        layout.data_dir, s.data_seed, s.num_train, s.num_test, s.tasks
    )
    echo(
        f"fine-tuning data: {ft.num_train} train / {ft.num_test} held-out test records of the "
        f"built-in tasks {', '.join(s.tasks)} (data seed {s.data_seed})"
    )
    info: dict[str, object] = {"pretrained": opts.pretrain}
    if opts.pretrain and opts.corpus is not None:  # --reuse-base needs no --corpus
        info.update(corpus=str(opts.corpus.resolve()), licence=_licence(opts.corpus))
    if opts.shared_base is None:
        info |= prepare_base_inputs(opts, s, layout, train, echo)
    return info, ft.num_train, ft.num_test


def prepare_base_inputs(
    opts: Options, s: Settings, layout: Layout, train: list[dict[str, str]], echo: Echo
) -> dict[str, object]:
    """The pretraining corpus (plain text) and the tokenizer, trained on it and on the
    fine-tuning records `train`. Returns corpus info for the report."""
    info: dict[str, object] = {}
    docs: list[str] = []
    if opts.pretrain and not opts.reuse_base:
        records = exp_data.load_alpaca_corpus(opts.corpus)[: s.corpus_limit]
        docs = exp_data.corpus_documents(records)
        exp_data.write_jsonl_text(docs, layout.corpus)
        info["corpus_records"] = len(docs)
        echo(f"pretraining corpus: {len(docs)} documents from {opts.corpus} -> {layout.corpus}")
    if opts.reuse_base:
        echo(f"tokenizer: reusing {layout.tokenizer} (--reuse-base)")
    else:
        lines = exp_data.tokenizer_lines(docs, train)
        layout.tokenizer.parent.mkdir(parents=True, exist_ok=True)
        exp_data.train_tokenizer(lines, layout.tokenizer, s.vocab_size)
        echo(f"tokenizer: {s.vocab_size} BPE pieces -> {layout.tokenizer}")
    return info


def _licence(corpus: Path) -> str:
    return KNOWN_LICENCES.get(corpus.name, "unknown (user-supplied corpus: check its licence)")


def run_all(
    plan: list[RunSpec], layout: Layout, opts: Options, jobs: int, echo: Echo
) -> tuple[dict[str, float], list[str]]:
    """Train every run (independent ones side by side); returns (wall seconds per run, notes)."""
    notes: list[str] = []
    done: set[str] = set()
    base = next((spec for spec in plan if spec.name == "base"), None)
    if base is not None and opts.shared_base is not None:
        if not runner.is_finished(layout.run_dir("base")):  # the driver trained it first
            raise ConfigError(f"the shared base in {layout.run_dir('base')} is not finished")
        seed = opts.settings().base_seed
        notes.append(f"base shared by every seed: {layout.run_dir('base')} (seed {seed})")
        done.add("base")
    elif base is not None and (opts.reuse_base or runner.reusable_base(base, layout)):
        if opts.reuse_base:
            notes += runner.check_forced_reuse(base, layout)
        echo(f"base: reusing the finished run in {layout.run_dir('base')}")
        notes.append(f"base reused from {layout.run_dir('base')} (not retrained)")
        done.add("base")
    index = {spec.name: i for i, spec in enumerate(plan, start=1)}

    def head(spec: RunSpec) -> str:
        return f"[{index[spec.name]}/{len(plan)}] {spec.name}"

    def on_start(spec: RunSpec) -> None:
        echo(
            f"{head(spec)}: {spec.mode}, {spec.depth} layers, {spec.iters} steps "
            f"(log: {layout.log(spec.name)})"
        )

    def on_done(spec: RunSpec, outcome: runner.RunOutcome) -> None:
        loss = "-" if outcome.final_loss is None else f"{outcome.final_loss:.4f}"
        echo(f"{head(spec)}: done in {outcome.wall_s:.0f} s, final training loss {loss}")
        if spec.name == "base":
            runner.write_fingerprint(spec, layout)

    outcomes = runner.run_plan(
        plan,
        done,
        jobs,
        lambda spec: runner.train(spec, layout, opts.nproc_per_node),
        on_start,
        on_done,
    )
    return {f"train {name}": o.wall_s for name, o in outcomes.items()}, notes


def _evaluate_all(
    plan: list[RunSpec], layout: Layout, s: Settings, echo: Echo
) -> tuple[dict[str, tuple[str, dict]], dict[str, float]]:
    """Every fine-tuned run's final checkpoint on the held-out prompts, at its exits."""
    from transformers.utils import logging as hf_logging

    from soft.evaluation.runner import run_eval_exits

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per run clutters the console

    evals: dict[str, tuple[str, dict]] = {}
    timing: dict[str, float] = {}
    for spec in plan:
        if not spec.eval_exits:
            continue
        started = time.perf_counter()
        out = layout.eval_json(spec.name)
        run_eval_exits(
            layout.checkpoints(spec.name),
            layout.data_dir / "test.json",
            "alpaca",
            exits=list(spec.eval_exits),
            max_new_tokens=s.max_new_tokens,
            out=out,
            progress=False,
        )
        timing[f"eval {spec.name}"] = time.perf_counter() - started
        evals[spec.name] = (spec.mode, json.loads(out.read_text()))
        echo(
            f"eval {spec.name}: exits {list(spec.eval_exits)} in {timing[f'eval {spec.name}']:.0f} s"
        )
    return evals, timing


def _base_description(opts: Options, info: dict, s: Settings, notes: list[str]) -> str:
    if not opts.pretrain:
        return "none: every method fine-tuned from a random init (--no-pretrain)"
    if opts.shared_base is not None:
        how = "; trained once and shared by every seed"
    else:
        how = " (reused)" if any(n.startswith("base reused") for n in notes) else ""
    if "corpus" not in info:
        return f"pretrained (seed {s.base_seed}) on the corpus of the reused base{how}"
    return (
        f"pretrained for {s.pretrain_iters} steps (seed {s.base_seed}) on "
        f"{Path(info['corpus']).name} as plain text, licence {info['licence']}{how}"
    )


def base_fingerprint_sha(layout: Layout) -> str | None:
    """Identifies the base a result was fine-tuned from (None: no recorded base)."""
    path = layout.run_dir("base") / runner.FINGERPRINT
    return runner.sha256(path) if path.is_file() else None


def _child_run_ids(plan: list[RunSpec], layout: Layout, shared_base: bool) -> list[str]:
    ids = []
    for spec in plan:
        if spec.name == "base" and shared_base:
            continue  # nested under the --seeds parent run, not under one seed's
        path = layout.run_dir(spec.name) / "mlflow_run_id"
        if path.is_file():
            ids.append(path.read_text().strip())
    return ids


def reproduce(opts: Options, echo: Echo = print) -> dict:
    """Run the whole comparison; returns the results dict written to results.json."""
    if opts.seeds is not None:
        from soft.experiments.seeds import reproduce_seeds

        return reproduce_seeds(opts, echo)
    started = time.perf_counter()
    check_options(opts)
    s = opts.settings()
    layout = Layout(opts.out.resolve(), opts.shared_base and opts.shared_base.resolve())
    uri = opts.mlflow_uri or layout.default_mlflow_uri
    extra = check_extra_overrides(list(opts.overrides))
    plan = build_plan(
        s, layout, pretrain=opts.pretrain, mlflow_uri=uri, experiment=opts.experiment, extra=extra
    )
    tracking = validate_plan(plan)
    if "OMP_NUM_THREADS" not in os.environ:  # evaluation runs here: same thread policy as runs
        import torch

        torch.set_num_threads(1)
    layout.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    info, num_train, num_test = _prepare_data(opts, s, layout, echo)
    timing = {"data and tokenizer": time.perf_counter() - t0}
    jobs = opts.jobs or runner.default_jobs(opts.nproc_per_node)
    echo(f"{len(plan)} training runs, up to {jobs} at a time, {opts.nproc_per_node} rank(s) each")
    run_timing, notes = run_all(plan, layout, opts, jobs, echo)
    evals, eval_timing = _evaluate_all(plan, layout, s, echo)
    timing |= run_timing | eval_timing
    modes = res.merge_mode_evals(evals)
    if not any(m.per_example for m in modes.values()):
        notes.append("the evaluation files have no per_example outcomes: win rates not computed")
    rows = res.comparison_rows(modes, [*s.exit_layers, *s.extracted_depths])
    timing["total"] = time.perf_counter() - started
    results = {
        "settings": s.as_params(),
        "base_description": _base_description(opts, info, s, notes),
        "corpus": info,
        "num_train": num_train,
        "num_test": num_test,
        "nproc_per_node": opts.nproc_per_node,
        "jobs": jobs,
        "extra_overrides": extra,
        "base_fingerprint_sha256": base_fingerprint_sha(layout) if opts.pretrain else None,
        "runs": _run_summaries(plan),
        "rows": rows,
        "notes": notes,
        "timing": {k: round(v, 1) for k, v in timing.items()},
    }
    _write_report(results, layout, plan, uri, opts, tracking, echo)
    return results


def _run_summaries(plan: list[RunSpec]) -> dict[str, dict]:
    return {
        spec.name: {
            "mode": spec.mode,
            "depth": spec.depth,
            "loads": spec.loads,
            "overrides": list(spec.overrides),
        }
        for spec in plan
    }


def _write_report(
    results: dict, layout: Layout, plan: list[RunSpec], uri: str, opts: Options,
    tracking: bool, echo: Echo,
) -> None:  # fmt: skip
    json_path, md_path = layout.out / "results.json", layout.out / "results.md"
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    md_path.write_text(res.markdown_report(results))
    png = res.plot_results(results["rows"], layout.out / "results.png", "SoFT paper reproduction")
    if tracking:
        params = report_params(
            results, "num_train", "num_test", "nproc_per_node", "jobs", "extra_overrides"
        )
        artifacts = [json_path, md_path, png, *sorted(layout.eval_dir.glob("*.json"))]
        run_id = log_parent_run(
            uri, opts.experiment, opts.run_name, params, results["rows"], artifacts,
            _child_run_ids(plan, layout, opts.shared_base is not None),
        )  # fmt: skip
        (layout.out / PARENT_RUN_ID_FILE).write_text(run_id + "\n")
        echo(f"MLflow: parent run {run_id} in {uri} (experiment '{opts.experiment}')")
    echo("")
    echo(res.quality_table(results["rows"]))
    echo("")
    echo(res.win_table(results["rows"]))
    echo(f"\nwrote {md_path}, {json_path}, {png} ({results['timing']['total']:.0f} s in total)")
