"""The memory planner against what each rank of a multi-rank CPU run allocates (gloo).

    python -m tests.parallel.memory_ranks OUT_DIR [scenario ...]

writes OUT_DIR/report.json: per scenario and rank, the measured and the planned bytes. Run as
a subprocess (tests/parallel/test_memory.py): the ranks are forked from this process, which
must not have a torch.distributed world of its own (a pytest process may have one).

Per rank, after one training step of M micro batches: weights (parameters), gradients (DDP's
main_grad buffers) and optimizer state (main copies and Adam moments) as in the one-rank
test; activations as the unique storages autograd saved over the whole step divided by M
(each micro batch saves its own; every storage is held until the end so none is reused); and
the micro batches in flight: the forwards this rank ran before its first backward read a
saved tensor, which under 1F1B is the most it holds at once.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

from soft.config.root import load_config
from soft.data import build_datasets
from soft.parallel import memory
from soft.parallel.setup import init_distributed, seed_everything
from soft.peft.config import PeftConfig
from soft.training import step
from soft.training.model import build_soft_model
from soft.training.optim import build_optimizer, build_scheduler
from tests.parallel.multirank import run_ranks

BASE = [
    "model.num_layers=4",
    "model.hidden_size=128",
    "model.ffn_hidden_size=352",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "data.seq_length=128",
    "data.builtin_num_samples=64",
    "train.micro_batch_size=2",
    "tracking.enabled=false",
    "checkpoint.auto_resume=false",
]
MICROBATCHES = 4
TP2_SP = ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"]
# name: (world size, overrides, LoRA fields or None)
SCENARIOS: dict[str, tuple[int, list[str], dict | None]] = {
    "tp2_sp": (2, TP2_SP, None),
    # Exits inside both stages and on the boundary (layer 2: the stage's last layer).
    "pp2": (2, ["parallel.pipeline_model_parallel_size=2", "soft.exit_layers=[1,2,3,4]"], None),
    "dp2_distopt_bf16": (
        2,
        ["parallel.use_distributed_optimizer=true", "model.params_dtype=bf16"],
        None,
    ),
    "lora_tp2_sp": (2, TP2_SP, {"rank": 8}),
    "lora_pp2": (2, ["parallel.pipeline_model_parallel_size=2"], {"train_final_norm": True}),
    # Interleaved 1F1B: one layer per model chunk, exits on both chunks of both ranks.
    "pp2_vp2": (
        2,
        [
            "parallel.pipeline_model_parallel_size=2",
            "parallel.virtual_pipeline_model_parallel_size=2",
        ],
        None,
    ),
}


def _config(world: int, overrides: list[str], lora: dict | None, out: Path):
    cfg = load_config(None, BASE + overrides + [f"train.output_dir={out}"])
    dp = world // cfg.parallel.model_parallel_size
    batch = cfg.train.micro_batch_size * MICROBATCHES * dp
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, global_batch_size=batch))
    if lora is not None:  # after loading: the config refuses adapters without a base to load
        cfg = dataclasses.replace(cfg, peft=PeftConfig(method="lora", **lora))
    return cfg


def worker(world: int, overrides: list[str], lora: dict | None, out: Path) -> dict:
    """One rank: a training step, then what it allocated (module docstring)."""
    from megatron.core import parallel_state as ps

    cfg = _config(world, overrides, lora, out)
    init_distributed(cfg.parallel, cfg.train.seed)
    seed_everything(cfg.train.seed)
    train, _, tokenizer = build_datasets(cfg.data, cfg.train.seed)
    from soft.models.gpt import padded_vocab_size

    vocab = padded_vocab_size(
        tokenizer.vocab_size, cfg.model, cfg.parallel.tensor_model_parallel_size
    )
    model = build_soft_model(
        cfg.model, cfg.parallel, cfg.soft, cfg.exit_plan(), vocab, cfg.train.seed, peft=cfg.peft
    )
    optimizer = build_optimizer(model, cfg.train, cfg.model, cfg.parallel)
    scheduler = build_scheduler(optimizer, cfg.train)
    mbs = cfg.train.micro_batch_size
    batches = [train.batch(list(range(i * mbs, (i + 1) * mbs))) for i in range(MICROBATCHES)]
    params = {id(p): p for chunk in model.unwrapped for p in chunk.parameters()}
    buffers = [b for chunk in model.chunks for b in chunk.buffers]
    owned = {p.untyped_storage().data_ptr() for p in params.values()}
    owned |= {
        b.param_data.untyped_storage().data_ptr() for b in buffers if b.param_data is not None
    }
    saved: dict[int, torch.UntypedStorage] = {}
    forwards, before_backward = [0], [None]

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in owned:
            saved.setdefault(storage.data_ptr(), storage)
        return t

    def unpack(t: torch.Tensor) -> torch.Tensor:
        if before_backward[0] is None:
            before_backward[0] = forwards[0]
        return t

    plain_forward = step.forward_step

    def counted_forward(*args, **kwargs):
        forwards[0] += 1
        return plain_forward(*args, **kwargs)

    step.forward_step = counted_forward
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            step.train_step(model, optimizer, scheduler, batches)
    finally:
        step.forward_step = plain_forward
    state = 0
    inner = optimizer.optimizer
    for group in inner.param_groups:
        for p in group["params"]:
            if p.untyped_storage().data_ptr() not in owned:
                state += p.nbytes
            state += sum(
                v.nbytes for v in inner.state.get(p, {}).values() if torch.is_tensor(v) and v.dim()
            )
    return {
        "stage": ps.get_pipeline_model_parallel_rank(),
        "dp": ps.get_data_parallel_world_size(),
        "vocab": vocab,
        "weights": sum(p.nbytes for p in params.values()),
        "grads": sum(b.grad_data.nbytes for b in buffers),
        "optimizer": state,
        "activations_per_microbatch": sum(s.nbytes() for s in saved.values()) / MICROBATCHES,
        "in_flight": before_backward[0],
    }


def planned(world: int, overrides: list[str], lora: dict | None, out: Path, rank: dict) -> dict:
    cfg = _config(world, overrides, lora, out)
    setup = memory.MemorySetup(
        model=cfg.model,
        parallel=cfg.parallel,
        plan=cfg.exit_plan(),
        peft=cfg.peft,
        vocab_size=rank["vocab"],
        seq_length=cfg.data.seq_length,
        micro_batch_size=cfg.train.micro_batch_size,
        num_microbatches=MICROBATCHES,
        data_parallel=rank["dp"],
        exit_loss=cfg.soft.exit_loss,
        loss_chunk_tokens=cfg.soft.loss_chunk_tokens,
        kernels="local",
    )
    stage = memory.stage_memory(setup)[rank["stage"]]
    act = memory.stage_activations(setup, rank["stage"])
    replica = stage.replica_state  # the exit head replica: in the planner's exits column
    return {
        "weights": stage.weights + replica[0],
        "grads": stage.grads + replica[1],
        "optimizer": stage.optimizer + replica[2],
        "activations_per_microbatch": act.layers_per_microbatch + act.exits_per_microbatch,
        # Chunk forwards with virtual pipelining: the planner counts them in micro batches.
        "in_flight": stage.in_flight * (cfg.parallel.virtual_pipeline_model_parallel_size or 1),
    }


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    names = argv[1:] or list(SCENARIOS)
    report = {}
    for name in names:
        world, overrides, lora = SCENARIOS[name]
        run_dir = out / name
        ranks = run_ranks(
            world, worker, (world, overrides, lora, run_dir / "run"), run_dir / "ranks"
        )
        report[name] = [
            {"measured": r, "planned": planned(world, overrides, lora, run_dir / "run", r)}
            for r in ranks
        ]
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
