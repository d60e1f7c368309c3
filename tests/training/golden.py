"""The golden loss curve: the default tiny job, 20 steps, every exit's loss per step.

A change that should not touch numerics (a refactor, a reliability guard, a new option left at
its default) must reproduce `golden_loss_curve.json` at one rank and at TP2 x PP2. A deliberate
numeric change regenerates the file in a commit of its own that says why:

    .venv/bin/python -m tests.training.golden --reason "why the curve changed"

Tolerances (fp32 on CPU):
- one rank vs the file: rel 1e-5. The file was written by a one-rank run, so on the same
  machine the match is exact; another x86 CPU may pick other BLAS kernels (summation order),
  which over 20 Adam steps moved losses by < 1e-6 relative in our runs.
- TP2 x PP2 vs the file: rel 1e-4. TP splits matmuls into partial sums and PP/DP reorder the
  gradient sums; observed 3.8e-7 relative (largest over 20 steps, every exit and grad norm).
A real numeric change is far larger: a dropped exit weight, a changed loss normalisation or a
skipped exit gradient moves step-2 losses by 1e-3 or more.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

GOLDEN_FILE = Path(__file__).with_name("golden_loss_curve.json")
STEPS = 20
# The README's default job (configs/default.yaml = the embedded defaults), shortened to 20
# steps, no validation or tracking so that only the training curve is compared.
OVERRIDES = [
    f"train.train_iters={STEPS}",
    "train.eval_interval=0",
    "train.log_interval=5",
    "tracking.enabled=false",
]
TP2_PP2 = ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"]
SINGLE_RANK_RTOL = 1e-5
TP2_PP2_RTOL = 1e-4
COMPARED = ("loss", "grad_norm")  # plus every exit_<k>


def golden_config(output_dir: Path, *extra: str):
    from soft.config.root import load_config

    return load_config(None, [*OVERRIDES, f"train.output_dir={output_dir}", *extra])


def curve(train_history: list[dict]) -> list[dict]:
    """The compared values of each step record."""
    keys = [k for k in train_history[0] if k in COMPARED or k.startswith("exit_")]
    return [{"iteration": r["iteration"], **{k: r[k] for k in keys}} for r in train_history]


def load_golden() -> dict:
    return json.loads(GOLDEN_FILE.read_text())


def compare(got: list[dict], rtol: float) -> float:
    """Largest relative difference from the golden curve; AssertionError beyond rtol."""
    want = load_golden()["steps"]
    assert [r["iteration"] for r in got] == [r["iteration"] for r in want], "steps differ"
    worst = 0.0
    for g, w in zip(got, want, strict=True):
        assert set(g) == set(w), f"step {w['iteration']}: keys {sorted(g)} vs {sorted(w)}"
        for key in w:
            if key == "iteration":
                continue
            rel = abs(g[key] - w[key]) / max(abs(w[key]), 1e-12)
            assert rel <= rtol, (
                f"step {w['iteration']} {key}: {g[key]!r} vs golden {w[key]!r} "
                f"(rel {rel:.2e} > {rtol:.0e})"
            )
            worst = max(worst, rel)
    return worst


def _run_single_rank(output_dir: Path) -> list[dict]:
    from soft.parallel.setup import init_distributed
    from soft.training.cli import run_training

    cfg = golden_config(output_dir)
    init_distributed(cfg.parallel, cfg.train.seed)
    return curve(run_training(cfg).train_history)


def main(argv: list[str] | None = None) -> int:
    import tempfile

    import megatron.core
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reason", required=True, help="why the golden curve changes")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        steps = _run_single_rank(Path(tmp) / "run")
    GOLDEN_FILE.write_text(
        json.dumps(
            {
                "what": "default tiny job, 1 rank, fp32, CPU: " + " ".join(OVERRIDES),
                "reason": args.reason,
                "written": datetime.date.today().isoformat(),
                "versions": {
                    "torch": torch.__version__,
                    "megatron-core": megatron.core.__version__,
                    "python": platform.python_version(),
                    "machine": platform.machine(),
                },
                "steps": steps,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {GOLDEN_FILE} ({len(steps)} steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
