"""tools/reproduce_paper.py --mini --seeds 1,2 end to end: a shared base, then every mode
trained (subprocesses) and every exit evaluated per seed, the per-seed and aggregate report
files written and logged to MLflow with the runs nested under them; a rerun reuses it all."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import pytest

from soft.experiments.plan import MODES
from soft.experiments.settings import make_settings
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

SEEDS = (1, 2)


def _run(out, corpus):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "tools/reproduce_paper.py", "--mini", "--out", str(out)]
    cmd += ["--seeds", ",".join(map(str, SEEDS)), "--corpus", str(corpus)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _check_seed(out, seed):
    """One seed's folder: a complete single-seed result, reporting the seeds it used."""
    s = make_settings(mini=True, seed=seed, base_seed=SEEDS[0])
    results = json.loads((out / "results.json").read_text())
    assert results["num_test"] == s.num_test
    got = results["settings"]
    assert (got["seed"], got["data_seed"], got["base_seed"]) == (seed, seed, SEEDS[0])
    assert set(results["runs"]) == {
        "base", "sft", "soft", "ict", *(f"extracted_{k}" for k in s.extracted_depths),
    }  # fmt: skip
    for name, run in results["runs"].items():
        want = SEEDS[0] if name == "base" else seed
        assert f"train.seed={want}" in run["overrides"], name
    rows = {row["layer"]: row for row in results["rows"]}
    assert sorted(rows) == s.exit_layers  # the extracted depths are exits too
    for k, row in rows.items():
        for mode in ("soft", "sft", "ict"):
            got = row["metrics"][mode]
            assert got["loss"] > 0 and 0 <= got["exact_match"] <= 1, (k, mode)
        assert (row["metrics"]["extracted"] is not None) == (k in s.extracted_depths)
        for name, wr in row["win_rates"].items():
            if name == "soft_vs_extracted" and k not in s.extracted_depths:
                assert wr is None
                continue
            assert wr["wins"] + wr["ties"] + wr["losses"] == s.num_test, (k, name)
    md = (out / "results.md").read_text()
    for label in ("SoFT EM", "SFT EM", "SFT+ICT EM", "Extracted EM", "SoFT vs SFT W/T/L"):
        assert label in md
    assert f"training seed {seed} (`train.seed`)" in md and f"Data seed {seed} " in md
    assert "GSM8K" in md and "shared by every seed" in md  # corpus, licence, shared base
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    for name in results["runs"]:
        if name != "base":  # the base is trained once, under <out>/base
            assert (out / "runs" / f"{name}.log").is_file()
    assert not (out / "runs" / "base").exists()
    return results


def _check_aggregate(out, per_seed):
    report = json.loads((out / "results.json").read_text())
    assert report["seeds"] == list(SEEDS) and report["base_shared"] is True
    assert [(e["train_seed"], e["data_seed"]) for e in report["per_seed"]] == [
        (s, s) for s in SEEDS
    ]
    seed_rows = [{r["layer"]: r for r in res["rows"]} for res in per_seed]
    for row in report["rows"]:
        k = row["layer"]
        for mode in MODES:
            for metric in ("loss", "exact_match"):
                values = [
                    rows[k]["metrics"][mode][metric]
                    for rows in seed_rows
                    if rows[k]["metrics"][mode] is not None
                ]
                got = (row["metrics"][mode] or {}).get(metric)
                if not values:
                    assert got is None
                    continue
                assert got["values"] == values
                assert got["mean"] == pytest.approx(statistics.fmean(values))
                assert got["std"] == pytest.approx(statistics.stdev(values))
                assert (got["min"], got["max"]) == (min(values), max(values))
        for name, claim in row["claims"].items():
            scores = [r[k]["win_rates"][name] for r in seed_rows]
            if scores[0] is None:
                assert claim is None or claim["score"] is None
                continue
            scores = [wr["score"] for wr in scores]
            assert claim["seeds"] == len(SEEDS)
            assert claim["soft_better"] == sum(v > 0 for v in scores)
            assert claim["score"]["mean"] == pytest.approx(statistics.fmean(scores))
            if 0 < claim["soft_better"] < len(SEEDS):
                assert claim["verdict"] == "tie"
    md = (out / "results.md").read_text()
    assert f"over {len(SEEDS)} seeds" in md and "shared by every seed" in md
    assert "SoFT vs SFT SoFT better in" in md and f"/{len(SEEDS)} seeds" in md
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    return report


def test_mini_reproduction_over_two_seeds(tmp_path, shared_data):
    out = tmp_path / "repro"
    corpus = shared_data / "gsm8k-alpaca" / "gsm8k_train_alpaca.json"
    proc = _run(out, corpus)
    per_seed = [_check_seed(out / f"seed_{s}", s) for s in SEEDS]
    report = _check_aggregate(out, per_seed)
    assert (out / "base" / "runs" / "base" / "exit_status.json").is_file()
    assert proc.stdout.count("[1/1] base: done") == 1  # pretrained once for both seeds
    md = (out / "results.md").read_text()
    claims = md.split("## Claims")[1].split("\n\n")[1]
    assert claims in proc.stdout  # the claims table is printed

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("paper_repro")
    runs = client.search_runs([experiment.experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    parent = by_name["paper_repro"]
    assert parent.info.status == "FINISHED"
    assert json.loads(parent.data.params["seeds"]) == list(SEEDS)
    assert "MIT" in parent.data.params["corpus.licence"]
    assert {f"{m}/exact_match" for m in MODES} <= set(parent.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.md", "results.json", "results.png"} <= artifacts

    def children(run):
        return sorted(
            r.info.run_name
            for r in runs
            if r.data.tags.get("mlflow.parentRunId") == run.info.run_id
        )

    seed_parents = [f"paper_repro seed_{s}" for s in SEEDS]
    assert children(parent) == sorted(["base", *seed_parents])
    for name, res in zip(seed_parents, per_seed, strict=True):
        assert children(by_name[name]) == sorted(set(res["runs"]) - {"base"})
        seed_artifacts = {a.path for a in client.list_artifacts(by_name[name].info.run_id)}
        assert {"results.md", "results.json", "soft.json"} <= seed_artifacts

    # An interrupted or repeated run continues: nothing is trained again.
    again = _run(out, corpus)
    assert again.stdout.count("reusing the finished result") == len(SEEDS)
    assert "base: reusing the finished run" in again.stdout
    assert "done in" not in again.stdout
    assert json.loads((out / "results.json").read_text())["rows"] == report["rows"]
