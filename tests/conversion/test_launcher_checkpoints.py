"""End to end with the launcher (slow): HF -> megatron -> SoFT training at TP2 x PP2 (4 gloo ranks)
-> HF, full model and an exit-K sub-model.

Checks, all numerical:
1. the converted checkpoint loads at TP2 x PP2: the first step's exit losses (computed on the
   loaded weights, before any update) equal a single-process run's (rel 1e-5: fp32 with a
   different reduction order across TP ranks);
2. the trained TP2 x PP2 checkpoint exported to HF gives the logits of the megatron model loaded
   from it at TP1 x PP1 in-process (same tolerance as the conversion tests);
3. the `--exit-layer 3` export gives exit 3 of that model, and records the exit plan.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from soft.conversion import convert_hf_to_megatron
from tests.conversion.helpers import (
    BUILTIN_TOKENIZER,
    hf_logits_and_exits,
    make_hf_model,
    megatron_logits_and_exits,
    megatron_reference,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOL = {"atol": 2e-5, "rtol": 1e-5}
# Exits only on the last pipeline stage: see the report on soft.models.heads' `_extra_state`.
RUN_ARGS = [
    "train.micro_batch_size=2", "train.global_batch_size=4", "data.seq_length=64",
    "train.lr_warmup_iters=0", "train.eval_iters=1", "train.log_interval=1",
    "soft.exit_layers=[3,4]", "checkpoint.finetune=true",
]  # fmt: skip


def _clean_env() -> dict[str, str]:
    """The in-process 1-rank world set RANK/MASTER_PORT...; a child must start its own."""
    drop = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}
    return {k: v for k, v in os.environ.items() if k not in drop} | {"PYTHONWARNINGS": "ignore"}


def _launch(nproc: int, config, out, extra: list[str]) -> list[dict]:
    env = _clean_env()
    head = (
        [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
        if nproc > 1
        else [sys.executable]
    )
    cmd = [
        *head,
        "launchers/pretrain_soft.py",
        "--config",
        str(config),
        f"train.output_dir={out}",
        *RUN_ARGS,
        *extra,
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def _export(ckpt, out, *extra: str) -> None:
    cmd = [
        sys.executable,
        "tools/convert_megatron_to_hf.py",
        "--checkpoint-dir",
        str(ckpt),
        "--out-dir",
        str(out),
    ]
    proc = subprocess.run(
        [*cmd, "--no-progress", *extra],
        cwd=REPO,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_tp2_pp2_training_from_hf_exports_back_with_matching_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    # The launcher's default tiny shape, grouped-query (2 groups, so TP2 splits them), with the
    # built-in tokenizer's vocabulary so the built-in data trains it.
    make_hf_model(
        tmp_path / "hf", vocab=512, hidden=64, heads=4, kv_heads=2, intermediate=176, layers=4,
        tokenizer=BUILTIN_TOKENIZER,
    )  # fmt: skip
    meg = convert_hf_to_megatron(tmp_path / "hf", tmp_path / "meg", dtype="fp32", progress=False)
    load = [f"checkpoint.load_dir={meg}"]
    single = _launch(1, meg / "model.yaml", tmp_path / "run1", [*load, "train.train_iters=1"])
    parallel = _launch(
        4, meg / "model.yaml", tmp_path / "run4",
        [*load, "train.train_iters=2", "parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"],
    )  # fmt: skip
    for key in ("exit_3", "exit_4"):
        assert parallel[0][key] == pytest.approx(single[0][key], rel=1e-5), key

    ckpt = tmp_path / "run4" / "checkpoints"
    _export(ckpt, tmp_path / "full")
    _export(ckpt, tmp_path / "sub3", "--exit-layer", "3")
    gpt, vocab = megatron_reference(ckpt, ckpt / "iter_0000002" / "config.yaml")
    tokens = torch.randint(0, vocab, (2, 17), generator=torch.Generator().manual_seed(3))
    ref_logits, ref_exits = megatron_logits_and_exits(gpt, tokens, vocab)

    full, info = AutoModelForCausalLM.from_pretrained(tmp_path / "full", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    logits, exits = hf_logits_and_exits(full.eval(), tokens)
    torch.testing.assert_close(logits, ref_logits, **TOL)
    torch.testing.assert_close(exits[3], ref_exits[3], **TOL)
    assert full.config.soft_exit_layers == [3, 4] and full.config.soft_exit_weights == [0.5, 0.5]

    sub = AutoModelForCausalLM.from_pretrained(tmp_path / "sub3").eval()
    assert sub.config.num_hidden_layers == 3 and sub.config.soft_source_exit_layer == 3
    assert sub.config.soft_exit_layers == [3]
    with torch.no_grad():
        torch.testing.assert_close(sub(tokens).logits, ref_exits[3], **TOL)
