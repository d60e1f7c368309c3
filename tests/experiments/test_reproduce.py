"""tools/reproduce_paper.py --mini end to end: every mode trained (subprocesses), every exit
evaluated, the report files written and logged to MLflow with the runs nested under it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from soft.experiments.plan import MODES
from soft.experiments.settings import make_settings
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def test_mini_reproduction_covers_every_mode_and_exit(tmp_path, shared_data):
    out = tmp_path / "repro"
    corpus = shared_data / "gsm8k-alpaca" / "gsm8k_train_alpaca.json"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "tools/reproduce_paper.py", "--mini", "--out", str(out)]
    proc = subprocess.run(
        [*cmd, "--corpus", str(corpus)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    s = make_settings(mini=True)

    results = json.loads((out / "results.json").read_text())
    assert results["num_test"] == s.num_test
    assert set(results["runs"]) == {
        "base", "sft", "soft", "ict", *(f"extracted_{k}" for k in s.extracted_depths),
    }  # fmt: skip
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
    assert "GSM8K" in md  # the corpus and its licence are named
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert md.split("## Loss")[1].split("\n\n")[1] in proc.stdout  # the table is printed
    for name in results["runs"]:
        assert (out / "runs" / f"{name}.log").is_file()

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("paper_repro")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.info.run_name == "paper_repro")
    assert parent.info.status == "FINISHED"
    assert parent.data.params["settings.num_layers"] == str(s.num_layers)
    assert "MIT" in parent.data.params["corpus.licence"]
    assert {f"{m}/exact_match" for m in MODES} <= set(parent.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.md", "results.json", "results.png", "soft.json"} <= artifacts
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == sorted(results["runs"])
