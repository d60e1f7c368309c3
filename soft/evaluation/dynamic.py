"""Confidence-based (instance-aware) early exit, one decision per generated token.

Exit rule: a token leaves at exit `e_i` (not the last) when the max softmax probability of
that exit's logits is STRICTLY greater than `thresholds[i]`; the last exit (the full model)
always emits. Since a probability never exceeds 1.0, thresholds of 1.0 mean "never exit
early" (output = full model), and thresholds of 0.0 mean "always take the first exit"
(output = that sub-model's greedy output).

Confidence is that of the exit's own logits (its ICT head when it has one, see
`LayerRunner.logits`).

KV cache of skipped layers: lazy RECOMPUTE (exact, no state copying). A token that exits at
depth k leaves layers k.. without its K/V. We keep each position's latest hidden state; when
a later token goes deeper than k, every pending position is pushed through each deeper layer
together with that token, as one causal chunk, before the token attends to them. Layer j's
cache then holds exactly the K/V the full model would have computed, because pending
positions are processed in order and each sees the complete cache of every earlier position
at that layer. Invariant: cache lengths never increase with depth, and positions between
layer j's and layer j-1's cache length are exactly at depth j.

The cost of skipped layers is deferred, not avoided, whenever a deeper token follows; it is
batched (cheap on a GPU), and `recomputed_positions` in the statistics counts it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import torch

from soft.evaluation.decoding import GenerationResult, LayerRunner, check_prompt, sync


def check_thresholds(
    exits: Sequence[int], thresholds: Sequence[float], num_layers: int
) -> tuple[list[int], list[float]]:
    """Exits sorted with the full depth last; one threshold per early exit (a single value is broadcast)."""
    exits = sorted(set(int(e) for e in exits))
    if not exits or exits[0] < 1 or exits[-1] > num_layers:
        raise ValueError(f"exits {exits} must lie in 1..{num_layers}")
    if exits[-1] != num_layers:
        exits.append(num_layers)
    early = len(exits) - 1
    thresholds = [float(t) for t in thresholds]
    if len(thresholds) == 1 and early > 1:
        thresholds = thresholds * early
    if len(thresholds) != early:
        raise ValueError(
            f"expected {early} thresholds (one per early exit {exits[:-1]}) or a single one, "
            f"got {len(thresholds)}"
        )
    return exits, thresholds


@torch.inference_mode()
def dynamic_generate(
    runner: LayerRunner,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    exits: Sequence[int],
    thresholds: Sequence[float],
    stop_ids: Iterable[int] = (),
) -> GenerationResult:
    """Greedy decoding where each token leaves at the first sufficiently confident exit.

    The prompt except its last token is prefilled through all layers; the last prompt token
    gets the same per-token exit decision as generated tokens (it produces the first one).
    """
    prompt = check_prompt(prompt_ids)
    exits, thresholds = check_thresholds(exits, thresholds, runner.num_layers)
    stops = set(stop_ids)
    sync(runner.device)
    start = time.perf_counter()
    cache = runner.new_cache()
    if len(prompt) > 1:
        runner.run_layers(runner.embed(prompt[:-1]), 0, runner.num_layers, cache, 0)
    # Latest hidden state of every position, at whatever depth it has reached.
    states = runner.embed(prompt[-1:]).new_zeros(
        1, len(prompt) + max_new_tokens, runner.model.config.hidden_size
    )
    new: list[int] = []
    depths: list[int] = []
    recomputed = 0
    token, pos = prompt[-1], len(prompt) - 1
    while len(new) < max_new_tokens:
        states[:, pos : pos + 1] = runner.embed([token])
        depth = 0
        for exit_index, exit_layer in enumerate(exits):
            for layer in range(depth, exit_layer):
                first = runner.cache_length(cache, layer)  # pending positions first .. pos - 1
                recomputed += pos - first
                states[:, first : pos + 1] = runner.run_layers(
                    states[:, first : pos + 1], layer, layer + 1, cache, first
                )
            depth = exit_layer
            logits = runner.logits(states[:, pos : pos + 1], exit_layer).float()
            if (
                exit_index == len(exits) - 1
                or logits.softmax(-1).max().item() > thresholds[exit_index]
            ):
                token = int(logits.argmax(-1).item())
                break
        new.append(token)
        depths.append(depth)
        pos += 1
        if token in stops:
            break
    sync(runner.device)
    elapsed = time.perf_counter() - start
    stats = {
        "average_exit_depth": sum(depths) / max(len(depths), 1),
        "exit_counts": {e: depths.count(e) for e in exits},
        "recomputed_positions": recomputed,
        "exits": exits,
        "thresholds": thresholds,
    }
    return GenerationResult(new, elapsed, stats)
