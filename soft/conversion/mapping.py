"""HF LLaMA <-> megatron-core parameter mapping: one declarative table, used in both directions.

Each row names a megatron parameter and the HF tensor(s) it corresponds to; `*` stands for the
0-based layer index. Plain rows copy the tensor; two named special cases fuse/split:

- `QKVRow`: megatron's `linear_qkv` stacks, for each query group g, the query rows of the heads
  in g, then g's key rows, then g's value rows (head_dim rows each). Grouped-query aware:
  with 8 query groups (70B) each group holds num_heads/8 query heads. HF's q/k weights are
  already in rotate-half order, which megatron's RoPE (rotary_interleaved=False) uses too, so
  no permutation is needed (checked by the logits-parity tests).
- `GatedMLPRow`: megatron's `linear_fc1` is cat[gate, up] on dim 0.

Vocabulary rows (`vocab=True`) are padded with zero rows to megatron's padded vocabulary on
import and cut back on export (see soft.conversion.vocab).

`CONFIG_PAIRS` maps ModelConfig fields to HF config.json keys, also in both directions.

ICT heads (`soft.mode=ict`, the paper's SFT+ICT baseline): each early exit k has its own
norm + output layer, stored in the checkpoint under plain keys `exit_heads.<k>.final_layernorm
.weight` [hidden] and `exit_heads.<k>.output_layer.weight` [padded_vocab, hidden]. On export
they go to a separate `exit_heads.safetensors` (so the HF weight files stay exactly
LlamaForCausalLM's) as `exit_heads.<k>.norm.weight` / `exit_heads.<k>.lm_head.weight`, and
config.json lists the exits under `soft_exit_heads`; see `exit_head_rows`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from soft.config.errors import ConfigError
from soft.conversion.export_format import exit_head_names

LAYER = "*"


@dataclass(frozen=True)
class Shapes:
    """The sizes a row needs to fuse/split and to check shapes."""

    hidden: int
    ffn: int
    heads: int
    groups: int
    vocab: int  # the true (unpadded) vocabulary: HF's row count
    padded_vocab: int  # megatron's row count

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def heads_per_group(self) -> int:
        return self.heads // self.groups


def _at(pattern: str, layer: int | None) -> str:
    return pattern.replace(LAYER, str(layer)) if layer is not None else pattern


@dataclass(frozen=True)
class Row:
    """A one-to-one parameter (optionally a vocabulary-sized one)."""

    megatron: str
    hf: str
    vocab: bool = False

    @property
    def is_norm(self) -> bool:
        return "layernorm" in self.megatron

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
    """Fused, grouped-query attention input projection (see the module docstring)."""

    k: str = ""
    v: str = ""

    def hf_names(self, layer: int | None = None) -> list[str]:
        return [_at(self.hf, layer), _at(self.k, layer), _at(self.v, layer)]

    def _hf_shapes(self, s: Shapes) -> list[tuple[int, ...]]:
        kv = s.groups * s.head_dim
        return [(s.hidden, s.hidden), (kv, s.hidden), (kv, s.hidden)]

    def megatron_shape(self, s: Shapes) -> tuple[int, ...]:
        return ((s.heads + 2 * s.groups) * s.head_dim, s.hidden)

    def to_megatron(self, tensors: list[torch.Tensor], s: Shapes) -> torch.Tensor:
        q, k, v = tensors
        d, g = s.head_dim, s.groups
        fused = torch.cat(
            [q.reshape(g, s.heads_per_group * d, -1), k.reshape(g, d, -1), v.reshape(g, d, -1)],
            dim=1,
        )
        return fused.reshape(-1, s.hidden)

    def to_hf(self, tensor: torch.Tensor, s: Shapes) -> list[torch.Tensor]:
        d, g = s.head_dim, s.groups
        per_group = tensor.reshape(g, (s.heads_per_group + 2) * d, s.hidden)
        q, k, v = torch.split(per_group, [s.heads_per_group * d, d, d], dim=1)
        return [t.reshape(-1, s.hidden).contiguous() for t in (q, k, v)]


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
    "o_proj": lambda s: (s.hidden, s.hidden),
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
OUTPUT_LAYER = Row("output_layer.weight", "lm_head.weight", vocab=True)
TABLE: tuple[Row, ...] = (EMBEDDING, *LAYER_ROWS, FINAL_NORM, OUTPUT_LAYER)


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


# ModelConfig field <-> HF LlamaConfig key (rotary_base and params_dtype are special-cased in
# hf_io because HF moved rope_theta into rope_parameters and spells dtypes differently).
CONFIG_PAIRS: tuple[tuple[str, str], ...] = (
    ("num_layers", "num_hidden_layers"),
    ("hidden_size", "hidden_size"),
    ("ffn_hidden_size", "intermediate_size"),
    ("num_attention_heads", "num_attention_heads"),
    ("num_query_groups", "num_key_value_heads"),
    ("vocab_size", "vocab_size"),
    ("norm_epsilon", "rms_norm_eps"),
    ("max_position_embeddings", "max_position_embeddings"),
)


def iter_rows(num_layers: int) -> Iterator[tuple[Row, int | None]]:
    """(row, layer) in checkpoint order: embedding, layer 0 rows, layer 1 rows, ..., head."""
    yield EMBEDDING, None
    for layer in range(num_layers):
        for row in LAYER_ROWS:
            yield row, layer
    yield FINAL_NORM, None
    yield OUTPUT_LAYER, None


def check_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...], source: str) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise ConfigError(
            f"{source}: tensor '{name}' has shape {tuple(tensor.shape)}, expected {tuple(expected)} "
            "from the model config"
        )
