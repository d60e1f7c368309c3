"""What the project adds to a plain megatron-core training step (pure SFT, one rank).

`python benchmarks/bench_overhead.py [--warmup N] [--steps M] [key=value ...]`

Two loops over the same model, data and optimizer settings, interleaved step by step:
- `bare`: megatron-core alone, as its own examples train: GPTModel (local spec), DDP,
  get_megatron_optimizer, get_forward_backward_func with a masked-mean loss function, and
  `optimizer.step()` + the LR scheduler;
- `soft`: the project's `train_step` on a pure SFT run (soft.mode=sft, only the last exit):
  the same megatron calls plus the exit bookkeeping, the non-finite guard (the grad norm is
  always computed), and the per-step loss table.
Both run under the CPU compatibility layer on a CPU. Prints the median step times, their
paired ratio, and the top operators by self CPU time that differ (torch profiler), so an
overhead can be traced to its source.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron.core.distributed import (  # noqa: E402
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer  # noqa: E402
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402

from soft.config.root import load_config  # noqa: E402
from soft.data import ResumableBatchSampler  # noqa: E402
from soft.models.gpt import build_stage_model, padded_vocab_size  # noqa: E402
from soft.training.model import transformer_config  # noqa: E402
from soft.training.run import setup  # noqa: E402
from soft.training.step import (  # noqa: E402
    causal_mask,
    microbatches,  # noqa: E402
    train_step,
)


def bare_loop(cfg, vocab: int):
    """megatron-core's own training step for the same model; returns step()."""
    config = transformer_config(cfg.model, cfg.parallel)
    model = build_stage_model(cfg.model, config, vocab, True, True)
    ddp = DistributedDataParallel(
        config=config,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True),
        module=model,
    )
    t = cfg.train
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
            adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_eps=t.adam_eps,
            clip_grad=t.clip_grad,
        ),
        [ddp],
    )  # fmt: skip
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=t.lr, min_lr=t.min_lr, lr_warmup_steps=t.warmup_iters,
        lr_decay_steps=t.train_iters, lr_decay_style=t.lr_decay_style, start_wd=t.weight_decay,
        end_wd=t.weight_decay, wd_incr_steps=t.train_iters, wd_incr_style="constant",
    )  # fmt: skip

    def loss_func(mask, output):
        mask = mask.float()
        total = (output.float() * mask).sum()
        return total, mask.sum().to(torch.int), {}

    def forward_step(iterator, chunk):
        batch = next(iterator)
        b, s = batch["tokens"].shape
        pos = torch.arange(s).unsqueeze(0).expand(b, s)
        out = chunk(batch["tokens"], pos, causal_mask(s, pos.device), labels=batch["labels"])
        return out, partial(loss_func, batch["loss_mask"])

    def step(mbs):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        mb, seq = mbs[0]["tokens"].shape
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(mbs), model=[ddp],
            num_microbatches=len(mbs), seq_length=seq, micro_batch_size=mb, forward_only=False,
        )  # fmt: skip
        ok, _, _ = optimizer.step()
        if ok:
            scheduler.step(increment=1)

    return step


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--profile", action="store_true", help="print the top operators of each")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            None,
            [*args.overrides, "soft.mode=sft", "soft.exit_layers=null", f"train.output_dir={tmp}"],
        )
        cfg = load_config(
            None,
            [*args.overrides, "soft.mode=sft", f"soft.exit_layers=[{cfg.model.num_layers}]",
             f"train.output_dir={tmp}", "tracking.enabled=false"],
        )  # fmt: skip
        run = setup(cfg)
        t = cfg.train
        sampler = ResumableBatchSampler(len(run.train_data), t.global_batch_size, t.seed)
        mbs = microbatches(run.train_data, sampler, 0, t.micro_batch_size, run.topo.device)
        vocab = padded_vocab_size(run.model.vocab_size, cfg.model, 1)
        bare = bare_loop(cfg, vocab)
        loops = {
            "bare": lambda: bare(mbs),
            "soft": lambda: train_step(run.model, run.optimizer, run.scheduler, mbs, False),
        }
        times: dict[str, list[float]] = {k: [] for k in loops}
        for i in range(args.warmup + args.steps):
            for name in list(loops)[i % 2 :] + list(loops)[: i % 2]:
                started = time.perf_counter()
                loops[name]()
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - started)
        ratios = [s / b for s, b in zip(times["soft"], times["bare"], strict=True)]
        print("| loop | step time (s, median) | soft/bare (paired median) | min |")
        print("| --- | --- | --- | --- |")
        for name, values in times.items():
            print(f"| {name} | {statistics.median(values):.4f} | - | - |")
        print(f"| soft/bare | - | {statistics.median(ratios):.3f}x | {min(ratios):.3f}x |")
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            for name, fn in loops.items():
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(3):
                        fn()
                print(f"\n### {name}\n")
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    return 0


if __name__ == "__main__":
    sys.exit(main())
