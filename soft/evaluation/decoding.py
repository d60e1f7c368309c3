"""Driving a HF LLaMA's decoder layers directly, so that any prefix of layers is a model.

A SoFT sub-model with exit k is "embed -> layers[:k] -> model.norm -> lm_head" of the same
module: nothing is copied, and each generation keeps its own `DynamicCache` (layers that a
sub-model never runs simply stay empty in it). An ICT export gives some early exits their own
norm + head (`ExportedModel.exit_heads`); `LayerRunner.logits` picks the exit's head, so every
decoding mode uses the head that exit was trained with.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import DynamicCache, DynamicLayer

if TYPE_CHECKING:
    from soft.evaluation.causal_lm import CausalLM


@dataclass
class GenerationResult:
    """New token ids (a stop token, when hit, is included like HF `generate` does) and statistics."""

    token_ids: list[int]
    elapsed_s: float
    stats: dict[str, object] = field(default_factory=dict)  # numbers, lists, exit counts

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.elapsed_s if self.elapsed_s > 0 else float("inf")

    @property
    def ms_per_token(self) -> float:
        return 1000.0 * self.elapsed_s / max(len(self.token_ids), 1)


class LayerRunner:
    """Runs embeddings, any range of decoder layers, and the exit heads of one model.

    Every call processes a contiguous chunk of positions `first_pos .. first_pos + q - 1` at
    one layer whose cache must hold exactly positions `0 .. first_pos - 1`; the causal mask is
    built here (per layer) because in dynamic early exit the layers' caches have different
    lengths, which HF's `create_causal_mask` (it reads layer 0's length) cannot express.
    """

    def __init__(
        self,
        model: CausalLM,
        exit_heads: Mapping[int, tuple[nn.Module, nn.Module]] | None = None,
    ):
        self.model = model
        self.base = model.model
        self.num_layers = int(model.config.num_hidden_layers)
        self.device = model.lm_head.weight.device
        self.exit_heads = dict(exit_heads or {})  # exit k -> (norm, lm_head) of its ICT head

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.model.config)

    def embed(self, token_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=self.device).reshape(1, -1)
        return self.base.embed_tokens(ids)

    @staticmethod
    def cache_length(cache: DynamicCache, layer: int) -> int:
        return _kv_layer(cache, layer).get_seq_length()

    def _mask(self, q: int, first_pos: int, hidden: torch.Tensor) -> torch.Tensor | None:
        # One query sees the whole cache: no mask needed (this is also what HF does for sdpa).
        if q == 1:
            return None
        key_pos = torch.arange(first_pos + q, device=hidden.device)
        query_pos = torch.arange(first_pos, first_pos + q, device=hidden.device)
        allowed = key_pos[None, :] <= query_pos[:, None]
        mask = torch.zeros(q, first_pos + q, dtype=hidden.dtype, device=hidden.device)
        mask.masked_fill_(~allowed, torch.finfo(hidden.dtype).min)
        return mask[None, None]

    def run_layers(
        self, hidden: torch.Tensor, start: int, end: int, cache: DynamicCache, first_pos: int
    ) -> torch.Tensor:
        """Hidden states (1, q, H) entering layer `start` -> states leaving layer `end - 1`."""
        if start >= end:
            return hidden
        q = hidden.shape[1]
        position_ids = torch.arange(first_pos, first_pos + q, device=hidden.device)[None]
        position_embeddings = self.base.rotary_emb(hidden, position_ids=position_ids)
        mask = self._mask(q, first_pos, hidden)
        for layer in range(start, end):
            have = self.cache_length(cache, layer)
            if have != first_pos:  # a wrong cache silently gives wrong tokens: fail loudly instead
                raise RuntimeError(
                    f"layer {layer} cache holds {have} positions, expected {first_pos}"
                )
            hidden = self.base.layers[layer](
                hidden,
                attention_mask=mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
                position_embeddings=position_embeddings,
            )
        return hidden

    def logits(self, hidden: torch.Tensor, exit_layer: int) -> torch.Tensor:
        """Exit `exit_layer`'s logits: its own ICT head when it has one, else the shared head
        (the model's own final RMSNorm, then lm_head)."""
        norm, lm_head = self.exit_heads.get(exit_layer, (self.base.norm, self.model.lm_head))
        return lm_head(norm(hidden))

    def crop(self, cache: DynamicCache, length: int, layers: Iterable[int] | None = None) -> None:
        """Keep only positions `0 .. length - 1` in the given layers' caches (rollback)."""
        for layer in range(self.num_layers) if layers is None else layers:
            extra = self.cache_length(cache, layer) - length
            if extra > 0:
                _kv_layer(cache, layer).crop(-extra)


def _kv_layer(cache: DynamicCache, layer: int) -> DynamicLayer:
    """A layer's key/value cache: full attention in every family we load (no linear-attention
    or placeholder layers, whose lengths mean something else)."""
    got = cache.layers[layer]
    if not isinstance(got, DynamicLayer):
        raise TypeError(f"layer {layer} has a {type(got).__name__} cache, not a DynamicLayer")
    return got


def check_prompt(prompt_ids: Sequence[int]) -> list[int]:
    ids = [int(i) for i in prompt_ids]
    if not ids:
        raise ValueError("prompt_ids is empty: a LLaMA-2 prompt starts with BOS at least")
    return ids


def sync(device: torch.device) -> None:
    """Wait for queued GPU work so wall-clock timings mean something."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def greedy_generate(
    runner: LayerRunner,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    exit_layer: int | None = None,
    stop_ids: Iterable[int] = (),
) -> GenerationResult:
    """Greedy decoding with sub-model `exit_layer` (None = the full model), with its own KV cache.

    Stops after a token in `stop_ids` (it is kept in the output) or after `max_new_tokens`.
    """
    prompt = check_prompt(prompt_ids)
    k = runner.num_layers if exit_layer is None else int(exit_layer)
    if not 1 <= k <= runner.num_layers:
        raise ValueError(f"exit layer {k} outside 1..{runner.num_layers}")
    stops = set(stop_ids)
    sync(runner.device)
    start = time.perf_counter()
    cache = runner.new_cache()
    new: list[int] = []
    pending, pos = prompt, 0
    while len(new) < max_new_tokens:
        hidden = runner.run_layers(runner.embed(pending), 0, k, cache, pos)
        token = int(runner.logits(hidden[:, -1:], k).argmax(-1).item())
        new.append(token)
        pos += len(pending)
        pending = [token]
        if token in stops:
            break
    sync(runner.device)
    elapsed = time.perf_counter() - start
    return GenerationResult(new, elapsed, {"exit_layer": k, "average_exit_depth": float(k)})
