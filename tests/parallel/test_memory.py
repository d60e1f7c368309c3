"""The memory planner (soft.parallel.memory) against what a one-rank CPU model allocates,
full SoFT and LoRA SoFT (soft.peft.lora: subsets of layers and targets, trained final norm,
adapter dropout, with full recompute).

Weights, gradients and optimizer state are compared with the tensors megatron-core actually
holds after a training step (parameters, DDP's main_grad buffers, the optimizer's main
parameters and Adam moments): exact, within 1% for the buffer padding the distributed
optimizer may add (none at these shapes). Activations are compared with the unique storages
autograd saves during one micro batch's forward (saved_tensors_hooks), which is what is kept
until backward, within 5%: the model leaves out small fixed-size tensors (the causal mask,
the rotary table a full-recompute checkpoint keeps as an input), which are up to ~3% of this
tiny model's activations (measured: 0.1% without full recompute, 2.8% with it) and vanish at
real sizes. The CPU path is megatron's local spec, hence kernels="local". The fused exit
loss's transient peak (chunk logits, weight gradient) is measured by tracking every storage
its ops allocate until the tensor holding it dies, within 2% (observed 0.1-0.7%: per-token
scalars not modelled).
"""

from __future__ import annotations

import dataclasses
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from soft.models.config import ModelConfig
from soft.models.exit_plan import ExitPlan
from soft.parallel import balance, memory
from soft.parallel.config import ParallelConfig
from soft.peft.config import PeftConfig
from tests.megatron_env import single_rank_world, tiny_config

# The multi-rank scenarios' names (tests/parallel/memory_ranks.py imports megatron-core and
# forks; its table is repeated here so that collecting this module imports neither).
RANK_SCENARIOS = ("tp2_sp", "pp2", "dp2_distopt_bf16", "lora_tp2_sp", "lora_pp2", "pp2_vp2")

SHAPE = (
    "data.seq_length=128",
    "model.hidden_size=128",
    "model.ffn_hidden_size=352",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
)
VOCAB = 512


@dataclasses.dataclass
class Measured:
    weights: int
    grads: int
    optimizer: int
    activations: int  # one micro batch's saved tensors


def _measure(cfg) -> Measured:
    """Allocations of a one-rank model after one training step (cfg.peft: LoRA or not)."""
    from soft.data import build_datasets
    from soft.parallel.setup import seed_everything
    from soft.training.model import build_soft_model
    from soft.training.optim import build_optimizer, build_scheduler
    from soft.training.step import forward_step, train_step

    single_rank_world()
    seed_everything(42)
    train, _, _ = build_datasets(cfg.data, cfg.train.seed)
    model = build_soft_model(
        cfg.model, cfg.parallel, cfg.soft, cfg.exit_plan(), VOCAB, cfg.train.seed, peft=cfg.peft
    )
    optimizer = build_optimizer(model, cfg.train, cfg.model, cfg.parallel)
    batches = [train.batch([0, 1]), train.batch([2, 3])]
    train_step(model, optimizer, build_scheduler(optimizer, cfg.train), batches)
    params = {id(p): p for chunk in model.unwrapped for p in chunk.parameters()}
    buffers = [b for chunk in model.chunks for b in chunk.buffers]
    # Storages of the model's own tensors: never counted as optimizer state or activations.
    model_storage = {p.untyped_storage().data_ptr() for p in params.values()}
    model_storage |= {
        b.param_data.untyped_storage().data_ptr() for b in buffers if b.param_data is not None
    }
    state = 0
    inner = optimizer.optimizer
    for group in inner.param_groups:
        for p in group["params"]:
            if p.untyped_storage().data_ptr() not in model_storage:  # an fp32 main copy
                state += p.nbytes
            state += sum(
                v.nbytes for v in inner.state.get(p, {}).values() if torch.is_tensor(v) and v.dim()
            )
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in model_storage:
            saved.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward_step(model, torch.ones(()), False, iter(batches[:1]), model.chunks[0])
    return Measured(
        weights=sum(p.nbytes for p in params.values()),
        grads=sum(b.grad_data.nbytes for b in buffers),
        optimizer=state,
        activations=sum(saved.values()),
    )


def _config(overrides: tuple[str, ...], lora: dict | None = None):
    """The tiny model with `overrides`; `lora`: PeftConfig fields of method=lora (set after
    loading: the config refuses adapters without a base checkpoint to load)."""
    cfg = tiny_config(*SHAPE, *overrides)
    if lora is None:
        return cfg
    return dataclasses.replace(cfg, peft=PeftConfig(method="lora", **lora))


def _setup(cfg, **kw) -> memory.MemorySetup:
    values = dict(
        model=cfg.model,
        parallel=cfg.parallel,
        plan=cfg.exit_plan(),
        peft=cfg.peft,
        vocab_size=VOCAB,
        seq_length=cfg.data.seq_length,
        micro_batch_size=cfg.train.micro_batch_size,
        num_microbatches=1,
        data_parallel=1,
        exit_loss=cfg.soft.exit_loss,
        loss_chunk_tokens=cfg.soft.loss_chunk_tokens,
        kernels="local",
    )
    values.update(kw)
    return memory.MemorySetup(**values)


@pytest.mark.parametrize(
    "overrides, lora",
    [
        ((), None),
        (("soft.mode=sft",), None),
        (("model.params_dtype=bf16", "parallel.use_distributed_optimizer=true"), None),
        (("model.recompute_granularity=selective", "soft.exit_loss=recompute", "soft.loss_chunk_tokens=32"), None),
        (("model.recompute_granularity=full", "model.recompute_num_layers=2"), None),
        (("model.recompute_granularity=full", "model.recompute_method=block", "soft.exit_loss=plain"), None),
        ((), {}),
        (("model.params_dtype=bf16",), dict(target_modules=["linear_qkv", "linear_fc2"], layers=[3, 4], train_final_norm=True)),
        ((), dict(rank=4, dropout=0.1)),
        (("model.recompute_granularity=full",), {}),
    ],
    ids=["soft", "sft", "bf16-distopt", "selective-recompute-loss", "full-uniform",
         "full-block-plain", "lora", "lora-bf16-subset-norm", "lora-dropout", "lora-recompute"],
)  # fmt: skip
def test_planner_matches_measured_allocations(overrides, lora):
    cfg = _config(overrides, lora)
    got = _measure(cfg)
    setup = _setup(cfg)
    (stage,) = memory.stage_memory(setup)
    assert got.weights == pytest.approx(stage.weights, rel=0.01)
    assert got.grads == pytest.approx(stage.grads, rel=0.01)
    assert got.optimizer == pytest.approx(stage.optimizer, rel=0.01)
    act = memory.stage_activations(setup, 0)
    planned = act.layers_per_microbatch + act.exits_per_microbatch
    assert got.activations == pytest.approx(planned, rel=0.05)


def test_exits_cost_what_the_planner_says():
    """SoFT minus SFT (same model, early exits trained or not): the measured difference is the
    planner's kept bytes for three early exits (one micro batch)."""
    soft = _measure(_config(()))
    sft = _measure(_config(("soft.mode=sft",)))
    act = memory.stage_activations(_setup(_config(())), 0)
    assert soft.activations - sft.activations == pytest.approx(act.exits_per_microbatch, rel=0.01)


def _model(**kw) -> ModelConfig:
    base = dict(hidden_size=64, ffn_hidden_size=176, num_attention_heads=4, num_query_groups=2)
    return ModelConfig(**{**base, **kw})


def _plan_setup(model: ModelConfig, parallel: ParallelConfig, **kw) -> memory.MemorySetup:
    values = dict(
        model=model,
        parallel=parallel,
        plan=ExitPlan.build(model.num_layers, None),
        peft=PeftConfig(),
        vocab_size=VOCAB,
        seq_length=64,
        micro_batch_size=1,
        num_microbatches=8,
        data_parallel=1,
    )
    values.update(kw)
    return memory.MemorySetup(**values)


def test_lora_adapter_shapes_by_hand():
    """r=8 at TP2, h=64, 4 heads of 16, 2 kv groups, f=176 (shapes of soft.peft.lora):
    qkv A 8x64 + B (128/2)x8; proj A 8x(64/2) + B 64x8; fc1 A 8x64 + B (352/2)x8;
    fc2 A 8x(176/2) + B 64x8."""
    peft = PeftConfig(method="lora", rank=8)
    assert memory.adapter_params_per_rank(_model(), peft, tp=2) == 1024 + 768 + 1920 + 1216
    only = dataclasses.replace(peft, target_modules=["linear_proj"])
    assert memory.adapter_params_per_rank(_model(), only, tp=1) == 8 * 64 + 64 * 8


def test_lora_trains_only_adapters_and_keeps_the_base():
    model, parallel = _model(params_dtype="bf16"), ParallelConfig(use_distributed_optimizer=True)
    peft = PeftConfig(method="lora", rank=8, layers=[3, 4])
    full = memory.stage_memory(_plan_setup(model, parallel, data_parallel=4))[0]
    lora = memory.stage_memory(_plan_setup(model, parallel, peft=peft, data_parallel=4))[0]
    adapters = 2 * memory.adapter_params_per_rank(model, peft, 1)
    assert lora.trainable == adapters
    assert lora.params == full.params + adapters
    assert lora.weights == full.weights + 2 * adapters  # bf16
    assert lora.grads == 4 * adapters  # fp32 main_grad
    assert lora.optimizer == 12 * adapters / 4  # main copy + Adam, sharded over DP 4
    assert full.optimizer == 12 * full.trainable / 4 and full.grads == 4 * full.trainable
    # With every target adapted a layer keeps what a fully trained one does (the adapters
    # keep the frozen linears' inputs) plus u = A x: 64 tokens x r 8 x 4 targets x 2 bytes;
    # a layer without adapters keeps only its input-gradient path, and so do layers 1-2.
    setup = _plan_setup(model, parallel, peft=peft)
    adapted = memory.layer_activation_bytes(setup, adapted=True)
    frozen = memory.layer_activation_bytes(setup, adapted=False)
    assert adapted - memory.layer_activation_bytes(_plan_setup(model, parallel)) == 4096
    kept = memory.stage_activations(setup, 0).layers_per_microbatch
    assert kept == 2 * adapted + 2 * frozen + memory.final_loss_bytes(setup)
    assert frozen < adapted


def test_params_agree_with_the_balance_table_at_tp1():
    model = _model(num_layers=8)
    parallel = ParallelConfig(pipeline_model_parallel_size=4, num_layers_in_first_pipeline_stage=1, num_layers_in_last_pipeline_stage=3)  # fmt: skip
    plan = ExitPlan.build(8, [2, 5, 8])
    setup = _plan_setup(model, parallel, plan=plan)
    cost = balance.CostModel.build(model, 64, VOCAB)
    expected = [s.params for s in balance.layout(parallel, plan, cost).stages]
    assert [s.params for s in memory.stage_memory(setup)] == expected


def test_one_f_one_b_in_flight_micro_batches():
    parallel = ParallelConfig(pipeline_model_parallel_size=4)
    model = _model(num_layers=8)
    assert [memory.in_flight(_plan_setup(model, parallel), i) for i in range(4)] == [4, 3, 2, 1]
    few = _plan_setup(model, parallel, num_microbatches=2)
    assert [memory.in_flight(few, i) for i in range(4)] == [2, 2, 2, 1]


def test_tool_prints_memory_for_full_and_lora(capsys):
    from soft.parallel.cli_plan import main

    assert main(["--compare-lora", "--gpus", "4", "parallel.pipeline_model_parallel_size=2"]) == 0
    out = capsys.readouterr().out
    assert "### memory per rank, full SoFT: DP 2" in out
    assert "### memory per rank, LoRA SoFT (r 16" in out
    assert out.count("| total GiB |") == 2


def test_tool_refuses_gpus_not_a_multiple_of_the_layout(capsys):
    from soft.parallel.cli_plan import main

    assert main(["--gpus", "3", "parallel.pipeline_model_parallel_size=2"]) == 2
    assert "--gpus 3 is not a multiple of TP x PP = 2" in capsys.readouterr().err


@pytest.fixture(scope="module")
def ranks_report(request, tmp_path_factory) -> dict:
    """One launch of tests/parallel/memory_ranks.py for the scenarios selected (it forks its
    ranks from a fresh process: this one may hold a one-rank world already)."""
    from tests.launcher_utils import run_harness, selected_names

    out = tmp_path_factory.mktemp("memory_ranks")
    names = selected_names(request, test_planner_matches_every_rank)
    return run_harness("tests.parallel.memory_ranks", out, *names, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RANK_SCENARIOS))
def test_planner_matches_every_rank(ranks_report, name):
    """Two ranks (memory_ranks.py): TP2 with sequence parallelism, PP2 with an exit on the
    stage boundary and a head replica on stage 0 (its weights, gradients and Adam state are
    the planner's exits column), DP2 with the distributed optimizer in bf16 (optimizer state
    halved), LoRA at TP2+SP and PP2 (trained norm replica), and PP2 with virtual pipeline 2
    (a replica on three of the four chunks). Same tolerances as above; the micro batches (chunk
    forwards when interleaved) in flight equal the planner's count."""
    for rank in ranks_report[name]:
        got, plan = rank["measured"], rank["planned"]
        for key in ("weights", "grads", "optimizer"):
            assert got[key] == pytest.approx(plan[key], rel=0.01), (key, rank)
        per_mb = got["activations_per_microbatch"]
        assert per_mb == pytest.approx(plan["activations_per_microbatch"], rel=0.05), rank
        assert got["in_flight"] == plan["in_flight"], rank


def test_rank_scenarios_are_the_harness_table():
    from tests.parallel import memory_ranks

    assert tuple(memory_ranks.SCENARIOS) == RANK_SCENARIOS


class _LiveBytes(TorchDispatchMode):
    """Bytes of the storages the ops under it allocate, while a tensor holding each lives
    (freed when that tensor is collected: exact for code that keeps no views past the tensor
    they come from, as FusedExitCE's loop). `known`: storages allocated before."""

    def __init__(self, known: list[torch.Tensor]) -> None:
        super().__init__()
        self.known = {t.untyped_storage().data_ptr() for t in known}
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            ptr = t.untyped_storage().data_ptr()
            if ptr and ptr not in self.live and ptr not in self.known:
                self.live[ptr] = t.untyped_storage().nbytes()
                self.now += self.live[ptr]
                self.peak = max(self.peak, self.now)
                weakref.finalize(t, self._free, ptr)
        return out

    def _free(self, ptr: int) -> None:
        self.now -= self.live.pop(ptr, 0)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("chunk", [32, 0])
@pytest.mark.parametrize("frozen", [False, True])
def test_exit_loss_transient_peak(dtype, chunk, frozen):
    """One exit's fused loss (soft.models.exit_loss) at s=128, b=2, h=64, V=512: the peak of
    what it allocates, less dL/dx (kept, counted by exit_kept_bytes), is the planner's
    transient; chunks of 32 positions or one chunk; a frozen head (LoRA) computes no dW."""
    from soft.models import exit_loss

    single_rank_world()
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    s, b, h, vocab = 128, 2, 64, 512
    x = torch.randn(s, b, h, dtype=torch_dtype, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(vocab, h, dtype=torch_dtype), requires_grad=not frozen)
    known = [x, weight]
    if not frozen:
        weight.main_grad = torch.zeros(vocab, h)  # DDP's fp32 buffer
        known.append(weight.main_grad)
    labels, mask, scale = torch.randint(0, vocab, (s, b)), torch.ones(s, b), torch.ones(())
    tracker = _LiveBytes([*known, labels, mask, scale])
    with tracker:
        exit_loss.fused_ce_sum(x, weight, labels, mask, scale, chunk, True)
    model = _model(hidden_size=h, params_dtype=dtype)
    peft = PeftConfig(method="lora") if frozen else PeftConfig()
    setup = _plan_setup(model, ParallelConfig(), seq_length=s, micro_batch_size=b, peft=peft)
    setup = dataclasses.replace(setup, loss_chunk_tokens=chunk)
    measured = tracker.peak - x.numel() * x.element_size()
    assert measured == pytest.approx(memory.exit_transient_bytes(setup), rel=0.02)


def test_tool_plans_the_configured_kernels(capsys):
    from soft.parallel.cli_plan import main

    assert main(["model.transformer_impl=local"]) == 0
    assert "kernels local" in capsys.readouterr().out
    assert main(["--kernels", "te", "model.transformer_impl=local"]) == 0
    assert "kernels te" in capsys.readouterr().out
