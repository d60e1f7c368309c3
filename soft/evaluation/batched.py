"""Batched, padding-aware evaluation of every exit: the loss pass and greedy generation.

- Loss: examples right-padded into one forward with an attention mask (a real token never
  attends to padding: under the causal mask the pads come after it, and positions stay
  0..n-1); every exit's head is applied only at the target positions of each example.
- Generation: sub-model k ("first k layers + norm + head", the same modules, nothing copied) as
  a `LlamaForCausalLM` view, run by transformers' `generate` with left padding (it derives the
  position ids from the attention mask and keeps one KV cache per layer of the view); each row
  stops at its own stop token.

Both equal the one-example code paths (`losses.exit_nll`, `decoding.greedy_generate`, written
independently): losses to float rounding (different matmul shapes), tokens exactly
(tests/evaluation/test_eval_batched.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from soft.evaluation.decoding import sync
from soft.evaluation.losses import Targets, target_positions

if TYPE_CHECKING:
    from soft.evaluation.causal_lm import CausalLM

ExitHead = tuple[nn.Module, nn.Module]


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first: a memory problem shows
    at once), so little compute goes to padding."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _padded(
    seqs: Sequence[Sequence[int]], pad_id: int, left: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        span = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, span] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, span] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def exit_nll_batch(
    model: CausalLM,
    loss_ids: Sequence[Sequence[int]],
    targets: Sequence[Targets],
    exits: Sequence[int],
    exit_heads: Mapping[int, ExitHead] | None = None,
    pad_id: int = 0,
) -> list[dict[int, tuple[float, int]]]:
    """`exit_nll` for a batch: per example, {exit: (summed NLL of its `targets` ids (the last
    N, or spans), count)}. Exit L uses the model's final (already normed) hidden state and its
    own head."""
    heads = exit_heads or {}
    num_layers = int(model.config.num_hidden_layers)
    device = model.lm_head.weight.device
    ids, mask = _padded(loss_ids, pad_id, left=False, device=device)
    out = model(
        input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False,
        logits_to_keep=1,  # the full-vocabulary projection happens below, at targets only
    )  # fmt: skip
    rows: list[int] = []
    cols: list[int] = []
    owner: list[int] = []
    counts: list[int] = []
    for i, (seq, target) in enumerate(zip(loss_ids, targets, strict=True)):
        positions = target_positions(len(seq), target)
        rows.extend([i] * len(positions))
        cols.extend(p - 1 for p in positions)  # the positions predicting the targets
        owner.extend([i] * len(positions))
        counts.append(len(positions))
    rows_t = torch.as_tensor(rows, device=device)
    cols_t = torch.as_tensor(cols, device=device)
    labels = ids[rows_t, cols_t + 1]
    owner_t = torch.as_tensor(owner, device=device)
    result: list[dict[int, tuple[float, int]]] = [{} for _ in loss_ids]
    for k in exits:
        hidden = out.hidden_states[k][rows_t, cols_t]
        if k == num_layers:
            logits = model.lm_head(hidden)
        else:
            norm, lm_head = heads.get(k, (model.model.norm, model.lm_head))
            logits = lm_head(norm(hidden))
        token_nll = F.cross_entropy(logits.float(), labels, reduction="none")
        sums = torch.zeros(len(loss_ids), dtype=torch.float64, device=device)
        sums.index_add_(0, owner_t, token_nll.double())
        for i, count in enumerate(counts):
            result[i][k] = (float(sums[i]), count)
    return result


class SubModels:
    """`LlamaForCausalLM` views of sub-model k: the first k decoder layers, the shared (or
    exit k's ICT) norm and head, the same embedding and rotary modules. Built once per k on
    the meta device and then given the real modules, so no weight is allocated or copied."""

    def __init__(self, model: CausalLM, exit_heads: Mapping[int, ExitHead] | None = None):
        self.model = model
        self.exit_heads = dict(exit_heads or {})
        self._views: dict[int, CausalLM] = {}

    def __call__(self, k: int) -> CausalLM:
        num_layers = int(self.model.config.num_hidden_layers)
        if not 1 <= k <= num_layers:
            raise ValueError(f"exit layer {k} outside 1..{num_layers}")
        if k == num_layers:
            return self.model
        if k not in self._views:
            self._views[k] = self._view(k)
        return self._views[k]

    def _view(self, k: int) -> CausalLM:
        base = self.model
        config = base.config.__class__.from_dict(base.config.to_dict())
        config.num_hidden_layers = k
        with torch.device("meta"):
            # The model's own class (Llama, Mistral, Qwen2, Qwen3), chosen at run time: its config
            # is base.config's class, which mypy cannot pair with the union's members.
            model_class: Any = type(base)
            view: CausalLM = model_class(config)
        norm, lm_head = self.exit_heads.get(k, (base.model.norm, base.lm_head))
        view.model.embed_tokens = base.model.embed_tokens
        view.model.layers = nn.ModuleList(base.model.layers[:k])
        view.model.norm = norm
        view.model.rotary_emb = base.model.rotary_emb
        view.lm_head = lm_head
        view.generation_config = base.generation_config
        view.eval()
        leftover = [n for n, t in [*view.named_parameters(), *view.named_buffers()] if t.is_meta]
        if leftover:  # a module this view does not know about (a newer transformers)
            raise RuntimeError(f"sub-model view of exit {k} has unset tensors: {leftover}")
        return view


@torch.inference_mode()
def generate_batch(
    model: CausalLM,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop_ids: Iterable[int],
    pad_id: int,
) -> tuple[list[list[int]], float]:
    """Greedy continuations of left-padded prompts, each cut after its first stop token (kept,
    as `greedy_generate` does), and the wall time of the whole batch."""
    stops = sorted(set(stop_ids))
    device = model.lm_head.weight.device
    ids, mask = _padded(prompts, pad_id, left=True, device=device)
    sync(device)
    start = time.perf_counter()
    # transformers types generate's self as its GenerativePreTrainedModel protocol (written for
    # the `ty` checker), which lists encoder attributes no decoder-only model has.
    out = model.generate(  # type: ignore[misc]
        input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, min_new_tokens=0,
        do_sample=False, num_beams=1, eos_token_id=stops or None, pad_token_id=pad_id,
        temperature=None, top_p=None, top_k=None,
    )  # fmt: skip
    sync(device)
    elapsed = time.perf_counter() - start
    stop_set = set(stops)
    results = []
    for row in out[:, ids.shape[1] :].tolist():
        tokens: list[int] = []
        for token in row:
            tokens.append(token)
            if token in stop_set:
                break
        results.append(tokens)
    return results, elapsed
