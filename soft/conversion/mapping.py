"""HF <-> megatron-core parameter mapping: one declarative table, used in both directions.

Each row names a megatron parameter and the HF tensor(s) it corresponds to; `*` stands for the
0-based layer index. Plain rows copy the tensor; two named special cases fuse/split:

- `QKVRow`: megatron's `linear_qkv` stacks, for each query group g, the query rows of the heads
  in g, then g's key rows, then g's value rows (head_dim rows each). Grouped-query aware:
  with 8 query groups (70B) each group holds num_heads/8 query heads. HF's q/k weights are
  already in rotate-half order, which megatron's RoPE (rotary_interleaved=False) uses too, so
  no permutation is needed (checked by the logits-parity tests). The q/k/v biases (Qwen2) are
  fused the same way, per query group.
- `GatedMLPRow`: megatron's `linear_fc1` is cat[gate, up] on dim 0.

Vocabulary rows (`vocab=True`) are padded with zero rows to megatron's padded vocabulary on
import and cut back on export (see soft.conversion.vocab).

The model families are feature switches, not forks (Megatron-Bridge's per-family bridges share
one row vocabulary the same way): a row with a `feature` exists only when that ModelConfig
switch is on (q/k/v biases, q/k norms); the LM head row only when the head is not tied to the
embedding (`unless`). `FAMILIES` says what each HF architecture fixes and which config.json
values it needs for our model to express it: the import refuses other values, the export
writes these.

`CONFIG_PAIRS` maps ModelConfig fields to HF config.json keys, also in both directions.

ICT heads (`soft.mode=ict`, the paper's SFT+ICT baseline): each early exit k has its own
norm + output layer, stored in the checkpoint under plain keys `exit_heads.<k>.final_layernorm
.weight` [hidden] and `exit_heads.<k>.output_layer.weight` [padded_vocab, hidden]. On export
they go to a separate `exit_heads.safetensors` (so the HF weight files stay exactly the
architecture's own) as `exit_heads.<k>.norm.weight` / `exit_heads.<k>.lm_head.weight`, and
config.json lists the exits under `soft_exit_heads`; see `exit_head_rows`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from soft.config.errors import ConfigError
from soft.conversion.export_format import exit_head_names
from soft.models.config import FamilyName, ModelConfig

LAYER = "*"


@dataclass(frozen=True)
class Shapes:
    """The sizes a row needs to fuse/split and to check shapes."""

    hidden: int
    ffn: int
    heads: int
    groups: int
    head_dim: int  # megatron's kv_channels (HF's head_dim; Qwen3 0.6B-4B: != hidden / heads)
    vocab: int  # the true (unpadded) vocabulary: HF's row count
    padded_vocab: int  # megatron's row count

    @property
    def heads_per_group(self) -> int:
        return self.heads // self.groups


def _at(pattern: str, layer: int | None) -> str:
    return pattern.replace(LAYER, str(layer)) if layer is not None else pattern


@dataclass(frozen=True)
class Row:
    """A one-to-one parameter (optionally a vocabulary-sized one). `feature`: the ModelConfig
    switch the row exists under; `unless`: the switch under which it does not."""

    megatron: str
    hf: str
    vocab: bool = False
    feature: str | None = field(default=None, kw_only=True)
    unless: str | None = field(default=None, kw_only=True)

    @property
    def is_norm(self) -> bool:
        return "layernorm" in self.megatron

    def exists_in(self, model: ModelConfig) -> bool:
        return (self.feature is None or bool(getattr(model, self.feature))) and (
            self.unless is None or not getattr(model, self.unless)
        )

    def stored_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """megatron's local-spec RMSNorm keeps its weight in fp32 whatever params_dtype is, and
        so does its checkpoint; we store the same (lossless), so the layout is exactly its own."""
        return torch.float32 if self.is_norm else dtype

    def hf_names(self, layer: int | None = None) -> list[str]:
        return [_at(self.hf, layer)]

    def megatron_shape(self, s: Shapes) -> tuple[int, ...]:
        return tuple(self._hf_shapes(s)[0]) if not self.vocab else (s.padded_vocab, s.hidden)

    def hf_shapes(self, s: Shapes) -> list[tuple[int, ...]]:
        return self._hf_shapes(s)

    def _hf_shapes(self, s: Shapes) -> list[tuple[int, ...]]:
        return [_PLAIN_SHAPES[self.hf.rsplit(".", 2)[-2]](s)]

    def to_megatron(self, tensors: list[torch.Tensor], s: Shapes) -> torch.Tensor:
        (t,) = tensors
        if self.vocab and s.padded_vocab > s.vocab:
            # Zero rows: padded tokens are never looked up and score a logit of exactly 0.
            t = torch.cat([t, t.new_zeros(s.padded_vocab - s.vocab, t.shape[1])])
        return t

    def to_hf(self, tensor: torch.Tensor, s: Shapes) -> list[torch.Tensor]:
        return [tensor[: s.vocab] if self.vocab else tensor]


@dataclass(frozen=True)
class QKVRow(Row):
    """Fused, grouped-query attention input projection, weight or bias (module docstring)."""

    k: str = ""
    v: str = ""

    def hf_names(self, layer: int | None = None) -> list[str]:
        return [_at(self.hf, layer), _at(self.k, layer), _at(self.v, layer)]

    def _trailing(self, s: Shapes) -> tuple[int, ...]:
        """The dims after the output rows: (hidden,) for the weight, () for the bias."""
        return () if self.megatron.endswith(".bias") else (s.hidden,)

    def _hf_shapes(self, s: Shapes) -> list[tuple[int, ...]]:
        q, kv, rest = s.heads * s.head_dim, s.groups * s.head_dim, self._trailing(s)
        return [(q, *rest), (kv, *rest), (kv, *rest)]

    def megatron_shape(self, s: Shapes) -> tuple[int, ...]:
        return ((s.heads + 2 * s.groups) * s.head_dim, *self._trailing(s))

    def to_megatron(self, tensors: list[torch.Tensor], s: Shapes) -> torch.Tensor:
        q, k, v = tensors
        d, g, rest = s.head_dim, s.groups, self._trailing(s)
        per_group = [
            q.reshape(g, s.heads_per_group * d, *rest),
            k.reshape(g, d, *rest),
            v.reshape(g, d, *rest),
        ]
        return torch.cat(per_group, dim=1).reshape(-1, *rest)

    def to_hf(self, tensor: torch.Tensor, s: Shapes) -> list[torch.Tensor]:
        # The trailing dims are the tensor's own: the weight's (hidden,), the bias's (), or a
        # LoRA B's (r,), whose rows follow the weight's (soft.conversion.peft_export).
        d, g, rest = s.head_dim, s.groups, tuple(tensor.shape[1:])
        per_group = tensor.reshape(g, (s.heads_per_group + 2) * d, *rest)
        q, k, v = torch.split(per_group, [s.heads_per_group * d, d, d], dim=1)
        return [t.reshape(-1, *rest).contiguous() for t in (q, k, v)]


@dataclass(frozen=True)
class GatedMLPRow(Row):
    """SwiGLU input projection: megatron's fc1 = cat[gate, up] on dim 0."""

    up: str = ""

    def hf_names(self, layer: int | None = None) -> list[str]:
        return [_at(self.hf, layer), _at(self.up, layer)]

    def _hf_shapes(self, s: Shapes) -> list[tuple[int, ...]]:
        return [(s.ffn, s.hidden), (s.ffn, s.hidden)]

    def megatron_shape(self, s: Shapes) -> tuple[int, ...]:
        return (2 * s.ffn, s.hidden)

    def to_megatron(self, tensors: list[torch.Tensor], s: Shapes) -> torch.Tensor:
        return torch.cat(tensors, dim=0)

    def to_hf(self, tensor: torch.Tensor, s: Shapes) -> list[torch.Tensor]:
        gate, up = torch.split(tensor, [s.ffn, s.ffn], dim=0)
        return [gate.contiguous(), up.contiguous()]


# Shapes of the one-to-one HF tensors, by the module name before ".weight".
_PLAIN_SHAPES = {
    "embed_tokens": lambda s: (s.vocab, s.hidden),
    "lm_head": lambda s: (s.vocab, s.hidden),
    "input_layernorm": lambda s: (s.hidden,),
    "post_attention_layernorm": lambda s: (s.hidden,),
    "norm": lambda s: (s.hidden,),
    "q_norm": lambda s: (s.head_dim,),  # one RMSNorm shared by every head
    "k_norm": lambda s: (s.head_dim,),
    "o_proj": lambda s: (s.hidden, s.heads * s.head_dim),
    "down_proj": lambda s: (s.hidden, s.ffn),
}

# The table. Order = HF's usual order, so exported shards read naturally.
EMBEDDING = Row("embedding.word_embeddings.weight", "model.embed_tokens.weight", vocab=True)
LAYER_ROWS: tuple[Row, ...] = (
    Row("decoder.layers.*.input_layernorm.weight", "model.layers.*.input_layernorm.weight"),
    QKVRow(
        "decoder.layers.*.self_attention.linear_qkv.weight",
        "model.layers.*.self_attn.q_proj.weight",
        k="model.layers.*.self_attn.k_proj.weight",
        v="model.layers.*.self_attn.v_proj.weight",
    ),
    QKVRow(
        "decoder.layers.*.self_attention.linear_qkv.bias",
        "model.layers.*.self_attn.q_proj.bias",
        k="model.layers.*.self_attn.k_proj.bias",
        v="model.layers.*.self_attn.v_proj.bias",
        feature="qkv_bias",
    ),
    Row(
        "decoder.layers.*.self_attention.q_layernorm.weight",
        "model.layers.*.self_attn.q_norm.weight",
        feature="qk_layernorm",
    ),
    Row(
        "decoder.layers.*.self_attention.k_layernorm.weight",
        "model.layers.*.self_attn.k_norm.weight",
        feature="qk_layernorm",
    ),
    Row(
        "decoder.layers.*.self_attention.linear_proj.weight",
        "model.layers.*.self_attn.o_proj.weight",
    ),
    Row(
        "decoder.layers.*.pre_mlp_layernorm.weight",
        "model.layers.*.post_attention_layernorm.weight",
    ),
    GatedMLPRow(
        "decoder.layers.*.mlp.linear_fc1.weight",
        "model.layers.*.mlp.gate_proj.weight",
        up="model.layers.*.mlp.up_proj.weight",
    ),
    Row("decoder.layers.*.mlp.linear_fc2.weight", "model.layers.*.mlp.down_proj.weight"),
)
FINAL_NORM = Row("decoder.final_layernorm.weight", "model.norm.weight")
# Tied: the LM head is the embedding; HF writes no lm_head.weight and megatron stores none.
OUTPUT_LAYER = Row(
    "output_layer.weight", "lm_head.weight", vocab=True, unless="tie_word_embeddings"
)
TABLE: tuple[Row, ...] = (EMBEDDING, *LAYER_ROWS, FINAL_NORM, OUTPUT_LAYER)


def layer_rows(model: ModelConfig) -> tuple[Row, ...]:
    """The per-layer rows this model has (its feature switches decide)."""
    return tuple(row for row in LAYER_ROWS if row.exists_in(model))


def head_rows(model: ModelConfig) -> tuple[Row, ...]:
    """The final norm and, unless tied, the LM head."""
    return tuple(row for row in (FINAL_NORM, OUTPUT_LAYER) if row.exists_in(model))


def exit_head_rows(k: int, as_final: bool = False) -> tuple[Row, Row]:
    """(norm row, output-layer row) of exit k's ICT head.

    `as_final`: named as the HF model's own `model.norm` / `lm_head`, for the standalone
    k-layer sub-model, whose head after ICT is exactly this one.
    """
    norm_hf, head_hf = (FINAL_NORM.hf, OUTPUT_LAYER.hf) if as_final else exit_head_names(k)
    return (
        Row(f"exit_heads.{k}.final_layernorm.weight", norm_hf),
        Row(f"exit_heads.{k}.output_layer.weight", head_hf, vocab=True),
    )


# ModelConfig field <-> HF config.json key (rotary_base, rope scaling and params_dtype are
# special-cased in hf_io because HF moved rope_theta into rope_parameters and spells dtypes
# differently; the q/k/v bias and q/k norm switches come with the family, FAMILIES).
CONFIG_PAIRS: tuple[tuple[str, str], ...] = (
    ("num_layers", "num_hidden_layers"),
    ("hidden_size", "hidden_size"),
    ("ffn_hidden_size", "intermediate_size"),
    ("num_attention_heads", "num_attention_heads"),
    ("num_query_groups", "num_key_value_heads"),
    ("vocab_size", "vocab_size"),
    ("norm_epsilon", "rms_norm_eps"),
    ("max_position_embeddings", "max_position_embeddings"),
    ("head_dim", "head_dim"),
    ("tie_word_embeddings", "tie_word_embeddings"),
)


@dataclass(frozen=True)
class Family:
    """An HF architecture that megatron-core's GPTModel expresses with our switches.

    `qkv_bias`, `qk_layernorm`: what its modeling code fixes (Qwen2 always has q/k/v biases,
    Qwen3 always q/k norms). `required`: config.json keys and the value each must have for the
    model to be one we build (HF's class default counts for an absent key); the import refuses
    any other value, saying why (`REFUSED_BECAUSE`), and the export writes them.
    """

    model_type: FamilyName
    architecture: str
    qkv_bias: bool = False
    qk_layernorm: bool = False
    required: dict[str, Any] = field(default_factory=dict)


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        # LLaMA-2, LLaMA-3/3.1/3.2 (GQA, llama3 RoPE scaling, tied in 3.2 1B/3B)
        Family("llama", "LlamaForCausalLM", required={"attention_bias": False, "mlp_bias": False}),
        # Mistral v0.3 style: full attention (v0.1's 4096-token sliding window is refused)
        Family("mistral", "MistralForCausalLM", required={"sliding_window": None}),
        # Qwen2 / Qwen2.5: biases on q, k, v (fixed in Qwen2Attention), tied when small
        Family("qwen2", "Qwen2ForCausalLM", qkv_bias=True, required={"use_sliding_window": False}),
        # Qwen3 (dense): RMSNorm on each q and k head, no biases
        Family(
            "qwen3",
            "Qwen3ForCausalLM",
            qk_layernorm=True,
            required={"attention_bias": False, "use_sliding_window": False},
        ),
    )
}

_SLIDING = (
    "sliding-window attention is out of scope (README, 'Which models'): training, evaluation, "
    "decoding and export here use full causal attention, and a model trained with a window "
    "computes another function without it"
)
REFUSED_BECAUSE: dict[str, str] = {
    "attention_bias": "it puts biases on q, k, v AND o_proj; megatron-core's add_qkv_bias covers "
    "q/k/v only and add_bias_linear would add biases to every linear layer (the MLP's too)",
    "mlp_bias": "MLP biases are not mapped (megatron-core's add_bias_linear would also add them "
    "to the attention projections)",
    "sliding_window": _SLIDING,
    "use_sliding_window": _SLIDING,
}


def iter_rows(model: ModelConfig) -> Iterator[tuple[Row, int | None]]:
    """(row, layer) in checkpoint order: embedding, layer 0 rows, layer 1 rows, ..., head."""
    yield EMBEDDING, None
    rows = layer_rows(model)
    for layer in range(model.num_layers):
        for row in rows:
            yield row, layer
    for row in head_rows(model):
        yield row, None


def check_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...], source: str) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise ConfigError(
            f"{source}: tensor '{name}' has shape {tuple(tensor.shape)}, expected {tuple(expected)} "
            "from the model config"
        )
