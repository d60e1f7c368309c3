"""Multi-rank checks of the model families, run by the harness in tests/parallel/multirank.py
(`families_tp2_pp2`): for every family of soft/conversion/tiny.FAMILY_MODELS (LLaMA-3 with
RoPE scaling, LLaMA-3.2 tied, Mistral, Qwen2 with biases and tied, Qwen3 with q/k norms and an
odd head_dim), a tiny random HF model is imported and loaded at TP2 x PP2:

- every exit's logits (layer k's output through the exit's head on the stage that owns it,
  gathered over TP) equal transformers' (the first k layers + final norm + head, from
  output_hidden_states), fp32: atol 2e-5 + rtol 1e-5, as at one rank
  (tests/conversion/test_families.py): TP and the pipeline only reorder sums (row-parallel
  projections add two partial products). Observed: at most 4.4e-6 on logits of magnitude ~4;
- then SoFT trains it 6 steps on the built-in tasks: every exit's loss falls.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from soft.config.root import load_config
from soft.conversion import convert_hf_to_megatron
from soft.conversion.tiny import FAMILY_MODELS
from soft.data import ResumableBatchSampler
from soft.models.heads import exit_heads_of, head_of
from soft.training import step
from soft.training.run import setup
from tests.conversion.helpers import (
    BUILTIN_TOKENIZER,
    hf_logits_and_exits,
    make_family_model,
)
from tests.training import golden

LOGIT_TOL = dict(atol=2e-5, rtol=1e-5)
TRAIN_STEPS = 6
RUN = [
    "soft.exit_layers=null",
    "data.seq_length=48",
    "data.builtin_num_samples=64",
    "train.micro_batch_size=2",
    "train.global_batch_size=8",
    "train.lr=3e-3",
    "train.lr_warmup_iters=1",
    f"train.train_iters={TRAIN_STEPS}",
    "tracking.enabled=false",
    "checkpoint.auto_resume=false",
    "checkpoint.finetune=true",
    "soft.loss_chunk_tokens=20",
]
# Built-in tokenizer's vocabulary, so the built-in tasks train the model; odd widths, GQA
# (2 query groups: TP2 splits them), 4 layers over 2 stages.
SIZES = dict(vocab=512, hidden=40, heads=4, kv_heads=2, intermediate=84, layers=4)


def import_worker(name: str, root: Path, tokens: torch.Tensor) -> dict:
    """One process: the HF model of family `name`, its exits' logits on `tokens` (the
    reference), and its import (tokenizer files carried along)."""
    hf = make_family_model(root / "hf", name, tokenizer=BUILTIN_TOKENIZER, seed=11, **SIZES)
    _, exits = hf_logits_and_exits(hf, tokens)
    convert_hf_to_megatron(root / "hf", root / "meg", dtype="fp32", progress=False)
    return {"exits": exits}


def _capture(k: int, head, vocab: int, out: dict, module, args, output) -> None:
    with torch.no_grad():
        logits = F.linear(head.norm(output[0]), head.weight)  # [s, b, V/tp]
        full = gather_from_tensor_model_parallel_region(logits)  # [s, b, V]
        out[k] = full.transpose(0, 1)[..., :vocab].detach().clone()


def exit_logits(run, tokens: torch.Tensor, vocab: int) -> dict[int, torch.Tensor]:
    """{exit k: [b, s, vocab] logits} of the exits this rank's chunks own, by one forward-only
    pass of megatron-core's schedule (the last exit through the real head)."""
    plan, captured, handles = run.model.plan, {}, []
    for chunk in run.model.unwrapped:
        heads = dict(exit_heads_of(chunk, plan))
        if chunk.post_process:
            heads[plan.final] = head_of(chunk)
        for layer in chunk.decoder.layers:
            if layer.layer_number in heads:
                hook = partial(_capture, layer.layer_number, heads[layer.layer_number], vocab)
                handles.append(layer.register_forward_hook(partial(hook, captured)))
    batch = {"tokens": tokens, "labels": tokens.roll(-1, 1), "loss_mask": torch.ones(tokens.shape)}
    try:
        step.eval_step(run.model, [batch])
    finally:
        for handle in handles:
            handle.remove()
    return captured if parallel_state.get_tensor_model_parallel_rank() == 0 else {}


def train_losses(run, steps: int) -> list[dict[int, float]]:
    t = run.cfg.train
    sampler = ResumableBatchSampler(len(run.train_data), t.global_batch_size, t.seed)
    losses = []
    for _ in range(steps):
        mbs = step.microbatches(
            run.train_data, sampler, run.state.consumed_samples, t.micro_batch_size, run.topo.device
        )
        losses.append(step.train_step(run.model, run.optimizer, run.scheduler, mbs).exit_losses)
        run.state.consumed_samples += t.global_batch_size
    return losses


def family_worker(meg: Path, out: Path, tokens: torch.Tensor, vocab: int) -> dict:
    """One rank at TP2 x PP2: per-exit logits of the loaded import, then a few SoFT steps."""
    overrides = [*RUN, *golden.TP2_PP2, f"checkpoint.load_dir={meg}", f"train.output_dir={out}"]
    run = setup(load_config(meg / "model.yaml", overrides))
    logits = exit_logits(run, tokens, vocab)
    return {"logits": logits, "losses": train_losses(run, TRAIN_STEPS)}


def check_family(name: str, root: Path, run_ranks: Callable) -> dict:
    """The parent computes nothing: the reference and the import run in a child process."""
    vocab = SIZES["vocab"]
    tokens = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(5))
    want = run_ranks(1, import_worker, (name, root, tokens), root / "import")[0]["exits"]
    ranks = run_ranks(4, family_worker, (root / "meg", root / "run", tokens, vocab), root / "par")
    got: dict[int, torch.Tensor] = {}
    for rank in ranks:
        got.update(rank["logits"])
    assert sorted(got) == sorted(want), f"{name}: exits {sorted(got)} vs {sorted(want)}"
    worst = 0.0
    for k in want:
        torch.testing.assert_close(
            got[k], want[k], **LOGIT_TOL, msg=lambda m, k=k: f"{name} exit {k}: {m}"
        )
        worst = max(worst, float((got[k] - want[k]).abs().max()))
    losses = ranks[0]["losses"]
    rising = [k for k in losses[0] if not losses[-1][k] < losses[0][k]]
    assert not rising, f"{name}: exit losses did not fall for {rising}: {losses[0]} -> {losses[-1]}"
    first, last = losses[0][max(losses[0])], losses[-1][max(losses[0])]
    return {"logit_abs": worst, "final_exit_loss": [round(first, 4), round(last, 4)]}


def check_families(root: Path, run_ranks: Callable) -> dict:
    """Every family in one harness entry; each family's failure is named."""
    report, failures = {}, []
    for name in FAMILY_MODELS:
        try:
            report[name] = check_family(name, root / name, run_ranks)
        except AssertionError as exc:
            failures.append(f"{name}: {exc}")
    if failures:
        raise AssertionError("; ".join(failures))
    return report
