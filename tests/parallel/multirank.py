"""Multi-rank layouts vs the single-rank run, on CPU with gloo.

megatron-core takes ~10 s to import per process, so this module is run once as a subprocess:
it imports everything, then forks the ranks of each scenario (and each scenario's 1-rank
reference) from that warm parent, which has done no compute yet. Each rank writes what it
owns to a file, keyed by the layout-free checkpoint key; the parent assembles full tensors
and compares them.

    python -m tests.parallel.multirank OUT_DIR [scenario ...]

writes OUT_DIR/report.json (one entry per scenario: ok + the largest differences found).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

# Everything heavy is imported before forking.
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

from soft.checkpointing.checkpoint import TrainState, resume, save
from soft.checkpointing.directory import find_checkpoint
from soft.compat import checkpoint_queue
from soft.config.root import load_config
from soft.data import ResumableBatchSampler
from soft.models.gpt import walk_leaves
from soft.models.heads import head_copies
from soft.parallel.head_sync import head_replica_max_diff
from soft.parallel.setup import destroy_distributed
from soft.training import loop, step
from soft.training.run import setup
from soft.training.signals import StopRequest
from tests.parallel import family_checks
from tests.training import golden
from tests.training.thd_reference import thd_calls, use_reference_thd

BASE = [
    "model.num_layers=8",
    "model.hidden_size=32",
    "model.ffn_hidden_size=64",
    "model.num_attention_heads=4",
    "data.seq_length=48",
    "data.builtin_num_samples=64",
    "train.micro_batch_size=2",
    "train.global_batch_size=8",
    "train.train_iters=10",
    "train.lr=3e-3",
    "train.lr_warmup_iters=1",
    "train.clip_grad=1.0",
    "tracking.enabled=false",
    "checkpoint.auto_resume=false",
    "soft.loss_chunk_tokens=20",
]

# fp32 on CPU; a parallel run differs from the single-rank run only in summation order
# (TP partial sums, DP gradient sums, chunked CE), so values agree to ~1e-6 relative. Three Adam
# steps divide by sqrt(v): tiny gradient entries amplify rounding, hence the atol on params.
GRAD_TOL = dict(rtol=1e-4, atol=1e-7)
PARAM_TOL = dict(rtol=1e-4, atol=2e-6)
LOSS_RTOL = 1e-5
# bf16 rounds every matmul output to 8 mantissa bits (2**-8 = 4e-3 relative), so a different
# summation order (TP partial sums, pipeline send/recv of bf16 activations) moves single
# elements by far more than that where they nearly cancel: compare whole tensors by norm,
# ||got - ref|| / ||ref||, at 2e-2 (observed 6e-3 for gradients, 8e-3 for parameters after 3
# steps). The losses are fp32 sums of bf16 logits: rel 2e-3 (observed 4e-5).
BF16_NORM_RTOL = 2e-2
BF16_LOSS_RTOL = 2e-3


@dataclass
class Scenario:
    name: str
    world: int
    layout: list[str]
    exits: str
    extra: list[str] = field(default_factory=list)
    compare_grads: bool = True  # the distributed optimizer leaves each rank one shard of the grads
    # Fine-tuning modes start from a checkpoint that a 1-rank run of these overrides saves.
    base: list[str] | None = None
    # Overrides of the parallel run only: the 1-rank reference runs without them (activation
    # recompute must change nothing, so its reference is the plain run).
    parallel_only: list[str] = field(default_factory=list)
    bf16: bool = False  # compared with the bf16 tolerances above
    # The parallel run takes packed batches as THD streams (Transformer Engine's path) with
    # its attention stood in for on CPU (tests/training/thd_reference.py); the 1-rank
    # reference takes the block-diagonal mask.
    thd_reference: bool = False

    @property
    def loss_rtol(self) -> float:
        return BF16_LOSS_RTOL if self.bf16 else LOSS_RTOL


FROM_BASE = ["checkpoint.load_dir=../base", "checkpoint.finetune=true"]  # see _config
TP2_PP2 = golden.TP2_PP2
TP2_PP2_SP = [*TP2_PP2, "parallel.sequence_parallel=true"]
PP2_VP2 = [
    "parallel.pipeline_model_parallel_size=2",
    "parallel.virtual_pipeline_model_parallel_size=2",
]
TIED = ["model.tie_word_embeddings=true"]
LORA = ["peft.method=lora", "peft.rank=4", "peft.alpha=8", "peft.train_final_norm=true"]
PACKED = ["data.packing=true", "data.seq_length=128"]  # two or three built-in examples a pack
FEATURES = [
    "model.qkv_bias=true",
    "model.qk_layernorm=true",
    "model.head_dim=12",
    "model.num_query_groups=2",
    "model.rope_scaling=llama3",
    "model.rope_scaling_factor=4.0",
]

SCENARIOS = {
    s.name: s
    for s in [
        # several exits on the first stage (inside it), one inside the last stage
        Scenario(
            "tp2_pp2",
            4,
            TP2_PP2,
            "[2,3,5,8]",
        ),
        # sequence parallel: exits gather the sequence shards; norm grads summed over TP
        Scenario(
            "tp2_pp2_sp",
            4,
            TP2_PP2_SP,
            "[2,3,5,8]",
        ),
        # an exit on a stage boundary (layer 2 ends stage 0); stages 1 and 2 own no exit
        Scenario("pp4", 4, ["parallel.pipeline_model_parallel_size=4"], "[2,8]"),
        Scenario("dp2_tp2", 4, ["parallel.tensor_model_parallel_size=2"], "[1,4,8]"),
        Scenario(
            "dp2_pp2_distopt",
            4,
            ["parallel.pipeline_model_parallel_size=2", "parallel.use_distributed_optimizer=true"],
            "[4,6,8]",
            compare_grads=False,
        ),
        # interleaved 1F1B: rank 0 holds chunks (layers 1-2) and (5-6), both with exits
        Scenario(
            "pp2_vp2",
            2,
            [
                "parallel.pipeline_model_parallel_size=2",
                "parallel.virtual_pipeline_model_parallel_size=2",
            ],
            "[1,3,5,8]",
            extra=["train.global_batch_size=8", "train.micro_batch_size=2"],
        ),
        # ict: separate heads on both stages, the backbone frozen; loaded from an SFT checkpoint
        Scenario(
            "ict_tp2_pp2",
            4,
            TP2_PP2,
            "[2,3,5,8]",
            extra=["soft.mode=ict", *FROM_BASE],
            base=["soft.mode=sft"],
        ),
        # extracted: the first 4 layers of an 8-layer checkpoint, each rank reading its slices
        Scenario(
            "extracted_tp2_pp2",
            4,
            TP2_PP2,
            "null",
            extra=["soft.mode=extracted", "model.num_layers=4", *FROM_BASE],
            base=["soft.mode=sft", "soft.exit_layers=[4,8]", "model.num_layers=8"],
        ),
        # the fused exit loss (default) at TP2xPP2 with sequence parallelism against the
        # recompute implementation at one rank: same losses, gradients and updates
        Scenario(
            "tp2_pp2_sp_fused_vs_recompute",
            4,
            TP2_PP2_SP,
            "[2,3,5,8]",
            extra=["soft.exit_loss=recompute"],
            parallel_only=["soft.exit_loss=fused"],
        ),
        # full activation recompute: exits inside checkpointed segments, 1F1B and interleaved
        Scenario(
            "tp2_pp2_recompute_full",
            4,
            TP2_PP2,
            "[2,3,5,8]",
            parallel_only=[
                "model.recompute_granularity=full",
                "model.recompute_method=uniform",
                "model.recompute_num_layers=2",
            ],
        ),
        Scenario(
            "pp2_vp2_recompute_block",
            2,
            [
                "parallel.pipeline_model_parallel_size=2",
                "parallel.virtual_pipeline_model_parallel_size=2",
            ],
            "[1,3,5,8]",
            extra=["train.global_batch_size=8", "train.micro_batch_size=2"],
            parallel_only=[
                "model.recompute_granularity=full",
                "model.recompute_method=block",
                "model.recompute_num_layers=1",
            ],
        ),
        # bf16 (megatron's Float16Module, fp32 main params and grads), fused exit loss, sequence
        # parallel, against the same bf16 job at one rank
        Scenario(
            "tp2_pp2_sp_bf16",
            4,
            TP2_PP2_SP,
            "[2,3,5,8]",
            extra=["model.params_dtype=bf16"],
            bf16=True,
        ),
        # LoRA (peft): adapters over the frozen SFT base, the final norm trained too; sequence
        # parallel splits the adapters' replicated halves' gradients over TP (summed as the
        # norms' are)
        Scenario(
            "lora_tp2_pp2_sp",
            4,
            TP2_PP2_SP,
            "[2,3,5,8]",
            extra=[*LORA, *FROM_BASE],
            base=["soft.mode=sft"],
        ),
        # LoRA with the distributed optimizer (adapters only in its buffers), interleaved
        # pipeline and full activation recompute (the frozen embedding's output must carry a
        # gradient into the first checkpointed segment)
        Scenario(
            "lora_pp2_vp2_distopt_recompute",
            4,
            [*PP2_VP2, "parallel.use_distributed_optimizer=true"],
            "[1,3,5,8]",
            extra=[*LORA, "peft.layers=[1,2,4,6,7]", *FROM_BASE],
            base=["soft.mode=sft"],
            compare_grads=False,
            parallel_only=[
                "model.recompute_granularity=full",
                "model.recompute_method=uniform",
                "model.recompute_num_layers=1",
            ],
        ),
        # interleaved 1F1B with data parallelism: DDP reduces each chunk once (a second
        # reduction of the summed gradients would multiply them by DP: seen, fixed)
        Scenario("pp2_vp2_dp2", 4, PP2_VP2, "[1,3,5,8]"),
        Scenario(
            "pp2_uneven",
            2,
            [
                "parallel.pipeline_model_parallel_size=2",
                "parallel.num_layers_in_first_pipeline_stage=2",
            ],
            "[1,2,5,8]",
        ),
        # Tied embeddings: the exit heads are the embedding matrix. Exits on the first stage
        # (they read the embedding itself, a norm replica beside it) and the last (megatron-
        # core's copy of the embedding); every copy gets the sum of all gradients.
        Scenario("tied_tp2_pp2", 4, TP2_PP2, "[2,3,5,8]", extra=TIED),
        # an exit on every stage: the middle stages hold matrix replicas of the embedding
        Scenario(
            "tied_pp4", 4, ["parallel.pipeline_model_parallel_size=4"], "[1,3,6,8]", extra=TIED
        ),  # fmt: skip
        # interleaved: rank 0 holds the embedding (chunk 0) and a replica (chunk 2, exit 5)
        Scenario("tied_pp2_vp2", 2, PP2_VP2, "[1,3,5,8]", extra=TIED),
        # ict on a tied model: the separate heads start from the embedding (the tied head)
        Scenario(
            "ict_tied_tp2_pp2",
            4,
            TP2_PP2,
            "[2,3,5,8]",
            extra=["soft.mode=ict", *FROM_BASE, *TIED],
            base=["soft.mode=sft", *TIED],
        ),
        # the other family switches under TP (q/k norm gradients summed over TP, the q/k/v
        # bias split per query group) and pipelining: biases, q/k norms, a head_dim that is
        # not hidden/heads, grouped-query attention and llama3 RoPE scaling
        Scenario("features_tp2_pp2", 4, TP2_PP2, "[2,3,5,8]", extra=FEATURES),
        # packed sequences (data.packing): the block-diagonal mask and restarting positions
        # through TP, SP (the mask is per microbatch, the sequence sharded), PP and
        # interleaving; 128 tokens hold two or three built-in examples
        Scenario(
            "packed_tp2_pp2_sp",
            4,
            TP2_PP2_SP,
            "[2,3,5,8]",
            extra=["data.packing=true", "data.seq_length=128"],
        ),
        Scenario(
            "packed_pp2_vp2",
            2,
            PP2_VP2,
            "[1,3,5,8]",
            extra=["data.packing=true", "data.seq_length=128"],
        ),
        # ... with data parallelism and full activation recompute (the mask rides along into
        # the recomputed segments), and in ict mode from an SFT checkpoint
        Scenario(
            "packed_dp2_tp2_recompute",
            4,
            ["parallel.tensor_model_parallel_size=2"],
            "[1,4,8]",
            extra=["data.packing=true", "data.seq_length=128"],
            parallel_only=[
                "model.recompute_granularity=full",
                "model.recompute_method=uniform",
                "model.recompute_num_layers=2",
            ],
        ),
        Scenario(
            "packed_ict_tp2_pp2",
            4,
            TP2_PP2,
            "[2,3,5,8]",
            extra=["soft.mode=ict", *FROM_BASE, "data.packing=true", "data.seq_length=128"],
            base=["soft.mode=sft"],
        ),
        Scenario(
            "packed_extracted_tp2_pp2",
            4,
            TP2_PP2,
            "null",
            extra=[
                "soft.mode=extracted",
                "model.num_layers=4",
                *FROM_BASE,
                "data.packing=true",
                "data.seq_length=128",
            ],
            base=["soft.mode=sft", "soft.exit_layers=[4,8]", "model.num_layers=8"],
        ),
        # ... with the layouts the first slice did not run: interleaving with TP and SP (the
        # sharded sequence of a pack through virtual stages), four stages (the packs' batches
        # through three send/recv hops), the distributed optimizer (compare_grads: each rank
        # keeps one shard of the grads) and bf16 (the mask applied to bf16 scores)
        Scenario(
            "packed_tp2_pp2_vp2_sp",
            4,
            [*TP2_PP2_SP, "parallel.virtual_pipeline_model_parallel_size=2"],
            "[1,3,5,8]",
            extra=PACKED,
        ),
        Scenario(
            "packed_pp4",
            4,
            ["parallel.pipeline_model_parallel_size=4"],
            "[2,8]",
            extra=PACKED,
        ),
        Scenario(
            "packed_dp2_pp2_distopt",
            4,
            ["parallel.pipeline_model_parallel_size=2", "parallel.use_distributed_optimizer=true"],
            "[4,6,8]",
            extra=PACKED,
            compare_grads=False,
        ),
        Scenario(
            "packed_tp2_pp2_sp_bf16",
            4,
            TP2_PP2_SP,
            "[2,3,5,8]",
            extra=[*PACKED, "model.params_dtype=bf16"],
            bf16=True,
        ),
        # Transformer Engine's THD path through TP, SP and PP (the stream [b*s, 1, h] sharded
        # over TP, passed between stages with the schedule's [b*s, 1] shapes), its attention
        # stood in for by the local one per cu_seqlens sequence; against the mask path at one
        # rank
        Scenario(
            "packed_thd_tp2_pp2_sp",
            4,
            TP2_PP2_SP,
            "[2,3,5,8]",
            extra=PACKED,
            thd_reference=True,
        ),
        # ... through the interleaved schedule, with full activation recompute (the
        # PackedSeqParams ride along into the recomputed segments)
        Scenario(
            "packed_thd_pp2_vp2_recompute",
            2,
            PP2_VP2,
            "[1,3,5,8]",
            extra=PACKED,
            thd_reference=True,
            parallel_only=[
                "model.recompute_granularity=full",
                "model.recompute_method=block",
                "model.recompute_num_layers=1",
            ],
        ),
        # the gradient reduction overlapped with backward: DDP starts a bucket once each of
        # its parameters reported a gradient; the first stage's head replica gets its whole
        # gradient from the fused exit loss (into main_grad) and reports it with megatron-
        # core's dummy-and-flag convention (soft.compat.wgrad)
        Scenario(
            "dp2_pp2_overlap",
            4,
            ["parallel.pipeline_model_parallel_size=2"],
            "[2,3,5,8]",
            parallel_only=["parallel.overlap_grad_reduce=true"],
        ),
    ]
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(scenario: Scenario, out: Path, layout: bool, *more: str):
    """`checkpoint.load_dir=../base` in a scenario means the base checkpoint beside `out`."""
    extra = [e.replace("=../base", f"={out.parent / 'base'}") for e in scenario.extra]
    overrides = [
        *BASE,
        f"soft.exit_layers={scenario.exits}",
        f"train.output_dir={out}",
        *extra,
        *more,
    ]
    parallel = [*scenario.layout, *scenario.parallel_only] if layout else []
    return load_config(None, overrides + parallel)


def base_worker(scenario: Scenario, root: Path) -> dict:
    """One rank: one SFT step of the base model, saved where fine-tuning scenarios load it."""
    cfg = load_config(
        None,
        [*BASE, f"soft.exit_layers={scenario.exits}", f"train.output_dir={root / 'base_run'}"]
        + list(scenario.base or []),
    )
    run = setup(cfg)
    _train_steps(run, 1, capture_first=False)
    save(
        root / "base",
        run.model.unwrapped,
        run.state,
        cfg,
        optimizer=run.optimizer,
        scheduler=run.scheduler,
    )
    return {}


def _is_main(replica_id) -> bool:
    return replica_id == 0 if isinstance(replica_id, int) else all(r == 0 for r in replica_id)


def _shards(item, attr: str) -> list:
    """The ShardedTensors of one state-dict item, with `attr` of its parameter as data."""
    if getattr(item, "data", None) is None or getattr(item.data, attr, None) is None:
        return []  # frozen parameters (ict) have no main_grad
    if isinstance(item, ShardedTensorFactory):
        return list(item.build_fn(item.key, getattr(item.data, attr), item.replica_id, None))
    if isinstance(item, ShardedTensor) and item.data.is_floating_point():
        return [(item, getattr(item.data, attr))]
    return []


def dump_global(chunks, attr: str) -> list[tuple]:
    """(key, global_offset, global_shape, tensor) for every main-replica shard this rank owns;
    `attr` = "data" for weights, "main_grad" for gradients."""
    out = []
    for chunk in chunks:
        for item in walk_leaves(chunk.sharded_state_dict()):
            for sh in _shards(item, attr):
                sh, tensor = sh if isinstance(sh, tuple) else (sh, sh.data)
                if _is_main(sh.replica_id):
                    out.append(
                        (
                            sh.key,
                            tuple(sh.global_offset),
                            tuple(sh.global_shape),
                            tensor.detach().clone(),
                        )
                    )
    return out


def _train_steps(run, n: int, capture_first: bool) -> dict:
    """n optimizer steps from run.state; the first step's losses and grads are captured."""
    t = run.cfg.train
    sampler = ResumableBatchSampler(len(run.train_data), t.global_batch_size, t.seed)
    record: dict = {"losses": [], "grad_norms": []}
    for i in range(n):
        mbs = step.microbatches(
            run.train_data, sampler, run.state.consumed_samples, t.micro_batch_size, run.topo.device
        )
        if i == 0 and capture_first:
            for chunk in run.model.chunks:
                chunk.zero_grad_buffer()
            run.optimizer.zero_grad()
            run.model.tallies.clear()
            step._run_schedule(run.model, mbs, run.optimizer.get_loss_scale().reshape(()))
            record["grads"] = dump_global(run.model.unwrapped, "main_grad")
            ok, norm, _ = run.optimizer.step()
            run.scheduler.step(increment=1)
            losses, _ = step.reduce_exit_losses(run.model)
            record["losses"].append(losses)
            record["grad_norms"].append(float(norm))
        else:
            result = step.train_step(run.model, run.optimizer, run.scheduler, mbs)
            record["losses"].append(result.exit_losses)
            record["grad_norms"].append(result.grad_norm)
        run.state.iteration += 1
        run.state.consumed_samples += t.global_batch_size
    return record


def scenario_worker(scenario: Scenario, out: Path, layout: bool) -> dict:
    """Body of every rank: 3 steps; first-step grads; final params; head replica check."""
    run = setup(_config(scenario, out, layout))
    if scenario.thd_reference and layout:
        use_reference_thd(run.model)
    record = _train_steps(run, 3, capture_first=True)
    record["params"] = dump_global(run.model.unwrapped, "data")
    record["head_max_diff"] = head_replica_max_diff(run.model.unwrapped, run.model.head_groups)
    record["head_copies"] = [len(c) for c in head_copies(run.model.unwrapped)]
    record["param_dtypes"] = sorted({str(p.dtype) for p in run.model.unwrapped[0].parameters()})
    record["thd_calls"] = thd_calls(run.model)
    return record


def reshard_worker(
    scenario: Scenario, out: Path, layout: bool, ckpt: Path, save_first: bool
) -> dict:
    """save_first: 2 steps, save, 2 more steps. Else: load that checkpoint, 2 steps."""
    run = setup(_config(scenario, out, layout))
    if save_first:
        _train_steps(run, 2, capture_first=False)
        save(
            ckpt,
            run.model.unwrapped,
            run.state,
            run.cfg,
            optimizer=run.optimizer,
            scheduler=run.scheduler,
            optimizer_format=run.cfg.checkpoint.optimizer_format,
        )
    else:
        run.state = resume(
            find_checkpoint(ckpt).path, run.model.unwrapped, run.optimizer, run.scheduler
        )
        assert run.state == TrainState(
            iteration=2, consumed_samples=2 * run.cfg.train.global_batch_size
        ), run.state
    return _train_steps(run, 2, capture_first=False)  # the 2nd step uses the loaded Adam state


def _child(rank: int, world: int, port: int, target, args, result_file: Path) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    code = 0
    try:
        torch.save(target(*args), result_file)
    except BaseException:
        result_file.with_suffix(".err").write_text(traceback.format_exc())
        code = 1
    finally:
        try:
            checkpoint_queue.restore()
            destroy_distributed()
        except Exception:
            pass
    os._exit(code)


def run_ranks(world: int, target, args, workdir: Path, timeout: float = 300) -> list[dict]:
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    port = _free_port()
    ctx = mp.get_context("fork")
    files = [workdir / f"rank{r}.pt" for r in range(world)]
    procs = [
        ctx.Process(target=_child, args=(r, world, port, target, args, files[r]))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    # Poll: one failed rank leaves the others blocked in a collective, so stop them at once.
    while any(p.is_alive() for p in procs):
        failed = any(p.exitcode not in (None, 0) for p in procs)
        if failed or time.monotonic() > deadline:
            for p in procs:
                p.kill()
            break
        time.sleep(0.05)
    for p in procs:
        p.join()
    errors = [f.with_suffix(".err").read_text() for f in files if f.with_suffix(".err").exists()]
    if errors or any(p.exitcode != 0 for p in procs):
        reason = "timed out" if time.monotonic() > deadline else "failed"
        raise RuntimeError(f"ranks {reason} in {workdir}:\n" + "\n".join(errors))
    return [torch.load(f, weights_only=False) for f in files]


def assemble(dumps: list[list[tuple]]) -> dict[str, torch.Tensor]:
    """Full tensors from every rank's shards; every element must be covered exactly once."""
    full: dict[str, torch.Tensor] = {}
    cover: dict[str, torch.Tensor] = {}
    for dump in dumps:
        for key, offset, shape, tensor in dump:
            if key not in full:
                full[key] = torch.zeros(shape, dtype=tensor.dtype)
                cover[key] = torch.zeros(shape, dtype=torch.int32)
            n_pre = len(shape) - tensor.dim()
            index = tuple(offset[:n_pre]) + tuple(
                slice(o, o + s) for o, s in zip(offset[n_pre:], tensor.shape, strict=True)
            )
            full[key][index] = tensor
            cover[key][index] += 1
    bad = [k for k, c in cover.items() if not bool((c == 1).all())]
    if bad:
        raise AssertionError(f"shards do not cover these tensors exactly once: {bad}")
    return full


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / (b.abs() + 1e-6)).max())


def compare_tensors(got: dict, ref: dict, tol: dict, what: str) -> float:
    assert set(got) == set(ref), f"{what}: keys differ: {set(got) ^ set(ref)}"
    worst = 0.0
    for key in ref:
        torch.testing.assert_close(
            got[key], ref[key], **tol, msg=lambda m, k=key: f"{what} {k}: {m}"
        )
        worst = max(worst, float((got[key] - ref[key]).abs().max()))
    return worst


def compare_tensors_by_norm(got: dict, ref: dict, rtol: float, what: str) -> float:
    assert set(got) == set(ref), f"{what}: keys differ: {set(got) ^ set(ref)}"
    worst = 0.0
    for key in ref:
        a, b = got[key].double(), ref[key].double()
        rel = float((a - b).norm() / b.norm().clamp_min(1e-12))
        assert rel < rtol, f"{what} {key}: ||got - ref|| / ||ref|| = {rel:.2e} (limit {rtol})"
        worst = max(worst, rel)
    return worst


def compare_losses(got: list[dict], ref: list[dict], what: str, rtol: float = LOSS_RTOL) -> float:
    worst = 0.0
    for i, (g, r) in enumerate(zip(got, ref, strict=True)):
        assert set(g) == set(r), f"{what} step {i + 1}: exits differ {set(g)} vs {set(r)}"
        for k in r:
            rel = abs(g[k] - r[k]) / abs(r[k])
            assert rel < rtol, f"{what} step {i + 1} exit {k}: {g[k]} vs {r[k]} (rel {rel:.2e})"
            worst = max(worst, rel)
    return worst


def check_scenario(scenario: Scenario, root: Path) -> dict:
    if scenario.base is not None:
        run_ranks(1, base_worker, (scenario, root), root / "base_run")
    ref = run_ranks(1, scenario_worker, (scenario, root / "ref", False), root / "ref")[0]
    ranks = run_ranks(scenario.world, scenario_worker, (scenario, root / "par", True), root / "par")
    report = {
        "loss_rel": compare_losses(
            ranks[0]["losses"], ref["losses"], f"{scenario.name} losses", scenario.loss_rtol
        )
    }
    norm_rel = abs(ranks[0]["grad_norms"][0] - ref["grad_norms"][0]) / ref["grad_norms"][0]
    assert norm_rel < scenario.loss_rtol, (
        f"{scenario.name}: grad norm {ranks[0]['grad_norms'][0]} vs {ref['grad_norms'][0]}"
    )
    report["grad_norm_rel"] = norm_rel
    dtypes = {str(d) for r in [ref, *ranks] for d in r["param_dtypes"]}
    assert dtypes == {"torch.bfloat16" if scenario.bf16 else "torch.float32"}, dtypes
    compared = [("grads", GRAD_TOL, "grad_abs")] if scenario.compare_grads else []
    compared.append(("params", PARAM_TOL, "param_abs_after_3_steps"))
    for attr, fp32_tol, fp32_key in compared:
        got, want = assemble([r[attr] for r in ranks]), assemble([ref[attr]])
        name = f"{scenario.name} {attr}"
        if scenario.bf16:
            report[f"{attr}_rel_l2"] = compare_tensors_by_norm(got, want, BF16_NORM_RTOL, name)
        else:
            report[fp32_key] = compare_tensors(got, want, fp32_tol, name)
    report["head_max_diff"] = max(r["head_max_diff"] for r in ranks)
    assert report["head_max_diff"] == 0.0, (
        f"{scenario.name}: head replicas differ by {report['head_max_diff']}"
    )
    report["head_copies_per_rank"] = [r["head_copies"] for r in ranks]
    if scenario.thd_reference:  # every rank's layers took THD streams, the reference none
        report["thd_calls_per_rank"] = [r["thd_calls"] for r in ranks]
        assert min(report["thd_calls_per_rank"]) > 0 and ref["thd_calls"] == 0, report
    return report


def check_reshard(
    root: Path,
    scenario: Scenario,
    save_parallel: bool,
    load_parallel: bool,
    load_as: Scenario | None = None,
) -> dict:
    """Save at one layout, load at another (or the same): the next two steps' losses equal the
    unbroken run's. The first checks the weights; the second, taken after an Adam update from
    the loaded moments and step count, checks the optimizer state.
    `load_as`: another layout of the same model and exits for the loading side."""
    ckpt = root / "ckpt"
    loader = load_as or scenario
    if scenario.base is not None:
        run_ranks(1, base_worker, (scenario, root), root / "base_run")
    saved = run_ranks(
        scenario.world if save_parallel else 1,
        reshard_worker,
        (scenario, root / "a", save_parallel, ckpt, True),
        root / "a",
    )
    loaded = run_ranks(
        loader.world if load_parallel else 1,
        reshard_worker,
        (loader, root / "b", load_parallel, ckpt, False),
        root / "b",
    )
    return {
        "loss_rel": compare_losses(loaded[0]["losses"], saved[0]["losses"], "resumed next step")
    }


# The distributed optimizer's checkpoints (dp_reshardable) reshard over data parallelism:
# saved at DP2 x PP2, loaded at DP1 x PP2 (same model, exits and global batch).
DISTOPT_PP2 = Scenario(
    "pp2_distopt",
    2,
    ["parallel.pipeline_model_parallel_size=2", "parallel.use_distributed_optimizer=true"],
    "[4,6,8]",
)

# fully_reshardable (the default format) also reshards over TP and PP.
DISTOPT_DP2_TP2 = Scenario(
    "dp2_tp2_distopt",
    4,
    ["parallel.tensor_model_parallel_size=2", "parallel.use_distributed_optimizer=true"],
    "[4,6,8]",
)
DISTOPT_ONE_RANK = Scenario("distopt_1", 1, ["parallel.use_distributed_optimizer=true"], "[4,6,8]")
# dp_reshardable: less communication at save, reshards over DP only.
DP_RESHARDABLE = ["checkpoint.optimizer_format=dp_reshardable"]
DISTOPT_DPRS = Scenario(
    "dp2_pp2_distopt_dprs", 4, DISTOPT_PP2.layout, "[4,6,8]", extra=DP_RESHARDABLE
)

RESHARDS = {
    "reshard_tp2pp2_to_tp1pp1": ("tp2_pp2", True, False, None),
    "reshard_tp1pp1_to_tp2pp2": ("tp2_pp2", False, True, None),
    "resume_distopt_dp2pp2": ("dp2_pp2_distopt", True, True, None),
    # ict checkpoints: separate heads saved once at TP2xPP2 (norms replicated over TP)
    "reshard_ict_tp2pp2_to_tp1pp1": ("ict_tp2_pp2", True, False, None),
    "reshard_distopt_dp2pp2_to_dp2tp2": ("dp2_pp2_distopt", True, True, DISTOPT_DP2_TP2),
    "reshard_distopt_dp2pp2_to_1rank": ("dp2_pp2_distopt", True, True, DISTOPT_ONE_RANK),
    "reshard_dp_reshardable_dp2pp2_to_dp1pp2": (DISTOPT_DPRS, True, True, DISTOPT_PP2),
    # tied embeddings: saved at TP2xPP2 (the last stage's copy and the replicas stored as
    # non-main replicas of the embedding), resumed at one rank
    "reshard_tied_tp2pp2_to_tp1pp1": ("tied_tp2_pp2", True, False, None),
    # adapter checkpoints: adapters (TP-split halves) saved at TP2xPP2 with SP, the base read
    # from its own checkpoint, resumed at one rank
    "reshard_lora_tp2pp2sp_to_tp1pp1": ("lora_tp2_pp2_sp", True, False, None),
    # packed data: the resumed run continues at the same pack of the same packing
    "reshard_packed_tp2pp2sp_to_tp1pp1": ("packed_tp2_pp2_sp", True, False, None),
}


def golden_worker(out: Path) -> list[dict]:
    """One rank of the golden-curve job at TP2 x PP2 (tests/training/golden.py)."""
    from soft.tracking import NullTracker

    run = setup(golden.golden_config(out, *golden.TP2_PP2))
    with StopRequest() as stop:
        return golden.curve(loop.train(run, NullTracker(), stop).train_history)


def check_golden(root: Path) -> dict:
    """The default tiny job at TP2 x PP2 reproduces the golden loss curve."""
    ranks = run_ranks(4, golden_worker, (root / "run",), root / "ranks")
    assert all(r == ranks[0] for r in ranks), "ranks disagree on the per-step losses"
    return {"golden_rel": golden.compare(ranks[0], golden.TP2_PP2_RTOL)}


def check_families(root: Path) -> dict:
    """Every model family imported from HF: per-exit logits at TP2xPP2 equal transformers',
    and SoFT's losses fall (tests/parallel/family_checks.py)."""
    return family_checks.check_families(root, run_ranks)


GOLDEN = {"golden_tp2_pp2": check_golden, "families_tp2_pp2": check_families}


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    names = argv[1:] or [*SCENARIOS, *RESHARDS, *GOLDEN]
    report = {}
    for name in names:
        try:
            if name in GOLDEN:
                result = GOLDEN[name](out / name)
            elif name in RESHARDS:
                base, save_parallel, load_parallel, load_as = RESHARDS[name]
                scenario = SCENARIOS[base] if isinstance(base, str) else base
                result = check_reshard(out / name, scenario, save_parallel, load_parallel, load_as)
            else:
                result = check_scenario(SCENARIOS[name], out / name)
            report[name] = {"ok": True, **result}
        except BaseException as exc:  # report every scenario (whole messages), then fail
            report[name] = {
                "ok": False,
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(),
            }
        print(name, json.dumps(report[name])[:600], flush=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return 0 if all(r["ok"] for r in report.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
