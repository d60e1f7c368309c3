"""Per-rank training memory of full SoFT and of LoRA SoFT, stage by stage: a planner's estimate.

Pure arithmetic on the config (no model, no torch), like soft.parallel.balance. Every term is
bytes on one rank of a pipeline stage (its tensor-parallel shard), for the step's peak.

Weights, gradients, optimizer state (megatron-core 0.16.1 as soft wraps it, soft.parallel.wrap
and soft.training.optim):
- weights: every parameter the rank holds, in model.params_dtype (Float16Module casts the
  fp32-created norms too); LoRA's frozen base weights are stored the same way.
- gradients: megatron-core DDP's `main_grad` buffer, fp32 for every parameter that trains
  (wrap.py sets grad_reduce_in_fp32=True; DDP only buckets requires_grad parameters, so a
  frozen LoRA base has none). Not sharded: the distributed optimizer reduce-scatters it but
  keeps the whole buffer.
- optimizer: Adam's two fp32 moments, plus an fp32 main copy of each bf16/fp16 parameter
  (Float16OptimizerWithFloat16Params / DistributedOptimizer; fp32 parameters are their own
  main copy). `parallel.use_distributed_optimizer` shards these over the data-parallel ranks
  (ZeRO-1). megatron pads buckets to multiples of lcm(DP, 128) elements and each parameter
  start to 64 with the distributed optimizer: below 1% at real sizes, not counted.

Activations (one micro batch, one layer), from what autograd saves for backward, i.e. the
Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
section 4) accounting redone for a LLaMA layer: RMSNorm, grouped-query attention, SwiGLU, no
biases, no dropout (soft sets both dropouts to 0, so no masks are kept). Per token, with
h hidden, a query heads, g key/value groups, d head width, f SwiGLU width, s sequence, TP t,
sp = t with sequence parallelism else 1, e the dtype's bytes:
- both norms keep their input (h/sp) and fp32 1/rms; megatron's linears keep their input,
  the sequence-parallel shard (h/sp) for linear_qkv and linear_fc1, a*d/t for linear_proj,
  f/t for linear_fc2; SwiGLU keeps linear_fc1's output (2f/t).
- `kernels="te"` (GPUs: Transformer Engine, flash attention, megatron's fused bias-SwiGLU):
  attention keeps q and k after RoPE ((a + g) d/t, new tensors), v, a view that keeps
  linear_qkv's whole output alive ((a + 2g) d/t), its output (the tensor linear_proj keeps,
  a d/t) and fp32 log-sum-exp (a/t). Nothing quadratic in s. Not measured on a GPU here.
- `kernels="local"` (megatron's local spec: the CPU path, measured by
  tests/parallel/test_memory.py): torch's RMSNorm also keeps x/rms (h/sp) when its weight
  trains; unfused attention keeps q and k, v repeated to all a heads (3 a d/t), the softmax
  [a/t x s] per token (fp32, plus a bf16 copy for the bmm in bf16), and RoPE's cos/sin
  (4 s d per layer and micro batch); the unfused SwiGLU keeps silu(x1) and x2 + 0 (2f/t)
  more; selective recompute keeps what `te` keeps, without the log-sum-exp.
- LoRA (soft.peft.lora): a frozen linear keeps no input (megatron's LinearWithFrozenWeight
  saves only its weight) and a frozen norm no x/rms; an adapted target keeps its input for
  dA (the shard the base would keep; with peft.dropout, the dropped copy and its mask)
  and u = A x for dB: [tokens x r], gathered over the sequence for column-parallel bases,
  the sequence-parallel shard for row-parallel ones. Every layer keeps its input-gradient
  path, those below the first adapter too (the frozen embedding's output requires grad).
- model.recompute_granularity: selective keeps the core attention's inputs (q, k, v as
  above) instead of its internals; full keeps each checkpoint's input hidden state (h/sp) and rebuilds one block
  (recompute_num_layers layers) at a time in backward: that block is a transient.
Micro batches in flight under 1F1B: stage i of pp holds min(pp - i, M) micro batches' worth
of activations; interleaved 1F1B: min(2 (pp - i - 1) + (vp - 1) pp + 1, M vp) chunk forwards
(megatron's warm-up count), each counted as 1/vp of the rank's chunks together (an average:
the chunks' layers and exits may differ).

Exits (soft.models.exits, soft.models.exit_loss, soft.models.heads):
- a head replica (final norm + [V/t x h] matrix; a norm only when tied on the first stage)
  on every stage that owns early exits but not the real head, with its gradient buffer and
  optimizer state when it trains;
- per trained early exit and micro batch in flight: the fused loss keeps dL/dx [s x b x h]
  (the whole sequence, gathered over TP) and the norm's 1/rms (and x/rms on `local`); the
  `plain` loss (and `recompute` with one chunk) keeps the logits' softmax [s x b x V/t]
  fp32 and its gathered input instead;
- transient, once per stage: one chunk's logits [loss_chunk_tokens x b x V/t] in fp32 plus
  the matmul's output in the model dtype, beside the previous chunk's dlogits and weight
  gradient [V/t x h] (still bound to the loop's variables); or the weight gradient step
  (exit_transient_bytes).
The final exit is GPTModel's own loss (counted as activations): megatron's vocab-parallel
cross entropy keeps the softmax [s x b x V/t] fp32.

Not counted: the CUDA context, NCCL and pipeline receive buffers, the allocator's
fragmentation and the final loss's backward transient: leave headroom (the CLI asks for 10%).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from soft.config.errors import ConfigError
from soft.models.config import ModelConfig
from soft.models.exit_plan import ExitPlan
from soft.parallel.config import ParallelConfig
from soft.peft.config import COLUMN_PARALLEL, PeftConfig

Kernels = Literal["te", "local"]
GIB = 2**30
_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
_FP32 = 4
_GRAD_BYTES = 4  # grad_reduce_in_fp32=True: soft.parallel.wrap
_ADAM_BYTES = 8  # exp_avg + exp_avg_sq, fp32


@dataclass(frozen=True)
class MemorySetup:
    """What the estimate depends on, gathered from the config (soft.parallel.cli_plan.memory_setup)."""

    model: ModelConfig
    parallel: ParallelConfig
    plan: ExitPlan
    peft: PeftConfig
    vocab_size: int  # padded (the head's width)
    seq_length: int
    micro_batch_size: int
    num_microbatches: int  # per optimizer step and data-parallel rank
    data_parallel: int
    exit_loss: str = "fused"
    loss_chunk_tokens: int = 256
    kernels: Kernels = "te"

    def __post_init__(self) -> None:
        if self.plan.separate_heads:
            raise ConfigError(
                "the memory plan covers soft.mode soft, sft and extracted, not ict "
                "(separate heads over a frozen backbone)"
            )
        if self.data_parallel < 1 or self.num_microbatches < 1:
            raise ConfigError(
                f"data-parallel size {self.data_parallel} and micro batches per step "
                f"{self.num_microbatches} must be >= 1"
            )

    @property
    def tp(self) -> int:
        return self.parallel.tensor_model_parallel_size

    @property
    def sp(self) -> int:
        """Divisor of the hidden-sized tensors that sequence parallelism shards."""
        return self.tp if self.parallel.sequence_parallel else 1

    @property
    def dtype_bytes(self) -> int:
        return _DTYPE_BYTES[self.model.params_dtype]

    @property
    def tokens(self) -> int:
        return self.seq_length * self.micro_batch_size

    @property
    def lora(self) -> bool:
        return self.peft.enabled


@dataclass(frozen=True)
class StageMemory:
    """Bytes on one rank of a stage. weights/grads/optimizer: layers, embedding, real head and
    adapters; exits: what early exits add (replica weights + grads + optimizer, kept
    activations, one chunk's transient)."""

    index: int
    layers: tuple[tuple[int, int], ...]  # per chunk: 1-based, inclusive
    exits: tuple[int, ...]
    params: int  # parameters on the rank, exits' replica included
    trainable: int
    weights: float
    grads: float
    optimizer: float
    activations: float
    exit_bytes: float
    in_flight: float  # micro batches (interleaved: chunk-forwards / vp) held at the peak
    replica_state: tuple[float, float, float] = (0.0, 0.0, 0.0)  # in exit_bytes: w, g, opt

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.exit_bytes


# --- parameters ------------------------------------------------------------------------------


def _layer_shapes(model: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear layer of a decoder layer (megatron-core names)."""
    h, f, d = model.hidden_size, model.ffn_hidden_size, model.kv_channels
    q, kv = model.num_attention_heads * d, model.query_groups * d
    return {
        "linear_qkv": (h, q + 2 * kv),
        "linear_proj": (q, h),
        "linear_fc1": (h, 2 * f),
        "linear_fc2": (f, h),
    }


def layer_params_per_rank(model: ModelConfig, tp: int) -> int:
    """One decoder layer on one TP rank: the four matrices (and q/k/v biases) split over TP,
    the two RMSNorm weights (and q/k norms) replicated."""
    split = sum(i * o for i, o in _layer_shapes(model).values())
    if model.qkv_bias:
        split += _layer_shapes(model)["linear_qkv"][1]
    replicated = 2 * model.hidden_size + (2 * model.kv_channels if model.qk_layernorm else 0)
    return split // tp + replicated


def adapter_params_per_rank(model: ModelConfig, peft: PeftConfig, tp: int) -> int:
    """LoRA adapters of one adapted layer on one TP rank: column-parallel bases (qkv, fc1)
    have A [r x in] replicated and B [out/t x r] split; row-parallel bases (proj, fc2) A
    [r x in/t] split and B [out x r] replicated (the layout of soft.peft.lora)."""
    shapes, r, total = _layer_shapes(model), peft.rank, 0
    for target in peft.target_modules:
        fan_in, fan_out = shapes[target]
        if target in COLUMN_PARALLEL:
            total += r * fan_in + fan_out // tp * r
        else:
            total += r * fan_in // tp + fan_out * r
    return total


@dataclass(frozen=True)
class _StageParams:
    base: int  # layers (and their adapters), embedding, real head on the rank
    replica: int  # exits' head replica
    trainable_base: int
    trainable_replica: int


@dataclass(frozen=True)
class _Chunk:
    """A model chunk a rank holds: its layers and whether it is the model's first or last."""

    first: int
    last: int
    pre: bool  # holds the embedding
    post: bool  # holds the real head and the final loss

    @property
    def layers(self) -> range:
        return range(self.first, self.last + 1)


def _chunks(setup: MemorySetup, index: int) -> list[_Chunk]:
    """The chunks pipeline rank `index` holds: one stage, or with virtual pipelining the
    virtual stages index, index + pp, ... of L / (pp vp) layers each (megatron-core's)."""
    par, num_layers = setup.parallel, setup.model.num_layers
    pp, vp = par.pipeline_model_parallel_size, par.virtual_pipeline_model_parallel_size
    if vp is None:
        counts = par.stage_layer_counts(num_layers)
        first = sum(counts[:index]) + 1
        return [_Chunk(first, first + counts[index] - 1, index == 0, index == pp - 1)]
    if num_layers % (pp * vp):
        raise ConfigError(
            f"model.num_layers={num_layers} is not divisible by pipeline x virtual pipeline "
            f"size {pp} x {vp}"
        )
    per = num_layers // (pp * vp)
    virtual = [j * pp + index for j in range(vp)]
    return [_Chunk(v * per + 1, (v + 1) * per, v == 0, v == pp * vp - 1) for v in virtual]


def _stage_params(setup: MemorySetup, chunks: list[_Chunk]) -> _StageParams:
    """Parameters on one TP rank of a pipeline rank's chunks. Every chunk that owns early
    exits but not the real head holds a replica (soft.models.heads): the norm only when tied
    beside the embedding; the real head's matrix is the embedding when tied on one chunk."""
    model, tp, plan = setup.model, setup.tp, setup.plan
    h, matrix = model.hidden_size, setup.vocab_size * model.hidden_size // tp
    tied = model.tie_word_embeddings
    base = replica = adapted = trained_norms = replica_norms = 0
    for chunk in chunks:
        base += len(chunk.layers) * layer_params_per_rank(model, tp)
        base += matrix if chunk.pre else 0
        if chunk.post:
            base += h + (0 if tied and chunk.pre else matrix)
            trained_norms += h
        elif any(k in plan.early for k in chunk.layers):
            replica += h + (0 if tied and chunk.pre else matrix)
            replica_norms += h
        adapted += sum(1 for k in chunk.layers if setup.peft.adapts(k))
    if not setup.lora:
        return _StageParams(base, replica, base, replica)
    adapters = adapted * adapter_params_per_rank(model, setup.peft, tp)
    norms = setup.peft.train_final_norm
    return _StageParams(
        base + adapters,
        replica,
        adapters + (trained_norms if norms else 0),
        replica_norms if norms else 0,
    )


def _state_bytes(setup: MemorySetup, trainable: int) -> tuple[float, float]:
    """(main_grad, optimizer) bytes of `trainable` parameters on the rank."""
    main_copy = 0 if setup.dtype_bytes == _FP32 else _FP32
    shards = setup.data_parallel if setup.parallel.use_distributed_optimizer else 1
    return trainable * _GRAD_BYTES, trainable * (main_copy + _ADAM_BYTES) / shards


# --- activations -----------------------------------------------------------------------------


def layer_activation_bytes(setup: MemorySetup, adapted: bool = True) -> float:
    """What one decoder layer keeps for backward for one micro batch (module docstring).
    `adapted`: with LoRA, whether this layer has adapters (a frozen layer above adapted ones
    still keeps what its input gradient needs)."""
    m, tp, sp, e = setup.model, setup.tp, setup.sp, setup.dtype_bytes
    h, f, d, s = m.hidden_size, m.ffn_hidden_size, m.kv_channels, setup.seq_length
    a, g = m.num_attention_heads, m.query_groups
    local = setup.kernels == "local"
    full = not setup.lora
    targets = set(setup.peft.target_modules) if setup.lora and adapted else set()

    def keeps_input(target: str) -> bool:
        return full or target in targets

    norms = 2 * norm_bytes(setup, weight_trains=full, input_shared=False)
    elements, fp32 = 0.0, 0.0
    elements += (h / sp) * (keeps_input("linear_qkv") + keeps_input("linear_fc1"))
    granularity = m.recompute_granularity
    if local and granularity != "selective":
        elements += 3 * a * d / tp  # q; k and v repeated to every query head
        elements += a * s / tp  # softmax probabilities
        if e != _FP32:
            fp32 += _FP32 * a * s / tp  # megatron's unfused softmax runs in fp32
        if keeps_input("linear_proj"):
            elements += a * d / tp
    else:
        # Flash attention, or selective recompute's checkpoint: the inputs q and k (new
        # tensors after RoPE) and v, a view that keeps linear_qkv's whole output alive; the
        # output, which linear_proj keeps too.
        elements += (a + g) * d / tp + (a + 2 * g) * d / tp + a * d / tp
        if not local:
            fp32 += _FP32 * a / tp  # log-sum-exp, fp32: one value per head
    elements += 2 * f / tp  # linear_fc1's output, kept by SwiGLU
    if local:
        elements += 2 * f / tp  # unfused SwiGLU: silu(x1) and x2 + 0
    if keeps_input("linear_fc2"):
        elements += f / tp
    elements += _adapter_elements(setup, targets)
    per_microbatch = setup.tokens * (elements * e + fp32 + norms)
    if setup.peft.dropout > 0:  # the adapters keep dropout(x) instead of x, and the mask:
        mask = e if local else 1  # torch's CPU dropout keeps scaled noise, CUDA's a bool mask
        per_microbatch += setup.tokens * mask * sum(_input_elements(setup, t) for t in targets)
    if local:
        per_microbatch += 4 * s * d * e  # RoPE cos/sin for q and k, in the model dtype
    return per_microbatch


def _input_elements(setup: MemorySetup, target: str) -> float:
    """Per token, the input a linear layer (or its adapter) keeps on this rank."""
    fan_in = _layer_shapes(setup.model)[target][0]
    return fan_in / setup.sp if target in COLUMN_PARALLEL else fan_in / setup.tp


def _adapter_elements(setup: MemorySetup, targets: set[str]) -> float:
    """Per token, u = A x kept for dB (soft.peft.lora): gathered over the sequence for a
    column-parallel base (r wide), reduce-scattered along it for a row-parallel one."""
    r = setup.peft.rank
    return sum(r if t in COLUMN_PARALLEL else r / setup.sp for t in targets)


def _checkpoint_input_bytes(setup: MemorySetup) -> float:
    """Full recompute keeps a checkpoint's input hidden state (sequence-parallel shard)."""
    return setup.tokens * setup.model.hidden_size / setup.sp * setup.dtype_bytes


def norm_bytes(setup: MemorySetup, weight_trains: bool, input_shared: bool) -> float:
    """Per token, what an RMSNorm keeps: its input (unless another op keeps the same tensor),
    fp32 1/rms, and on `local` x/rms when its weight trains. TE's norms keep the input as
    given; torch's RMSNorm (local spec) computes in fp32 and keeps the fp32 upcast, which is
    the input itself only in fp32."""
    h, sp, e = setup.model.hidden_size, setup.sp, setup.dtype_bytes
    local = setup.kernels == "local"
    kept = _FP32 / sp
    if not input_shared or (local and e != _FP32):
        kept += h / sp * (_FP32 if local else e)
    if local and weight_trains:
        kept += h / sp * _FP32
    return kept


def exit_kept_bytes(setup: MemorySetup, stage_last_layer: bool) -> float:
    """What one trained early exit keeps per micro batch (module docstring). The hidden state
    its norm reads is the next layer's input, except at a stage's last layer (sent on and
    freed by the schedule, but the exit's norm keeps it)."""
    h, e, tokens = setup.model.hidden_size, setup.dtype_bytes, setup.tokens
    norm = norm_bytes(setup, _head_norm_trains(setup), input_shared=not stage_last_layer)
    kept = tokens * norm
    if setup.exit_loss == "plain" or (
        setup.exit_loss == "recompute" and not 0 < setup.loss_chunk_tokens < setup.seq_length
    ):  # one chunk: autograd keeps the logits' fp32 softmax and the gathered input
        kept += tokens * setup.vocab_size / setup.tp * _FP32 + tokens * h * e
    else:  # fused keeps dL/dx, recompute its input x: both [s, b, h] gathered
        kept += tokens * h * e
    return kept


def exit_transient_bytes(setup: MemorySetup) -> float:
    """Peak of one exit's fused loss while it runs, beyond what it keeps (soft.models.
    exit_loss.FusedExitCE.forward, measured by tests/parallel/test_memory.py): a chunk's fp32
    logits (and, in bf16, the matmul output they are cast from); or the dL/dx step (dlogits
    and the chunk's dL/dx); or the dW step: dlogits, dW, and its fp32 copy for main_grad in
    bf16. Each chunk's dlogits and dW are freed before the next chunk's logits exist. A frozen
    head (LoRA) computes no dW."""
    e, vt, h = setup.dtype_bytes, setup.vocab_size / setup.tp, setup.model.hidden_size
    chunk = setup.loss_chunk_tokens or setup.seq_length
    rows = min(chunk, setup.seq_length) * setup.micro_batch_size
    upcast = 0 if e == _FP32 else e  # .float() of a bf16 matmul output is a copy
    logits = rows * vt * (_FP32 + upcast)
    # dL/dx of the chunk: dlogits @ W, before it is copied into the kept dL/dx.
    dx = rows * vt * e + rows * h * e
    if setup.lora:
        return max(logits, dx)
    fp32_copy = 0 if e == _FP32 else vt * h * _FP32
    wgrad = rows * vt * e + vt * h * e + fp32_copy
    return max(logits, dx, wgrad)


def _head_norm_trains(setup: MemorySetup) -> bool:
    return not setup.lora or setup.peft.train_final_norm


def final_loss_bytes(setup: MemorySetup) -> float:
    """The last stage's own head per micro batch: the final norm, the output layer's input
    (when it trains), and megatron's fp32 softmax with its target mask (bool) and masked
    targets (int64)."""
    h, e, tokens = setup.model.hidden_size, setup.dtype_bytes, setup.tokens
    kept = tokens * norm_bytes(setup, _head_norm_trains(setup), input_shared=False)
    if not setup.lora:
        kept += tokens * h / setup.sp * e
    kept += tokens * (setup.vocab_size / setup.tp * _FP32 + 1 + 8)
    return kept


def in_flight(setup: MemorySetup, index: int) -> float:
    """Micro batches of activations stage `index` holds at its peak (module docstring)."""
    pp, mbs = setup.parallel.pipeline_model_parallel_size, setup.num_microbatches
    vp = setup.parallel.virtual_pipeline_model_parallel_size
    if vp is None:
        return min(pp - index, mbs)
    chunks = min(2 * (pp - index - 1) + (vp - 1) * pp + 1, mbs * vp)
    return chunks / vp


@dataclass(frozen=True)
class Activations:
    """A stage's activations: kept per micro batch in flight, and rebuilt once (full
    recompute's block in backward, with the exits in it)."""

    layers_per_microbatch: float  # layers (or checkpoint inputs), embedding ids, final loss
    exits_per_microbatch: float  # trained early exits outside recomputed layers
    recompute_transient: float


def stage_activations(setup: MemorySetup, index: int) -> Activations:
    """Activations of pipeline rank `index` of the configured split, all its chunks (module
    docstring)."""
    per_mb = exits = transient = 0.0
    for chunk in _chunks(setup, index):
        part = _chunk_activations(setup, chunk)
        per_mb += part.layers_per_microbatch
        exits += part.exits_per_microbatch
        transient = max(transient, part.recompute_transient)
    return Activations(per_mb, exits, transient)


def _chunk_activations(setup: MemorySetup, chunk: _Chunk) -> Activations:
    m, plan = setup.model, setup.plan

    # With LoRA every layer keeps what its input gradient needs, the layers below the first
    # adapter too: soft.peft.lora makes the frozen embedding's output require a gradient.
    def layer_bytes(k: int) -> float:
        return layer_activation_bytes(setup, adapted=setup.peft.adapts(k) or not setup.lora)

    def exit_bytes(k: int) -> float:
        trained = plan.trains_early_exits and k in plan.early
        return exit_kept_bytes(setup, k == chunk.last) if trained else 0.0

    recomputed = _recomputed_layers(setup, list(chunk.layers))
    kept = [k for k in chunk.layers if k not in recomputed]
    per_mb = sum(layer_bytes(k) for k in kept)
    per_mb += _num_checkpoints(setup, recomputed) * _checkpoint_input_bytes(setup)
    if chunk.post:
        per_mb += final_loss_bytes(setup)
    if chunk.pre and not setup.lora:
        per_mb += setup.tokens * 8  # the embedding keeps the token ids (int64)
    # One recomputed block is rebuilt at a time (in backward).
    rebuilt = sorted(recomputed)[: m.recompute_num_layers]
    return Activations(
        per_mb,
        sum(exit_bytes(k) for k in kept),
        sum(layer_bytes(k) + exit_bytes(k) for k in rebuilt),
    )


def _recomputed_layers(setup: MemorySetup, layers: list[int]) -> set[int]:
    m = setup.model
    if m.recompute_granularity != "full":
        return set()
    if m.recompute_method == "block":
        return set(layers[: m.recompute_num_layers])
    return set(layers)


def _num_checkpoints(setup: MemorySetup, recomputed: set[int]) -> int:
    if not recomputed:
        return 0
    if setup.model.recompute_method == "block":
        return len(recomputed)  # megatron checkpoints each of the first n layers
    return math.ceil(len(recomputed) / setup.model.recompute_num_layers)


# --- the plan --------------------------------------------------------------------------------


def stage_memory(setup: MemorySetup) -> list[StageMemory]:
    """Per-stage memory of one rank for the configured layout."""
    stages = []
    for index in range(setup.parallel.pipeline_model_parallel_size):
        chunks = _chunks(setup, index)
        exits = tuple(k for c in chunks for k in c.layers if k in setup.plan.layers)
        params = _stage_params(setup, chunks)
        grads, optimizer = _state_bytes(setup, params.trainable_base)
        r_grads, r_optimizer = _state_bytes(setup, params.trainable_replica)
        act, flight = stage_activations(setup, index), in_flight(setup, index)
        trained_early = setup.plan.trains_early_exits and any(k in setup.plan.early for k in exits)
        transient = exit_transient_bytes(setup) if trained_early else 0.0
        replica = (params.replica * setup.dtype_bytes, r_grads, r_optimizer)
        stages.append(
            StageMemory(
                index=index,
                layers=tuple((c.first, c.last) for c in chunks),
                exits=exits,
                params=params.base + params.replica,
                trainable=params.trainable_base + params.trainable_replica,
                weights=params.base * setup.dtype_bytes,
                grads=grads,
                optimizer=optimizer,
                activations=act.layers_per_microbatch * flight + act.recompute_transient,
                exit_bytes=sum(replica) + act.exits_per_microbatch * flight + transient,
                in_flight=flight,
                replica_state=replica,
            )
        )
    return stages


def format_memory_table(stages: list[StageMemory], budget_gib: float | None = None) -> str:
    """Markdown table in GiB per rank; `budget_gib`: a fits column against that budget."""
    head = "| stage | layers | exits | in flight | params (M) | trainable (M) | weights | grads "
    head += "| optimizer | activations | exits mem | total GiB |"
    sep = "| --- " * 12 + "|"
    if budget_gib is not None:
        head += f" fits {budget_gib:g} GiB |"
        sep += " --- |"
    rows = [head, sep]
    for s in stages:
        cells = [
            str(s.index),
            ",".join(f"{a}-{b}" for a, b in s.layers),
            ",".join(str(k) for k in s.exits) or "-",
            f"{s.in_flight:g}",
            f"{s.params / 1e6:,.1f}",
            f"{s.trainable / 1e6:,.1f}",
            *(
                f"{v / GIB:.2f}"
                for v in (s.weights, s.grads, s.optimizer, s.activations, s.exit_bytes, s.total)
            ),
        ]
        if budget_gib is not None:
            cells.append("yes" if s.total / GIB <= budget_gib else "**no**")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)
