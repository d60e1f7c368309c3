"""README's command blocks, run as a new user would after the two commands.

Every command in a ```bash block is either run here (in a scratch folder beside which the
checkout's launchers, tools and configs appear, with the virtual environment active, and
training shortened to a few steps) or needs something this machine has not got, which the
NEEDS list names; a new README command must be one or the other. A command followed by a
`# error: ...` line must fail with exit status 2 and print that message.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
# What a command needs that this machine has not got (weights, data, a GPU cluster, network).
NEEDS = {
    "/data/": "a user's data files",
    "/models/": "the released LLaMA-2 weights",
    "llama2-13b": "a 13B model",
    "llama3.2-3b": "the released Llama-3.2-3B weights",
    "CORPUS": "a pretraining corpus the user picks",
    "hf://": "the Hugging Face hub (no network here)",
    "...": "a placeholder the user fills in",
    "sbatch": "a multi-node GPU SLURM cluster (tests/slurm runs the script on one node)",
    "scripts/setup.sh": "the two commands themselves (CI runs them)",
    "setup_llamacpp.sh": "a 14-minute llama.cpp build (tests/benchmarks skips without it)",
}
# Shorter runs of the same commands: a few steps, a small built-in dataset, few eval examples.
SHRINK = {
    "launchers/pretrain_soft.py": [
        "train.train_iters=4", "train.lr_warmup_iters=1", "train.eval_interval=0",
        "train.log_interval=1", "data.builtin_num_samples=200",
    ],
    "tools/eval_exits.py": ["--limit", "8"],
}  # fmt: skip


def readme_commands() -> list[tuple[str, str | None]]:
    """(command, expected error message or None) for every command of every bash block."""
    out: list[tuple[str, str | None]] = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            stripped = line.strip()
            if stripped.startswith("# error: ") and out:
                out[-1] = (out[-1][0], stripped.removeprefix("# error: "))
            elif stripped and not stripped.startswith("#"):
                out.append((stripped, None))
    return out


def needs(command: str) -> str | None:
    return next((why for token, why in NEEDS.items() if token in command), None)


def runnable() -> list[tuple[str, str | None]]:
    return [(c, e) for c, e in readme_commands() if needs(c) is None]


def test_every_readme_command_is_run_or_says_what_it_needs():
    commands = readme_commands()
    assert len(commands) > 20
    ran = runnable()
    assert len(ran) >= 9, ran
    assert any(e for _, e in ran), "the config error example is run"
    for command, _ in commands:
        words = shlex.split(command, comments=True)
        assert words, command
        assert needs(command) or words[0] in ("python", "torchrun", ".venv/bin/python",
                                              ".venv/bin/torchrun", "lm_eval", "llama-cli",
                                              "vllm"), command  # fmt: skip


def _workdir(tmp: Path) -> Path:
    for name in ("launchers", "tools", "configs", "benchmarks", ".venv"):
        (tmp / name).symlink_to(REPO / name)
    return tmp


def _run(command: str, cwd: Path) -> subprocess.CompletedProcess:
    words = shlex.split(command, comments=True)
    program, args = words[0].removeprefix(".venv/bin/"), words[1:]
    if program == "python":
        words = [sys.executable, *args]
    elif program == "torchrun":
        words = [sys.executable, "-m", "torch.distributed.run", *args]
    else:
        words = [str(Path(sys.executable).parent / program), *args]
    script = next((w for w in words if w in SHRINK), None)
    if script is not None:
        words += SHRINK[script]
    skip = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"}
    env = {k: v for k, v in os.environ.items() if k not in skip}
    env.update(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return subprocess.run(words, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path):
    """In README order: later commands use what earlier ones made (runs/sft, runs/demo, ...)."""
    cwd = _workdir(tmp_path)
    for command, error in runnable():
        proc = _run(command, cwd)
        detail = f"$ {command}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        if error is None:
            assert proc.returncode == 0, detail
        else:
            assert proc.returncode == 2 and f"error: {error}" in proc.stderr, detail
    assert (cwd / "runs" / "ict" / "checkpoints" / "latest").is_file()
    assert (cwd / "runs" / "demo" / "eval" / "results.json").is_file()
