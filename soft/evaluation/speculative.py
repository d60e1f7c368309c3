"""Self-speculative greedy decoding: a shallow SoFT exit drafts, the full model verifies.

One model, one KV cache. Drafting runs layers[:k] token by token and so fills the first k
layers' cache exactly as the full model would; verification reuses those k-layer hidden
states and runs only layers k.. over all drafted positions in one chunk. After accepting
the longest agreeing prefix plus the full model's own next token, every layer is cropped
back to the accepted positions. The output is by construction the full model's greedy output.
Drafts come from the draft exit's own head (its ICT head when it has one).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import torch
from transformers import DynamicCache

from soft.evaluation.decoding import GenerationResult, LayerRunner, check_prompt, sync


def _draft(
    runner: LayerRunner, cache: DynamicCache, token: int, pos: int, draft_exit: int, n: int
) -> tuple[list[int], list[torch.Tensor]]:
    """n greedy tokens from exit `draft_exit`, feeding `token` (at `pos`) first.

    Returns the drafts and the depth-k hidden states of the n fed positions
    (`token`, d_1 .. d_{n-1}); d_n itself is not fed yet.
    """
    drafts: list[int] = []
    hiddens: list[torch.Tensor] = []
    for i in range(n):
        hidden = runner.run_layers(runner.embed([token]), 0, draft_exit, cache, pos + i)
        hiddens.append(hidden)
        token = int(runner.logits(hidden, draft_exit).argmax(-1).item())
        drafts.append(token)
    return drafts, hiddens


@torch.inference_mode()
def speculative_generate(
    runner: LayerRunner,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    draft_exit: int,
    num_draft: int,
    stop_ids: Iterable[int] = (),
) -> GenerationResult:
    """Greedy output identical to the full model's, drafting `num_draft` tokens per round."""
    prompt = check_prompt(prompt_ids)
    num_layers = runner.num_layers
    if not 1 <= draft_exit <= num_layers:
        raise ValueError(f"draft exit {draft_exit} outside 1..{num_layers}")
    if num_draft < 1:
        raise ValueError(f"num_draft must be >= 1, got {num_draft}")
    stops = set(stop_ids)
    sync(runner.device)
    start = time.perf_counter()
    cache = runner.new_cache()
    new: list[int] = []
    drafted = accepted = rounds = 0
    if max_new_tokens > 0:
        hidden = runner.run_layers(runner.embed(prompt), 0, num_layers, cache, 0)
        new.append(int(runner.logits(hidden[:, -1:], num_layers).argmax(-1).item()))
    # Loop invariant: the cache holds every position before new[-1], which is not fed yet.
    while new and len(new) < max_new_tokens and new[-1] not in stops:
        pos = len(prompt) + len(new) - 1
        n = min(num_draft, max_new_tokens - len(new))  # drafts beyond the budget are wasted work
        drafts, hiddens = _draft(runner, cache, new[-1], pos, draft_exit, n)
        # Verify: d_n through the first k layers, then all n + 1 positions through the rest.
        hiddens.append(runner.run_layers(runner.embed(drafts[-1:]), 0, draft_exit, cache, pos + n))
        hidden = runner.run_layers(torch.cat(hiddens, dim=1), draft_exit, num_layers, cache, pos)
        targets = runner.logits(hidden, num_layers).argmax(-1)[0].tolist()  # full model's next
        m = 0
        while m < n and drafts[m] == targets[m]:
            m += 1
        new.extend(drafts[:m] + [targets[m]])
        runner.crop(cache, pos + m + 1)  # keep new[-1]'s predecessors only
        drafted, accepted, rounds = drafted + n, accepted + m, rounds + 1
    new = _truncate(new, max_new_tokens, stops)
    sync(runner.device)
    elapsed = time.perf_counter() - start
    stats: dict[str, object] = {
        "draft_exit": draft_exit,
        "num_draft": num_draft,
        "acceptance_rate": accepted / drafted if drafted else 0.0,
        "drafted_tokens": drafted,
        "accepted_tokens": accepted,
        "verify_rounds": rounds,
        "tokens_per_round": (len(new) - 1) / rounds if rounds else 0.0,
    }
    return GenerationResult(new, elapsed, stats)


def _truncate(tokens: list[int], max_new_tokens: int, stops: set[int]) -> list[int]:
    """A round may overshoot a stop token or the budget: cut after the first stop / at the budget."""
    tokens = tokens[:max_new_tokens]
    for i, token in enumerate(tokens):
        if token in stops:
            return tokens[: i + 1]
    return tokens
